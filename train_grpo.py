"""GRPO from scratch: CLS-RL, No-Thinking-CLS-RL, Think-After-Answer and Adaptive-Thinking.

    python train_grpo.py                       # offline demo: tiny model, demo shapes, CPU, ~30 s
    python train_grpo.py --demo --max-steps 20 # the demo with any of its settings changed
    python train_grpo.py --model Qwen/Qwen2-VL-2B-Instruct --dataset oxford_pets --data-root ~/data
    torchrun --nproc_per_node 8 train_grpo.py --dataset imagenet --data-root ~/data --method no-think
    # 7B: the torchrun line with --fsdp --model Qwen/Qwen2-VL-7B-Instruct added

One optimizer step, top to bottom in `main`: the step's prompts (data.py) -> the rollout, G
sampled completions per prompt, all micro-steps in one batched call (model.sample_groups) ->
rewards (rewards.py, per method) -> group-normalised advantages -> reference log-probs, one
MicroStep per micro-step -> per micro-step: the policy's shared-prefix log-probs, clipped-ratio
loss with a k3 KL penalty, backward (DDP syncs only on the last) -> clip, AdamW, log. How the
run runs around this (processes, precision, DDP / FSDP, checkpoints, resume) is run.py's; with
`--fsdp` (7B: weights, gradients and AdamW state sharded over the GPUs) the same loop runs
unchanged, each rollout gathering the full weights once (run.full_weights).

Shapes: B prompts per micro-step per rank (--batch-size), A micro-steps per optimizer step
(--grad-accum), G completions per prompt (--num-generations), T completion tokens, P prompt
tokens; BG = B*G rows of one micro-step, BAG = B*A*G rows of a rank's rollout. mu
(--num-iterations): updates per rollout.

Defaults are the authors' settings (docs/method.md section 5): G=4, temperature 1, lr 1e-6,
beta 0.04, epsilon 0.2, one update per rollout, per-completion mean loss, batch 1 x accumulation
2 per GPU, seed 100, epochs per dataset, bf16 on GPU (with fp32 master weights, see
`--precision`). Where this departs from their code, and why:
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

import os
import random
import shutil
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from rewards import reward_components, thinks, total_reward
from data import load_step_examples
from model import (GroupScorer, PromptBatch, adapters_off, build_prompts, load_model, merge_adapters,
                   sample_groups, save_pretrained, slice_prompts)
from run import (Run, all_reduce, append_jsonl, barrier, check_flags, checkpoint_dirs,
                 compute_context, due, finish, full_state_dict, full_weights, load_checkpoint,
                 new_optimizer, one_line_errors, optimizer_step, peak_memory_gb, prepare_training,
                 print0, save_or_stop, saved_state, shard, start_run, swapped_weights, sync_gradients,
                 total_steps, training_parser)
from evaluate import held_out_accuracy
from train_sft import fit

# Epochs on 4-shot data, as the authors trained (docs/method.md section 5).
EPOCHS = {"imagenet": 10, "sun397": 25, "eurosat": 100}
DEFAULT_EPOCHS = 50
DEMO_ARGS = ("--model tiny --dataset demo --method no-think --image-size 112 --shots 16 "
             "--warm-start-steps 40 --warm-start-lr 3e-3 --lr 1e-3 --beta 0.04 --num-generations 8 "
             "--batch-size 4 --grad-accum 2 --max-new-tokens 8 --max-steps 100 --eval-every 25 "
             "--output-dir runs/demo --device cpu --demo").split()


def parse_args(argv=None):
    parser = training_parser(__doc__, lr=1e-6, max_new_tokens=1024,
                             max_new_tokens_help="completion length limit (authors: 1024)",
                             epochs_help=f"epochs (default: per dataset {EPOCHS}, others {DEFAULT_EPOCHS})")
    a = parser.add_argument
    a("--num-generations", type=int, default=4, help="G: completions sampled per prompt")
    a("--temperature", type=float, default=1.0, help="sampling temperature of the rollouts")
    a("--top-p", type=float, default=1.0, help="nucleus sampling threshold of the rollouts")
    a("--beta", type=float, default=0.04, help="KL penalty weight; 0 loads no reference model")
    a("--epsilon", type=float, default=0.2, help="PPO clipping range of the probability ratio")
    a("--num-iterations", type=int, default=1, help="updates per rollout (mu); >1: ratio to its logp")
    a("--loss-norm", default="sequence", choices=["sequence", "token"],
      help="sequence: per-completion token mean, then their mean (paper); token: over all tokens")
    a("--warm-start-steps", type=int, default=0, help="SFT steps before GRPO (the demo: so rewards vary)")
    a("--warm-start-lr", type=float, default=1e-5, help="constant learning rate of the warm start "
      "(SFT's default; the demo's random tiny model: 3e-3)")
    a("--demo", action="store_true", help="the offline demo (no arguments); other flags change it")
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or "--demo" in argv:  # the demo's settings first: flags given with it override them
        argv = DEMO_ARGS + argv
    args = parser.parse_args(argv)
    args.epochs = EPOCHS.get(args.dataset, DEFAULT_EPOCHS) if args.epochs is None else args.epochs
    check_flags(args, at_least=dict(num_generations=2, num_iterations=1, beta=0, warm_start_steps=0),
                above=dict(temperature=0, top_p=0, epsilon=0, warm_start_lr=0), at_most=dict(top_p=1))
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
        policy = -min(ratio * adv, clip(ratio, 1 - eps, 1 + eps) * adv)
        kl = exp(ref - logp) - (ref - logp) - 1            (k3: unbiased, always >= 0)
        loss_t = policy + beta * kl
    `sequence` sums each completion's mean token loss, `token` sums all tokens; the caller's
    normaliser turns that sum into the mean over the global batch. Returns (loss, stats), the
    stats summed over this batch's tokens for logging.
    """
    ratio = torch.exp(logprobs - old_logprobs)  # (N, T)
    adv = advantages[:, None]  # (N, 1)
    # min, not max: for adv < 0 this caps how far the update may push the ratio below 1 - eps
    policy = -torch.min(ratio * adv, ratio.clamp(1 - epsilon, 1 + epsilon) * adv)  # (N, T)
    # no reference when beta = 0: delta 0, so kl 0 (and logged as such)
    delta = ref_logprobs - logprobs if beta else torch.zeros_like(logprobs)  # (N, T)
    kl = torch.exp(delta) - delta - 1  # (N, T)
    per_token = policy + beta * kl
    mask = mask.to(per_token.dtype)
    masked = per_token * mask  # (N, T)
    total = (masked.sum(1) / mask.sum(1).clamp(min=1)).sum() if loss_norm == "sequence" else masked.sum()
    clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + epsilon) & (adv > 0))
    with torch.no_grad():
        stats = {"kl_sum": float((kl * mask).sum()), "clipped_tokens": float((clipped * mask).sum()),
                 "tokens": float(mask.sum())}
    return total / normaliser, stats


@dataclass(frozen=True)
class MicroStep:
    """What one micro-step's update needs, fixed at rollout time: B prompts and their B*G
    completions (row b*G + g is sample g of prompt b)."""
    prompts: PromptBatch
    completion_ids: torch.Tensor         # (B*G, T)
    completion_mask: torch.Tensor        # (B*G, T) 1 up to and including the first end token
    advantages: torch.Tensor             # (B*G,)
    ref_logprobs: torch.Tensor | None    # (B*G, T) the frozen reference; None when beta = 0
    old_logprobs: torch.Tensor | None    # (B*G, T) the rollout's policy; None when mu = 1


def rollout_seed(seed: int, step: int, position: int) -> int:
    """The sampling seed of the group at `position` of step `step`'s global batch."""
    return random.Random(f"{seed}:rollout:{step}:{position}").getrandbits(62)


@torch.no_grad()
def micro_steps(args, model, policy, reference, prompts: PromptBatch, rollout, advantages) -> list[MicroStep]:
    """Cut one rollout into A micro-steps, scoring each under the frozen reference (and under
    the policy as it sampled, when the rollout is reused for more than one update, mu > 1)."""
    B, G = args.batch_size, args.num_generations
    steps = []
    for m in range(args.grad_accum):
        micro_prompts = slice_prompts(prompts, m * B, (m + 1) * B)
        rows = slice(m * B * G, (m + 1) * B * G)
        ids = rollout.completion_ids[rows]
        old_logprobs = None
        if args.num_iterations > 1:
            with compute_context(model, args.precision):
                old_logprobs = policy(micro_prompts, ids, G)
        steps.append(MicroStep(micro_prompts, ids, rollout.completion_mask[rows], advantages[rows],
                               ref_logprobs=None if reference is None else reference(micro_prompts, ids, G),
                               old_logprobs=old_logprobs))
    return steps


# ----------------------------------------------------------------------------- the run

def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    run, checkpoint, train_data, test_data, model, processor = start_run(args, "train_grpo.py")
    resuming_grpo = checkpoint is not None and not saved_state(checkpoint)["warm_start"]
    policy, optimizer = prepare_training(args, run, model)
    if args.warm_start_steps and not resuming_grpo:
        warm_start(args, run, model, processor, policy, train_data, test_data, checkpoint)
    # the reference lies beside a GRPO checkpoint; a warm start just run saved it in --output-dir
    reference = load_reference(args, run, model, checkpoint if resuming_grpo else None)
    start_step = load_checkpoint(checkpoint, run, model, optimizer)["step"] if resuming_grpo else 0
    total = total_steps(args, len(train_data.examples), run.world_size)
    B, A, G, mu = args.batch_size, args.grad_accum, args.num_generations, args.num_iterations
    log = os.path.join(args.output_dir, "metrics.jsonl")
    before = None  # the accuracy GRPO starts from: step 0 of the held-out curve
    if (args.demo or args.eval_every) and start_step == 0:
        before = held_out_accuracy(args, run, model, processor, test_data, policy, start_log=log)
    print0(run, f"GRPO ({args.method}) on {args.dataset}: {len(train_data.examples)} training "
                f"examples, {total} steps of {run.world_size * B * A} prompts x {G} completions, "
                f"{args.precision} precision")
    bar = tqdm(total=total, initial=start_step, desc="grpo", disable=not run.is_main, dynamic_ncols=True)

    for step in range(start_step, total):
        times = {"start": timer(run.device)}
        # 1. this rank's prompts of the step and G completions each: ONE sampling call for all
        #    micro-steps, since a wider decode batch is much faster than one prompt at a time
        batch = load_step_examples(train_data, step, seed=args.seed, method=args.method,
                                   image_size=args.image_size, rank=run.rank,
                                   world_size=run.world_size, per_rank=B * A)
        model.eval()  # no dropout, and HF's checkpointing layers would drop the KV cache
        prompts = build_prompts(processor, batch.images, batch.texts, run.device)
        seeds = [rollout_seed(args.seed, step, run.rank * B * A + j) for j in range(B * A)]
        # one region: each weight cast to bf16 once (DDP), or gathered once (FSDP), per rollout
        with torch.no_grad(), full_weights(policy), compute_context(model, args.precision, keep=args.compile):
            rollout = sample_groups(model, processor, prompts, G, args.max_new_tokens,
                                    args.temperature, args.top_p, seeds, compile=args.compile)
        # 2. rewards, and advantages within each group of G completions of one prompt
        labels = [label for label in batch.labels for _ in range(G)]
        components = [reward_components(args.method, text, label)
                      for text, label in zip(rollout.texts, labels)]
        rewards = torch.tensor([total_reward(args.method, c) for c in components])  # (BAG,)
        advantages = group_advantages(rewards.view(B * A, G)).flatten().to(run.device)  # (BAG,)
        times["rollout"] = timer(run.device)
        # 3. per micro-step: its prompts, completions, and the frozen reference's log-probs
        micro = micro_steps(args, model, policy, reference, prompts, rollout, advantages)
        times["reference"] = timer(run.device)
        rollout_stats = rollout_record(args, run, rollout, rewards, components, prompts, batch.unreadable)
        # DDP averages gradients over ranks, so dividing each rank's sum by its own completion
        # count (or by global tokens / world size) makes the update the global-batch mean
        normaliser = B * A * G if args.loss_norm == "sequence" else rollout_stats["completion_tokens"] / run.world_size

        for iteration in range(mu):
            times["policy_start"] = timer(run.device)
            model.train()
            sums = {"loss": 0.0, "kl_sum": 0.0, "clipped_tokens": 0.0, "tokens": 0.0}
            for m, micro_step in enumerate(micro):
                with sync_gradients(policy, last=m == A - 1), compute_context(model, args.precision):
                    logprobs = policy(micro_step.prompts, micro_step.completion_ids, G)  # (BG, T)
                    # one update per rollout: old = current, so the ratio is 1 and the
                    # gradient is that of adv * logp (clipping can only act when mu > 1)
                    old = logprobs.detach() if micro_step.old_logprobs is None else micro_step.old_logprobs
                    loss, stats = grpo_loss(logprobs, old, micro_step.ref_logprobs, micro_step.advantages,
                                            micro_step.completion_mask, beta=args.beta,
                                            epsilon=args.epsilon, loss_norm=args.loss_norm,
                                            normaliser=normaliser)
                    loss.backward()
                for key, value in {"loss": float(loss.detach()), **stats}.items():
                    sums[key] += value
            times["policy"] = timer(run.device)
            # the schedule counts updates: linear decay to 0 (the authors'), or constant
            update, updates = step * mu + iteration, total * mu
            lr = args.lr * (1 - update / updates) if args.lr_schedule == "linear" else args.lr
            grad_norm, skipped = optimizer_step(model, optimizer, lr, args.max_grad_norm)
            times["optimizer"] = timer(run.device)
            if skipped:
                print0(run, f"step {step + 1}: non-finite gradient norm; every rank skipped the update")
            record = update_record(run, step, iteration, rollout_stats, sums, grad_norm, skipped, lr, times)
            if iteration == mu - 1 and due(args.eval_every, step + 1, total):
                record["test_accuracy"] = held_out_accuracy(args, run, model, processor, test_data, policy)
            if run.is_main:
                append_jsonl(log, [record])
        bar.update(1)
        bar.set_postfix(reward=f"{record['reward']:.2f}", length=f"{record['completion_length']:.1f}")
        save_or_stop(args, run, step + 1, total, model, processor, optimizer)
    bar.close()
    if args.demo:
        after = held_out_accuracy(args, run, model, processor, test_data, policy)
        print0(run, "held-out accuracy: " + ("" if before is None else f"{100 * before:.1f}% before "
                    "GRPO, ") + f"{100 * after:.1f}% after")  # before: None on a resume
    print0(run, f"metrics: {log}")
    finish(args, run, t_start, model)


def warm_start(args, run: Run, model, processor, policy, train_data, test_data, checkpoint: str | None):
    """`--warm-start-steps` of SFT (train_sft.fit, constant --warm-start-lr) before GRPO, so a
    model that never names a class (the demo's random one) gets rewards to learn from. Resumes
    from a warm_start-N checkpoint when a signal stopped it there. The result is saved in
    <output-dir>/warm_start: the KL reference of the GRPO that follows, also after a resume.
    It trains through GRPO's `policy` with an AdamW of its own (GRPO starts with fresh moments)."""
    if checkpoint is None and args.demo:
        accuracy = held_out_accuracy(args, run, model, processor, test_data, policy,
                                     start_log=os.path.join(args.output_dir, "warm_start.jsonl"))
        print0(run, f"held-out accuracy of the untrained model: {100 * accuracy:.1f}%")
    print0(run, f"warm start: {args.warm_start_steps} supervised steps (train_sft.fit)")
    optimizer = new_optimizer(model, run, args.warm_start_lr, args.weight_decay)
    start = load_checkpoint(checkpoint, run, model, optimizer)["step"] if checkpoint else 0
    fit(args, run, model, processor, train_data, policy, optimizer, start, warm_start=True)
    if args.lora_rank:  # the trained adapters become part of the base: GRPO's reference
        merge_adapters(model, args.seed + 1)
    weights = full_state_dict(model)  # under FSDP every rank takes part in gathering them
    if run.is_main:
        save_pretrained(model, processor, os.path.join(args.output_dir, "warm_start"), weights)
        for name in checkpoint_dirs(args.output_dir, "warm_start-"):  # done with: GRPO starts
            shutil.rmtree(os.path.join(args.output_dir, name))
    barrier(run)


def load_reference(args, run: Run, model, checkpoint: str | None):
    """The frozen KL reference: (prompts, completion_ids, G) -> (BG, T) log-probs under the
    weights GRPO started from (the warm-started model when there was a warm start, found beside
    the checkpoint on a resume), held in the compute dtype (bf16 under --precision bf16). None
    when beta = 0. It is the policy's own network computing with those frozen weights (no second
    model), so at the start, when the weights are equal, the two compute the same numbers bit
    for bit and the KL is exactly 0 (run.compute_context). Under --fsdp it is a sharded model:
    a bf16 copy on every GPU would take 2 bytes per parameter (16.6 GB for 7B), 1/world_size of
    that when sharded, for one all-gather of it per micro-step: the room 7B on 80 GB GPUs needs."""
    if not args.beta:
        return None
    scorer = GroupScorer(model)
    if args.lora_rank:  # the policy with its adapters off: the base it started from, for free

        def base_logprobs(prompts, completion_ids, group_size):
            with adapters_off(model):
                return scorer(prompts, completion_ids, group_size)
        return base_logprobs
    run_dir = os.path.dirname(checkpoint) if checkpoint else args.output_dir
    source = os.path.join(run_dir, "warm_start") if args.warm_start_steps else args.model
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    with one_line_errors("train_grpo.py"):
        reference = load_model(source, run.device, dtype=dtype)[0].requires_grad_(False)
    if args.fsdp:
        return shard(reference, run, args.precision, frozen=True)
    weights = dict(reference.named_parameters(remove_duplicate=False))

    def reference_logprobs(prompts, completion_ids, group_size):
        with swapped_weights(model, weights):
            return scorer(prompts, completion_ids, group_size)
    return reference_logprobs


def rollout_record(args, run: Run, rollout, rewards, components, prompts, unreadable: int) -> dict:
    """The rollout's numbers over the whole global batch (all ranks), reduced once per step:
    rates are fractions of completions (or of groups), lengths in tokens."""
    lengths = rollout.completion_mask.sum(1).float()  # (BAG,)
    group_rewards = rewards.view(-1, args.num_generations)  # (BA, G)
    totals = all_reduce(run, {
        "reward": rewards.sum(), "completions": len(rewards),
        **{f"reward_{name}": sum(c[name] for c in components) for name in components[0]},
        "thinking": sum(thinks(text) for text in rollout.texts), "tokens": lengths.sum(),
        "prompt_tokens": prompts.attention_mask.sum(), "groups": len(group_rewards),
        "zero_spread": (group_rewards.std(1) == 0).sum(), "unreadable": unreadable})
    extremes = all_reduce(run, {"max": lengths.max(), "-min": -lengths.min()}, op=dist.ReduceOp.MAX)
    n = totals["completions"]
    return {"reward": totals["reward"] / n, **{k: totals[k] / n for k in totals if k.startswith("reward_")},
            "think_share": totals["thinking"] / n, "completion_length": totals["tokens"] / n,
            "completion_length_min": -extremes["-min"], "completion_length_max": extremes["max"],
            "zero_spread_share": totals["zero_spread"] / totals["groups"],
            "unreadable_images": int(totals["unreadable"]),
            "completion_tokens": totals["tokens"], "prompt_tokens": totals["prompt_tokens"]}


def update_record(run: Run, step: int, iteration: int, rollout_stats: dict, sums: dict,
                  grad_norm: float, skipped: bool, lr: float, times: dict) -> dict:
    """The log record of one update: its step and iteration, the rollout's numbers, and the
    update's over the global batch with where the step's time went (rollout and reference work
    happen once per rollout, in its first iteration)."""
    totals = all_reduce(run, sums)
    tokens = rollout_stats["prompt_tokens"] + rollout_stats["completion_tokens"]
    # each rank's loss is its sum over the normaliser, which makes the mean of the ranks'
    # losses the global batch's mean loss
    return {"step": step + 1, "iteration": iteration, **rollout_stats,
            "loss": totals["loss"] / run.world_size,
            "kl": totals["kl_sum"] / max(totals["tokens"], 1),
            "clip_fraction": totals["clipped_tokens"] / max(totals["tokens"], 1),
            "grad_norm": grad_norm, "lr": lr, "skipped_update": skipped,
            "rollout_seconds": times["rollout"] - times["start"] if iteration == 0 else 0.0,
            "reference_seconds": times["reference"] - times["rollout"] if iteration == 0 else 0.0,
            "policy_seconds": times["policy"] - times["policy_start"],
            "optimizer_seconds": times["optimizer"] - times["policy"],
            "step_seconds": times["optimizer"] - times["start"],
            "tokens_per_second": tokens / (times["optimizer"] - times["start"]),
            "peak_memory_gb": peak_memory_gb()}


def timer(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()  # time the GPU work, not the launch
    return time.perf_counter()


if __name__ == "__main__":
    main()
