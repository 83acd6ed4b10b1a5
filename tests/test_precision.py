"""--precision bf16 on CPU: the GPU configuration (fp32 master weights, gradients and AdamW state,
bf16 math) really updates the model at the paper's learning rate, where bf16 weights would not."""
import json

import pytest

import torch
from safetensors import safe_open
from torch.utils._python_dispatch import TorchDispatchMode

import model as M
import run as R
import train_grpo as T
from conftest import make_image, never_ending, training_args
from helpers import FAST, ROOT, max_difference, metrics, run_script, weights

TEXTS = ["red circle", "blue square", "green triangle", "yellow star"]  # rewarded: 0 and 2


def fixed_batch(processor, prompts_count: int = 1):
    """`prompts_count` prompts, each with the same 4 completions, the 1st and 3rd rewarded."""
    images = [make_image(3 + i) for i in range(prompts_count)]
    prompts = M.build_prompts(processor, images, ["What type of object is in the photo?"] * prompts_count)
    rows = [processor.tokenizer(t)["input_ids"] + [processor.end_id] for t in TEXTS]
    width = max(map(len, rows))
    ids = torch.tensor([r + [processor.pad_id] * (width - len(r)) for r in rows] * prompts_count)
    advantages = T.group_advantages(torch.tensor([[1.0, 0.0, 1.0, 0.0]] * prompts_count)).flatten()
    return prompts, ids, M.completion_mask(ids, processor.end_id), advantages


def tiny_at_real_scale(dtype):
    """The tiny architecture with weights drawn at the real checkpoints' scale (std 0.02). The
    `tiny` model's wide init (0.2, for varied greedy answers) makes a chaotic network whose
    gradients cancel far more than a real one's, and so magnifies any rounding."""
    from transformers import Qwen2VLForConditionalGeneration
    _, processor = M.load_model("tiny")
    config = M.tiny_config(processor.tokenizer)
    config.initializer_range = config.text_config.initializer_range = 0.02
    config.vision_config.initializer_range = 0.02
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(config).to(dtype), processor


def one_update(model, processor, precision: str, lr: float = 1e-6, prompts_count: int = 1) -> dict:
    """One GRPO optimizer step through the training machinery; the weights before it."""
    prompts, ids, mask, advantages = fixed_batch(processor, prompts_count)
    run = R.Run(0, 1, torch.device("cpu"))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    policy, optimizer = R.prepare_training(training_args(lr=lr), run, model)
    with R.compute_context(model, precision):
        logprobs = policy(prompts, ids, len(TEXTS))
        loss, _ = T.grpo_loss(logprobs, logprobs.detach(), None, advantages, mask, beta=0.0,
                              epsilon=0.2, loss_norm="sequence", normaliser=len(ids))
        loss.backward()
    R.optimizer_step(model, optimizer, lr, max_grad_norm=1.0)
    return before


def update_of(model, before: dict) -> torch.Tensor:
    return torch.cat([(v.float() - before[k].float()).flatten() for k, v in model.state_dict().items()])


def test_bf16_precision_moves_every_weight_at_lr_1e6_like_fp32_and_bf16_weights_do_not():
    fp32, processor = tiny_at_real_scale(torch.float32)
    before = one_update(fp32, processor, "fp32", prompts_count=4)
    fp32_update = update_of(fp32, before)

    mixed, _ = tiny_at_real_scale(torch.float32)
    before = one_update(mixed, processor, "bf16", prompts_count=4)
    mixed_update = update_of(mixed, before)
    assert all(p.dtype == torch.float32 for p in mixed.parameters())  # masters stay fp32
    moved = float((mixed_update != 0).float().mean())
    cosine = float(torch.nn.functional.cosine_similarity(mixed_update, fp32_update, dim=0))
    assert moved >= 0.99, moved
    assert cosine >= 0.99, cosine

    # what the precision fix guards against: AdamW on bf16 weights rounds 1e-6 steps away
    pure, _ = tiny_at_real_scale(torch.bfloat16)
    before = one_update(pure, processor, "bf16", prompts_count=4)
    assert float((update_of(pure, before) != 0).float().mean()) < 0.10


def sequence_logprobs(model, processor) -> torch.Tensor:
    """Log-probability of each whole completion, in fp32 math on the (fp32) weights: fine
    enough to see a 1e-6 update."""
    prompts, ids, mask, _ = fixed_batch(processor)
    with torch.no_grad():
        return (M.completion_logprobs(model, prompts, ids, len(TEXTS)) * mask).sum(1)


def test_one_bf16_update_at_lr_1e6_raises_the_rewarded_completion_and_lowers_the_other():
    model, processor = M.load_model("tiny", dtype=torch.float32)
    start = sequence_logprobs(model, processor)
    one_update(model, processor, "bf16")
    after = sequence_logprobs(model, processor)
    change = after - start
    assert change[0] > 1e-4 and change[2] > 1e-4, change  # rewarded: more likely
    assert change[1] < -1e-4 and change[3] < -1e-4, change  # unrewarded: less likely


class CountWeightCasts(TorchDispatchMode):
    """Counts casts whose source is one of the given tensors (the weights), per weight."""

    def __init__(self, tensors):
        super().__init__()
        self.pointers = {t.data_ptr() for t in tensors}
        self.casts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in self.pointers:
            self.casts[args[0].data_ptr()] = self.casts.get(args[0].data_ptr(), 0) + 1
        return func(*args, **(kwargs or {}))


def test_a_bf16_rollout_casts_each_weight_once_not_once_per_decode_step():
    model, processor = M.load_model("tiny", dtype=torch.float32)
    model.requires_grad_(True)  # a policy being trained
    prompts = M.build_prompts(processor, [make_image(1), make_image(2)], ["red", "a blue square"])
    matrices = [p for p in model.parameters() if p.dim() == 2]
    with CountWeightCasts(matrices) as counter, R.compute_context(model, "bf16"):
        rollout = M.sample_groups(model, never_ending(processor), prompts, 3, 12, 1.0, seeds=[1, 2])
    assert rollout.completion_ids.shape == (6, 12)  # 12 decode steps
    assert counter.casts and max(counter.casts.values()) == 1, max(counter.casts.values())


def test_checkpoint_is_bf16_for_the_hub_and_fp32_for_resume(tmp_path):
    out = tmp_path / "run"
    T.main(FAST + ["--method", "no-think", "--max-steps", "1", "--batch-size", "2",
                   "--num-generations", "2", "--precision", "bf16", "--output-dir", str(out)])
    checkpoint = out / "checkpoint-000001"
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch.bfloat16}
    assert json.loads((checkpoint / "config.json").read_text())["dtype"] == "bfloat16"
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
    masters = state["master_weights"]
    assert all(v.dtype == torch.float32 for v in masters.values() if v.is_floating_point())
    assert any(not torch.equal(v, v.bfloat16().float()) for v in masters.values())  # not re-rounded
    from transformers import AutoModelForImageTextToText
    loaded = AutoModelForImageTextToText.from_pretrained(str(checkpoint))
    assert loaded.dtype == torch.bfloat16


@pytest.mark.parametrize("precision, processes, wrap", [
    ("fp32", 1, []), ("bf16", 1, []), ("bf16", 2, []), ("bf16", 2, ["--fsdp"]),
    ("bf16", 2, ["--lora-rank", "4"])])
def test_at_step_1_the_policy_is_its_reference(precision, processes, wrap, tmp_path):
    """The untrained tiny model never names a class: every reward is 0, every advantage 0, so
    the only gradient is the KL term's, which is 0 exactly when the policy computes what its
    reference computes. Under bf16 both must be the same bf16 computation on the same weights:
    KL exactly 0 and a gradient exactly 0, in one process, under DDP, under FSDP, and with LoRA
    (the reference: the policy with its adapters off)."""
    args = FAST + ["--method", "no-think", "--max-steps", "1", "--batch-size", "2", "--grad-accum",
                   str(3 - processes), "--num-generations", "2", "--max-new-tokens", "4",
                   "--lr", "1e-6", "--precision", precision, "--output-dir", "run"]
    run_script(ROOT / "train_grpo.py", args + wrap, tmp_path, nproc=processes)
    (record,) = metrics(tmp_path / "run")
    assert record["zero_spread_share"] == 1 and record["reward"] == 0  # all advantages 0
    assert record["kl"] == 0 and record["grad_norm"] == 0, record


def test_activation_checkpointing_recomputes_the_same_bf16_forward(fresh_tiny):
    """Checkpointing recomputes each layer's forward during backward, so backward runs inside
    run.compute_context: the recomputation must see the bf16 weights the forward saw."""
    model, processor = fresh_tiny
    prompts, ids, mask, advantages = fixed_batch(processor)
    grads = []
    for checkpointing in (False, True):
        model.train().zero_grad()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with R.compute_context(model, "bf16"):
            logprobs = M.completion_logprobs(model, prompts, ids, len(TEXTS))
            (-(logprobs * mask).sum(1) @ advantages).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().sum() > 0 and torch.equal(grads[0], grads[1])


BF16_RUN = FAST + ["--method", "no-think", "--batch-size", "2", "--num-generations", "4",
                   "--lr", "1e-3", "--shots", "4", "--precision", "bf16"]


def test_bf16_resume_continues_bit_for_bit(tmp_path, warm_tiny):
    common = BF16_RUN + ["--model", warm_tiny, "--max-steps", "4", "--save-every", "2"]
    run_script(ROOT / "train_grpo.py", common + ["--output-dir", "straight"], tmp_path)
    run_script(ROOT / "train_grpo.py", common + ["--output-dir", "resumed",
               "--resume", str(tmp_path / "straight/checkpoint-000002")], tmp_path)
    masters = [torch.load(tmp_path / f"{d}/checkpoint-000004/trainer_state.pt",
                          weights_only=False)["master_weights"] for d in ("straight", "resumed")]
    assert max_difference(*masters) == 0
    assert max_difference(weights(tmp_path / "straight/checkpoint-000004"),
                          weights(tmp_path / "resumed/checkpoint-000004")) == 0
    assert [r["reward"] for r in metrics(tmp_path / "resumed")] == \
        [r["reward"] for r in metrics(tmp_path / "straight")[2:]]


