"""How a training run runs, for both trainers: processes, signals, precision, wrapping, checkpoints.

train_sft.py and train_grpo.py hold the methods; everything they do the same way around their
loops lives here, in the order a run meets it:

- processes: join the torchrun job (NCCL on GPU, gloo on CPU) or run alone; print on rank 0,
  reduce numbers over ranks;
- flags and errors: every flag checked before anything loads, one-line errors for bad input;
- stopping together: SIGTERM / SIGINT on any rank stops every rank at the same step boundary;
- precision (`--precision`): fp32 master weights, bf16 math;
- wrapping: DDP, or FSDP2 with `--fsdp`; which micro-step syncs gradients; the AdamW step;
- checkpoints: written atomically, resumed exactly (weights, optimizer, RNG, step);
- the run itself: the shared training flags, the output folder, what a `--resume` may change,
  when to save, and the `final` link at the end.
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
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from data import DATASETS, PROMPT_SUFFIX, load_data, read_json, write_atomic
from model import GroupScorer, adapters, add_adapters, load_model, merged_state_dict, save_pretrained

# Flags a --resume may change: they decide what is saved, logged or checked, never the weights.
# --compile too: the same tokens, up to floating-point rounding.
RESUME_MAY_CHANGE = {"resume", "output_dir", "save_every", "keep_checkpoints", "eval_every",
                     "eval_limit", "eval_batch_size", "device", "dist_timeout", "demo", "compile"}
# The largest --image-size: the Qwen2-VL and Qwen2.5-VL processors shrink any image of more than
# 12,845,056 pixels (3584 x 3584, their max_pixels: 16384 visual tokens) back under it, so a
# larger resize only costs time and memory (at 100000 px, tens of GB in PIL before any error).
MAX_IMAGE_SIZE = 3584

# ----------------------------------------------------------------------------- processes

@dataclass
class Run:
    """Where this process stands in the job."""
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def join_job(device: str | None, timeout_minutes: float = 30) -> Run:
    """Join the torchrun job if there is one (NCCL on GPU, gloo on CPU), else run alone.
    `device` is the --device flag: cpu, cuda, or None for cuda when available."""
    cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if "RANK" not in os.environ:
        return Run(0, 1, torch.device("cuda" if cuda else "cpu"))
    rank_device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(rank_device)
    # a timeout, so a dead rank makes the others fail instead of waiting forever
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=timeout_minutes))
    return Run(dist.get_rank(), dist.get_world_size(), rank_device)


def print0(run: Run, *args, **kwargs):
    if run.is_main:
        print(*args, **kwargs, flush=True)


def barrier(run: Run):
    if run.world_size > 1:
        dist.barrier()


def leave_job(run: Run):
    """Destroy the process group, after a barrier: under gloo a rank that destroys it right after
    a collective can deadlock (the group's destructor waits, holding Python's lock, for a worker
    thread that needs that lock to free the collective's tensors)."""
    if run.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


def all_reduce(run: Run, values: dict, op=dist.ReduceOp.SUM) -> dict:
    """Each value summed over ranks (or reduced with `op`), in one collective for the whole dict."""
    if run.world_size == 1:
        return {k: float(v) for k, v in values.items()}
    packed = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=run.device)
    dist.all_reduce(packed, op=op)
    return dict(zip(values, packed.tolist()))


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ----------------------------------------------------------------------------- flags and files

def read_jsonl(path: str) -> list[dict]:
    """The records of a JSON-lines file. An incomplete last line (a write cut short by a kill)
    is dropped with a note; a bad line elsewhere is an error naming the file and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found")
    lines = Path(path).read_text().split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        try:
            if line.strip():
                records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number < len(lines):  # a newline after it: not a write cut short
                raise ValueError(f"{path} line {number} is not JSON ({err})") from None
            print(f"{path}: dropped an incomplete last line (an interrupted write)", flush=True)
    return records


def append_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))


def check_flags(args, at_least: dict | None = None, above: dict | None = None,
                at_most: dict | None = None) -> None:
    """Stop with one line naming the flag, its value and what was expected, before anything is
    loaded: every float flag finite, and the given bounds. Flags whose value is None (not given,
    no default) are not checked.
    >>> check_flags(argparse.Namespace(batch_size=0, lr=1e-6), at_least={"batch_size": 1})
    Traceback (most recent call last):
    SystemExit: --batch-size 0: expected at least 1
    """
    for name, value in vars(args).items():  # inf would pass every lower bound
        if isinstance(value, float) and not math.isfinite(value):
            raise SystemExit(f"--{name.replace('_', '-')} {value}: expected a finite number")
    tests = {"at least": float.__ge__, "more than": float.__gt__, "at most": float.__le__}
    for words, bounds in zip(tests, (at_least or {}, above or {}, at_most or {})):
        for name, bound in bounds.items():
            value = getattr(args, name)
            if value is not None and not tests[words](float(value), float(bound)):
                raise SystemExit(f"--{name.replace('_', '-')} {value}: expected {words} {bound}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help (a flag whose default is None says in words what it depends on), and
    the description's lines kept as written."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def changed_flags(saved: dict, args, names) -> list[str]:
    """'--flag was A, now B' for each of `names` whose value in `args` is not the `saved` one."""
    return [f"--{name.replace('_', '-')} was {saved.get(name, 'not set')!r}, now {getattr(args, name)!r}"
            for name in names if name not in saved or saved[name] != getattr(args, name)]


@contextmanager
def one_line_errors(script: str):
    """Bad input met while setting up (a missing file, a malformed split, an unloadable model, an
    unusable output folder) ends the script with its message on one line, not a traceback."""
    try:
        yield
    except (OSError, ValueError) as err:
        raise SystemExit(f"{script}: error: {err}") from None


# ----------------------------------------------------------------------------- stopping together

_SIGNAL = {"number": 0, "handlers": {}}  # the last TERM / INT received (0: none), the old handlers


def catch_stop_signals():
    """SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) no longer kill the process: they
    ask it to stop at the next step boundary, where every rank saves and exits together."""
    _SIGNAL["number"] = 0
    for signum in (signal.SIGTERM, signal.SIGINT):  # the handler only records the signal
        old = signal.signal(signum, lambda number, frame: _SIGNAL.update(number=number))
        _SIGNAL["handlers"].setdefault(signum, old)  # not ours, when a stopped run left it set


def release_stop_signals():
    """The handlers from before catch_stop_signals (a finished run in a longer process), except
    that the default action, killing the process, becomes "ignore": a SIGTERM while a finished
    run's process winds down must not turn it into a failure (exit 143)."""
    for signum, handler in _SIGNAL["handlers"].items():
        signal.signal(signum, signal.SIG_IGN if handler == signal.SIG_DFL else handler)
    _SIGNAL["handlers"].clear()


# ----------------------------------------------------------------------------- precision, wrapping, the optimizer step

@contextmanager
def swapped_weights(model, weights: dict):
    """Inside the block `model` computes with `weights` (parameter name -> tensor) in place of
    those parameters; outside, with its own. Autograd sees through the swap: a weight that is a
    differentiable cast of a parameter passes its gradient on to that parameter. Tied
    parameters (the output layer is the embedding in Qwen2-VL) need an entry under each name."""
    saved = {}
    for name, tensor in weights.items():
        module_name, _, attribute = name.rpartition(".")
        module = model.get_submodule(module_name)
        saved[module, attribute] = module._parameters[attribute]
        module._parameters[attribute] = tensor
    try:
        yield
    finally:
        for (module, attribute), parameter in saved.items():
            module._parameters[attribute] = parameter


def compute_context(model, precision: str, keep: bool = False):
    """Where the forward (and backward) math of `--precision bf16` happens: the fp32 master
    weights are cast to bf16 ONCE when the block starts (one cast per weight for a whole
    rollout, not one per decode step; differentiable, so gradients reach the fp32 masters in
    fp32), and the network computes with them exactly as a model whose weights are bf16 does:
    norms, embeddings and the residual stream in bf16 too. That is the computation of the KL
    reference held as bf16 weights, of FSDP's MixedPrecisionPolicy (which casts per unit, so
    nothing to do here under FSDP) and of the authors' DeepSpeed bf16: the policy and its
    reference compute identically from identical weights (KL exactly 0 at the start).
    (torch.autocast would keep norms and the residual stream in fp32: another computation.)
    Backward must run inside the block when activation checkpointing recomputes the forward
    then. `keep` (a --compile rollout, no gradients): the bf16 copies live on between blocks,
    refilled in place, at addresses a CUDA graph may keep (2 bytes per weight for the run).
    `fp32`: plain fp32 math, nothing to do."""
    if precision == "fp32" or sharded(model):
        return nullcontext()
    casts, kept = {}, model.__dict__.setdefault("kept_bf16", {})  # one cast per tensor: tied names share it
    for parameter in model.parameters():
        if keep and parameter.dtype != torch.bfloat16:
            if id(parameter) not in kept:
                kept[id(parameter)] = torch.empty_like(parameter, dtype=torch.bfloat16)
                torch._dynamo.mark_static_address(kept[id(parameter)])  # a graph input, never copied
            casts[id(parameter)] = kept[id(parameter)].copy_(parameter.detach())
        else:
            casts[id(parameter)] = parameter.to(torch.bfloat16)  # itself if already bf16
    return swapped_weights(model, {name: casts[id(parameter)]
                                   for name, parameter in model.named_parameters(remove_duplicate=False)})


def prepare_training(args, run: Run, model):
    """Training mode, optional activation checkpointing (`--grad-checkpointing`), DDP when
    distributed (or FSDP2 with `--fsdp`, see `shard`), AdamW at `--lr`.

    The weights stay in fp32 whatever the precision: they are the master copy that AdamW
    updates (a 1e-6 step applied to bf16 weights would round away), and their gradients and
    AdamW's moments are fp32 too. Returns (policy, optimizer): the policy's forward is
    completion_logprobs as ONE module call, which is what DDP needs to sync every gradient.
    """
    model.train()
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = shard(model, run, args.precision) if args.fsdp else GroupScorer(model)
    if run.world_size > 1 and not args.fsdp:
        # gradients as views into DDP's all-reduce buckets: no second gradient-sized buffer
        policy = DDP(policy, device_ids=[run.device.index] if run.device.type == "cuda" else None,
                     gradient_as_bucket_view=True)
    return policy, new_optimizer(model, run, args.lr, args.weight_decay)


def new_optimizer(model, run: Run, lr: float, weight_decay: float):
    """AdamW over the trainable parameters (under FSDP, this rank's fp32 shards of them; under
    LoRA the adapters only: frozen weights get no gradient and no AdamW state)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.999), eps=1e-8,
                             weight_decay=weight_decay, fused=run.device.type == "cuda")


def shard(model, run: Run, precision: str, frozen: bool = False) -> GroupScorer:
    """`--fsdp`: torch's FSDP2 over all ranks, instead of a full copy of everything per rank.

    Each decoder layer and each vision block is one unit, all-gathered just before it runs
    (forward, and again in backward) and freed after; the GroupScorer is the root unit, which
    holds the rest (embedding and output layer, tied in 2B, final norm, patch embedding,
    merger) from its forward to the end of backward. A rank keeps 1/world_size of every weight,
    gradient and AdamW moment, all fp32. Under bf16 the MixedPrecisionPolicy gathers weights in
    bf16 for the math and reduces gradients in fp32: the computation compute_context gives a DDP
    policy; fp32: everything fp32. `frozen` (the KL reference, never backpropagated): the root
    frees its weights after each forward too."""
    mesh = init_device_mesh(run.device.type, (run.world_size,))
    # inputs are not cast: a unit's inputs stay as the model makes them (the vision tower's
    # rotary angles fp32), as in a bf16 model and under compute_context
    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if precision == "bf16" else None,
                                 reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in (*model.model.language_model.layers, *model.model.visual.blocks):
        fully_shard(block, mesh=mesh, mp_policy=mixed)
    return fully_shard(GroupScorer(model), mesh=mesh, mp_policy=mixed,
                       reshard_after_forward=True if frozen else None)


def sharded(model) -> bool:
    """Whether FSDP (`shard`) manages the model's weights."""
    return any(isinstance(m, FSDPModule) for m in model.modules())


@contextmanager
def full_weights(policy):
    """The whole policy gathered ONCE for work that calls the bare model many times (a rollout's
    decode steps, held-out evaluation), and freed after. Under FSDP a layer's every forward
    would otherwise all-gather its weights and free them again: a 1024-token rollout would
    gather the whole model 1024 times. Nothing to do without FSDP (or for policy None)."""
    units = [m for m in policy.modules() if isinstance(m, FSDPModule)] if policy is not None else []
    if units:
        # FSDP makes the module whose forward runs first its root; a rollout calls the layers
        # first, so settle now that the policy is the root (torch has no public call for this)
        policy._get_fsdp_state()._lazy_init()
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()  # one all-gather per unit, in bf16 under bf16 precision
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            # as fully_shard set it: the root keeps its weights from forward to backward
            unit.set_reshard_after_forward(unit is not policy, recurse=False)


def sync_gradients(policy, last: bool):
    """DDP averages gradients across ranks only on the last micro-step of an optimizer step;
    the earlier ones just accumulate locally (syncing each would cost a full all-reduce).
    FSDP likewise reduce-scatters only on the last; until then each rank accumulates full-size
    fp32 gradients (4 bytes per parameter)."""
    if isinstance(policy, FSDPModule):
        policy.set_requires_gradient_sync(last)
    return policy.no_sync() if isinstance(policy, DDP) and not last else nullcontext()


def optimizer_step(model, optimizer, lr: float, max_grad_norm: float) -> tuple[float, bool]:
    """Clip and step; a non-finite gradient norm skips the update.

    After DDP's all-reduce every rank holds the same gradients, so every rank sees the same
    norm and skips (or not) together. Under FSDP each rank holds a shard of every gradient
    (DTensors): the norm of the shards is summed over ranks (`full_tensor`), so again every
    rank clips by, and skips on, the same global norm. Returns (grad norm, skipped).
    """
    parameters = [p for p in model.parameters() if p.grad is not None]
    total_norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    if isinstance(total_norm, DTensor):
        total_norm = total_norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_grad_norm, total_norm)
    skipped = not torch.isfinite(total_norm)
    if not skipped:
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(total_norm), skipped


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path: str, run: Run, model, processor, optimizer, state: dict, precision: str):
    """path/: a Hugging Face model directory with the weights in the compute dtype (bf16 under
    --precision bf16, as the hub ships Qwen2-VL; LoRA adapters merged in), trainer_state.pt
    (`state`, the optimizer, and under bf16 or LoRA the trainable weights in fp32, so a resume
    never re-rounds them: the masters, or the adapters) and one RNG file per rank. Under FSDP
    rank 0 writes the same Hugging Face directory from gathered weights, and the fp32 weights
    and the optimizer go into path/sharded/ instead (torch.distributed.checkpoint: every rank
    writes its own shards, no rank ever holds all of them). Written into path.tmp
    and renamed: a crash mid-save never leaves a half checkpoint. A write that fails (a full
    disk) on any rank ends every rank with one line naming the checkpoint; path.tmp is removed
    and the earlier checkpoints are left as they were."""
    tmp = path + ".tmp"
    if run.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save cut short
    barrier(run)
    weights = full_state_dict(model)  # under FSDP every rank takes part in gathering them
    error = None  # this rank's failed write: it still takes part in the all_reduce below
    try:
        if sharded(model):  # first: a write that fails on any rank raises on every rank
            # (an optimizer that has not stepped is left out: torch's helper would first give it
            # a state by a zero step, and the first real update would count as its second)
            shards = get_state_dict(model, [optimizer] if optimizer.state else [])  # this rank's
            dcp.save(dict(zip(("model", "optimizer"), shards)), checkpoint_id=f"{tmp}/sharded")
        os.makedirs(tmp, exist_ok=True)
        rng = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
                   **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {}))
        torch.save(rng, os.path.join(tmp, f"rng_rank{run.rank}.pt"))
        if run.is_main:
            state = {**state, "sharded_optimizer": bool(optimizer.state)} if sharded(model) else {
                **state, "optimizer": optimizer.state_dict()}
            if (precision == "bf16" or adapters(model)) and not sharded(model):
                state["master_weights"] = {
                    name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
            if precision == "bf16":
                # one bf16 tensor per storage: the tied embedding / output weight is saved once
                floats = {v.data_ptr(): v for v in weights.values() if v.is_floating_point()}
                cast = {data_ptr: value.bfloat16() for data_ptr, value in floats.items()}
                weights = {k: cast.get(v.data_ptr(), v) for k, v in weights.items()}
            save_pretrained(model, processor, tmp, weights)
            torch.save(state, os.path.join(tmp, "trainer_state.pt"))
    # what writing a checkpoint raises on a full disk: the OS, safetensors, torch.save ("unexpected
    # pos"), torch.distributed.checkpoint (on every rank, when any rank's write failed)
    except (OSError, RuntimeError, SafetensorError, CheckpointException) as err:
        error = err
    # instead of a barrier: every rank's files are in, or every rank learns that one failed
    if all_reduce(run, {"failed": error is not None}, op=dist.ReduceOp.MAX)["failed"]:
        if run.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        leave_job(run)
        reason = next((line for line in str(error).splitlines() if line.strip()), "") if error else ""
        raise SystemExit(f"could not write checkpoint {path} ({type(error).__name__}: {reason}); "
                         "the earlier checkpoints are intact" if error else 1)
    if run.is_main:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    barrier(run)


def load_checkpoint(path: str, run: Run, model, optimizer) -> dict:
    """Restore the fp32 weights (the master copy when the checkpoint has one; under FSDP this
    rank's shards from path/sharded/), the optimizer and this rank's RNG from a save_checkpoint
    directory; returns the saved state."""
    state = torch.load(os.path.join(path, "trainer_state.pt"), map_location=run.device,
                       weights_only=False)
    if sharded(model):
        optimizers = [optimizer] if state.pop("sharded_optimizer") else []
        shards = dict(zip(("model", "optimizer"), get_state_dict(model, optimizers)))  # this rank's
        dcp.load(shards, checkpoint_id=os.path.join(path, "sharded"))  # into this rank's shards
        set_state_dict(model, optimizers, model_state_dict=shards["model"],
                       optim_state_dict=shards["optimizer"])
    else:  # the trainable weights, when saved in fp32 apart (the rest came with the model)
        model.load_state_dict(state.pop("master_weights", {}), strict=False)
        optimizer.load_state_dict(state.pop("optimizer"))
    rng_file = os.path.join(path, f"rng_rank{run.rank}.pt")
    if os.path.isfile(rng_file):  # resumed with more ranks than saved: nothing to restore
        rng = torch.load(rng_file, weights_only=False)
        random.setstate(rng["python"]), np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return state


def saved_state(folder: str) -> dict:
    """trainer_state.pt of a checkpoint of this project ({} for any other model folder): "step",
    "args" (the flags it was trained with), "warm_start" (a GRPO warm start's checkpoint), ...
    Memory-mapped: reading them does not read the optimizer state beside them (gigabytes)."""
    path = os.path.join(folder, "trainer_state.pt")
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True) \
        if os.path.isfile(path) else {}


def full_state_dict(model) -> dict:
    """The model's complete state dict under Hugging Face's names (LoRA adapters merged in).
    Under FSDP every rank must call this (each weight is gathered in turn) and only rank 0 gets
    it, on the CPU; the others get {}."""
    if not sharded(model):
        return merged_state_dict(model)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # a tied weight (the output layer's is the embedding's) comes back as two copies: make them
    # one tensor again, as in model.state_dict(), so that it is saved once
    first = {}
    for name, value in model.state_dict(keep_vars=True).items():
        if full and first.setdefault(id(value), name) != name:
            full[name] = full[first[id(value)]]
    return full


# ----------------------------------------------------------------------------- the run

def training_parser(doc: str, lr: float, epochs_help: str, max_new_tokens: int,
                    max_new_tokens_help: str, epochs: float | None = None):
    """The command line of a training script (its docstring `doc`) with the flags that mean the
    same thing in train_sft.py and train_grpo.py (`epochs` None: the script sets the default
    after parsing); train_grpo.py adds its own."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0], formatter_class=HelpFormatter)
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
    a("--resume", default=None, help="checkpoint directory to continue from, or 'latest': the newest "
      "in --output-dir, or a fresh start when it has none (one command line for torchrun restarts)")
    a("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    a("--keep-checkpoints", type=int, default=2, help="how many recent checkpoints to keep")
    a("--eval-every", type=int, default=0, help="held-out accuracy at step 0 and every N steps (0: never)")
    a("--eval-limit", type=int, default=None, help="test images used by --eval-every (default: all)")
    a("--eval-batch-size", type=int, default=32, help="prompts per greedy decoding batch in evaluation")
    a("--grad-checkpointing", action="store_true", help="recompute activations in backward to save memory")
    a("--fsdp", action="store_true", help="FSDP2: shard weights, gradients, AdamW state (for 7B)")
    a("--lora-rank", type=int, default=0, help="LoRA adapters of this rank on the language model's "
      "projections, all else frozen (0: full fine-tuning, the paper's)")
    a("--lora-alpha", type=float, default=None, help="LoRA scale alpha / rank (default: 2 x rank)")
    a("--compile", action="store_true", help="rollouts and evaluation decode with a static KV cache "
      "and a compiled step (CUDA graphs on GPU): the same tokens, fewer launches; not with --fsdp")
    a("--device", default=None, help="cpu or cuda (default: cuda when available)")
    a("--dist-timeout", type=float, default=30, help="minutes a rank waits on the others before failing")
    return parser


def start_run(args, script: str):
    """Everything before training: check the flags, join the job, check the output folder and
    what --resume continues, write args.json and catch stop signals; then load the data and the
    model: from the checkpoint when resuming, in fp32 (the master weights); under --lora-rank
    the base model the run started from, frozen in the compute dtype, with fp32
    adapters (a resume restores them from the checkpoint). Returns (run, checkpoint to resume
    from or None, training data, test data, model, processor)."""
    check_flags(args, above=dict(lr=0, epochs=0, max_grad_norm=0, dist_timeout=0), at_least=dict(
        batch_size=1, grad_accum=1, image_size=1, shots=1, max_steps=1, max_new_tokens=1, save_every=0,
        keep_checkpoints=1, eval_every=0, eval_limit=1, eval_batch_size=1, weight_decay=0, lora_rank=0),
        at_most=dict(image_size=MAX_IMAGE_SIZE, lora_rank=4096))
    if args.fsdp and "RANK" not in os.environ:
        raise SystemExit("--fsdp: shards over the processes of a torchrun job; launch with torchrun "
                         "(--nproc_per_node 1 works too)")
    if args.fsdp and args.lora_rank:
        raise SystemExit("--fsdp with --lora-rank: not supported; LoRA needs no sharding (a frozen "
                         "bf16 base is 2 bytes per parameter: 7B fits one 80 GB GPU), drop --fsdp")
    args.lora_alpha = args.lora_alpha or 2 * args.lora_rank
    run = join_job(args.device, args.dist_timeout)
    args.precision = args.precision or ("bf16" if run.device.type == "cuda" else "fp32")
    if args.compile and args.fsdp:  # FSDP's per-layer hooks would run inside the compiled step
        print0(run, "--compile: not used with --fsdp; rollouts and evaluation decode with the eager loop")
        args.compile = False
    with one_line_errors(script):
        checkpoint = find_checkpoint(args) if args.resume else None
        prepare_output_dir(args, run, checkpoint)
        if args.resume == "latest" and not checkpoint:
            print0(run, f"--resume latest: no checkpoint in {args.output_dir} yet; starting the run")
        catch_stop_signals()
        train_data, test_data = load_train_test(args)
        source = checkpoint or args.model
        if args.lora_rank:  # the base the run started from: --model, or the result of its warm start
            warmed = checkpoint and getattr(args, "warm_start_steps", 0) and \
                not saved_state(checkpoint)["warm_start"]  # a GRPO checkpoint after a warm start
            source = os.path.join(os.path.dirname(checkpoint), "warm_start") if warmed else args.model
        dtype = torch.bfloat16 if args.lora_rank and args.precision == "bf16" else torch.float32
        model, processor = load_model(source, run.device, dtype=dtype)
    if args.lora_rank:
        add_adapters(model, args.lora_rank, args.lora_alpha, args.seed)
    return run, checkpoint, train_data, test_data, model, processor


# What a demo run writes into its folder (and the .tmp leftovers of each): all a fresh demo deletes.
DEMO_OUTPUTS = ("args.json", "metrics.jsonl", "warm_start.jsonl", "fewshot.json", "warm_start", "final")
DEMO_PREFIXES = ("checkpoint-", "warm_start-", ".tmp-")  # checkpoints, write_atomic's temporary files


def prepare_output_dir(args, run: Run, checkpoint: str | None):
    """Check what the run is about to do in --output-dir, on every rank (so all of them stop
    together on a bad folder); then rank 0 alone prepares it and writes the run's args.json.

    - A resumed run continues the saved trajectory: any flag that would change it (model, data,
      learning rate, batch, sampling, ...) must be what the checkpoint was trained with, and so
      must the number of processes (each takes its own share of the global batch). Its logs are
      cut back to the step it resumes from (a kill -9 may have logged steps after the last
      checkpoint).
    - A fresh run (`checkpoint` None) starts fresh logs and never mixes into another run's
      checkpoints, except for `--resume latest` of the run in the folder when that stopped
      after its warm start and before its first checkpoint: the same run (its args.json has the
      same flags) starts again.
    - A fresh demo starts the folder over, if it holds nothing but the files an earlier demo
      wrote; anything else there, or a folder whose args.json is not a demo's, is an error
      naming it."""
    folder, args_file = args.output_dir, os.path.join(args.output_dir, "args.json")
    # a fresh run: as if it resumed a warm start's step 0 (its logs keep no record after step 0)
    state = saved_state(checkpoint) if checkpoint else {"step": 0, "warm_start": True}
    # the flags that decide the trajectory, which a resume (or a restart) must share
    trajectory = [name for name in vars(args) if name not in RESUME_MAY_CHANGE]
    if checkpoint and (changed := changed_flags(state["args"], args, trajectory)):
        raise ValueError(f"--resume {checkpoint}: the run would not continue the saved one: "
                         f"{'; '.join(changed)}. Resume with the saved flags (its args.json), or "
                         f"start a new run; only {', '.join(sorted(RESUME_MAY_CHANGE))} may change")
    if state.get("world_size", run.world_size) != run.world_size:
        raise ValueError(f"--resume {checkpoint}: saved by a run of {state['world_size']} processes, "
                         f"resumed with {run.world_size}: the global batch, and so the run, would "
                         f"change; resume with {state['world_size']} processes")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"--output-dir {folder} is a file; expected a folder")
    fresh_demo = getattr(args, "demo", False) and checkpoint is None
    # what a fresh demo deletes: the folder's contents, which only an earlier demo may have written
    demo_outputs = sorted(os.listdir(folder)) if fresh_demo and os.path.isdir(folder) else []
    for name in demo_outputs:
        if name.removesuffix(".tmp") not in DEMO_OUTPUTS and not name.startswith(DEMO_PREFIXES):
            raise FileExistsError(f"--demo starts --output-dir {folder} over, but "
                                  f"{os.path.join(folder, name)} is not a demo's output; choose "
                                  "another --output-dir")
    if demo_outputs and not (os.path.isfile(args_file) and read_json(args_file).get("demo")):
        raise FileExistsError(f"--demo starts --output-dir {folder} over, but it holds no args.json "
                              "of a demo run; choose another --output-dir")
    runs = checkpoint_dirs(folder) + checkpoint_dirs(folder, "warm_start-") + \
        (["warm_start"] if os.path.isdir(os.path.join(folder, "warm_start")) else [])
    resumed_here = checkpoint and (os.path.realpath(os.path.dirname(checkpoint))
                                   == os.path.realpath(folder))
    if runs and not fresh_demo and not resumed_here:
        if args.resume != "latest" or not os.path.isfile(args_file) or \
                changed_flags(read_json(args_file), args, trajectory):  # not a restart of the same run
            raise FileExistsError(f"--output-dir {folder} already holds checkpoints of another run "
                                  f"({runs[-1]}); continue it with its flags (args.json) and --resume "
                                  "latest, or choose another --output-dir")
    if run.is_main:
        # an earlier demo's outputs go; its args.json is replaced below
        for path in [os.path.join(folder, name) for name in demo_outputs if name != "args.json"]:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        os.makedirs(folder, exist_ok=True)  # (one that cannot be written: write_atomic names the file)
        # the last step each log keeps: a warm start's checkpoint comes before any GRPO step
        for name, step in (("warm_start.jsonl", state["step"] if state["warm_start"] else math.inf),
                           ("metrics.jsonl", 0 if state["warm_start"] else state["step"])):
            path = os.path.join(folder, name)
            if os.path.exists(path):
                kept = [r for r in read_jsonl(path) if r["step"] <= step]
                write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
        # only now: a refused resume keeps the record of the run it would continue
        write_atomic(args_file, json.dumps(vars(args), indent=2))
    barrier(run)


def checkpoint_dirs(output_dir: str, prefix: str = "checkpoint-") -> list[str]:
    """A run's complete checkpoint folders, oldest first (a .tmp one is a save cut short)."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    return sorted(d for d in names if d.startswith(prefix) and not d.endswith(".tmp"))


def find_checkpoint(args) -> str | None:
    """The folder --resume names: a path, or with 'latest' the newest checkpoint in --output-dir (a
    GRPO run stopped during its warm start has only warm_start-* ones), None when there is none
    yet: then the run starts, so one command line serves a first start and every restart. A
    damaged checkpoint is an error naming its file (and, for 'latest', the newest intact one)."""
    if args.resume != "latest":
        checkpoint = os.path.normpath(args.resume)  # a trailing slash names the same folder
        if not os.path.isfile(os.path.join(checkpoint, "trainer_state.pt")):
            raise FileNotFoundError(f"--resume {args.resume}: no trainer_state.pt there; expected a "
                                    "checkpoint-* folder written by train_sft.py or train_grpo.py")
        if damage := damaged_file(checkpoint):
            raise ValueError(f"--resume {args.resume}: {damage}")
        return checkpoint
    found = checkpoint_dirs(args.output_dir) or checkpoint_dirs(args.output_dir, "warm_start-")
    found = [os.path.join(args.output_dir, name) for name in found]
    if found and (damage := damaged_file(found[-1])):
        intact = [path for path in found[:-1] if not damaged_file(path)]
        raise ValueError(f"--resume latest: {damage}; " + (
            f"the newest intact checkpoint is {intact[-1]}: pass --resume {intact[-1]}" if intact
            else "no earlier checkpoint is intact") + " (nothing was deleted)")
    return found[-1] if found else None


def damaged_file(checkpoint: str) -> str | None:
    """'<file> is missing' or '<file> is damaged' for the first file of `checkpoint` that a
    resume needs and could not read, None when all of them read."""
    names = os.listdir(checkpoint)
    index = "model.safetensors.index.json"  # the weights of a large model, in several files
    for needed in ("trainer_state.pt", "config.json", index if index in names else "model.safetensors"):
        if needed not in names:
            return f"{os.path.join(checkpoint, needed)} is missing"
    readers = {".pt": lambda path: torch.load(path, map_location="cpu", weights_only=False, mmap=True),
               ".safetensors": lambda path: safe_open(path, "pt"),  # the header must cover the file
               ".json": read_json}
    for name in sorted(names):
        path, extension = os.path.join(checkpoint, name), os.path.splitext(name)[1]
        try:
            readers.get(extension, lambda path: None)(path)  # any other file: not read
        except Exception:  # noqa: BLE001 (whatever reading a damaged file raises)
            return f"{path} is damaged (unreadable as a {extension} file)"
    return None


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


def due(every: int, step: int, total: int) -> bool:
    """Whether step `step` (from 1) is one of every `every`, or the last; never for every = 0."""
    return bool(every) and (step % every == 0 or step == total)


def save_or_stop(args, run: Run, step: int, total: int, model, processor, optimizer,
                 warm_start: bool = False):
    """After optimizer step `step` (from 1): checkpoint every --save-every steps, at the end
    (not at a GRPO warm start's end: GRPO goes on from it), or when any rank got SIGTERM /
    SIGINT; then every rank exits together, non-zero, so a scheduler sees the job did not
    finish (and no `final` link points at the unfinished run). A warm start's checkpoints are
    warm_start-N, the run's checkpoint-N."""
    # the signal any rank received (0: none): one rank's preemption stops every rank at this step
    signum = int(all_reduce(run, {"signal": _SIGNAL["number"]}, op=dist.ReduceOp.MAX)["signal"])
    prefix = "warm_start-" if warm_start else "checkpoint-"
    if signum or (step == total and not warm_start) or (args.save_every and step % args.save_every == 0):
        path = os.path.join(args.output_dir, f"{prefix}{step:06d}")
        save_checkpoint(path, run, model, processor, optimizer, {"step": step, "args": vars(args),
                        "warm_start": warm_start, "world_size": run.world_size}, args.precision)
        if run.is_main:
            for name in checkpoint_dirs(args.output_dir, prefix)[:-args.keep_checkpoints]:
                shutil.rmtree(os.path.join(args.output_dir, name))
    if signum:
        print0(run, f"{signal.Signals(signum).name}: saved {prefix}{step:06d} and stopped; "
                    "continue with --resume latest")
        leave_job(run)
        raise SystemExit(128 + signum)


def finish(args, run: Run, t0: float, model):
    """Point <output-dir>/final at the last checkpoint of the finished run, print the training
    time and leave the process group cleanly. A run whose weights are not all finite, or whose
    every update was skipped, gets no `final` and ends with an error instead."""
    metrics = os.path.join(args.output_dir, "metrics.jsonl")
    records = read_jsonl(metrics) if run.is_main and os.path.isfile(metrics) else []
    skipped = [r["skipped_update"] for r in records if "skipped_update" in r]  # (step 0 has none)
    failed = all_reduce(run, {  # under FSDP each rank checks its shards
        "nonfinite": not all(bool(torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all())
                             for p in model.parameters()),
        "all_skipped": bool(skipped) and all(skipped)}, op=dist.ReduceOp.MAX)
    if failed["nonfinite"] or failed["all_skipped"]:
        leave_job(run)
        raise SystemExit(("the trained weights are not all finite" if failed["nonfinite"] else
                          "every update of the run was skipped (non-finite gradient norms)") +
                         f" (see {metrics}); no `final` link" if run.is_main else 1)
    saved = checkpoint_dirs(args.output_dir)
    if run.is_main and saved:
        link = os.path.join(args.output_dir, "final")
        if os.path.lexists(link + ".tmp"):  # left by a crash in this very spot
            os.remove(link + ".tmp")
        os.symlink(saved[-1], link + ".tmp")
        os.replace(link + ".tmp", link)  # atomic, also over the link of an earlier run
        print0(run, f"final model: {link} -> {saved[-1]}")
    print0(run, f"training time: {(time.time() - t0) / 60:.1f} min; outputs in {args.output_dir}")
    leave_job(run)
    release_stop_signals()  # last: until here a late SIGTERM is only recorded, and the run is done


