"""bench.py compares equal computations, and runs end to end (timings are never asserted)."""
import json

import pytest
import torch

import bench
import model as M
import run as R
from conftest import training_args


@pytest.fixture(scope="module")
def small():
    """The CPU preset cut to one layer each, with its real 151,936-token vocabulary."""
    preset = bench.PRESETS["cpu"]
    policy, reference, processor = bench.build_models(preset, 1, 1, torch.device("cpu"), "fp32")
    prompts = bench.make_prompts(preset, 2, "cpu")
    return preset, policy, reference, processor, prompts


def test_naive_and_shared_prefix_paths_give_the_same_logprobs(small):
    _, policy, _, processor, prompts = small
    G = 3
    completions = M.sample_groups(policy, processor, prompts, G, 5, 1.0, seeds=[0, 1]).completion_ids
    assert completions.shape == (6, 5)
    assert not torch.isin(completions, torch.tensor(processor.blocked_ids)).any()
    with torch.no_grad():
        for b in range(2):
            one = M.slice_prompts(prompts, b, b + 1)
            ours = M.completion_logprobs(policy, one, completions[b * G:(b + 1) * G], G)
            naive = bench.naive_logprobs(policy, one, completions[b * G:(b + 1) * G], G)
            torch.testing.assert_close(ours, naive, rtol=0, atol=1e-4)


def test_naive_rollout_repeats_each_prompt_and_image(small):
    _, policy, _, processor, prompts = small
    repeated = bench.repeat_prompts(prompts, 3)
    patches = prompts.image_grid_thw.prod(1).tolist()
    first, second = prompts.pixel_values.split(patches)
    assert torch.equal(repeated.pixel_values, torch.cat([first] * 3 + [second] * 3))
    assert torch.equal(repeated.input_ids[3], prompts.input_ids[1])
    out = bench.naive_rollout(policy, processor, prompts, 3, 4)
    assert out.shape == (6, 4) and not (out == processor.end_id).any()  # forced length


def test_slice_prompts_keeps_each_rows_inputs(small):
    *_, prompts = small
    one = M.slice_prompts(prompts, 1, 2)
    real = prompts.attention_mask[1].bool()
    assert torch.equal(one.input_ids[0], prompts.input_ids[1, real])
    assert torch.equal(one.position_ids[:, 0], prompts.position_ids[:, 1, real])
    assert torch.equal(one.pixel_values, prompts.pixel_values.split(prompts.image_grid_thw.prod(1).tolist())[1])


def test_bench_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    records = bench.main(["--preset", "cpu", "--layers", "1", "--vision-layers", "1", "--configs", "2x4",
                          "--groups", "1", "--repeats", "1", "--precision", "bf16",
                          "--precision-rollout", "2x3", "--lora-rank", "4", "--compile-rollouts", "",
                          "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(records))
    record = saved[0]
    assert record["G"] == 2 and record["completion_tokens"] == 4
    for path in ("naive", "ours"):
        assert record[path]["total_s"] == pytest.approx(sum(
            record[path][f"{k}_s"] for k in ("rollout", "reference", "policy", "optimizer")))
        assert record[path]["imagenet_minutes"] == pytest.approx(40_000 * record[path]["total_s"] / 60)
    assert record["ratio"]["total"] == pytest.approx(record["naive"]["total_s"] / record["ours"]["total_s"])
    assert record["precision"] == "bf16"
    rollout = saved[-2]["rollout_seconds"]
    assert set(rollout) == {"fp32", "bf16", "bf16_recast_per_step"} and min(rollout.values()) > 0
    lora = saved[-1]
    assert lora["full"]["total_s"] == record["ours"]["total_s"] and lora["lora"]["total_s"] > 0
    assert 0 < lora["lora"]["peak_gb"]


def test_bf16_bench_models_are_fp32_masters_and_a_bf16_reference():
    policy, reference, _ = bench.build_models(bench.PRESETS["cpu"], 1, 1, torch.device("cpu"), "bf16")
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    assert {p.dtype for p in reference.parameters()} == {torch.bfloat16}


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a tied weight counts once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


@pytest.mark.parametrize("preset, precision, lora_rank", [
    ("tiny", "fp32", 0), ("tiny", "bf16", 0), ("tiny", "bf16", 8), ("tiny", "fp32", 8),
    ("cpu", "bf16", 0), ("cpu", "bf16", 8)])
def test_memory_budget_counts_what_the_real_tensors_hold(preset, precision, lora_rank):
    """What bench.memory_budget computes from shapes against the storage of real tensors, set up
    as run.start_run, run.prepare_training and train_grpo.load_reference set them up, after an
    AdamW step (its moments exist from then on)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def build(dtype):
        if preset == "tiny":
            return M.load_model("tiny", dtype=dtype)[0]
        from transformers import Qwen2VLForConditionalGeneration
        return Qwen2VLForConditionalGeneration._from_config(bench.qwen2_vl_config(bench.PRESETS["cpu"]), dtype=dtype)
    model = build(dtype if lora_rank else torch.float32)
    if lora_rank:
        M.add_adapters(model, lora_rank, 2 * lora_rank, seed=0)
    args = training_args(lr=1e-3, precision=precision, lora_rank=lora_rank)
    _, optimizer = R.prepare_training(args, R.Run(0, 1, torch.device("cpu")), model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    with R.compute_context(model, precision):
        working = [p for p in model.parameters() if not isinstance(p, torch.nn.Parameter)]
        working_bytes = storage_bytes(working)
    reference = [] if lora_rank else list(build(dtype).parameters())  # load_reference's weights
    real = {"weights": storage_bytes(model.parameters()), "gradients": storage_bytes(p.grad for p in trainable),
            "adamw": storage_bytes(t for state in optimizer.state.values() for k, t in state.items() if k != "step"),
            "reference": storage_bytes(reference), "working copy": working_bytes}
    budget = bench.memory_budget(model, precision=precision)
    assert {k: budget[k] for k in real} == real
    assert budget["activations"] > 0
