"""Supervised fine-tuning: the paper's SFT baseline, and the run set-up both trainers share.

    python train_sft.py --dataset oxford_pets --data-root ~/data --method no-think
    torchrun --nproc_per_node 8 train_sft.py --dataset oxford_pets --data-root ~/data --method no-think
    python train_sft.py --model tiny --dataset demo --lr 1e-3 --max-steps 60   # CPU, no downloads

The model sees exactly the question GRPO training sees (data.make_question) and is taught the
answer: the bare label for `--method no-think`, `<answer>label</answer>` for the tag-based
prompts (no reasoning text exists to imitate, so SFT teaches the answer and the tags only).
Cross-entropy covers the answer tokens and the end-of-turn token ONLY. The authors' SFT code
also trained on the prompt tokens (its trainer's default); we do not: the prompt is given, and
learning to predict candidate lists is not the task.

Defaults (the paper gives none; these are common for full fine-tuning of a 2B VLM on a few
thousand examples): lr 1e-5 with linear decay, AdamW (0.9, 0.999), no weight decay, gradient
clipping at 1.0, 5 epochs, 16 prompts per optimizer step on 8 GPUs (batch 1 x accumulation 2).

A 7B model's fp32 weights, gradients and AdamW state (16 bytes per parameter) fit no single
80 GB GPU: add `--fsdp` to the torchrun command (with `--model Qwen/Qwen2-VL-7B-Instruct`) to
shard them over the GPUs (torch's FSDP2, model.shard) instead of holding a copy on each (DDP).

How the run runs around the loop (flags, processes, precision, checkpoints, resume) is run.py's;
train_grpo.py runs this file's loop, `fit`, as its warm start.
"""
from __future__ import annotations

import os
import time

import torch
from tqdm import tqdm

from data import PROMPT_SUFFIX, load_step_examples
from model import Processor, build_prompts
from run import (Run, all_reduce, append_jsonl, compute_context, due, finish, load_checkpoint,
                 optimizer_step, peak_memory_gb, prepare_training, print0, save_or_stop, start_run,
                 sync_gradients, total_steps, training_parser)
from evaluate import held_out_accuracy

# The answer SFT teaches: in <answer> tags for every tag-based prompt, bare for no-think.
SFT_TARGETS = {**dict.fromkeys(PROMPT_SUFFIX, "<answer>{label}</answer>"), "no-think": "{label}"}


def sft_batch(processor: Processor, labels: list[str], method: str, device):
    """Target ids (B, T) and loss mask (B, T) for the answer of each prompt.

    The mask covers the answer tokens and the end token, by position: padding after them
    repeats the pad id, which never enters the loss even when it equals the end id.
    """
    rows = [processor.tokenizer(SFT_TARGETS[method].format(label=label),
                                add_special_tokens=False)["input_ids"] + [processor.end_id]
            for label in labels]
    T = max(len(r) for r in rows)
    ids = torch.tensor([row + [processor.pad_id] * (T - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (T - len(row)) for row in rows])
    return ids.to(device), mask.to(device)


def fit(args, run: Run, model, processor, train_data, policy, optimizer, start_step: int = 0,
        test_data=None, warm_start: bool = False) -> None:
    """The SFT loop: `--max-steps` or `--epochs` of it at `--lr`. One step = `--grad-accum`
    micro-batches of `--batch-size` prompts per rank (B and A below). train_grpo.py runs it as
    its warm start (`warm_start`): `--warm-start-steps` at a constant `--warm-start-lr`, logged
    in warm_start.jsonl, checkpoints named warm_start-N and none at the end (GRPO goes on)."""
    total = args.warm_start_steps if warm_start else total_steps(args, len(train_data.examples), run.world_size)
    B, A = args.batch_size, args.grad_accum
    log = os.path.join(args.output_dir, "warm_start.jsonl" if warm_start else "metrics.jsonl")
    if test_data is not None and args.eval_every and start_step == 0:
        held_out_accuracy(args, run, model, processor, test_data, policy, start_log=log)
    bar = tqdm(total=total, initial=start_step, desc="warm start" if warm_start else "sft",
               disable=not run.is_main, dynamic_ncols=True)
    for step in range(start_step, total):
        t0 = time.perf_counter()
        batch = load_step_examples(train_data, step, seed=args.seed, method=args.method,
                                   image_size=args.image_size, rank=run.rank,
                                   world_size=run.world_size, per_rank=B * A)
        loss_sum, tokens = torch.zeros((), device=run.device), 0
        model.train()
        for m in range(A):
            rows = slice(m * B, (m + 1) * B)
            prompts = build_prompts(processor, batch.images[rows], batch.texts[rows], run.device)
            target_ids, target_mask = sft_batch(processor, batch.labels[rows], args.method, run.device)
            with sync_gradients(policy, last=m == A - 1), compute_context(model, args.precision):
                logprobs = policy(prompts, target_ids, 1)  # (B, T)
                # mean over each answer's tokens, then over all prompts of the global batch
                loss = -((logprobs * target_mask).sum(1) / target_mask.sum(1)).sum()
                (loss / (B * A)).backward()
            loss_sum += loss.detach()
            tokens += int(target_mask.sum())
        # linear decay to 0 (the authors'), or constant; a warm start's is constant
        lr = args.lr * (1 - step / total) if args.lr_schedule == "linear" else args.lr
        lr = args.warm_start_lr if warm_start else lr
        grad_norm, skipped = optimizer_step(model, optimizer, lr, args.max_grad_norm)
        totals = all_reduce(run, {"loss": loss_sum, "prompts": len(batch.texts),
                                  "unreadable_images": batch.unreadable, "answer_tokens": tokens})
        record = dict(step=step + 1, loss=totals["loss"] / totals["prompts"], grad_norm=grad_norm,
                      lr=lr, skipped_update=skipped, unreadable_images=totals["unreadable_images"],
                      answer_tokens=int(totals["answer_tokens"]),
                      seconds=time.perf_counter() - t0, peak_memory_gb=peak_memory_gb())
        if test_data is not None and due(args.eval_every, step + 1, total):
            record["test_accuracy"] = held_out_accuracy(args, run, model, processor, test_data, policy)
        if run.is_main:
            append_jsonl(log, [record])
        bar.update(1), bar.set_postfix(loss=f"{record['loss']:.3f}")
        save_or_stop(args, run, step + 1, total, model, processor, optimizer, warm_start)
    bar.close()


def main(argv=None):
    parser = training_parser(__doc__, lr=1e-5, epochs=5, epochs_help="training epochs",
                             max_new_tokens=64, max_new_tokens_help="held-out answer length limit")
    args = parser.parse_args(argv)
    run, checkpoint, train_data, test_data, model, processor = start_run(args, "train_sft.py")
    policy, optimizer = prepare_training(args, run, model)
    start_step = load_checkpoint(checkpoint, run, model, optimizer)["step"] if checkpoint else 0
    print0(run, f"SFT on {args.dataset} ({args.setting}, {len(train_data.examples)} examples, "
                f"{run.world_size} process(es), {args.precision} precision)")
    t0 = time.time()
    fit(args, run, model, processor, train_data, policy, optimizer, start_step, test_data)
    finish(args, run, t0, model)


if __name__ == "__main__":
    main()
