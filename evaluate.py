"""Evaluate zero-shot, SFT and RL checkpoints the way the paper does: greedy, batched, sharded.

(The command-line tool is built on `predict` below; see main().)
"""
from __future__ import annotations

import torch
import torch.distributed as dist

import data as D
import model as M
import rewards as R

# evaluation prompt name -> the training method whose suffix it uses
PROMPTS = {"think": "cls-rl", "no-think": "no-think", "think-after-answer": "think-after-answer",
           "adaptive": "adaptive"}


def gather_to_rank0(records: list[dict]) -> list[dict] | None:
    """All ranks' records on rank 0 (None elsewhere); a no-op without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return records
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(records, gathered, dst=0)
    return None if gathered is None else [r for part in gathered for r in part]


@torch.no_grad()
def predict(model, processor: M.Processor, data: D.ClassificationData, method: str, *,
            batch_size: int = 32, max_new_tokens: int = 1024, image_size: int = 384, seed: int = 1,
            limit: int | None = None, open_set: bool = False, skip: set[int] = frozenset(),
            rank: int = 0, world_size: int = 1, on_batch=None, progress=None) -> list[dict]:
    """Greedy answers for the examples of `data`, one record per example, this rank's share.

    Batches (not examples) are dealt round-robin to ranks, so every batch holds the same
    examples whatever the world size and sharded results equal one process's exactly.
    `skip` holds example indices already done (resume); `on_batch(records)` is called after
    each batch (to write them out at once). An unreadable image gives a record with `error`.
    """
    indices = [i for i in range(len(data.examples))[:limit] if i not in skip]
    batches = [indices[s:s + batch_size] for s in range(0, len(indices), batch_size)]
    records = []
    was_training = model.training
    model.eval()
    for batch in batches[rank::world_size]:
        images, texts, candidates, kept, done = [], [], [], [], []
        for i in batch:
            example = data.examples[i]
            text, names = D.make_question(data, i, method, seed, epoch=0, open_set=open_set)
            try:
                images.append(D.load_image(example.image, image_size))
            except D.ImageError as error:
                done.append(dict(index=i, image=example.image, label=example.classname,
                                 candidates=names, prompt=text, error=str(error)))
                continue
            texts.append(text), candidates.append(names), kept.append(i)
        if kept:
            prompts = M.build_prompts(processor, images, texts, model.device)
            rollout = M.sample_groups(model, processor, prompts, group_size=1,
                                      max_new_tokens=max_new_tokens, temperature=0)
            lengths = rollout.completion_mask.sum(1).tolist()
            for i, text, names, completion, length in zip(kept, texts, candidates, rollout.texts,
                                                          lengths):
                done.append(judge(data.examples[i], i, names, text, completion, length))
        done.sort(key=lambda r: r["index"])
        records += done
        if on_batch is not None:
            on_batch(done)
        if progress is not None:
            progress.update(len(batch) * world_size)
    model.train(was_training)
    return records


def judge(example: D.Example, index: int, candidates: list[str], prompt: str, completion: str,
          completion_tokens: int) -> dict:
    """One prediction record: what was asked, what came back, and every judgement of it."""
    answer = R.extract_answer(completion)
    return dict(index=index, image=example.image, label=example.classname, candidates=candidates,
                prompt=prompt, completion=completion, answer=answer,
                correct_paper=R.is_correct(completion, example.classname, "paper"),
                correct_strict=R.is_correct(completion, example.classname, "strict"),
                named=R.named_classes(answer, candidates), thinks=R.thinks(completion),
                completion_tokens=completion_tokens)


def accuracy(model, processor, data, method, *, rank=0, world_size=1, **kwargs) -> float:
    """Paper-rule accuracy (percent) over `data`, computed on every rank (for training logs)."""
    records = predict(model, processor, data, method, rank=rank, world_size=world_size, **kwargs)
    counts = torch.tensor([sum(r.get("correct_paper", False) for r in records), len(records)],
                          dtype=torch.float64, device=model.device)  # NCCL reduces CUDA tensors only
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    return 100.0 * float(counts[0]) / max(1.0, float(counts[1]))
