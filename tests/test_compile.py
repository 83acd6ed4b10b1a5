"""--compile (model.sample_groups(compile=True): static KV cache, compiled decode step) against
the eager loop, Hugging Face's generate, and whole evaluation and training runs.

Compiling the decode step takes 20-30 s on 2 CPU cores for each shape, and dynamo keeps every
compiled graph for the whole pytest session. So these tests decode a few shapes only, all with a
cache of 128 columns (prompts of 64 to 111 tokens + 12 new ones, rounded up): 3 rows greedy
(also evaluate.py's batches here), 9 rows sampled (also train_grpo.py's rollouts here) and 3
rows greedy in bf16.
"""
import json

import pytest
import torch
from torch._dynamo.utils import counters

import evaluate as E
import model as M
import run as R
import train_grpo as T
from conftest import hf_greedy, make_image
from helpers import FAST, max_difference, metrics, weights

IMAGES = [make_image(0), make_image(1, (84, 56)), make_image(2, (84, 84))]
TEXTS = ["What type of object is in the photo?",
         "What type of object is in the photo?\nPlease choose one from list [ red circle, blue square].",
         "red"]
NEW_TOKENS = 12


def compiled_graphs() -> int:
    """Graphs dynamo has compiled so far in this process."""
    return counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module")
def batch(tiny):
    """3 prompts of different lengths (the longest 75 tokens)."""
    return M.build_prompts(tiny[1], IMAGES, TEXTS)


def test_greedy_equals_the_eager_loop_and_generate(tiny, batch):
    model, processor = tiny
    before = compiled_graphs()
    compiled = M.sample_groups(model, processor, batch, 1, NEW_TOKENS, temperature=0, compile=True)
    assert compiled_graphs() - before <= 1  # the whole decode step is one graph (0: compiled earlier)
    eager = M.sample_groups(model, processor, batch, 1, NEW_TOKENS, temperature=0)
    reference = hf_greedy(model, processor, batch, NEW_TOKENS)
    assert torch.equal(compiled.completion_ids, eager.completion_ids)
    assert torch.equal(compiled.completion_mask, eager.completion_mask) and compiled.texts == eager.texts
    assert torch.equal(compiled.completion_ids, reference)
    assert 0 < int((compiled.completion_ids == processor.end_id).sum()) < 3  # rows end, and do not
    assert len(set(map(tuple, compiled.completion_ids.tolist()))) == 3


def test_sampling_equals_the_eager_loop_for_the_same_seeds(tiny, batch):
    model, processor = tiny
    kwargs = dict(group_size=3, max_new_tokens=NEW_TOKENS, temperature=1.0, seeds=[5, 6, 7])
    compiled = M.sample_groups(model, processor, batch, compile=True, **kwargs)
    eager = M.sample_groups(model, processor, batch, **kwargs)
    assert torch.equal(compiled.completion_ids, eager.completion_ids)
    assert compiled.texts == eager.texts
    again = M.sample_groups(model, processor, batch, compile=True, **{**kwargs, "seeds": [8, 6, 7]})
    assert not torch.equal(again.completion_ids[:3], compiled.completion_ids[:3])  # seeds matter
    assert torch.equal(again.completion_ids[3:], compiled.completion_ids[3:])  # per group


def test_prompt_lengths_compile_once_per_bucket(tiny):
    """Three rollouts whose prompts have three different lengths, all with 12 new tokens under
    128 columns: one compiled graph for all three (none if an earlier test compiled that shape),
    and each time the eager loop's tokens, although the decode cache is reused from rollout to
    rollout."""
    model, processor = tiny
    before, widths = compiled_graphs(), set()
    for words in (1, 8, 20):
        prompts = M.build_prompts(processor, IMAGES, [text + " red" * words for text in TEXTS])
        widths.add(prompts.input_ids.shape[1])
        compiled = M.sample_groups(model, processor, prompts, 1, NEW_TOKENS, 0, compile=True)
        eager = M.sample_groups(model, processor, prompts, 1, NEW_TOKENS, 0)
        assert torch.equal(compiled.completion_ids, eager.completion_ids)
    assert len(widths) == 3 and max(widths) + NEW_TOKENS <= 128
    assert compiled_graphs() - before <= 1


def rounding_gaps(model, processor, prompts, completion_ids):
    """(N, T) how far each greedy token's logit is below the best one, in the eager model's
    logits over the whole sequence (no cache), 0 after a row's end; and the largest |logit|."""
    T = completion_ids.shape[1]
    positions = (prompts.next_position[:, None] + torch.arange(T)).expand(3, -1, -1)  # (3, N, T)
    with torch.no_grad():
        logits = model(input_ids=torch.cat([prompts.input_ids, completion_ids], 1),
                       attention_mask=torch.cat([prompts.attention_mask, torch.ones_like(completion_ids)], 1),
                       position_ids=torch.cat([prompts.position_ids, positions], 2),
                       pixel_values=prompts.pixel_values, image_grid_thw=prompts.image_grid_thw,
                       ).logits[:, -T - 1:-1].float()  # (N, T, V)
    scale = logits.abs().amax()
    logits[..., processor.blocked_ids] = float("-inf")
    chosen = logits.gather(-1, completion_ids[..., None]).squeeze(-1)  # (N, T)
    valid = M.completion_mask(completion_ids, processor.end_id).bool()
    return torch.where(valid, logits.amax(-1) - chosen, 0), scale


def test_bf16_rollouts_compile_once_and_read_the_weights_of_each_rollout(fresh_tiny, batch):
    """--precision bf16 as train_grpo.py runs a --compile rollout (run.compute_context with keep:
    bf16 copies of the fp32 masters, refilled in place, swapped in for the parameters), with an
    update of the masters between two rollouts: the compiled step is not compiled again, the bf16
    weights stay at their addresses (a CUDA graph replays on them), and each greedy token is the
    best one under that rollout's weights up to bf16 rounding (compiled and eager bf16 kernels
    round differently, so their tokens may part where two logits are within rounding)."""
    model, processor = fresh_tiny
    graphs, addresses = [], []
    for rollout in range(2):
        with torch.no_grad(), R.compute_context(model, "bf16", keep=True):
            ids = M.sample_groups(model, processor, batch, 1, NEW_TOKENS, 0, compile=True).completion_ids
            graphs.append(compiled_graphs())
            addresses.append([p.data_ptr() for p in model.parameters()])
            assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
            gaps, scale = rounding_gaps(model, processor, batch, ids)
            assert gaps.max() <= scale * 2 ** -5, rollout  # a few bf16 roundings of the largest logit
        with torch.no_grad():  # "the optimizer step": the masters move
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter) * parameter.std() * 0.3)
    assert graphs[1] == graphs[0]  # no new compilation for the second rollout
    assert addresses[1] == addresses[0]
    with torch.no_grad(), R.compute_context(model, "bf16"):  # stale tokens: far from the best
        gaps, scale = rounding_gaps(model, processor, batch, ids)
        assert gaps.max() > scale * 2 ** -5


@pytest.fixture
def checked_compile(monkeypatch):
    """The sample_groups that evaluate.py and train_grpo.py call, checked: each call with
    compile=True is compared with the eager loop on the same inputs (completion ids equal, shape
    included). Yields the completion lengths of those calls."""
    lengths = []

    def checked(*args, compile=False, **kwargs):
        rollout = M.sample_groups(*args, compile=compile, **kwargs)
        if compile:
            assert torch.equal(rollout.completion_ids, M.sample_groups(*args, **kwargs).completion_ids)
            lengths.append(rollout.completion_ids.shape[1])
        return rollout
    for module in (E, T):
        monkeypatch.setattr(module, "sample_groups", checked)
    return lengths


def test_evaluate_predictions_are_the_same_with_compile(warm_tiny, tmp_path, checked_compile):
    """The fine-tuned model answers in a few tokens, so every row ends before the 12th: the
    compiled loop stops at a later check than the eager one, and trims to the same length."""
    common = ["--model", warm_tiny, "--dataset", "demo", "--image-size", "56", "--limit", "6",
              "--batch-size", "3", "--max-new-tokens", str(NEW_TOKENS), "--device", "cpu"]
    E.main(common + ["--output-dir", str(tmp_path / "eager")])
    assert checked_compile == []
    E.main(common + ["--output-dir", str(tmp_path / "compiled"), "--compile"])
    assert len(checked_compile) == 2 and max(checked_compile) < 8
    eager, compiled = (metrics(tmp_path / name / "demo", "predictions.jsonl") for name in ("eager", "compiled"))
    assert eager == compiled and len(eager) == 6


def test_grpo_resumed_with_compile_makes_the_same_update(warm_tiny, tmp_path, checked_compile):
    """Step 2 of a GRPO run, resumed from step 1 with --compile (a flag a resume may change):
    the same rollouts, rewards and update as the uninterrupted eager run (9 rows: 3 prompts x 3)."""
    common = FAST + ["--model", warm_tiny, "--method", "no-think", "--max-steps", "2", "--batch-size", "1",
                     "--grad-accum", "3", "--num-generations", "3", "--lr", "1e-3", "--shots", "4",
                     "--max-new-tokens", str(NEW_TOKENS), "--save-every", "1"]
    T.main(common + ["--output-dir", str(tmp_path / "eager")])
    T.main(common + ["--output-dir", str(tmp_path / "compiled"), "--compile",
                     "--resume", str(tmp_path / "eager/checkpoint-000001")])
    assert len(checked_compile) == 1  # step 2's rollout
    assert json.loads((tmp_path / "compiled/args.json").read_text())["compile"] is True
    final = weights(tmp_path / "eager/checkpoint-000002")
    assert max_difference(final, weights(tmp_path / "compiled/checkpoint-000002")) == 0
    assert max_difference(final, weights(tmp_path / "eager/checkpoint-000001")) > 1e-4  # it moved
    eager, compiled = metrics(tmp_path / "eager"), metrics(tmp_path / "compiled")
    for key in ("reward", "completion_length", "loss", "kl", "grad_norm"):
        assert compiled[0][key] == eager[1][key], key
