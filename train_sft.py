"""Supervised fine-tuning: the paper's SFT baseline, and the run machinery train_grpo.py shares.

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

The second half of this file is shared with train_grpo.py: distributed set-up, the
world-size-independent data stream, checkpoints, metrics and the optimizer step.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data as D
import model as M

SFT_TARGETS = {"no-think": "{label}", "cls-rl": "<answer>{label}</answer>",
               "think-after-answer": "<answer>{label}</answer>", "adaptive": "<answer>{label}</answer>"}


def sft_batch(processor: M.Processor, labels: list[str], method: str, device):
    """Target ids (B, T) and loss mask (B, T) for the answer of each prompt.

    The mask covers the answer tokens and the end token, by position: padding after them
    repeats the pad id, which never enters the loss even when it equals the end id.
    """
    rows = [processor.tokenizer(SFT_TARGETS[method].format(label=label),
                                add_special_tokens=False)["input_ids"] + [processor.end_id]
            for label in labels]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), processor.pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, :len(row)], mask[b, :len(row)] = torch.tensor(row), 1
    return ids.to(device), mask.to(device)


def fit(args, run: M.Run, model, processor, train_data, test_data=None, start_step=0,
        optimizer=None, log_name="metrics.jsonl", eval_every=0, checkpoints=True):
    """The SFT training core: returns the trained model. train_grpo.py calls it (without
    checkpoints) for its warm start. One step = `grad_accum` micro-batches of `batch_size`
    prompts per rank."""
    scorer, optimizer = make_trainable(model, args, run, optimizer)
    total = total_steps(args, len(train_data.examples), run.world_size)
    bar = tqdm(total=total, initial=start_step, desc="sft", disable=not run.is_main, dynamic_ncols=True)
    for step in range(start_step, total):
        t0 = time.perf_counter()
        batch = load_step_examples(run, args, train_data, step)
        loss_sum, tokens = torch.zeros((), device=run.device), 0
        model.train()
        for micro, part in enumerate(batch.micro_batches(args.batch_size)):
            prompts = M.build_prompts(processor, part.images, part.texts, run.device)
            target_ids, target_mask = sft_batch(processor, part.labels, args.method, run.device)
            with sync_gradients(scorer, last=micro == args.grad_accum - 1):
                logprobs = scorer(prompts, target_ids, 1)  # (B, T)
                # mean over each answer's tokens, then over all prompts of the global batch
                loss = -((logprobs * target_mask).sum(1) / target_mask.sum(1)).sum()
                (loss / (args.batch_size * args.grad_accum)).backward()
            loss_sum += loss.detach()
            tokens += int(target_mask.sum())
        grad_norm, skipped = optimizer_step(model, optimizer, args, step, total)
        stats = M.all_reduce_sum(run, {"loss": float(loss_sum), "prompts": len(batch.texts),
                                     "skipped_images": batch.skipped, "answer_tokens": tokens})
        record = dict(step=step + 1, loss=stats["loss"] / stats["prompts"], grad_norm=grad_norm,
                      lr=lr_at(args, step, total), skipped_update=skipped,
                      skipped_images=stats["skipped_images"], answer_tokens=int(stats["answer_tokens"]),
                      seconds=time.perf_counter() - t0, peak_memory_gb=M.peak_memory_gb())
        if eval_every and test_data is not None and ((step + 1) % eval_every == 0 or step + 1 == total):
            record["test_accuracy"] = held_out_accuracy(args, run, model, processor, test_data)
        log_metrics(run, log_name, record)
        bar.update(1), bar.set_postfix(loss=f"{record['loss']:.3f}")
        if save_or_stop(args, run, step + 1, total, model, processor, optimizer, save=checkpoints):
            break
    bar.close()
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run_args(parser, lr=1e-5, epochs_help="training epochs (default 5)")
    args = parser.parse_args(argv)
    args.epochs = args.epochs or 5
    run = init_run(args)
    model, processor, optimizer, start_step = load_policy(args, run)
    train_data, test_data = load_train_test(args)
    M.print0(run, f"SFT on {args.dataset} ({args.setting}, {len(train_data.examples)} training "
                f"examples, {len(train_data.classnames)} classes), {run.world_size} process(es)")
    t0 = time.time()
    model = fit(args, run, model, processor, train_data, test_data, start_step, optimizer,
                eval_every=args.eval_every)
    finish(args, run, model, processor, t0)


# ============================================================================ shared machinery

def add_run_args(parser, lr: float, epochs_help: str):
    """Flags that mean the same thing in train_sft.py and train_grpo.py."""
    a = parser.add_argument
    a("--model", default="Qwen/Qwen2-VL-2B-Instruct",
      help="hub id, local Hugging Face directory, or 'tiny' (random-weight, CPU tests and demo)")
    a("--dataset", default="demo", help=f"one of {', '.join(D.DATASETS)}, or demo")
    a("--data-root", default=None, help="folder holding the datasets in the CoOp layout (see data.py)")
    a("--setting", default="fewshot", choices=["fewshot", "base2new"],
      help="fewshot: all classes; base2new: train on the base half of the classes")
    a("--shots", type=int, default=4, help="training images per class")
    a("--method", default="no-think", choices=list(D.PROMPT_SUFFIX),
      help="prompt (and for GRPO, reward) recipe")
    a("--lr", type=float, default=lr, help="peak learning rate")
    a("--lr-schedule", default="linear", choices=["linear", "constant"],
      help="linear decay to 0 over the run (the authors' trainer default), or constant")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    a("--max-grad-norm", type=float, default=1.0, help="gradient clipping threshold")
    a("--epochs", type=float, default=None, help=epochs_help)
    a("--max-steps", type=int, default=None, help="stop after this many optimizer steps (overrides --epochs)")
    a("--batch-size", type=int, default=1, help="prompts per process per micro-step")
    a("--grad-accum", type=int, default=2, help="micro-steps per optimizer step")
    a("--image-size", type=int, default=384,
      help="images are resized to this square with LANCZOS (384 as the authors ran; the paper says 328)")
    a("--seed", type=int, default=100, help="few-shot choice, candidate lists and sampling (authors: 100)")
    a("--output-dir", default="runs/latest", help="checkpoints, metrics.jsonl and args.json go here")
    a("--resume", default=None, help="checkpoint directory to continue from, or 'latest' in --output-dir")
    a("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    a("--keep-checkpoints", type=int, default=2, help="how many recent checkpoints to keep")
    a("--eval-every", type=int, default=0, help="held-out accuracy every N steps (0: never)")
    a("--eval-limit", type=int, default=None, help="test images used by --eval-every (default: all)")
    a("--eval-batch-size", type=int, default=32, help="prompts per greedy decoding batch in evaluation")
    a("--grad-checkpointing", action="store_true", help="recompute activations in backward to save memory")
    a("--device", default=None, help="cpu or cuda (default: cuda when available)")
    a("--dist-timeout", type=float, default=30, help="minutes a rank waits on the others before failing")


def validate_args(args):
    for flag in ("batch_size", "grad_accum", "image_size", "shots"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.resume and args.resume != "latest" and not os.path.isdir(args.resume):
        raise SystemExit(f"--resume {args.resume}: no such checkpoint directory")


def init_run(args) -> M.Run:
    """Join the job (join_job), make the output dir, save args.json, and turn SIGTERM into a
    save-then-exit request."""
    validate_args(args)
    run = M.join_job(args.device, args.output_dir, args.dist_timeout)
    prepare_output_dir(args, run)
    if run.is_main:
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
    signal.signal(signal.SIGTERM, _on_sigterm)
    return run


def prepare_output_dir(args, run: M.Run):
    """A fresh run starts fresh logs and never mixes into another run's checkpoints. Every rank
    checks (so all of them stop together on a bad directory); rank 0 alone writes."""
    demo = getattr(args, "demo", False)  # the demo's own folder is simply started over
    if not args.resume and not demo and checkpoints(args.output_dir):
        raise SystemExit(f"--output-dir {args.output_dir} already holds checkpoints of another run; "
                         "pass --resume latest to continue it, or choose another --output-dir")
    if run.is_main:
        if demo and not args.resume:
            shutil.rmtree(args.output_dir, ignore_errors=True)
        os.makedirs(args.output_dir, exist_ok=True)
        for name in ("metrics.jsonl", "warm_start.jsonl"):
            if not args.resume and os.path.exists(os.path.join(args.output_dir, name)):
                os.remove(os.path.join(args.output_dir, name))
    M.barrier(run)


_STOP = {"requested": False}


def _on_sigterm(signum, frame):
    _STOP["requested"] = True


def stop_requested(run: M.Run) -> bool:
    """Whether any rank got SIGTERM; all ranks agree, so they save and stop together."""
    flag = torch.tensor(float(_STOP["requested"]), device=run.device)
    if run.world_size > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)


def total_steps(args, num_examples: int, world_size: int) -> int:
    global_batch = world_size * args.batch_size * args.grad_accum
    if args.max_steps:
        return args.max_steps
    return max(1, math.ceil(args.epochs * num_examples / global_batch))


def step_picks(args, num_examples: int, step: int, world_size: int) -> list[tuple[int, int]]:
    """(example index, epoch) of every prompt of optimizer step `step`, for the whole job.

    The training set is read as an endless stream of epochs, each a permutation seeded by
    (seed, epoch); step s takes the next `global batch` items. Nothing depends on the rank, so
    the same seed and global batch give the same prompts whatever the world size.
    """
    global_batch = world_size * args.batch_size * args.grad_accum
    picks = []
    for k in range(step * global_batch, (step + 1) * global_batch):
        epoch, position = divmod(k, num_examples)
        order = list(range(num_examples))
        random.Random(f"{args.seed}:epoch:{epoch}").shuffle(order)
        picks.append((order[position], epoch))
    return picks


@dataclass
class StepExamples:
    """This rank's prompts for one optimizer step, with their images loaded."""
    indices: list[int]
    epochs: list[int]
    images: list
    texts: list[str]
    labels: list[str]
    candidates: list[list[str]]
    skipped: int  # unreadable images replaced by the next readable example

    def micro_batches(self, size: int):
        for s in range(0, len(self.texts), size):
            yield StepExamples(self.indices[s:s + size], self.epochs[s:s + size],
                               self.images[s:s + size], self.texts[s:s + size],
                               self.labels[s:s + size], self.candidates[s:s + size], 0)


def load_step_examples(run: M.Run, args, train_data, step: int) -> StepExamples:
    """This rank's contiguous share of the step's prompts: questions built, images loaded.

    An unreadable image is skipped (and counted) by taking the next example instead, so the
    rank still has a full batch and no other rank waits for it.
    """
    picks = step_picks(args, len(train_data.examples), step, run.world_size)
    share = args.batch_size * args.grad_accum
    out = StepExamples([], [], [], [], [], [], 0)
    for index, epoch in picks[run.rank * share:(run.rank + 1) * share]:
        for attempt in range(len(train_data.examples)):
            i = (index + attempt) % len(train_data.examples)
            try:
                image = D.load_image(train_data.examples[i].image, args.image_size)
                break
            except D.ImageError as error:
                out.skipped += 1
                print(f"[rank {run.rank}] skipping unreadable image: {error}", file=sys.stderr)
        else:
            raise RuntimeError(f"no readable image in the {train_data.dataset} training set")
        text, candidates = D.make_question(train_data, i, args.method, args.seed, epoch)
        out.indices.append(i), out.epochs.append(epoch), out.images.append(image)
        out.texts.append(text), out.labels.append(train_data.examples[i].classname)
        out.candidates.append(candidates)
    return out


def load_train_test(args):
    """Training examples (few-shot, base classes for base2new) and the matching test split."""
    setting = "fewshot" if args.setting == "fewshot" else "base"
    fewshot_file = os.path.join(args.output_dir, "fewshot.json")
    train = D.load_data(args.dataset, args.data_root, setting, "train", args.shots, args.seed,
                        fewshot_file=fewshot_file)
    test = D.load_data(args.dataset, args.data_root, setting, "test")
    return train, test


def load_policy(args, run: M.Run, model_name: str | None = None):
    """The model to train (from --resume when given), its processor, the optimizer state and
    the step to start from."""
    checkpoint = find_checkpoint(args)
    model, processor = M.load_model(checkpoint or model_name or args.model, run.device)
    optimizer, start_step = None, 0
    if checkpoint:
        state = torch.load(os.path.join(checkpoint, "trainer_state.pt"), map_location=run.device,
                           weights_only=False)
        _, optimizer = make_trainable(model, args, run, None, wrap=False)
        optimizer.load_state_dict(state["optimizer"])
        start_step = state["step"]
        restore_rng(os.path.join(checkpoint, f"rng_rank{run.rank}.pt"))
        M.print0(run, f"resumed from {checkpoint} at step {start_step}")
    return model, processor, optimizer, start_step


def make_trainable(model, args, run: M.Run, optimizer, wrap: bool = True):
    """Training mode, optional activation checkpointing, AdamW; wrapped for DDP when distributed.

    Returns (scorer, optimizer): the scorer's forward is model.completion_logprobs as ONE
    module call, which is what DDP needs to sync every gradient, vision tower included.
    """
    model.train()
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if optimizer is None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                                      weight_decay=args.weight_decay,
                                      fused=run.device.type == "cuda")
    if not wrap:
        return None, optimizer
    scorer = M.GroupScorer(model)
    if run.world_size > 1:
        scorer = DDP(scorer, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    return scorer, optimizer


def sync_gradients(scorer, last: bool):
    """DDP averages gradients across ranks only on the last micro-step of an optimizer step;
    the earlier ones just accumulate locally (syncing each would cost a full all-reduce)."""
    return nullcontext() if last or not isinstance(scorer, DDP) else scorer.no_sync()


def lr_at(args, step: int, total: int) -> float:
    return args.lr * (1 - step / total) if args.lr_schedule == "linear" else args.lr


def optimizer_step(model, optimizer, args, step: int, total: int) -> tuple[float, bool]:
    """Clip and step; a non-finite gradient norm skips the update.

    After DDP's all-reduce every rank holds the same gradients, so every rank sees the same
    norm and skips (or not) together. Returns (grad norm, skipped).
    """
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm))
    skipped = not math.isfinite(grad_norm)
    if not skipped:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(args, step, total)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, skipped


def held_out_accuracy(args, run: M.Run, model, processor, test_data) -> float:
    import evaluate  # here, not at the top: evaluate.py imports this file for join_job and M.Run
    return evaluate.accuracy(model, processor, test_data, args.method, rank=run.rank,
                      world_size=run.world_size, batch_size=args.eval_batch_size,
                      max_new_tokens=getattr(args, "max_new_tokens", 64),
                      image_size=args.image_size, seed=args.seed, limit=args.eval_limit)


def log_metrics(run: M.Run, name: str, record: dict):
    """Append one JSON line (rank 0 only)."""
    if run.is_main:
        with open(os.path.join(run.output_dir, name), "a") as f:
            f.write(json.dumps(record) + "\n")


def save_or_stop(args, run: M.Run, step: int, total: int, model, processor, optimizer,
                 save: bool = True) -> bool:
    """After optimizer step `step` (counted from 1): checkpoint when one is due or when any rank
    got SIGTERM, and say whether to stop."""
    stop = stop_requested(run)
    if save and (stop or step == total or (args.save_every and step % args.save_every == 0)):
        save_checkpoint(args, run, step, model, processor, optimizer)
    if stop:
        M.print0(run, f"SIGTERM: {'saved step %d and ' % step if save else ''}stopped; "
                    "continue with --resume latest")
    return stop


def save_checkpoint(args, run: M.Run, step: int, model, processor, optimizer):
    """output_dir/checkpoint-000123/: a Hugging Face model directory plus trainer_state.pt
    (optimizer, step, args) and one RNG file per rank. Written into a temporary directory and
    renamed, so a crash mid-save never leaves a half checkpoint that --resume would pick."""
    path = os.path.join(args.output_dir, f"checkpoint-{step:06d}")
    tmp = path + ".tmp"
    if run.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    M.barrier(run)
    torch.save(rng_state(), os.path.join(tmp, f"rng_rank{run.rank}.pt"))
    if run.is_main:
        M.save_pretrained(model, processor, tmp)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "args": vars(args)},
                   os.path.join(tmp, "trainer_state.pt"))
    M.barrier(run)  # every rank's RNG file is in before the rename
    if run.is_main:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        for name in checkpoints(args.output_dir)[:-args.keep_checkpoints]:
            shutil.rmtree(os.path.join(args.output_dir, name))
    M.barrier(run)


def checkpoints(output_dir: str) -> list[str]:
    """A run's complete checkpoint directories, oldest first (a .tmp one is a save cut short)."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(d for d in os.listdir(output_dir) if d.startswith("checkpoint-") and not d.endswith(".tmp"))


def find_checkpoint(args) -> str | None:
    if not args.resume:
        return None
    if args.resume != "latest":
        return args.resume
    found = checkpoints(args.output_dir)
    if not found:
        raise SystemExit(f"--resume latest: no checkpoint-* directory in {args.output_dir}")
    return os.path.join(args.output_dir, found[-1])


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(path: str):
    if not os.path.isfile(path):  # resumed with more ranks than saved: nothing to restore
        return
    state = torch.load(path, weights_only=False)
    random.setstate(state["python"]), np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def finish(args, run: M.Run, model, processor, t0: float):
    """Point <output-dir>/final at the last checkpoint (unless SIGTERM cut the run short), print
    the training time and leave the process group cleanly."""
    saved = checkpoints(args.output_dir)
    if run.is_main and saved and not _STOP["requested"]:
        link = os.path.join(args.output_dir, "final")
        os.symlink(saved[-1], link + ".tmp")
        os.replace(link + ".tmp", link)  # atomic, also over the link of an earlier run
        M.print0(run, f"final model: {link} -> {saved[-1]}")
    M.print0(run, f"training time: {(time.time() - t0) / 60:.1f} min; outputs in {args.output_dir}")
    if run.world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
