"""--lora-rank: adapters that start as the base model, gradients equal to those through the
explicitly merged weight, the base model as the KL reference, merged checkpoints, exact resume,
DDP, and a demo that learns."""
import pytest
import torch
from safetensors import safe_open

import model as M
import run as R
import train_grpo as T
from conftest import make_image
from helpers import FAST, ROOT, max_difference, metrics, run_script, weights

GRPO = FAST + ["--method", "no-think", "--batch-size", "2", "--num-generations", "4", "--shots", "4",
               "--lr", "1e-2", "--lora-rank", "4"]


def batch(processor):
    prompts = M.build_prompts(processor, [make_image(1), make_image(2, (84, 56))], ["red", "a blue square"])
    rows = [processor.tokenizer(t)["input_ids"] + [processor.end_id] for t in ("red circle", "blue", "x y z", "a")]
    width = max(map(len, rows))
    ids = torch.tensor([r + [processor.pad_id] * (width - len(r)) for r in rows])  # (BG, T), G = 2
    return prompts, ids, M.completion_mask(ids, processor.end_id)


def test_adapters_start_as_the_base_model_and_only_they_train(any_tiny):
    model, processor = any_tiny
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    prompts, ids, _ = batch(processor)
    with torch.no_grad():
        before = model(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask,
                       pixel_values=prompts.pixel_values, image_grid_thw=prompts.image_grid_thw,
                       mm_token_type_ids=(prompts.input_ids == processor.image_pad_id).long()).logits
    M.add_adapters(model, rank=4, alpha=8, seed=0)
    with torch.no_grad():
        after = model(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask,
                      pixel_values=prompts.pixel_values, image_grid_thw=prompts.image_grid_thw,
                      mm_token_type_ids=(prompts.input_ids == processor.image_pad_id).long()).logits
    assert torch.equal(before, after)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    layers = model.config.text_config.num_hidden_layers
    assert len(trainable) == 2 * 7 * layers and all(".lora_" in name for name in trainable)
    assert all(torch.equal(p, base[name.replace(".base.", ".")]) for name, p in model.named_parameters()
               if ".lora_" not in name)  # wrapped, not changed


def test_adapter_gradients_equal_those_through_the_merged_weight(tiny):
    """Independent reference: the base model computing with W + (alpha / r) B A written out,
    autograd taking the gradient with respect to A and B through that product."""
    _, processor = tiny
    model, _ = M.load_model("tiny")
    M.add_adapters(model, rank=4, alpha=8, seed=0)
    generator = torch.Generator().manual_seed(1)
    for adapter in M.adapters(model):  # B away from 0, or the gradient of A would be 0
        adapter.lora_B.data = torch.randn(adapter.lora_B.shape, generator=generator) * 0.1
    prompts, ids, mask = batch(processor)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    (-(M.completion_logprobs(model, prompts, ids, 2) * mask).sum(1) @ advantages).backward()

    base, _ = M.load_model("tiny")
    leaves, merged = {}, {}
    for name, adapter in ((n, m) for n, m in model.named_modules() if isinstance(m, M.LoRALinear)):
        A, B = (adapter.lora_A.detach().clone().requires_grad_(), adapter.lora_B.detach().clone().requires_grad_())
        leaves[name] = (A, B)
        merged[name + ".weight"] = base.get_parameter(name + ".weight").detach() + adapter.scale * B @ A
    with R.swapped_weights(base, merged):
        (-(M.completion_logprobs(base, prompts, ids, 2) * mask).sum(1) @ advantages).backward()
    for name, adapter in ((n, m) for n, m in model.named_modules() if isinstance(m, M.LoRALinear)):
        for ours, reference in zip((adapter.lora_A.grad, adapter.lora_B.grad), (g.grad for g in leaves[name])):
            assert reference.abs().sum() > 0
            assert float((ours - reference).norm() / reference.norm()) < 1e-4, name


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, warm_tiny):
    """An in-process GRPO run with adapters after a warm start (which trains adapters too, then
    merges them into the base), its model in hand and every reference call seen."""
    tmp = tmp_path_factory.mktemp("lora")
    seen, models = [], []
    start_run, load_reference = T.start_run, T.load_reference

    def keep_model(*args, **kwargs):
        out = start_run(*args, **kwargs)
        models.append(out[4])
        return out

    def watched_reference(*args, **kwargs):
        reference = load_reference(*args, **kwargs)

        def call(prompts, ids, group_size):
            logprobs = reference(prompts, ids, group_size)
            seen.append((prompts, ids, group_size, logprobs))
            return logprobs
        return call
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(T, "start_run", keep_model)
        patch.setattr(T, "load_reference", watched_reference)
        T.main(GRPO + ["--model", warm_tiny, "--max-steps", "3", "--warm-start-steps", "2",
                       "--warm-start-lr", "1e-2", "--output-dir", str(tmp / "run")])
    return tmp, models[0], seen


def test_the_reference_is_the_warm_started_base_at_every_step(lora_run, warm_tiny):
    """With the adapters off the policy is the model GRPO started from: the warm start's
    adapters merged into the base, saved as <output-dir>/warm_start."""
    tmp, model, seen = lora_run
    base, _ = M.load_model(str(tmp / "run/warm_start"))
    assert max_difference(base.state_dict(), weights(warm_tiny)) > 1e-4  # the warm start trained
    assert len(seen) == 3 * 2  # every micro-step of every step
    with torch.no_grad():
        for prompts, ids, group_size, logprobs in seen:
            assert torch.equal(logprobs, M.completion_logprobs(base, prompts, ids, group_size))
    changed = [name for name, p in model.named_parameters() if ".lora_B" in name and p.abs().sum() > 0]
    assert len(changed) == len(M.adapters(model))  # every adapter learned
    assert all(torch.equal(p, base.get_parameter(name.replace(".base.", ".")))
               for name, p in model.named_parameters() if ".lora_" not in name)  # nothing else did
    assert metrics(tmp / "run")[0]["kl"] == 0 and metrics(tmp / "run")[-1]["kl"] > 0


def test_the_checkpoint_holds_the_merged_model(lora_run):
    tmp, model, seen = lora_run
    saved, _ = M.load_model(str(tmp / "run/final"))  # the Hugging Face folder, as evaluate.py reads it
    prompts, ids, group_size, _ = seen[0]
    with torch.no_grad():
        live, loaded = (M.completion_logprobs(m, prompts, ids, group_size) for m in (model, saved))
    # W x + s B (A x) live against (W + s B A) x saved: the same up to fp32 rounding
    assert float((live - loaded).abs().max()) < 1e-4
    masters = torch.load(tmp / "run/final/trainer_state.pt", weights_only=False)["master_weights"]
    assert masters and all(".lora_" in name for name in masters)  # the adapters, for --resume


def test_resume_is_exact_and_two_processes_equal_accumulation(tmp_path, warm_tiny):
    common = GRPO + ["--model", warm_tiny, "--max-steps", "4", "--beta", "0.04", "--lr-schedule", "constant"]
    run_script(ROOT / "train_grpo.py", common + ["--save-every", "2", "--output-dir", "straight"], tmp_path)
    run_script(ROOT / "train_grpo.py", common + ["--output-dir", "resumed", "--resume",
                                                 str(tmp_path / "straight/checkpoint-000002")], tmp_path)
    straight, resumed = (torch.load(tmp_path / f"{d}/checkpoint-000004/trainer_state.pt",
                                    weights_only=False)["master_weights"] for d in ("straight", "resumed"))
    assert max_difference(straight, resumed) == 0
    assert max_difference(weights(tmp_path / "straight/final"), weights(tmp_path / "resumed/final")) == 0
    run_script(ROOT / "train_grpo.py", common + ["--grad-accum", "1", "--max-steps", "2",
                                                 "--output-dir", "two"], tmp_path, nproc=2)
    two, one = (torch.load(tmp_path / f"{d}/checkpoint-000002/trainer_state.pt",
                           weights_only=False)["master_weights"] for d in ("two", "straight"))
    assert max_difference(two, one) < 1e-5
    assert max(float(v.abs().max()) for k, v in one.items() if "lora_B" in k) > 1e-3  # they moved
    for key in ("reward", "kl", "loss", "grad_norm"):
        assert [r[key] for r in metrics(tmp_path / "two")] == pytest.approx(
            [r[key] for r in metrics(tmp_path / "straight")[:2]], rel=1e-4, abs=1e-6), key


def test_under_bf16_the_base_is_frozen_bf16_and_only_the_adapters_have_fp32_state(tmp_path, monkeypatch):
    kept = {}
    prepare_training = T.prepare_training

    def keep(args, run, model):
        kept["model"] = model
        kept["policy"], kept["optimizer"] = prepare_training(args, run, model)
        return kept["policy"], kept["optimizer"]
    monkeypatch.setattr(T, "prepare_training", keep)
    T.main(GRPO + ["--precision", "bf16", "--max-steps", "1", "--output-dir", str(tmp_path / "run")])
    model, optimizer = kept["model"], kept["optimizer"]
    frozen = [p for name, p in model.named_parameters() if ".lora_" not in name]
    assert {p.dtype for p in frozen} == {torch.bfloat16} and not any(p.requires_grad for p in frozen)
    adapters = [p for name, p in model.named_parameters() if ".lora_" in name]
    assert {p.dtype for p in adapters} == {torch.float32}
    optimized = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in optimized} == {id(p) for p in adapters} and len(optimizer.state) == len(adapters)
    state = torch.load(tmp_path / "run/final/trainer_state.pt", weights_only=False)
    assert {v.dtype for v in state["master_weights"].values()} == {torch.float32}
    with safe_open(str(tmp_path / "run/final/model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # merged, for the hub


def test_fsdp_with_lora_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit, match="--fsdp with --lora-rank: not supported"):
        T.main(GRPO + ["--fsdp", "--max-steps", "1", "--output-dir", str(tmp_path / "run")])


def test_the_demo_learns_with_adapters(tmp_path):
    out = run_script(ROOT / "train_grpo.py", ["--demo", "--lora-rank", "8", "--max-steps", "50",
                                              "--eval-every", "25"], tmp_path, timeout=600)
    before, after = (float(x.split("%")[0]) for x in
                     out.split("held-out accuracy: ")[1].split(" before GRPO, "))
    assert after > before
    rewards = [r["reward"] for r in metrics(tmp_path / "runs/demo")[1:]]  # after step 0
    assert sum(rewards[-10:]) > sum(rewards[:10])
