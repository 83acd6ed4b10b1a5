"""GRPO from scratch: CLS-RL, No-Thinking-CLS-RL, Think-After-Answer and Adaptive-Thinking.

    python train_grpo.py                       # offline demo: tiny model, demo shapes, CPU, ~1 min
    python train_grpo.py --model Qwen/Qwen2-VL-2B-Instruct --dataset oxford_pets --data-root ~/data
    torchrun --nproc_per_node 8 train_grpo.py --dataset imagenet --data-root ~/data --method no-think

One optimizer step, top to bottom in `main`: the step's prompts (data.py) -> G sampled
completions per prompt, all micro-steps in one batched call (model.sample_groups) -> rewards
(rewards.py, per method) -> group-normalised advantages -> reference log-probs -> per micro-step:
shared-prefix log-probs, clipped-ratio loss with a k3 KL penalty, backward (DDP syncs only on
the last) -> clip, AdamW, log.

Defaults are the authors' settings (docs/method.md section 5): G=4, temperature 1, lr 1e-6,
beta 0.04, epsilon 0.2, one update per rollout, per-completion mean loss, batch 1 x accumulation
2 per GPU, seed 100, epochs per dataset. Where this departs from their code, and why:
- Prompts are never truncated (their trainer cut prompt ids but generated from uncut ones, so
  prompt text leaked into "completions" of long prompts).
- The prompt and vision tower run once per group, in sampling and in scoring; the numbers are
  those of the naive full-sequence computation (tests/test_model.py), only faster (bench.py).
- Log-probs are those of the policy at temperature 1, as in their trainer (with their
  temperature of 1 the distinction does not arise).
- The same seed and global batch give the same run on any number of GPUs: prompts and each
  group's sampling stream depend on (seed, step, position in the global batch), not the rank.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

import data as D
import model as M
import rewards as R
import train_sft as S

# Epochs on 4-shot data, as the authors trained (docs/method.md section 5).
EPOCHS = {"imagenet": 10, "sun397": 25, "eurosat": 100}
DEFAULT_EPOCHS = 50
DEMO_ARGS = ["--model", "tiny", "--dataset", "demo", "--method", "no-think", "--image-size", "112",
             "--shots", "16", "--warm-start-steps", "40", "--lr", "1e-3", "--beta", "0.04",
             "--num-generations", "8", "--batch-size", "4", "--grad-accum", "2",
             "--max-new-tokens", "8", "--max-steps", "100", "--eval-every", "25",
             "--output-dir", "runs/demo", "--device", "cpu"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    S.add_run_args(parser, lr=1e-6, epochs_help="epochs over the few-shot set (default: the "
                   f"authors' per dataset: {EPOCHS}, others {DEFAULT_EPOCHS})")
    a = parser.add_argument
    a("--num-generations", type=int, default=4, help="G: completions sampled per prompt")
    a("--temperature", type=float, default=1.0, help="sampling temperature of the rollouts")
    a("--top-p", type=float, default=1.0, help="nucleus sampling threshold of the rollouts")
    a("--max-new-tokens", type=int, default=1024, help="completion length limit (authors: 1024)")
    a("--beta", type=float, default=0.04, help="KL penalty weight; 0 loads no reference model")
    a("--epsilon", type=float, default=0.2, help="PPO clipping range of the probability ratio")
    a("--num-iterations", type=int, default=1,
      help="updates per rollout (mu); >1 reuses the rollout with the ratio against its log-probs")
    a("--loss-norm", default="sequence", choices=["sequence", "token"],
      help="sequence: mean over each completion's tokens, then over completions (the paper); "
           "token: mean over all completion tokens of the global batch")
    a("--warm-start-steps", type=int, default=0,
      help="supervised steps (train_sft.fit) before GRPO; the demo uses it so rewards are not all 0")
    a("--warm-start-lr", type=float, default=3e-3, help="constant learning rate of the warm start")
    a("--demo", action="store_true", help="the offline demo (what running with no arguments does)")
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv == ["--demo"]:
        argv = DEMO_ARGS
    args = parser.parse_args(argv)
    args.demo = argv == DEMO_ARGS
    args.epochs = args.epochs or EPOCHS.get(args.dataset, DEFAULT_EPOCHS)
    if args.num_generations < 2:
        parser.error("--num-generations must be at least 2: advantages compare samples of a group")
    return args


# ----------------------------------------------------------------------------- the algorithm

def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(B, G) rewards -> (B, G) advantages: (r - group mean) / (group std + eps), the unbiased
    std of each group, as the authors' trainer computed it. A group whose rewards are all equal
    gets zero advantage: it carries no signal about which completion is better.
    >>> group_advantages(torch.tensor([[1., 0., 0., 1.], [2., 2., 2., 2.]]))
    tensor([[ 0.8659, -0.8659, -0.8659,  0.8659],
            [ 0.0000,  0.0000,  0.0000,  0.0000]])
    """
    return (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + eps)


def grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, *, beta: float,
              epsilon: float, loss_norm: str, normaliser: float):
    """The clipped-ratio policy loss with a k3 KL penalty, summed and divided by `normaliser`.

    logprobs, old_logprobs, ref_logprobs, mask: (N, T); advantages: (N,). Per token:
        ratio = exp(logp - old_logp)
        policy = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)
        kl = exp(ref - logp) - (ref - logp) - 1            (k3: unbiased, always >= 0)
        loss_t = policy + beta * kl
    `sequence` sums each completion's mean token loss, `token` sums all tokens; the caller's
    normaliser turns that sum into the mean over the global batch. Returns (loss, stats), the
    stats summed over this batch's tokens for logging.
    """
    ratio = torch.exp(logprobs - old_logprobs)  # (N, T)
    A = advantages[:, None]  # (N, 1)
    # min, not max: for A < 0 this caps how far the update may push the ratio below 1 - eps
    policy = -torch.min(ratio * A, ratio.clamp(1 - epsilon, 1 + epsilon) * A)  # (N, T)
    per_token = policy
    kl = torch.zeros_like(policy)
    if beta:
        delta = ref_logprobs - logprobs
        kl = torch.exp(delta) - delta - 1  # (N, T)
        per_token = policy + beta * kl
    mask = mask.to(per_token.dtype)
    if loss_norm == "sequence":
        summed = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum()
    else:
        summed = (per_token * mask).sum()
    clipped = ((ratio < 1 - epsilon) & (A < 0)) | ((ratio > 1 + epsilon) & (A > 0))
    with torch.no_grad():
        stats = {"kl_sum": float((kl * mask).sum()), "clipped_tokens": float((clipped * mask).sum()),
                 "tokens": float(mask.sum())}
    return summed / normaliser, stats


@dataclass
class Rollouts:
    """One optimizer step's rollouts on this rank, everything the update needs, in B*A groups."""
    prompts: list[M.PromptBatch]      # one per micro-step, `batch_size` prompts each
    completion_ids: torch.Tensor      # (B*A*G, T)
    completion_mask: torch.Tensor     # (B*A*G, T)
    advantages: torch.Tensor          # (B*A*G,)
    ref_logprobs: list                # per micro-step (B*G, T), or None when beta = 0
    old_logprobs: list                # per micro-step (B*G, T), or None when num_iterations = 1


def rollout_seed(seed: int, step: int, position: int) -> int:
    """The sampling seed of the group at `position` of step `step`'s global batch."""
    return random.Random(f"{seed}:rollout:{step}:{position}").getrandbits(62)


def timer(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()  # time the GPU work, not the launch
    return time.perf_counter()


def main(argv=None):
    args = parse_args(argv)
    run = S.init_run(args)
    t_start = time.time()
    train_data, test_data = S.load_train_test(args)
    model, processor, optimizer, start_step = S.load_policy(args, run)
    # after a warm start, GRPO's reference is the warm-started model, saved in the run's folder
    checkpoint = S.find_checkpoint(args)
    warm_start_dir = os.path.join(os.path.dirname(checkpoint) if checkpoint else args.output_dir,
                                  "warm_start")
    if args.warm_start_steps and start_step == 0:
        M.print0(run, f"held-out accuracy of the untrained model: "
                      f"{S.held_out_accuracy(args, run, model, processor, test_data):.1f}%")
        M.print0(run, f"warm start: {args.warm_start_steps} supervised steps (train_sft.fit)")
        warm = argparse.Namespace(**{**vars(args), "max_steps": args.warm_start_steps,
                                     "lr": args.warm_start_lr, "lr_schedule": "constant"})
        S.fit(warm, run, model, processor, train_data, log_name="warm_start.jsonl", checkpoints=False)
        if run.is_main:  # the reference of the GRPO that follows, also after a resume
            M.save_pretrained(model, processor, warm_start_dir)
        M.barrier(run)
    reference = None
    if args.beta:  # the weights GRPO started from, frozen, also on resume
        reference, _ = M.load_model(warm_start_dir if args.warm_start_steps else args.model, run.device)
        reference.requires_grad_(False)
    scorer, optimizer = S.make_trainable(model, args, run, optimizer)
    total = S.total_steps(args, len(train_data.examples), run.world_size)
    G, A, mu = args.num_generations, args.grad_accum, args.num_iterations
    B = args.batch_size
    accuracy_before = S.held_out_accuracy(args, run, model, processor, test_data) if args.demo else None
    if args.demo:
        M.print0(run, f"held-out accuracy before GRPO: {accuracy_before:.1f}%")
    M.print0(run, f"GRPO ({args.method}) on {args.dataset}: {len(train_data.examples)} training "
                  f"examples, {total} steps of {run.world_size * B * A} prompts x {G} completions")
    bar = tqdm(total=total, initial=start_step, desc="grpo", disable=not run.is_main, dynamic_ncols=True)

    for step in range(start_step, total):
        times = {"start": timer(run.device)}
        # 1. this rank's prompts of the step and G completions each: ONE sampling call for all
        #    micro-steps, since a wider decode batch is much faster than one prompt at a time
        batch = S.load_step_examples(run, args, train_data, step)
        model.eval()  # no dropout, and HF's checkpointing layers would drop the KV cache
        prompts = M.build_prompts(processor, batch.images, batch.texts, run.device)
        seeds = [rollout_seed(args.seed, step, run.rank * B * A + j) for j in range(B * A)]
        rollout = M.sample_groups(model, processor, prompts, G, args.max_new_tokens,
                                  args.temperature, args.top_p, seeds)
        # 2. rewards, and advantages within each group of G completions of one prompt
        labels = [label for label in batch.labels for _ in range(G)]
        components = [R.reward_components(args.method, text, label)
                      for text, label in zip(rollout.texts, labels)]
        rewards = torch.tensor([R.total_reward(args.method, c) for c in components])  # (BAG,)
        group_rewards = rewards.view(B * A, G)
        advantages = group_advantages(group_rewards).flatten().to(run.device)  # (BAG,)
        times["rollout"] = timer(run.device)
        # 3. per micro-step: its prompts, completions, and the frozen reference's log-probs
        micro = [dict(prompts=M.slice_prompts(prompts, m * B, (m + 1) * B),
                      ids=rollout.completion_ids[m * B * G:(m + 1) * B * G],
                      mask=rollout.completion_mask[m * B * G:(m + 1) * B * G],
                      advantages=advantages[m * B * G:(m + 1) * B * G]) for m in range(A)]
        with torch.no_grad():
            for part in micro:
                part["ref"] = None if reference is None else \
                    M.completion_logprobs(reference, part["prompts"], part["ids"], G)
                # the rollout-time policy, which the ratio of later iterations compares with
                part["old"] = M.completion_logprobs(model, part["prompts"], part["ids"], G) \
                    if mu > 1 else None
        times["reference"] = timer(run.device)
        tokens = M.all_reduce_sum(run, {"tokens": rollout.completion_mask.sum()})["tokens"]
        # DDP averages gradients over ranks, so dividing each rank's sum by its own completion
        # count (or by global tokens / world size) makes the update the global-batch mean
        normaliser = B * A * G if args.loss_norm == "sequence" else tokens / run.world_size

        for iteration in range(mu):
            times["policy_start"] = timer(run.device)
            model.train()
            sums = {"loss": 0.0, "kl_sum": 0.0, "clipped_tokens": 0.0, "tokens": 0.0}
            for m, part in enumerate(micro):
                with S.sync_gradients(scorer, last=m == A - 1):
                    logprobs = scorer(part["prompts"], part["ids"], G)  # (BG, T)
                    # one update per rollout: old = current, so the ratio is 1 and the
                    # gradient is that of A * logp (clipping can only act when mu > 1)
                    old = part["old"] if mu > 1 else logprobs.detach()
                    loss, stats = grpo_loss(logprobs, old, part["ref"], part["advantages"],
                                            part["mask"], beta=args.beta, epsilon=args.epsilon,
                                            loss_norm=args.loss_norm, normaliser=normaliser)
                    loss.backward()
                for key, value in {"loss": float(loss.detach()), **stats}.items():
                    sums[key] += value
            times["policy"] = timer(run.device)
            update = step * mu + iteration
            grad_norm, skipped = S.optimizer_step(model, optimizer, args, update, total * mu)
            times["optimizer"] = timer(run.device)
            if skipped:
                M.print0(run, f"step {step + 1}: non-finite gradient norm; every rank skipped the update")
            record = step_record(args, run, step, iteration, sums, rewards, components, rollout,
                                 prompts, group_rewards, batch.skipped, grad_norm, skipped,
                                 S.lr_at(args, update, total * mu), times)
            if args.eval_every and iteration == mu - 1 and \
                    ((step + 1) % args.eval_every == 0 or step + 1 == total):
                record["test_accuracy"] = S.held_out_accuracy(args, run, model, processor, test_data)
            S.log_metrics(run, "metrics.jsonl", record)
        bar.update(1)
        bar.set_postfix(reward=f"{record['reward']:.2f}", length=f"{record['completion_length']:.1f}")
        if S.save_or_stop(args, run, step + 1, total, model, processor, optimizer):
            break
    bar.close()
    if args.demo:
        after = S.held_out_accuracy(args, run, model, processor, test_data)
        M.print0(run, f"held-out accuracy: {accuracy_before:.1f}% before GRPO, {after:.1f}% after")
    M.print0(run, f"metrics: {args.output_dir}/metrics.jsonl")
    S.finish(args, run, model, processor, t_start)


def step_record(args, run, step, iteration, sums, rewards, components, rollout, prompts,
                group_rewards, skipped_images, grad_norm, skipped, lr, times) -> dict:
    """One metrics.jsonl line: every number is over the whole global batch (all ranks)."""
    lengths = rollout.completion_mask.sum(1).float()  # (BAG,)
    g = M.all_reduce_sum(run, {
        **sums, "reward": rewards.sum(), "completions": len(rewards),
        **{f"reward_{name}": sum(c[name] for c in components) for name in components[0]},
        "thinking": sum(R.thinks(text) for text in rollout.texts), "length": lengths.sum(),
        "prompt_tokens": prompts.attention_mask.sum(), "groups": group_rewards.shape[0],
        "zero_spread_groups": (group_rewards.std(1) == 0).sum(), "skipped_images": skipped_images})
    extremes = torch.stack([lengths.max(), -lengths.min()]).to(run.device)
    if run.world_size > 1:
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    n, first = g["completions"], iteration == 0
    return {
        "step": step + 1, "iteration": iteration,
        "loss": g["loss"] / run.world_size,  # each rank's loss is already over the global batch
        "reward": g["reward"] / n, **{k: g[k] / n for k in g if k.startswith("reward_")},
        "accuracy": g["reward_accuracy"] / n,
        "format_rate": g["reward_format"] / n if "reward_format" in g else None,
        "think_share": g["thinking"] / n,
        "completion_length": g["length"] / n,
        "completion_length_min": -float(extremes[1]), "completion_length_max": float(extremes[0]),
        "kl": g["kl_sum"] / max(g["tokens"], 1), "clip_fraction": g["clipped_tokens"] / max(g["tokens"], 1),
        "zero_spread_groups": g["zero_spread_groups"] / g["groups"],
        "grad_norm": grad_norm, "lr": lr, "skipped_update": skipped, "skipped_images": g["skipped_images"],
        "tokens_per_second": (g["prompt_tokens"] + g["length"]) / (times["optimizer"] - times["start"]),
        # rollout and reference work happen once per rollout, in its first iteration
        "rollout_seconds": times["rollout"] - times["start"] if first else 0.0,
        "reference_seconds": times["reference"] - times["rollout"] if first else 0.0,
        "policy_seconds": times["policy"] - times["policy_start"],
        "optimizer_seconds": times["optimizer"] - times["policy"],
        "peak_memory_gb": M.peak_memory_gb()}


if __name__ == "__main__":
    main()
