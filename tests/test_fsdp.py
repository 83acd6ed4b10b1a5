"""--fsdp (torch's FSDP2) on CPU with gloo: the same weights as DDP and as one process, rollouts
that gather the weights once, exact resume after SIGTERM, checkpoints that load with
from_pretrained and evaluate.py. torchrun also runs this file as a worker (`worker`, at the end)
for the checks that need the sharded model in hand."""
import copy
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.tensor import DTensor
from transformers import AutoModelForImageTextToText

import model as M
import run as R
import train_grpo as T
from conftest import build_tiny_qwen25, make_image, never_ending, training_args
from helpers import FAST, ROOT, env, launch, max_difference, metrics, run_script, weights

GRPO = ROOT / "train_grpo.py"
cosine = torch.nn.functional.cosine_similarity


def masters(checkpoint, tmp_path) -> dict:
    """The fp32 weights a checkpoint resumes from: under --fsdp its sharded/ folder (gathered
    here), else trainer_state.pt's master weights under bf16, else the model directory."""
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
    if "sharded_optimizer" in state:
        dcp_to_torch_save(checkpoint / "sharded", tmp_path / "gathered.pt")
        return torch.load(tmp_path / "gathered.pt", weights_only=False)["model"]
    return state.get("master_weights") or weights(checkpoint)


def update(after: dict, before: dict, names=None) -> torch.Tensor:
    """The change of each weight in `names` (default: those both name; bf16 masters name a tied
    weight once, FSDP's and the model folder under both its names)."""
    names = sorted(after.keys() & before.keys() if names is None else names)
    return torch.cat([(after[k].float() - before[k].float()).flatten() for k in names])


def test_grpo_with_fsdp_equals_ddp_and_one_process_with_accumulation(tmp_path, warm_tiny):
    """fp32, 2 warm-start (SFT) steps then 2 GRPO steps with a sharded KL reference. FSDP's
    gradients are those of DDP bit for bit; only the global gradient norm is summed in another
    order (over shards), ~1e-7 relative. Clipping by it would pass that on, and Adam turns it
    into up to lr-sized differences on the weights whose gradient is pure rounding noise
    (k_proj.bias: softmax ignores a per-query shift, so its true gradient is 0), so clipping is
    kept out of this comparison (--max-grad-norm 100: the norms are ~1); the SFT test below
    compares with clipping acting. --compile is asked for under FSDP: the eager loop runs
    instead, with one note saying so."""
    common = FAST + ["--model", warm_tiny, "--method", "no-think", "--max-steps", "2",
                     "--batch-size", "2", "--num-generations", "4", "--lr", "1e-3", "--beta", "0.04",
                     "--shots", "4", "--warm-start-steps", "2", "--warm-start-lr", "1e-3",
                     "--max-grad-norm", "100", "--precision", "fp32"]
    out = run_script(GRPO, common + ["--grad-accum", "1", "--fsdp", "--output-dir", "fsdp",
                                     "--eval-every", "2", "--eval-limit", "8", "--compile"], tmp_path, nproc=2)
    assert out.count("--compile: not used with --fsdp") == 1  # the eager loop instead, said once
    run_script(GRPO, common + ["--grad-accum", "1", "--output-dir", "ddp"], tmp_path, nproc=2)
    run_script(GRPO, common + ["--grad-accum", "2", "--output-dir", "one"], tmp_path)
    fsdp, ddp, one = (weights(tmp_path / f"{name}/checkpoint-000002") for name in ("fsdp", "ddp", "one"))
    assert max_difference(weights(tmp_path / "fsdp/warm_start"), weights(tmp_path / "ddp/warm_start")) < 1e-5
    assert max_difference(weights(tmp_path / "fsdp/warm_start"), weights(tmp_path / "one/warm_start")) < 1e-5
    assert max_difference(fsdp, ddp) < 1e-5  # measured: 0
    assert max_difference(fsdp, one) < 1e-5  # measured: 4e-7, as DDP vs one process
    assert max_difference(one, weights(tmp_path / "one/warm_start")) > 1e-4  # GRPO moved them
    (start, *a), b, c = metrics(tmp_path / "fsdp"), metrics(tmp_path / "ddp"), metrics(tmp_path / "one")
    assert start["step"] == 0 and "test_accuracy" in start  # --eval-every: the accuracy before GRPO
    assert max(r["zero_spread_share"] for r in c) < 1 and b[-1]["kl"] > 0
    assert max(r["grad_norm"] for r in a + metrics(tmp_path / "fsdp", "warm_start.jsonl")) < 100
    for key in ("reward", "completion_length", "kl", "loss", "grad_norm"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-5, abs=1e-7), key
        assert [r[key] for r in a] == pytest.approx([r[key] for r in c], rel=1e-4, abs=1e-6), key

    # rank 0 wrote a complete Hugging Face directory: transformers loads it (the output layer
    # tied to the embedding, stored once as DDP stores it) and evaluate.py scores it as the run
    # did (the held-out accuracy at step 2 came from the gathered full weights)
    saved = tmp_path / "fsdp/checkpoint-000002"
    loaded = AutoModelForImageTextToText.from_pretrained(saved)
    assert loaded.lm_head.weight is loaded.model.language_model.embed_tokens.weight
    assert max_difference(loaded.state_dict(), ddp) < 1e-5
    run_script(ROOT / "evaluate.py", ["--model", str(saved), "--dataset", "demo", "--image-size", "56",
                                      "--max-new-tokens", "6", "--device", "cpu", "--limit", "8",
                                      "--output-dir", "eval"], tmp_path)
    summary = json.loads((tmp_path / "eval/summary.json").read_text())["datasets"]["demo"]
    assert summary["images"] == 8
    assert summary["accuracy_paper"] / 100 == pytest.approx(a[-1]["test_accuracy"], abs=1e-9)


def test_sft_with_fsdp_equals_ddp_and_one_process_with_accumulation(tmp_path):
    """fp32, with clipping acting (gradient norms ~16 > 1): the global norm over shards is the
    norm DDP sees. At lr 1e-4 what the norm's summation order changes (see above) stays ~1e-7."""
    common = ["--model", "tiny", "--dataset", "demo", "--image-size", "56", "--shots", "2",
              "--device", "cpu", "--max-steps", "2", "--batch-size", "2", "--lr", "1e-4",
              "--precision", "fp32"]
    train_sft = ROOT / "train_sft.py"
    run_script(train_sft, common + ["--grad-accum", "1", "--fsdp", "--output-dir", "fsdp"], tmp_path, nproc=2)
    run_script(train_sft, common + ["--grad-accum", "1", "--output-dir", "ddp"], tmp_path, nproc=2)
    run_script(train_sft, common + ["--grad-accum", "2", "--output-dir", "one"], tmp_path)
    fsdp, ddp, one = (weights(tmp_path / f"{name}/checkpoint-000002") for name in ("fsdp", "ddp", "one"))
    assert max_difference(fsdp, ddp) < 1e-5 and max_difference(fsdp, one) < 1e-5  # measured: 1e-7
    assert max_difference(one, weights("tiny")) > 1e-4  # training moved them
    a, b, c = metrics(tmp_path / "fsdp"), metrics(tmp_path / "ddp"), metrics(tmp_path / "one")
    assert min(r["grad_norm"] for r in a) > 1  # clipping acted
    for key in ("loss", "grad_norm", "answer_tokens"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-5), key
        assert [r[key] for r in a] == pytest.approx([r[key] for r in c], rel=1e-5), key


# ---- bf16: one straight --fsdp run, compared with one process and resumed after a SIGTERM

BF16 = FAST + ["--method", "no-think", "--batch-size", "2", "--num-generations", "4", "--shots", "4",
               "--lr", "1e-6", "--lr-schedule", "constant", "--beta", "0.04", "--precision", "bf16",
               "--fsdp"]


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory, warm_tiny):
    """At the paper's lr 1e-6 (a constant one, so 2 steps of a 4-step run are a 2-step run):
    --fsdp on 2 processes for 4 steps, on 1 process with accumulation 2 for 2 steps, and DDP on
    2 processes for 2 steps."""
    tmp = tmp_path_factory.mktemp("bf16")
    args = BF16 + ["--model", warm_tiny]
    run_script(GRPO, args + ["--grad-accum", "1", "--max-steps", "4", "--save-every", "2",
                             "--output-dir", "straight"], tmp, nproc=2)
    one = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=1", str(GRPO), *args, "--grad-accum", "2", "--max-steps", "2",
                          "--output-dir", "one"], cwd=tmp, env=env(tmp), capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, (one.stdout + one.stderr)[-4000:]
    run_script(GRPO, [a for a in args if a != "--fsdp"] + ["--grad-accum", "1", "--max-steps", "2",
                                                         "--output-dir", "ddp"], tmp, nproc=2)
    return tmp, args


def test_bf16_means_one_computation_under_ddp_and_fsdp(bf16_runs, warm_tiny):
    """--precision bf16 computes the same network whether DDP (fp32 masters cast to bf16 by
    run.compute_context) or FSDP (its MixedPrecisionPolicy) holds the weights: the same rollouts
    and rewards, KL exactly 0 at step 1 (the policy is its reference), and the same update. Only
    the order of the fp32 gradient reduction differs (all-reduce vs reduce-scatter), which Adam's
    normalisation can turn into +-lr on weights whose gradient is rounding noise: cosine, not
    weight-by-weight."""
    tmp, _ = bf16_runs
    start = weights(warm_tiny)
    fsdp, ddp = metrics(tmp / "straight")[:2], metrics(tmp / "ddp")
    for key in ("reward", "completion_length", "zero_spread_share"):
        assert [r[key] for r in fsdp] == [r[key] for r in ddp], key
    assert fsdp[0]["kl"] == ddp[0]["kl"] == 0 and ddp[1]["kl"] > 0
    assert ddp[0]["zero_spread_share"] < 1  # the step had a learning signal
    ddp_masters, fsdp_masters = (masters(tmp / f"{d}/checkpoint-000002", tmp) for d in ("ddp", "straight"))
    names = ddp_masters.keys() & fsdp_masters.keys()
    ddp_update, fsdp_update = (update(m, start, names) for m in (ddp_masters, fsdp_masters))
    assert float(cosine(ddp_update, fsdp_update, 0)) >= 0.999
    # and DDP on 2 processes moves the weights as 1 process with accumulation 2 does (the bf16
    # tolerance of the next test)
    one_update = update(masters(tmp / "one/checkpoint-000002", tmp), start, names)
    assert float(cosine(ddp_update, one_update, 0)) >= 0.95


def test_bf16_fsdp_on_two_processes_moves_fp32_masters_as_on_one(bf16_runs, warm_tiny):
    """bf16 keeps 8 significant bits (~4e-3 relative per rounding), and 1 and 2 processes score
    different shapes (one process pads all its completions to the longest of 4 prompts, rank 1
    to the longest of its 2), so their bf16 gradients differ at that level, not at fp32's 1e-7.
    Adam moves EVERY weight by about lr whatever its gradient's size, so a weight-by-weight
    tolerance says nothing: a weight whose gradient is within bf16 noise of 0 moves by +-1e-6
    either way. What must hold is the direction of the whole update, cosine >= 0.95 (measured:
    1.0000; FSDP's bf16 against autocast's, whose rollouts may differ, is compared on one
    gradient in the worker), and that almost every fp32 master moved (measured: 99.97 %): 1e-6
    steps applied to bf16 weights would round away."""
    tmp, _ = bf16_runs
    start = weights(warm_tiny)
    two, one = (masters(tmp / f"{name}/checkpoint-000002", tmp) for name in ("straight", "one"))
    assert all(v.dtype == torch.float32 for v in two.values())
    assert json.loads((tmp / "straight/checkpoint-000002/config.json").read_text())["dtype"] == "bfloat16"
    two, one = update(two, start), update(one, start)
    a, b = metrics(tmp / "straight")[:2], metrics(tmp / "one")
    # the same rollouts (else the updates would not be comparable at all)
    assert [(r["reward"], r["completion_length"]) for r in a] == [(r["reward"], r["completion_length"]) for r in b]
    assert float((two != 0).float().mean()) >= 0.99
    assert float(two.abs().max()) < 3e-6  # two Adam steps of 1e-6
    assert float(cosine(two, one, 0)) >= 0.95
    assert a[0]["kl"] == 0  # the policy's bf16 math on the bf16 reference's own weights


def test_sigterm_then_resume_under_fsdp_equals_the_uninterrupted_run(bf16_runs):
    """SIGTERM on rank 1 alone during step 3: every rank saves (the sharded fp32 masters and
    AdamW state) and stops; --resume latest then ends bit for bit where the straight run did."""
    tmp, args = bf16_runs
    args = args + ["--grad-accum", "1", "--max-steps", "4", "--save-every", "2"]
    process = launch(ROOT / "tests/signal_on_rank1.py", args + ["--output-dir", "cut"], tmp, nproc=2)
    out, _ = process.communicate(timeout=300)
    assert process.returncode != 0 and "SIGTERM" in out, out[-3000:]
    assert sorted(p.name for p in (tmp / "cut").glob("checkpoint-*")) == ["checkpoint-000002", "checkpoint-000003"]
    assert not (tmp / "cut/final").exists()
    assert [r["step"] for r in metrics(tmp / "cut")] == [1, 2, 3]
    run_script(GRPO, args + ["--output-dir", "cut", "--resume", "latest"], tmp, nproc=2)
    assert (tmp / "cut/final").resolve().name == "checkpoint-000004"
    straight, cut = tmp / "straight/checkpoint-000004", tmp / "cut/checkpoint-000004"
    assert max_difference(masters(cut, tmp), masters(straight, tmp)) == 0
    assert max_difference(weights(cut), weights(straight)) == 0
    assert max_difference(masters(straight, tmp), masters(tmp / "straight/checkpoint-000002", tmp)) > 0
    for key in ("reward", "loss", "kl", "grad_norm"):
        assert [r[key] for r in metrics(tmp / "cut")] == [r[key] for r in metrics(tmp / "straight")], key


def test_fsdp_needs_torchrun_and_a_resume_keeps_it(bf16_runs, tmp_path):
    """The checkpoint formats differ (sharded vs one file), so --fsdp may not change on resume."""
    tmp, args = bf16_runs
    with pytest.raises(SystemExit, match="--fsdp: shards over the processes of a torchrun job"):
        T.main(args + ["--output-dir", str(tmp_path / "alone")])
    with pytest.raises(SystemExit, match="--fsdp was True, now False"):
        T.main([a for a in args if a != "--fsdp"] + ["--grad-accum", "1", "--max-steps", "4",
                                                    "--save-every", "2", "--output-dir", str(tmp_path / "ddp"),
                                                    "--resume", str(tmp / "straight/checkpoint-000002")])


def test_sharded_model_in_hand(tmp_path):
    """What the worker below measured on 2 processes."""
    out = run_script(ROOT / "tests/test_fsdp.py", [], tmp_path, nproc=2)
    results = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    for family in ("qwen2-vl", "qwen2.5-vl"):
        r = results[family]
        # a rollout gathers each unit's weights once, whatever its length: the whole model, once
        assert r["all_gathers"] == [r["units"], r["units"]] and r["units"] == 5, family
        assert r["gathered"][0] == r["gathered"][1] >= r["parameters"], family
        assert r["same_tokens"] and r["sharded_after"], family  # as the unsharded model samples
        assert r["grad_difference"] < 1e-6, family  # measured: 0
        # clipped by the global norm, the same on both ranks and the unsharded model's
        assert r["rank_norms"][0] == r["rank_norms"][1], family
        assert r["rank_norms"][0] == pytest.approx(r["norm"], rel=1e-5), family
        # the clip factors differ as the norms do (~1e-6 relative, the order of the sums)
        assert r["weight_difference"] < 1e-5 * r["largest_update"], family
        assert r["state_dict_difference"] == r["weight_difference"], family  # gathered as they are
        # a NaN on rank 1 alone: every rank skips, no weight changes
        assert r["nan_skipped"] == [True, True] and r["nan_weight_change"] == 0, family
    bf16 = results["bf16"]
    # FSDP's bf16 (weights gathered in bf16, gradients reduced in fp32) against the unsharded
    # model under run.compute_context (bf16 casts of its fp32 weights, what DDP computes), on one
    # step's gradient: one computation, so they agree exactly, where either differs from fp32
    # math by several percent (bf16 keeps 8 significant bits)
    assert bf16["grad_dtype"] == "torch.float32" and bf16["master_dtype"] == "torch.float32"
    assert bf16["error_to_unsharded"] == 0 and bf16["unsharded_error_to_fp32"] >= 1e-2, bf16  # measured: 0, 0.04


def worker():
    """torchrun --nproc_per_node 2 tests/test_fsdp.py: rank 0 prints one JSON line of numbers."""
    run = R.join_job("cpu")
    gathered = []
    for name in ("all_gather_single", "all_gather_into_tensor"):  # count FSDP's all-gathers
        if hasattr(dist, name):
            def counting(output, *args, _original=getattr(dist, name), **kwargs):
                gathered.append(output.numel())
                return _original(output, *args, **kwargs)
            setattr(dist, name, counting)
    results = {}
    for family in ("qwen2-vl", "qwen2.5-vl"):
        model, processor = M.load_model("tiny")
        if family == "qwen2.5-vl":
            model, processor = build_tiny_qwen25(processor)
        plain = copy.deepcopy(model)  # the unsharded twin
        policy, _ = R.prepare_training(training_args(fsdp=True), run, model)
        prompts = M.build_prompts(processor, [make_image(3), make_image(4, (84, 56))],
                                  ["What type of object is in the photo?", "What is it?"])
        r = {"units": sum(isinstance(m, R.FSDPModule) for m in policy.modules()),
             "parameters": sum(p.numel() for p in plain.parameters()), "all_gathers": [], "gathered": []}
        model.eval(), plain.eval()
        for length in (2, 6):
            gathered.clear()
            with R.full_weights(policy):
                sampled = M.sample_groups(model, never_ending(processor), prompts, 2, length, seeds=[1, 2])
            r["all_gathers"].append(len(gathered))
            r["gathered"].append(sum(gathered))
        expected = M.sample_groups(plain, never_ending(processor), prompts, 2, 6, seeds=[1, 2])
        r["same_tokens"] = torch.equal(sampled.completion_ids, expected.completion_ids)
        r["sharded_after"] = all(isinstance(p, DTensor) for p in model.parameters())
        model.train(), plain.train()
        # the same batch on both ranks, so the averaged gradient is the unsharded model's
        ids = sampled.completion_ids
        (-(policy(prompts, ids, 2).sum(1) * ADVANTAGES).sum()).backward()
        (-(M.completion_logprobs(plain, prompts, ids, 2).sum(1) * ADVANTAGES).sum()).backward()
        r["grad_difference"] = max_difference(full(model, "grad"), full(plain, "grad"))
        # SGD with lr 1: the update is the clipped gradient itself; clip to half its norm
        norm = float(torch.nn.utils.get_total_norm([p.grad for p in plain.parameters()]))
        r["norm"], r["largest_update"] = norm, float(max(p.grad.abs().max() for p in plain.parameters())) / 2
        sgd = torch.optim.SGD(model.parameters(), lr=1.0)
        sharded_norm, _ = R.optimizer_step(model, sgd, 1.0, norm / 2)
        R.optimizer_step(plain, torch.optim.SGD(plain.parameters(), lr=1.0), 1.0, norm / 2)
        r["rank_norms"] = [None, None]
        dist.all_gather_object(r["rank_norms"], sharded_norm)
        r["weight_difference"] = max_difference(full(model), full(plain))
        state = R.full_state_dict(model)
        if run.is_main:
            r["state_dict_difference"] = max_difference(state, plain.state_dict())
        # a NaN loss on rank 1 only
        before = full(model)
        loss = -(policy(prompts, ids, 2).sum(1) * ADVANTAGES).sum()
        (loss * (math.nan if run.rank == 1 else 1.0)).backward()
        r["nan_skipped"] = [None, None]
        dist.all_gather_object(r["nan_skipped"], R.optimizer_step(model, sgd, 1.0, 1.0)[1])
        r["nan_weight_change"] = max_difference(full(model), before)
        results[family] = r
    results["bf16"] = bf16_gradients(run, prompts, ids)  # the last batch (the families share a tokenizer)
    if run.is_main:
        print(json.dumps(results), flush=True)
    dist.destroy_process_group()


ADVANTAGES = torch.tensor([1.0, -1.0, 0.5, -0.5])


def full(model, what: str = "weights") -> dict:
    """Every parameter (or its gradient) whole, gathered from the shards under FSDP."""
    tensors = {n: p.grad if what == "grad" else p.detach() for n, p in model.named_parameters()}
    return {n: t.full_tensor() if isinstance(t, DTensor) else t for n, t in tensors.items()}


def bf16_gradients(run, prompts, ids) -> dict:
    """One step's gradient of the tiny Qwen2-VL: sharded under bf16, unsharded under bf16, fp32."""
    model, _ = M.load_model("tiny")
    plain = copy.deepcopy(model).train()
    policy, _ = R.prepare_training(training_args(fsdp=True, precision="bf16"), run, model)
    with R.compute_context(model, "bf16"):
        (-(policy(prompts, ids, 2).sum(1) * ADVANTAGES).sum()).backward()
    sharded = full(model, "grad")
    grads = {}
    for precision in ("bf16", "fp32"):
        with R.compute_context(plain, precision):
            (-(M.completion_logprobs(plain, prompts, ids, 2).sum(1) * ADVANTAGES).sum()).backward()
        grads[precision] = full(plain, "grad")
        plain.zero_grad()
    flat = {name: torch.cat([g[k].flatten() for k in sorted(g)])
            for name, g in (("fsdp", sharded), ("unsharded", grads["bf16"]), ("fp32", grads["fp32"]))}

    def error(a, b):
        return float((flat[a] - flat[b]).norm() / flat[b].norm())
    return {"grad_dtype": str(next(model.parameters()).grad.dtype),
            "master_dtype": str(next(model.parameters()).dtype),
            "error_to_unsharded": error("fsdp", "unsharded"),
            "unsharded_error_to_fp32": error("unsharded", "fp32")}


if __name__ == "__main__":
    sys.exit(worker())
