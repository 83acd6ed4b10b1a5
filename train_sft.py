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

train_grpo.py builds on this file: the same flags (`training_parser`), the same run set-up
(`start_run`: flag checks, output folder, resume checks, signals) and, for its warm start, the
SFT loop itself (`fit`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from data import (DATASETS, PROMPT_SUFFIX, append_jsonl, changed_flags, check_flags, load_data,
                  load_step_examples, one_line_errors, write_atomic)
from evaluate import accuracy
from model import (Processor, Run, all_reduce, barrier, build_prompts, catch_stop_signals,
                   compute_context, full_weights, join_job, load_checkpoint, load_model, optimizer_step,
                   peak_memory_gb, prepare_training, print0, release_stop_signals, save_checkpoint,
                   saved_args, stop_signal, sync_gradients)

# The answer SFT teaches: in <answer> tags for every tag-based prompt, bare for no-think.
SFT_TARGETS = {**dict.fromkeys(PROMPT_SUFFIX, "<answer>{label}</answer>"), "no-think": "{label}"}
# Flags a --resume may change: they decide what is saved, logged or checked, never the weights.
RESUME_MAY_CHANGE = {"resume", "output_dir", "save_every", "keep_checkpoints", "eval_every",
                     "eval_limit", "eval_batch_size", "device", "dist_timeout", "demo"}


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


def fit(args, run: Run, model, processor, train_data, scorer, optimizer, start_step: int = 0,
        test_data=None, prefix: str = "checkpoint-") -> None:
    """The SFT loop, `args.max_steps` or `args.epochs` of it. One step = `grad_accum`
    micro-batches of `batch_size` prompts per rank. train_grpo.py runs it as its warm start
    (prefix warm_start-: checkpoints named so, not saved at the end, log in warm_start.jsonl)."""
    total = total_steps(args, len(train_data.examples), run.world_size)
    B, A = args.batch_size, args.grad_accum
    bar = tqdm(total=total, initial=start_step, desc="sft" if prefix == "checkpoint-" else "warm start",
               disable=not run.is_main, dynamic_ncols=True)
    for step in range(start_step, total):
        t0 = time.perf_counter()
        batch = load_step_examples(train_data, step, seed=args.seed, method=args.method,
                                   image_size=args.image_size, rank=run.rank,
                                   world_size=run.world_size, per_rank=B * A)
        loss_sum, tokens = torch.zeros((), device=run.device), 0
        model.train()
        for m in range(A):
            part = batch.part(m * B, (m + 1) * B)
            prompts = build_prompts(processor, part.images, part.texts, run.device)
            target_ids, target_mask = sft_batch(processor, part.labels, args.method, run.device)
            with sync_gradients(scorer, last=m == A - 1), compute_context(args.precision, run.device):
                logprobs = scorer(prompts, target_ids, 1)  # (B, T)
                # mean over each answer's tokens, then over all prompts of the global batch
                loss = -((logprobs * target_mask).sum(1) / target_mask.sum(1)).sum()
                (loss / (B * A)).backward()
            loss_sum += loss.detach()
            tokens += int(target_mask.sum())
        lr = lr_at(args, step, total)
        grad_norm, skipped = optimizer_step(model, optimizer, lr, args.max_grad_norm)
        stats = all_reduce(run, {"loss": loss_sum, "prompts": len(batch.texts),
                                     "unreadable_images": batch.unreadable, "answer_tokens": tokens})
        record = dict(step=step + 1, loss=stats["loss"] / stats["prompts"], grad_norm=grad_norm,
                      lr=lr, skipped_update=skipped, unreadable_images=stats["unreadable_images"],
                      answer_tokens=int(stats["answer_tokens"]),
                      seconds=time.perf_counter() - t0, peak_memory_gb=peak_memory_gb())
        if test_data is not None and due(args.eval_every, step + 1, total):
            record["test_accuracy"] = held_out_accuracy(args, run, model, processor, test_data, scorer)
        log_metrics(args, run, "metrics.jsonl" if prefix == "checkpoint-" else "warm_start.jsonl", record)
        bar.update(1), bar.set_postfix(loss=f"{record['loss']:.3f}")
        save_or_stop(args, run, step + 1, total, model, processor, optimizer, prefix)
    bar.close()


def main(argv=None):
    parser = training_parser(__doc__, lr=1e-5, epochs=5, epochs_help="training epochs",
                             max_new_tokens=64, max_new_tokens_help="held-out answer length limit")
    args = parser.parse_args(argv)
    run, checkpoint, train_data, test_data, model, processor = start_run(args, "train_sft.py")
    scorer, optimizer = prepare_training(model, run, args.lr, args.weight_decay, args.grad_checkpointing,
                                         args.fsdp, args.precision)
    start_step = load_checkpoint(checkpoint, run, model, optimizer)["step"] if checkpoint else 0
    print0(run, f"SFT on {args.dataset} ({args.setting}, {len(train_data.examples)} examples, "
                f"{run.world_size} process(es), {args.precision} precision)")
    t0 = time.time()
    fit(args, run, model, processor, train_data, scorer, optimizer, start_step, test_data)
    finish(args, run, t0)


# ============================================================================ what every run does

def training_parser(doc: str, lr: float, epochs_help: str, max_new_tokens: int,
                    max_new_tokens_help: str, epochs: float | None = None):
    """The command line of a training script (its docstring `doc`) with the flags that mean the
    same thing in train_sft.py and train_grpo.py (`epochs` None: the script sets the default
    after parsing); train_grpo.py adds its own."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = parser.add_argument
    a("--model", default="Qwen/Qwen2-VL-2B-Instruct", help="hub id, local folder, or 'tiny' (offline)")
    a("--dataset", default="demo", choices=list(DATASETS) + ["demo"], help="training dataset")
    a("--data-root", default=None, help="folder holding the datasets in the CoOp layout (see data.py)")
    a("--setting", default="fewshot", choices=["fewshot", "base2new"], help="base2new: the base half")
    a("--shots", type=int, default=4, help="training images per class")
    a("--method", default="no-think", choices=list(PROMPT_SUFFIX), help="prompt and GRPO reward recipe")
    a("--lr", type=float, default=lr, help="peak learning rate")
    a("--lr-schedule", default="linear", choices=["linear", "constant"], help="linear: to 0 (authors')")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    a("--max-grad-norm", type=float, default=1.0, help="gradient clipping threshold")
    a("--epochs", type=float, default=epochs, help=epochs_help)
    a("--max-steps", type=int, default=None, help="stop after this many optimizer steps (overrides --epochs)")
    a("--batch-size", type=int, default=1, help="prompts per process per micro-step")
    a("--grad-accum", type=int, default=2, help="micro-steps per optimizer step")
    a("--max-new-tokens", type=int, default=max_new_tokens, help=max_new_tokens_help)
    a("--image-size", type=int, default=384, help="square LANCZOS resize (authors: 384; paper: 328)")
    a("--seed", type=int, default=100, help="few-shot choice, candidate lists and sampling (authors: 100)")
    a("--precision", choices=["bf16", "fp32"], help="bf16: fp32 masters, bf16 math (default on GPU)")
    a("--output-dir", default="runs/latest", help="checkpoints, metrics.jsonl and args.json go here")
    a("--resume", default=None, help="checkpoint directory to continue from, or 'latest' in --output-dir")
    a("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    a("--keep-checkpoints", type=int, default=2, help="how many recent checkpoints to keep")
    a("--eval-every", type=int, default=0, help="held-out accuracy every N steps (0: never)")
    a("--eval-limit", type=int, default=None, help="test images used by --eval-every (default: all)")
    a("--eval-batch-size", type=int, default=32, help="prompts per greedy decoding batch in evaluation")
    a("--grad-checkpointing", action="store_true", help="recompute activations in backward to save memory")
    a("--fsdp", action="store_true", help="FSDP2: shard weights, gradients, AdamW state (for 7B)")
    a("--device", default=None, help="cpu or cuda (default: cuda when available)")
    a("--dist-timeout", type=float, default=30, help="minutes a rank waits on the others before failing")
    return parser


def start_run(args, script: str):
    """Everything before training: check the flags, join the job, check the output folder and
    what --resume continues, write args.json and catch stop signals; then load the data and the
    model (from the checkpoint when resuming; fp32, the master weights). Returns (run,
    checkpoint to resume from or None, training data, test data, model, processor)."""
    check_flags(args, above=dict(lr=0, epochs=0, max_grad_norm=0, dist_timeout=0), at_least=dict(
        batch_size=1, grad_accum=1, image_size=1, shots=1, max_steps=1, max_new_tokens=1, save_every=0,
        keep_checkpoints=1, eval_every=0, eval_limit=1, eval_batch_size=1, weight_decay=0))
    if args.fsdp and "RANK" not in os.environ:
        raise SystemExit("--fsdp: shards over the processes of a torchrun job; launch with torchrun "
                         "(--nproc_per_node 1 works too)")
    run = join_job(args.device, args.dist_timeout)
    args.precision = args.precision or ("bf16" if run.device.type == "cuda" else "fp32")
    with one_line_errors(script):
        prepare_output_dir(args, run)
        checkpoint = find_checkpoint(args)
        if checkpoint:
            check_resume(args, checkpoint)
    if run.is_main:  # only now: a refused resume keeps the record of the run it would continue
        write_atomic(os.path.join(args.output_dir, "args.json"), json.dumps(vars(args), indent=2))
    catch_stop_signals()
    with one_line_errors(script):
        train_data, test_data = load_train_test(args)
        model, processor = load_model(checkpoint or args.model, run.device, dtype=torch.float32)
    return run, checkpoint, train_data, test_data, model, processor


def prepare_output_dir(args, run: Run):
    """A fresh run starts fresh logs and never mixes into another run's checkpoints. Every rank
    checks (so all of them stop together on a bad folder); rank 0 alone writes."""
    folder = args.output_dir
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"--output-dir {folder} is a file; expected a folder")
    if not args.resume and not getattr(args, "demo", False) and checkpoint_dirs(folder):
        raise FileExistsError(f"--output-dir {folder} already holds checkpoints of another run; "
                              "pass --resume latest to continue it, or choose another --output-dir")
    if run.is_main:
        if getattr(args, "demo", False) and not args.resume:  # the demo's folder is started over
            shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"--output-dir {folder} is not writable")
        for name in ("metrics.jsonl", "warm_start.jsonl"):
            if not args.resume and os.path.exists(os.path.join(folder, name)):
                os.remove(os.path.join(folder, name))
    barrier(run)


def checkpoint_dirs(output_dir: str, prefix: str = "checkpoint-") -> list[str]:
    """A run's complete checkpoint folders, oldest first (a .tmp one is a save cut short)."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    return sorted(d for d in names if d.startswith(prefix) and not d.endswith(".tmp"))


def find_checkpoint(args) -> str | None:
    """The --resume folder: a path, or with 'latest' the newest checkpoint in --output-dir (a
    GRPO run stopped during its warm start has only warm_start-* ones)."""
    if not args.resume:
        return None
    if args.resume != "latest":
        if not os.path.isfile(os.path.join(args.resume, "trainer_state.pt")):
            raise FileNotFoundError(f"--resume {args.resume}: no trainer_state.pt there; expected a "
                                    "checkpoint-* folder written by train_sft.py or train_grpo.py")
        return args.resume
    found = checkpoint_dirs(args.output_dir) or checkpoint_dirs(args.output_dir, "warm_start-")
    if not found:
        raise FileNotFoundError(f"--resume latest: no checkpoint-* folder in {args.output_dir}")
    return os.path.join(args.output_dir, found[-1])


def check_resume(args, checkpoint: str):
    """A resumed run continues the saved trajectory: any flag that would change it (model,
    data, learning rate, batch, sampling, ...) must be what the checkpoint was trained with."""
    saved = saved_args(checkpoint)
    changed = changed_flags(saved, args, [name for name in vars(args) if name not in RESUME_MAY_CHANGE])
    if changed:
        raise ValueError(f"--resume {checkpoint}: the run would not continue the saved one: "
                         f"{'; '.join(changed)}. Resume with the saved flags (its args.json), or "
                         f"start a new run; only {', '.join(sorted(RESUME_MAY_CHANGE))} may change")


def load_train_test(args):
    """Training examples (few-shot, base classes for base2new) and the matching test split."""
    setting = "fewshot" if args.setting == "fewshot" else "base"
    train = load_data(args.dataset, args.data_root, setting, "train", args.shots, args.seed,
                      fewshot_file=os.path.join(args.output_dir, "fewshot.json"))
    return train, load_data(args.dataset, args.data_root, setting, "test")


def total_steps(args, num_examples: int, world_size: int) -> int:
    """--max-steps (checked to be at least 1), else --epochs over the training set."""
    global_batch = world_size * args.batch_size * args.grad_accum
    return args.max_steps or max(1, math.ceil(args.epochs * num_examples / global_batch))


def lr_at(args, step: int, total: int) -> float:
    return args.lr * (1 - step / total) if args.lr_schedule == "linear" else args.lr


def due(every: int, step: int, total: int) -> bool:
    """Whether step `step` (from 1) is one of every `every`, or the last; never for every = 0."""
    return bool(every) and (step % every == 0 or step == total)


def held_out_accuracy(args, run: Run, model, processor, test_data, scorer=None) -> float:
    """Greedy accuracy on the test split (a fraction), as evaluate.py computes it (under FSDP
    on the model's full weights, gathered once through its `scorer`)."""
    with full_weights(scorer), compute_context(args.precision, run.device):
        return accuracy(model, processor, test_data, args.method, rank=run.rank,
                        world_size=run.world_size, batch_size=args.eval_batch_size,
                        max_new_tokens=args.max_new_tokens, image_size=args.image_size,
                        seed=args.seed, limit=args.eval_limit)


def log_metrics(args, run: Run, name: str, record: dict):
    if run.is_main:
        append_jsonl(os.path.join(args.output_dir, name), [record])


def save_or_stop(args, run: Run, step: int, total: int, model, processor, optimizer,
                 prefix: str = "checkpoint-"):
    """After optimizer step `step` (from 1): checkpoint when one is due (a warm start's last step
    is not: GRPO goes on from it), or when any rank got SIGTERM / SIGINT; then every rank exits
    together, non-zero, so a scheduler sees the job did not finish (and no `final` link points
    at the unfinished run)."""
    signum = stop_signal(run)
    if signum or (prefix == "checkpoint-" and step == total) or due(args.save_every, step, 0):
        path = os.path.join(args.output_dir, f"{prefix}{step:06d}")
        save_checkpoint(path, run, model, processor, optimizer,
                        {"step": step, "args": getattr(args, "run_args", vars(args))}, args.precision)
        if run.is_main:
            for name in checkpoint_dirs(args.output_dir, prefix)[:-args.keep_checkpoints]:
                shutil.rmtree(os.path.join(args.output_dir, name))
    if signum:
        print0(run, f"{signal.Signals(signum).name}: saved {prefix}{step:06d} and stopped; "
                    "continue with --resume latest")
        if run.world_size > 1:
            dist.destroy_process_group()
        raise SystemExit(128 + signum)


def finish(args, run: Run, t0: float):
    """Point <output-dir>/final at the last checkpoint of the finished run, print the training
    time and leave the process group cleanly."""
    saved = checkpoint_dirs(args.output_dir)
    if run.is_main and saved:
        link = os.path.join(args.output_dir, "final")
        if os.path.lexists(link + ".tmp"):  # left by a crash in this very spot
            os.remove(link + ".tmp")
        os.symlink(saved[-1], link + ".tmp")
        os.replace(link + ".tmp", link)  # atomic, also over the link of an earlier run
        print0(run, f"final model: {link} -> {saved[-1]}")
    print0(run, f"training time: {(time.time() - t0) / 60:.1f} min; outputs in {args.output_dir}")
    release_stop_signals()
    if run.world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
