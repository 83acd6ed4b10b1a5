"""train_grpo.py: hand-computed advantages and losses, and whole runs (DDP, resume, faults)."""
import doctest
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import data as D
import model as M
import run as R
import train_grpo as T
from conftest import make_image
from helpers import FAST, ROOT, launch, max_difference, metrics, run_script, weights

e = math.exp


def test_doctests():
    result = doctest.testmod(T)
    assert result.failed == 0 and result.attempted >= 1, result


def test_group_advantages_by_hand():
    rewards = torch.tensor([[2.0, 1.0, 0.0, 1.0],   # mean 1, unbiased std sqrt(2/3)
                            [1.0, 1.0, 1.0, 1.0],   # all equal: no signal
                            [0.0, 0.0, 0.0, 1.0]])  # mean 1/4, unbiased std 1/2
    std = math.sqrt(2 / 3)
    expected = torch.tensor([[1 / (std + 1e-4), 0, -1 / (std + 1e-4), 0],
                             [0, 0, 0, 0],
                             [-0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, 0.75 / 0.5001]])
    torch.testing.assert_close(T.group_advantages(rewards), expected, rtol=0, atol=1e-6)


# Two completions of 3 tokens; the second ends after 2 (its third token is padding).
LOGP = [[-1.0, -2.0, -0.5], [-0.3, -1.2, -2.0]]
OLD = [[-1.2, -1.8, -0.5], [-0.3, -0.7, -2.5]]   # ratios e^.2, e^-.2, 1 | 1, e^-.5, e^.5
REF = [[-1.1, -2.0, -0.4], [-0.3, -1.3, -2.0]]   # ref - logp: -.1, 0, .1 | 0, -.1, 0
ADV, MASK, BETA, EPS = [1.0, -1.0], [[1, 1, 1], [1, 1, 0]], 0.1, 0.2


def k3(d):  # exp(ref - logp) - (ref - logp) - 1
    return e(d) - d - 1


# per-token loss, written out: A=+1 row: -min(r, clip(r)); A=-1 row: max(r, clip(r))
ROW0 = [-1.2 + BETA * k3(-0.1),          # r = e^.2 > 1.2: clipped to 1.2
        -e(-0.2) + BETA * k3(0.0),       # r = e^-.2 inside [0.8, 1.2]
        -1.0 + BETA * k3(0.1)]
ROW1 = [1.0 + BETA * k3(0.0),
        0.8 + BETA * k3(-0.1)]           # r = e^-.5 < 0.8 with A < 0: clipped to 0.8


def loss_inputs():
    logp = torch.tensor(LOGP, dtype=torch.float64, requires_grad=True)
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return logp, t(OLD), t(REF), t(ADV), torch.tensor(MASK)


@pytest.mark.parametrize("loss_norm", ["sequence", "token"])
def test_grpo_loss_by_hand(loss_norm):
    logp, old, ref, adv, mask = loss_inputs()
    normaliser = 2 if loss_norm == "sequence" else 5
    loss, stats = T.grpo_loss(logp, old, ref, adv, mask, beta=BETA, epsilon=EPS,
                              loss_norm=loss_norm, normaliser=normaliser)
    if loss_norm == "sequence":
        expected = (sum(ROW0) / 3 + sum(ROW1) / 2) / 2
    else:
        expected = (sum(ROW0) + sum(ROW1)) / 5
    assert float(loss.detach()) == pytest.approx(expected, abs=1e-12)
    assert stats["tokens"] == 5 and stats["clipped_tokens"] == 2
    assert stats["kl_sum"] == pytest.approx(2 * k3(-0.1) + k3(0.1), abs=1e-12)

    loss.backward()
    # d/dlogp: policy -r*A unless clipped (then 0); k3 gives beta * (1 - e^(ref - logp))
    row0 = [BETA * (1 - e(-0.1)), -e(-0.2), -1.0 + BETA * (1 - e(0.1))]
    row1 = [1.0, BETA * (1 - e(-0.1)), 0.0]
    if loss_norm == "sequence":
        expected_grad = [[g / 3 / 2 for g in row0], [g / 2 / 2 for g in row1]]
    else:
        expected_grad = [[g / 5 for g in row0], [g / 5 for g in row1]]
    torch.testing.assert_close(logp.grad, torch.tensor(expected_grad, dtype=torch.float64),
                               rtol=0, atol=1e-12)


def test_grpo_loss_without_reference_is_the_policy_term_alone():
    logp, old, _, adv, mask = loss_inputs()
    loss, stats = T.grpo_loss(logp, old, None, adv, mask, beta=0.0, epsilon=EPS,
                              loss_norm="token", normaliser=5)
    expected = (-1.2 - e(-0.2) - 1.0 + 1.0 + 0.8) / 5
    assert float(loss.detach()) == pytest.approx(expected, abs=1e-12) and stats["kl_sum"] == 0


def test_one_update_raises_the_rewarded_completion_and_lowers_the_other(fresh_tiny):
    model, processor = fresh_tiny
    prompts = M.build_prompts(processor, [make_image(3)], ["What type of object is in the photo?"])
    texts = ["red circle", "blue square"]
    rows = [processor.tokenizer(t)["input_ids"] + [processor.end_id] for t in texts]
    T_ = max(map(len, rows))
    ids = torch.tensor([r + [processor.pad_id] * (T_ - len(r)) for r in rows])
    mask = M.completion_mask(ids, processor.end_id)
    advantages = T.group_advantages(torch.tensor([[1.0, 0.0]])).flatten()

    def sequence_logprobs():
        with torch.no_grad():
            return (M.completion_logprobs(model, prompts, ids, 2) * mask).sum(1)

    before = sequence_logprobs()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    logp = M.completion_logprobs(model, prompts, ids, 2)
    loss, _ = T.grpo_loss(logp, logp.detach(), None, advantages, mask, beta=0.0, epsilon=0.2,
                          loss_norm="sequence", normaliser=2)
    loss.backward()
    optimizer.step()
    after = sequence_logprobs()
    assert after[0] > before[0] + 1e-3 and after[1] < before[1] - 1e-3


def test_rollout_seeds_depend_on_seed_step_and_position_only():
    """Not on the process (string hashing is salted per process), the rank, or any global RNG:
    a fresh interpreter with another hash salt and other global seeds draws the same seeds."""
    here = [T.rollout_seed(100, s, p) for s in range(5) for p in range(5)]
    assert len(set(here)) == 25  # every (step, position) its own stream
    assert T.rollout_seed(101, 3, 4) != T.rollout_seed(100, 3, 4)
    code = ("import random, torch, train_grpo as T; random.seed(7); torch.manual_seed(7); "
            "print([T.rollout_seed(100, s, p) for s in range(5) for p in range(5)])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345", "RANK": "1"}, check=True)
    assert json.loads(out.stdout) == here


@pytest.mark.parametrize("method", ["cls-rl", "no-think", "think-after-answer", "adaptive"])
def test_short_run_of_each_method(method, tmp_path):
    out = tmp_path / "run"
    T.main(FAST + ["--method", method, "--max-steps", "2", "--batch-size", "2",
                   "--num-generations", "3", "--output-dir", str(out), "--lr", "1e-4"])
    records = metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert 0 <= r["reward"] <= (1 if method == "no-think" else 2)
        assert r["reward"] == pytest.approx(r["reward_accuracy"] + (r["reward_format"] or 0)
                                            if method != "no-think" else r["reward_accuracy"])
        assert 1 <= r["completion_length_min"] <= r["completion_length"] <= r["completion_length_max"] <= 6
        assert r["kl"] >= 0 and 0 <= r["clip_fraction"] <= 1 and 0 <= r["zero_spread_share"] <= 1
        assert math.isfinite(r["grad_norm"]) and not r["skipped_update"]
        for key in ("tokens_per_second", "rollout_seconds", "reference_seconds", "policy_seconds",
                    "optimizer_seconds", "peak_memory_gb", "think_share", "lr", "unreadable_images"):
            assert key in r
        assert ("reward_format" in r) == (method != "no-think")
        assert "accuracy" not in r and "format_rate" not in r  # one name per number
    assert records[0]["kl"] == 0  # the first update starts from the reference weights
    assert json.loads((out / "args.json").read_text())["method"] == method
    assert (out / "final").resolve() == (out / "checkpoint-000002").resolve()
    assert M.load_model(str(out / "final"))[0] is not None


def test_rollout_reuse_and_token_normalisation(tmp_path, warm_tiny):
    """--num-iterations 2: two updates per rollout, the second with a ratio away from 1, so the
    clipping can act; --loss-norm token runs the other normalisation end to end."""
    out = tmp_path / "run"
    T.main(FAST + ["--model", warm_tiny, "--method", "no-think", "--max-steps", "2",
                   "--batch-size", "2", "--num-generations", "4", "--lr", "1e-2", "--shots", "4",
                   "--num-iterations", "2", "--epsilon", "0.05", "--loss-norm", "token",
                   "--output-dir", str(out)])
    records = metrics(out)
    assert [(r["step"], r["iteration"]) for r in records] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    first, second = records[0], records[1]
    assert first["clip_fraction"] == 0  # the first update's ratio is exactly 1
    assert second["clip_fraction"] > 0 and second["rollout_seconds"] == 0
    assert first["reward"] == second["reward"]  # the same rollout, scored twice
    assert records[1]["lr"] < records[0]["lr"]  # the schedule counts updates, not rollouts
    assert first["zero_spread_share"] < 1  # that rollout carried a signal


def test_resume_continues_exactly(tmp_path, warm_tiny):
    common = FAST + ["--model", warm_tiny, "--method", "no-think", "--max-steps", "4",
                     "--batch-size", "2", "--num-generations", "3", "--lr", "1e-3", "--save-every", "2"]
    run_script(ROOT / "train_grpo.py", common + ["--output-dir", "straight"], tmp_path)
    run_script(ROOT / "train_grpo.py", common + ["--output-dir", "resumed",
               "--resume", str(tmp_path / "straight/checkpoint-000002")], tmp_path)
    final = weights(tmp_path / "straight/checkpoint-000004")
    assert max_difference(final, weights(tmp_path / "resumed/checkpoint-000004")) == 0
    assert max_difference(final, weights(tmp_path / "straight/checkpoint-000002")) > 1e-4
    straight, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [3, 4]
    for key in ("reward", "loss", "kl", "grad_norm"):
        assert [r[key] for r in resumed] == [r[key] for r in straight[2:]], key
    optimizer = torch.load(tmp_path / "resumed/checkpoint-000004/trainer_state.pt",
                           weights_only=False)["optimizer"]
    assert optimizer["state"][0]["step"] == 4  # AdamW's moments came through the checkpoint


@pytest.mark.parametrize("signum", [signal.SIGINT])
def test_a_signal_saves_stops_non_zero_and_resume_finishes(tmp_path, signum):
    """SIGINT (Ctrl-C) as SIGTERM (preemption, tests/test_hardening.py and test_fsdp.py): save,
    exit non-zero, no `final` link; --resume latest then finishes the same run."""
    args = FAST + ["--method", "no-think", "--max-steps", "40", "--batch-size", "2",
                   "--num-generations", "2", "--output-dir", "run"]
    process = launch(ROOT / "train_grpo.py", args, tmp_path)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "run/metrics.jsonl").exists():
        time.sleep(0.05)
    process.send_signal(signum)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, out[-3000:]
    assert signal.Signals(signum).name in out
    saved = sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*"))
    assert len(saved) == 1 and not saved[0].endswith(".tmp")
    assert not (tmp_path / "run/final").exists()  # a stopped run has no final model yet
    steps = len(metrics(tmp_path / "run"))
    assert saved[0] == f"checkpoint-{steps:06d}" and steps < 40
    run_script(ROOT / "train_grpo.py", args + ["--resume", "latest"], tmp_path)
    assert [r["step"] for r in metrics(tmp_path / "run")] == list(range(1, 41))
    assert (tmp_path / "run/final").resolve().name == "checkpoint-000040"


def test_a_nan_on_one_rank_skips_the_update_on_every_rank(tmp_path, warm_tiny):
    args = FAST + ["--model", warm_tiny, "--method", "no-think", "--max-steps", "2", "--batch-size", "2", "--grad-accum",
                   "1", "--num-generations", "4", "--lr", "1e-3", "--output-dir", "run",
                   "--save-every", "1", "--keep-checkpoints", "5"]
    out = run_script(ROOT / "tests/nan_on_rank1.py", args, tmp_path, nproc=2)
    assert "step 1: non-finite gradient norm; every rank skipped the update" in out
    first, second = metrics(tmp_path / "run")
    assert first["skipped_update"] and not math.isfinite(first["grad_norm"])
    assert not second["skipped_update"] and second["zero_spread_share"] < 1
    after_first = weights(tmp_path / "run/checkpoint-000001")
    assert max_difference(after_first, weights(warm_tiny)) == 0
    assert max_difference(weights(tmp_path / "run/checkpoint-000002"), after_first) > 0


def test_an_unreadable_image_is_skipped_and_counted(tmp_path, monkeypatch):
    monkeypatch.setenv("CLS_RL_CACHE", str(tmp_path / "cache"))  # its own copy, to corrupt
    args = T.parse_args(FAST + ["--output-dir", str(tmp_path / "run"), "--batch-size", "2"])
    train, _ = R.load_train_test(args)
    first_index = D.step_picks(args.seed, len(train.examples), 0, 4)[0][0]
    with open(train.examples[first_index].image, "wb") as f:
        f.write(b"not a png")
    batch = D.load_step_examples(train, 0, seed=args.seed, method=args.method,
                                 image_size=args.image_size, rank=0, world_size=1, per_rank=4)
    assert batch.unreadable == 1 and len(batch.images) == 4
    assert batch.indices[0] == (first_index + 1) % len(train.examples)


def test_step_picks_cover_each_epoch_once_in_a_seeded_order():
    n = 10
    picks = [p for step in range(5) for p in D.step_picks(100, n, step, 4)]  # 20 = 2 epochs
    assert sorted(i for i, epoch in picks if epoch == 0) == list(range(n))
    assert sorted(i for i, epoch in picks if epoch == 1) == list(range(n))
    assert [i for i, _ in picks[:n]] != [i for i, _ in picks[n:]]  # reshuffled per epoch


def test_two_ranks_read_the_global_batch_one_process_reads():
    """World size 2 with half the accumulation: the same prompts, questions and order."""
    train = D.load_data("demo", None, "fewshot", "train", 2, 100)
    settings = dict(seed=100, method="cls-rl", image_size=56)
    one = D.load_step_examples(train, 3, rank=0, world_size=1, per_rank=4, **settings)
    two = [D.load_step_examples(train, 3, rank=r, world_size=2, per_rank=2, **settings) for r in (0, 1)]
    assert two[0].indices + two[1].indices == one.indices
    assert two[0].texts + two[1].texts == one.texts and len(set(one.texts)) == 4


def test_demo_learns(tmp_path):
    """`python train_grpo.py` with no arguments: reward and held-out accuracy go up."""
    out = run_script(ROOT / "train_grpo.py", [], tmp_path, timeout=600)
    before, after = (float(x.split("%")[0]) for x in
                     out.split("held-out accuracy: ")[1].split(" before GRPO, "))
    assert after > before
    before_record, *records = metrics(tmp_path / "runs/demo")
    # the accuracy before GRPO is step 0 of the log (the plot starts there)
    assert before_record == {"step": 0, "test_accuracy": pytest.approx(before / 100, abs=5e-4)}
    untrained = metrics(tmp_path / "runs/demo", "warm_start.jsonl")[0]
    assert untrained["step"] == 0 and f"untrained model: {100 * untrained['test_accuracy']:.1f}%" in out
    rewards = [r["reward"] for r in records]
    quarter = len(rewards) // 4
    assert sum(rewards[-quarter:]) > sum(rewards[:quarter])
    # --eval-every 25: held-out accuracy in the log, the last one the accuracy printed after
    evaluated = [r for r in records if "test_accuracy" in r]
    assert [r["step"] for r in evaluated] == [25, 50, 75, 100]
    assert evaluated[-1]["test_accuracy"] == pytest.approx(after / 100, abs=5e-4)  # a fraction
    assert "metrics: runs/demo/metrics.jsonl" in out
