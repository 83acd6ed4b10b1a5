"""Evaluate zero-shot, SFT and RL checkpoints the way the paper does: greedy, batched, sharded.

Evaluation: one folder per dataset under --output-dir (predictions.jsonl, one record per test
image), then summary.json and summary.md over all of them:

    python evaluate.py --model runs/pets/checkpoint-000600 --dataset oxford_pets --data-root ~/data
    torchrun --nproc_per_node 8 evaluate.py --model Qwen/Qwen2-VL-2B-Instruct --dataset all \\
        --data-root ~/data --prompt no-think --output-dir runs/eval/zero-shot
    python evaluate.py --model tiny --dataset demo --image-size 56 --max-new-tokens 8 --device cpu

    # continue an interrupted evaluation: only the images without a prediction are run
    python evaluate.py ... --output-dir runs/eval/zero-shot --resume
    # cross-dataset "free lunch": a fine-tuned model on all 11 datasets, change vs zero-shot
    torchrun --nproc_per_node 8 evaluate.py --model runs/imagenet/checkpoint-000250 \\
        --dataset all --data-root ~/data --output-dir runs/eval/from-imagenet \\
        --compare runs/eval/zero-shot

Tables and pictures from finished evaluations (a summary.json or the folder holding it):

    python evaluate.py table runs/eval/fewshot/*/                 # Table 2: one model per dataset
    python evaluate.py base2new runs/eval/b2n/*/base runs/eval/b2n/*/new     # Table 1: base, new, H
    python evaluate.py matrix runs/eval/from-imagenet runs/eval/from-pets ...   # Figure 2
    python evaluate.py plot runs/pets/metrics.jsonl [more metrics.jsonl]       # Figures 1, 3

The question ends with the prompt suffix of --prompt; by default the method the checkpoint
was trained with (read from its trainer_state.pt), else `think`. A --prompt of another method
than the checkpoint's stops with a message unless --allow-prompt-mismatch is given.

Batches of `--batch-size` images are dealt round-robin to the ranks of a torchrun job, so the
predictions are those of one process, only sooner. Each rank appends each finished batch to
<dataset>/predictions.rank<R>.jsonl; at the end of a dataset rank 0 writes predictions.jsonl
(sorted by image index) and the rank files are removed. A killed run keeps every finished
batch; --resume merges what it finds and predicts the rest (with the same --batch-size the
remaining batches are those of an uninterrupted run, so the results are too; unreadable images
are retried). Other ranks' files are only found again if --output-dir is shared by all ranks.
--output-dir also holds args.json (checked by --resume) and <dataset>/timing.json.

What summary.json / summary.md report per dataset, and averaged over datasets (the paper's
average is the plain mean of the per-dataset accuracies):
- accuracy_paper: the authors' lenient judge (label contained in the answer, ignoring case);
  accuracy_strict: the normalised answer equals the label (rewards.is_correct).
- An unreadable image gets a record with `error` and counts as WRONG in both accuracies (the
  model gave no answer); unreadable_images says how many there were. The answer statistics
  below are over the images that were answered.
- hedged_rate: answers that name more than one listed candidate (these pass the paper judge;
  none with --open-set, which lists no candidates).
- thinking_share: responses with a closed <think> block.
- think_answer_mismatch_rate: of the thinking responses whose think part and answer both name a
  candidate, the share where the two name no class in common (the reasoning argues for one
  class, the answer gives another); think_answer_pairs is that denominator.
- mean_completion_tokens, and the inference time: seconds of the prediction loop (model loading
  excluded) and images per second, summed over --resume passes (the images and time of an
  interrupted pass are left out of both).
- change_paper / change_strict with --compare: accuracy minus the compared (zero-shot) run's.
H in `base2new` is the harmonic mean of the AVERAGED base and new accuracies, as the paper
computes it (2*81.17*79.15/(81.17+79.15) = 80.15), not the mean of the per-dataset H.

Where this departs from the authors' evaluation (docs/method.md sections 3 and 6):
- The question ends with the TRAINING prompt suffix of the method (--prompt maps to it); the
  authors' evaluation scripts used slightly different wordings ("First output the thinking
  process..." and "Please directly output the answer name.").
- The candidate list of each test image is drawn from a generator seeded with (--seed, the
  example), so every rank and every rerun asks the same question (data.make_question).
- Greedy decoding is model.sample_groups at temperature 0, which equals transformers'
  generate (tests/test_model.py); vision and other special tokens cannot be generated.
- The strict judge, hedged answers and the think/answer agreement are ours, reported beside
  the paper's number.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import data as D
import model as M
import rewards as R

# evaluation prompt name -> the training method whose suffix it uses
PROMPTS = {"think": "cls-rl", "no-think": "no-think", "think-after-answer": "think-after-answer",
           "adaptive": "adaptive"}
# what a --resume must share with the run it continues, or its records would mix two evaluations
RESUME_MUST_MATCH = ("model", "setting", "prompt", "open_set", "image_size", "max_new_tokens", "seed")
_THINK_TEXT = re.compile(r"<think>(.*?)</think>", re.DOTALL)  # closed blocks, as rewards.thinks


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


# ============================================================================ summaries

def percent(count: float, total: int) -> float | None:
    return 100.0 * count / total if total else None


def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def harmonic_mean(base: float, new: float) -> float:
    """The paper's H of a base and a new accuracy.
    >>> round(harmonic_mean(81.17, 79.15), 2)
    80.15
    """
    return 2 * base * new / (base + new) if base + new else 0.0


def think_text(completion: str) -> str:
    """The text inside the completion's closed <think> blocks."""
    return " ".join(_THINK_TEXT.findall(completion))


def summarise(records: list[dict]) -> dict:
    """Accuracy and answer statistics of one dataset's prediction records (rates in percent)."""
    answered = [r for r in records if "error" not in r]
    listed = [r for r in answered if r["candidates"]]  # none with --open-set: nothing to hedge among
    thinking = [r for r in answered if r["thinks"]]
    pairs = [(R.named_classes(think_text(r["completion"]), r["candidates"]), r["named"])
             for r in thinking]
    pairs = [(thought, answer) for thought, answer in pairs if thought and answer]
    return dict(
        images=len(records), unreadable_images=len(records) - len(answered),
        # an unreadable image stays in the denominator: no answer is a wrong answer
        accuracy_paper=percent(sum(r.get("correct_paper", False) for r in records), len(records)),
        accuracy_strict=percent(sum(r.get("correct_strict", False) for r in records), len(records)),
        hedged_rate=percent(sum(len(r["named"]) > 1 for r in listed), len(listed)),
        thinking_share=percent(len(thinking), len(answered)),
        think_answer_mismatch_rate=percent(sum(not set(t) & set(a) for t, a in pairs), len(pairs)),
        think_answer_pairs=len(pairs),
        mean_completion_tokens=mean(r["completion_tokens"] for r in answered))


RATES = ("accuracy_paper", "accuracy_strict", "hedged_rate", "thinking_share",
         "think_answer_mismatch_rate", "mean_completion_tokens", "change_paper", "change_strict")
COUNTS = ("images", "unreadable_images", "think_answer_pairs", "timed_images", "inference_seconds")


def average(per_dataset: dict[str, dict]) -> dict:
    """Rates: the mean over datasets (as the paper averages); counts and times: the sum."""
    rows = list(per_dataset.values())
    out = {key: mean(row.get(key) for row in rows) for key in RATES}
    out.update({key: sum(row.get(key) or 0 for row in rows) for key in COUNTS})
    out["images_per_second"] = out["timed_images"] / out["inference_seconds"] \
        if out["inference_seconds"] else None
    return out


def add_comparison(per_dataset: dict[str, dict], baseline: dict) -> list[str]:
    """change_<rule> = accuracy minus the baseline run's, for the datasets both evaluated;
    returns the datasets the baseline lacks."""
    for name, row in per_dataset.items():
        other = baseline["datasets"].get(name)
        for rule in ("paper", "strict"):
            key = f"accuracy_{rule}"
            row[f"change_{rule}"] = None if other is None or other.get(key) is None \
                else row[key] - other[key]
    return [name for name in per_dataset if name not in baseline["datasets"]]


def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def signed(value) -> str:
    return "–" if value is None else f"{value:+.2f}"


def summary_markdown(summary: dict) -> str:
    compare = summary.get("compare") is not None
    lines = [f"# Evaluation of {summary['model']}", "",
             f"prompt `{summary['prompt']}` (the `{summary['method']}` training suffix), setting "
             f"{summary['setting']}{', open set' if summary['open_set'] else ''}, greedy, at most "
             f"{summary['args']['max_new_tokens']} new tokens, {summary['args']['image_size']} px "
             f"images, seed {summary['args']['seed']}.",
             "Fine-tuned on: " + (f"{summary['trained_on']} ({summary['trained_setting']}, "
                                  f"{summary['trained_method']})" if summary["trained_on"]
                                  else "unknown (no trainer_state.pt: a zero-shot model?)"),
             "Accuracies count unreadable images as wrong; the other rates are over answered images.",
             ""]
    header = ["dataset", "images", "unreadable", "acc. paper", "acc. strict", "hedged %",
              "thinking %", "think≠answer %", "mean tokens", "images/s", "seconds"]
    if compare:
        header += ["Δ paper", "Δ strict"]
        lines.insert(-1, f"Δ: accuracy change against {summary['compare']}.")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = list(summary["datasets"].items()) + [(f"average ({len(summary['datasets'])})",
                                                 summary["average"])]
    for name, row in rows:
        cells = [name, fmt(row["images"]), fmt(row["unreadable_images"]),
                 fmt(row["accuracy_paper"]), fmt(row["accuracy_strict"]), fmt(row["hedged_rate"]),
                 fmt(row["thinking_share"]), fmt(row["think_answer_mismatch_rate"]),
                 fmt(row["mean_completion_tokens"], 1), fmt(row["images_per_second"]),
                 fmt(row["inference_seconds"], 1)]
        if compare:
            cells += [signed(row.get("change_paper")), signed(row.get("change_strict"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def read_summary(path: str, what: str) -> dict:
    """A summary.json written by this script, from its path or its folder."""
    file = os.path.join(path, "summary.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise SystemExit(f"evaluate.py: {what} {path}: no summary.json there; expected a "
                         "summary.json written by evaluate.py, or the folder holding it")
    try:
        with open(file) as f:
            summary = json.load(f)
    except json.JSONDecodeError as err:
        raise SystemExit(f"evaluate.py: {what} {file} is not valid JSON ({err})") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("datasets"), dict):
        raise SystemExit(f"evaluate.py: {what} {file} has no 'datasets' table; expected a "
                         "summary.json written by evaluate.py")
    for name, row in summary["datasets"].items():
        if not isinstance(row, dict) or not {"accuracy_paper", "accuracy_strict"} <= set(row):
            raise SystemExit(f"evaluate.py: {what} {file}: dataset {name} has no accuracy_paper "
                             "and accuracy_strict; expected a summary.json written by evaluate.py")
    return summary


# ============================================================================ prediction files

def rank_file(folder: str, rank: int) -> str:
    return os.path.join(folder, f"predictions.rank{rank}.jsonl")


def read_predictions(path: str) -> list[dict]:
    """The records of a predictions file. An incomplete last line (a write cut short by a kill)
    is dropped: its image is simply predicted again."""
    with open(path) as f:
        lines = f.read().split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # no newline after it: the write was interrupted
                print(f"{path}: dropped an incomplete last line (an interrupted write)", flush=True)
                continue
            raise ValueError(f"{path} line {number} is not JSON ({err}); delete that line (its "
                             "image is then predicted again) or the whole file") from None
        if not isinstance(record, dict) or not isinstance(record.get("index"), int):
            raise ValueError(f"{path} line {number} has no integer 'index'; expected a record "
                             "written by evaluate.py")
        records.append(record)
    return records


def has_predictions(folder: str) -> bool:
    return os.path.exists(os.path.join(folder, "predictions.jsonl")) or \
        bool(glob.glob(os.path.join(folder, "predictions.rank*.jsonl")))


def collect_predictions(folder: str) -> dict[int, dict]:
    """Every record earlier runs left in `folder`, by example index, written back as ONE sorted
    predictions.jsonl (the rank files of an interrupted run are merged into it and removed).
    Later records win, so a retried unreadable image replaces its old error record."""
    main_file = os.path.join(folder, "predictions.jsonl")
    rank_files = sorted(glob.glob(os.path.join(folder, "predictions.rank*.jsonl")))
    done = {}
    for path in [main_file] * os.path.exists(main_file) + rank_files:
        done.update((r["index"], r) for r in read_predictions(path))
    write_predictions(folder, done)
    for path in rank_files:
        os.remove(path)
    return done


def write_predictions(folder: str, records: dict[int, dict]):
    D.write_atomic(os.path.join(folder, "predictions.jsonl"),
               "".join(json.dumps(records[i]) + "\n" for i in sorted(records)))


def from_rank0(run: M.Run, compute):
    """compute() on rank 0, its result on every rank; an error there stops every rank with
    its message (instead of leaving the others waiting)."""
    value, error = None, None
    if run.is_main:
        try:
            value = compute()
        except (OSError, ValueError) as err:
            error = f"evaluate.py: {err}"
    if run.world_size > 1:
        box = [(value, error)]
        dist.broadcast_object_list(box, src=0)
        value, error = box[0]
    if error:
        raise SystemExit(error)
    return value


# ============================================================================ evaluation

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help, and the epilog's lines kept as written."""


def parse_eval_args(argv):
    parser = argparse.ArgumentParser(
        prog="evaluate.py", description=__doc__.split("\n")[0], formatter_class=HelpFormatter,
        epilog="other commands (each has --help):\n"
               "  evaluate.py table SUMMARY...    one averaged table over several evaluations (Table 2)\n"
               "  evaluate.py base2new SUMMARY... base-to-new table with H (Table 1)\n"
               "  evaluate.py matrix RUN...       cross-dataset accuracy-change matrix (Figure 2)\n"
               "  evaluate.py plot METRICS...     training curves from metrics.jsonl (Figures 1, 3)")
    a = parser.add_argument
    a("--model", default="Qwen/Qwen2-VL-2B-Instruct",
      help="hub id (zero-shot), a checkpoint directory saved by train_sft.py / train_grpo.py, "
           "or 'tiny' (random weights, CPU tests)")
    a("--dataset", default="demo",
      help=f"a dataset, several joined by commas, or 'all' (the 11: {', '.join(D.DATASETS)}); "
           "or demo")
    a("--data-root", default=None, help="folder holding the datasets in the CoOp layout (see data.py)")
    a("--setting", default="fewshot", choices=D.SETTINGS,
      help="fewshot: all classes; base / new: the first / second half of the classes (base-to-new)")
    a("--prompt", default=None, choices=list(PROMPTS),
      help="which training prompt suffix ends the question (think = cls-rl's); default: the "
           "method the checkpoint was trained with, else think")
    a("--allow-prompt-mismatch", action="store_true",
      help="evaluate with a --prompt other than the checkpoint's training method")
    a("--open-set", action="store_true", help="ask without the candidate list (Table 4)")
    a("--limit", type=int, default=None, help="evaluate only the first N test images of each dataset")
    a("--batch-size", type=int, default=32, help="images per greedy decoding batch (authors: 32)")
    a("--max-new-tokens", type=int, default=1024, help="answer length limit (authors: 1024)")
    a("--image-size", type=int, default=384,
      help="images are resized to this square with LANCZOS; use the training size (authors: 384)")
    a("--seed", type=int, default=100,
      help="seed of the candidate lists (training's default, so --eval-every numbers match)")
    a("--output-dir", default="runs/eval", help="<dataset>/predictions.jsonl, summary.json and "
      "summary.md go here")
    a("--resume", action="store_true",
      help="keep the predictions already in --output-dir and predict only the missing images")
    a("--compare", default=None, metavar="SUMMARY",
      help="summary.json (or its folder) of a zero-shot run: report the accuracy change per dataset")
    a("--device", default=None, help="cpu or cuda (default: cuda when available)")
    a("--dist-timeout", type=float, default=30, help="minutes a rank waits on the others before failing")
    args = parser.parse_args(argv)
    for flag in ("batch_size", "max_new_tokens", "image_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit {args.limit}: nothing to evaluate; expected at least 1 image")
    return args


def dataset_names(value: str) -> list[str]:
    """--dataset as a list of names: 'all' is the paper's 11."""
    if value == "all":
        return list(D.DATASETS)
    names = list(dict.fromkeys(name.strip() for name in value.split(",") if name.strip()))
    unknown = [name for name in names if name not in D.DATASETS + ("demo",)]
    if unknown or not names:
        raise SystemExit(f"evaluate.py: --dataset {value}: unknown {', '.join(unknown) or 'empty'}; "
                         f"expected 'all' or names joined by commas from: {', '.join(D.DATASETS)}, demo")
    return names


def training_args(model_dir: str) -> dict:
    """The args a checkpoint of this project was trained with ({} for other models)."""
    path = os.path.join(model_dir, "trainer_state.pt")
    if not os.path.isfile(path):
        return {}
    # mmap: the optimizer state beside the args can be gigabytes, and only the args are read
    state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return dict(state.get("args", {})) if isinstance(state, dict) else {}


def choose_prompt(args, trained: dict) -> str:
    """--prompt, or the checkpoint's own method; a prompt of another method stops the run
    unless --allow-prompt-mismatch says it is meant."""
    trained_method = trained.get("method")
    if args.prompt is None:
        by_method = {method: name for name, method in PROMPTS.items()}
        return by_method.get(trained_method, "think")
    if trained_method and PROMPTS[args.prompt] != trained_method and not args.allow_prompt_mismatch:
        raise SystemExit(
            f"evaluate.py: --prompt {args.prompt} asks with the {PROMPTS[args.prompt]} training "
            f"suffix, but {args.model} was trained with --method {trained_method}; pass --prompt "
            f"{[n for n, m in PROMPTS.items() if m == trained_method][0]}, or "
            "--allow-prompt-mismatch to evaluate it with this prompt anyway")
    return args.prompt


def load_test_sets(args, names: list[str]) -> dict[str, D.ClassificationData]:
    """Every requested test split, all checked before the model is loaded."""
    test_sets = {}
    for name in names:
        try:
            data = D.load_data(name, args.data_root, args.setting, "test")
        except (OSError, ValueError) as err:
            raise SystemExit(f"evaluate.py: --dataset {name}: {err}") from None
        if not data.examples:
            raise SystemExit(f"evaluate.py: --dataset {name}: the {args.setting} test split has no "
                             "examples; nothing to evaluate")
        test_sets[name] = data
    return test_sets


def check_output_dir(args, names: list[str]):
    """A new run never mixes into earlier predictions; a resumed one only into its own kind."""
    saved_path = os.path.join(args.output_dir, "args.json")
    if args.resume and os.path.isfile(saved_path):
        with open(saved_path) as f:
            saved = json.load(f)
        changed = [f"--{key.replace('_', '-')} was {saved.get(key)!r}, now {getattr(args, key)!r}"
                   for key in RESUME_MUST_MATCH if saved.get(key) != getattr(args, key)]
        if changed:
            raise SystemExit(f"evaluate.py: --resume: {args.output_dir} holds predictions made with "
                             f"other settings ({'; '.join(changed)}); rerun with the same settings, "
                             "or choose another --output-dir")
    busy = [name for name in names if has_predictions(os.path.join(args.output_dir, name))]
    if busy and not args.resume:
        raise SystemExit(f"evaluate.py: --output-dir {args.output_dir} already holds predictions "
                         f"for {', '.join(busy)}; pass --resume to keep them and predict only the "
                         "missing images, or choose another --output-dir")


def evaluate_dataset(args, run: M.Run, model, processor, data: D.ClassificationData,
                     method: str) -> dict | None:
    """Predict (or finish predicting) one test split; its summary row on rank 0."""
    folder = os.path.join(args.output_dir, data.dataset)
    count = min(len(data.examples), args.limit or len(data.examples))
    done = {}

    def previous_work() -> list[int]:
        if args.resume:
            done.update(collect_predictions(folder))
        # unreadable images are tried again: the file may have been repaired
        return sorted(i for i, r in done.items() if "error" not in r)

    skip = set(from_rank0(run, previous_work))
    todo = count - len([i for i in skip if i < count])
    M.print0(run, f"{data.dataset}: {count} test images, {count - todo} done earlier, "
                  f"{todo} to predict")
    os.makedirs(folder, exist_ok=True)  # on every rank: --output-dir may not be shared
    shard = rank_file(folder, run.rank)
    open(shard, "w").close()  # this rank's work of an earlier run is in `done` or is redone

    def save_batch(records):  # after each batch, so an interruption keeps every finished one
        with open(shard, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))

    bar = tqdm(total=todo, desc=data.dataset, disable=not run.is_main, dynamic_ncols=True)
    M.barrier(run)
    t0 = time.perf_counter()
    records = predict(model, processor, data, method, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, image_size=args.image_size,
                      seed=args.seed, limit=count, open_set=args.open_set, skip=skip,
                      rank=run.rank, world_size=run.world_size, on_batch=save_batch, progress=bar)
    M.barrier(run)
    seconds = time.perf_counter() - t0
    bar.close()
    gathered = gather_to_rank0(records)
    row = None
    if run.is_main:
        done.update((r["index"], r) for r in gathered)
        write_predictions(folder, done)
        timing = accumulate_timing(folder, seconds, todo, args.resume)
        # the first `count` images are this evaluation (a longer earlier run may have done more)
        row = summarise([done[i] for i in sorted(done) if i < count])
        row.update(timing)
    M.barrier(run)  # rank 0 has saved everything: the rank files can go
    os.remove(shard)
    return row


def accumulate_timing(folder: str, seconds: float, images: int, resume: bool) -> dict:
    """Inference time and images of this pass, added to earlier passes' (timing.json)."""
    path = os.path.join(folder, "timing.json")
    total = {"inference_seconds": 0.0, "timed_images": 0}
    if resume and os.path.isfile(path):
        with open(path) as f:
            total.update(json.load(f))
    total["inference_seconds"] += seconds
    total["timed_images"] += images
    D.write_atomic(path, json.dumps(total))
    total["images_per_second"] = total["timed_images"] / total["inference_seconds"] \
        if total["inference_seconds"] else None
    return total


def run_evaluation(argv):
    args = parse_eval_args(argv)
    names = dataset_names(args.dataset)
    trained = training_args(args.model) if os.path.isdir(args.model) else {}
    args.prompt = choose_prompt(args, trained)
    method = PROMPTS[args.prompt]
    baseline = read_summary(args.compare, "--compare") if args.compare else None
    test_sets = load_test_sets(args, names)
    check_output_dir(args, names)

    run = M.join_job(args.device, args.output_dir, args.dist_timeout)
    if run.is_main:
        D.write_atomic(os.path.join(args.output_dir, "args.json"), json.dumps(vars(args), indent=2))
    try:
        model, processor = M.load_model(args.model, run.device)
    except (OSError, ValueError) as err:  # a missing config.json is a FileNotFoundError
        raise SystemExit(f"evaluate.py: {err}") from None
    M.print0(run, f"evaluating {args.model} with the {args.prompt} prompt ({method} suffix) on "
                  f"{', '.join(names)} ({args.setting}), {run.world_size} process(es)")
    per_dataset = {}
    for name, data in test_sets.items():
        row = evaluate_dataset(args, run, model, processor, data, method)
        if run.is_main:
            per_dataset[name] = row
            M.print0(run, f"{name}: accuracy {row['accuracy_paper']:.2f}% (paper rule), "
                          f"{row['accuracy_strict']:.2f}% (strict), {row['images']} images")
    if run.is_main:
        summary = dict(model=args.model, prompt=args.prompt, method=method, setting=args.setting,
                       open_set=args.open_set, trained_on=trained.get("dataset"),
                       trained_setting=trained.get("setting"), trained_method=trained.get("method"),
                       compare=args.compare, datasets=per_dataset, average=None, args=vars(args))
        if baseline is not None:
            missing = add_comparison(per_dataset, baseline)
            if missing:
                print(f"note: --compare {args.compare} has no {', '.join(missing)}: no change shown")
        summary["average"] = average(per_dataset)
        write_table(args.output_dir, "summary", summary, summary_markdown(summary))
    if run.world_size > 1:
        dist.destroy_process_group()


# ============================================================================ base-to-new

def base2new_table(base: dict, new: dict, rule: str = "paper") -> dict:
    """Per dataset base, new and H, and the average row: H of the averaged accuracies."""
    key = f"accuracy_{rule}"
    names = [name for name in base["datasets"] if name in new["datasets"]]
    rows = {}
    for name in names:
        b, n = base["datasets"][name][key], new["datasets"][name][key]
        rows[name] = {"base": b, "new": n, "H": harmonic_mean(b, n)}
    mean_base, mean_new = mean(r["base"] for r in rows.values()), mean(r["new"] for r in rows.values())
    # the paper's H: of the averages (82.64 etc. in Table 1), not an average of the rows' H
    return {"rule": rule, "datasets": rows,
            "average": {"base": mean_base, "new": mean_new, "H": harmonic_mean(mean_base, mean_new)},
            "only_in_base": [n for n in base["datasets"] if n not in new["datasets"]],
            "only_in_new": [n for n in new["datasets"] if n not in base["datasets"]]}


def base2new_markdown(table: dict) -> str:
    lines = [f"# Base-to-new ({table['rule']} rule)", "", "| dataset | base | new | H |", "|---|---|---|---|"]
    for name, row in list(table["datasets"].items()) + [("average", table["average"])]:
        lines.append(f"| {name} | {fmt(row['base'])} | {fmt(row['new'])} | {fmt(row['H'])} |")
    lines += ["", "H = 2·base·new / (base + new); the average row's H is that of the averaged "
                  "accuracies, as the paper computes it, not the mean of the rows' H."]
    for side in ("only_in_base", "only_in_new"):
        if table[side]:
            lines.append(f"Left out, evaluated {side.replace('_', ' ')}: {', '.join(table[side])}.")
    return "\n".join(lines) + "\n"


def write_table(folder: str, name: str, table: dict, markdown: str):
    """<folder>/<name>.json and <name>.md, and the markdown on screen."""
    D.write_atomic(os.path.join(folder, f"{name}.json"), json.dumps(table, indent=2))
    D.write_atomic(os.path.join(folder, f"{name}.md"), markdown)
    print(markdown + f"\nwrote {folder}/{name}.json and {name}.md", flush=True)


def merge_summaries(paths: list[str], what: str) -> dict:
    """The per-dataset rows of several summaries as one (the paper trains one model per dataset,
    so its tables gather one evaluation per dataset); a dataset found twice is an error."""
    merged = {"datasets": {}, "sources": {}}
    for path in paths:
        for name, row in read_summary(path, what)["datasets"].items():
            if name in merged["datasets"]:
                raise SystemExit(f"evaluate.py: {what}: {name} is in both {merged['sources'][name]} "
                                 f"and {path}; pass one evaluation per dataset")
            merged["datasets"][name], merged["sources"][name] = row, path
    return merged


def base2new_main(argv):
    parser = argparse.ArgumentParser(
        prog="evaluate.py base2new", formatter_class=HelpFormatter,
        description="The base-to-new table (the paper's Table 1) from evaluations of models trained "
                    "on the base classes, with --setting base and --setting new (one pair per "
                    "dataset, or one pair covering several datasets).")
    parser.add_argument("summaries", nargs="+", help="summary.json files (or their folders); each "
                        "is sorted into base or new by the --setting it was evaluated with")
    parser.add_argument("--rule", default="paper", choices=["paper", "strict"],
                        help="which judge's accuracy to tabulate")
    parser.add_argument("--output-dir", default="runs/base2new",
                        help="base2new.json and base2new.md go here")
    args = parser.parse_args(argv)
    sides = {"base": [], "new": []}
    for path in args.summaries:
        setting = read_summary(path, "SUMMARY").get("setting")
        if setting not in sides:
            raise SystemExit(f"evaluate.py base2new: {path} was evaluated with --setting {setting}; "
                             "expected evaluations with --setting base and --setting new")
        sides[setting].append(path)
    if not sides["base"] or not sides["new"]:
        missing = "base" if not sides["base"] else "new"
        raise SystemExit(f"evaluate.py base2new: no --setting {missing} evaluation among "
                         f"{', '.join(args.summaries)}")
    table = base2new_table(merge_summaries(sides["base"], "base"),
                           merge_summaries(sides["new"], "new"), args.rule)
    if not table["datasets"]:
        raise SystemExit("evaluate.py base2new: the base and new evaluations share no dataset")
    table["sources"] = sides
    markdown = base2new_markdown(table)
    write_table(args.output_dir, "base2new", table, markdown)
    return table


def table_main(argv):
    parser = argparse.ArgumentParser(
        prog="evaluate.py table", formatter_class=HelpFormatter,
        description="One accuracy table over several evaluations (e.g. the paper's Table 2: one "
                    "fine-tuned model per dataset, each evaluated on its own dataset), averaged as "
                    "the paper does: the plain mean of the per-dataset accuracies.")
    parser.add_argument("summaries", nargs="+", help="summary.json files (or their folders)")
    parser.add_argument("--output-dir", default="runs/table", help="table.json and table.md go here")
    args = parser.parse_args(argv)
    merged = merge_summaries(args.summaries, "SUMMARY")
    table = {"datasets": merged["datasets"], "average": average(merged["datasets"]),
             "sources": merged["sources"]}
    lines = ["| dataset | acc. paper | acc. strict | hedged % | thinking % | mean tokens | evaluation |",
             "|---|---|---|---|---|---|---|"]
    for name, row in list(table["datasets"].items()) + [(f"average ({len(merged['datasets'])})", table["average"])]:
        lines.append(f"| {name} | {fmt(row['accuracy_paper'])} | {fmt(row['accuracy_strict'])} | "
                     f"{fmt(row.get('hedged_rate'))} | {fmt(row.get('thinking_share'))} | "
                     f"{fmt(row.get('mean_completion_tokens'), 1)} | {merged['sources'].get(name, '')} |")
    markdown = "\n".join(lines) + "\n"
    write_table(args.output_dir, "table", table, markdown)
    return table


# ============================================================================ free-lunch matrix

def matrix_table(summaries: list[tuple[str, dict]], zero_shot: dict | None = None,
                 rule: str = "paper") -> dict:
    """Rows: the dataset each model was fine-tuned on; columns: evaluated datasets; cells: the
    accuracy change against zero-shot (from --zero-shot, else the run's own --compare)."""
    key, rows = f"accuracy_{rule}", {}
    for path, summary in summaries:
        row_name = summary.get("trained_on")
        if not row_name:
            row_name = os.path.basename(os.path.normpath(summary.get("model", path)))
            print(f"note: {path} does not say what its model was fine-tuned on (no "
                  f"trainer_state.pt); its row is called {row_name!r}")
        if row_name in rows:
            raise SystemExit(f"evaluate.py matrix: two runs are rows for {row_name!r} "
                             f"(the second is {path}); pass one run per training dataset")
        cells = {}
        for name, numbers in summary["datasets"].items():
            if zero_shot is not None:
                base = zero_shot["datasets"].get(name, {}).get(key)
                cells[name] = None if base is None else numbers[key] - base
            else:
                cells[name] = numbers.get(f"change_{rule}")
        if all(value is None for value in cells.values()):
            raise SystemExit(f"evaluate.py matrix: {path} has no accuracy change (it was evaluated "
                             "without --compare); pass --zero-shot SUMMARY to compute it")
        rows[row_name] = cells
    known = list(D.DATASETS) + ["demo"]
    seen = {name for cells in rows.values() for name in cells}
    columns = [name for name in known if name in seen] + sorted(seen - set(known))
    return {"rule": rule, "columns": columns, "rows": rows,
            "mean": {r: mean(cells.values()) for r, cells in rows.items()},
            "mean_others": {r: mean(v for name, v in cells.items() if name != r)
                            for r, cells in rows.items()}}


def matrix_markdown(table: dict) -> str:
    header = ["fine-tuned on \\ evaluated on"] + table["columns"] + ["mean", "mean of others"]
    lines = [f"# Accuracy change against zero-shot ({table['rule']} rule, points)", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row_name, cells in table["rows"].items():
        values = [signed(cells.get(name)) for name in table["columns"]]
        lines.append("| " + " | ".join([row_name] + values + [
            signed(table["mean"][row_name]), signed(table["mean_others"][row_name])]) + " |")
    return "\n".join(lines) + "\n"


def matrix_main(argv):
    parser = argparse.ArgumentParser(
        prog="evaluate.py matrix", formatter_class=HelpFormatter,
        description="The cross-dataset 'free lunch' matrix (the paper's Figure 2) from evaluations "
                    "of models fine-tuned on different datasets, each run with --dataset all.")
    parser.add_argument("runs", nargs="+", help="summary.json files (or their folders), one per "
                        "fine-tuned model")
    parser.add_argument("--zero-shot", default=None, metavar="SUMMARY",
                        help="the zero-shot run to subtract (default: each run's own --compare)")
    parser.add_argument("--rule", default="paper", choices=["paper", "strict"],
                        help="which judge's accuracy to compare")
    parser.add_argument("--output-dir", default="runs/matrix",
                        help="matrix.json, matrix.md and matrix.png go here")
    args = parser.parse_args(argv)
    summaries = [(path, read_summary(path, "RUN")) for path in args.runs]
    zero_shot = read_summary(args.zero_shot, "--zero-shot") if args.zero_shot else None
    table = matrix_table(summaries, zero_shot, args.rule)
    markdown = matrix_markdown(table)
    write_table(args.output_dir, "matrix", table, markdown)
    plot_matrix(table, os.path.join(args.output_dir, "matrix.png"))
    return table


# ============================================================================ pictures

def pyplot_or_none(target: str):
    """matplotlib's pyplot, or None after a note: pictures are an optional extra."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipped {target} (pip install matplotlib to draw it)")
        return None
    return plt


def plot_matrix(table: dict, path: str) -> str | None:
    """The free-lunch heat map: green where fine-tuning helped, red where it hurt."""
    plt = pyplot_or_none(path)
    if plt is None:
        return None
    rows, columns = list(table["rows"]), table["columns"]
    grid = [[table["rows"][r].get(c) for c in columns] for r in rows]
    limit = max([abs(v) for row in grid for v in row if v is not None] + [1e-9])
    fig, ax = plt.subplots(figsize=(1.5 + 0.8 * len(columns), 1.2 + 0.5 * len(rows)))
    image = ax.imshow([[math.nan if v is None else v for v in row] for row in grid],
                      cmap="RdYlGn", vmin=-limit, vmax=limit)
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if value is not None:
                ax.text(j, i, f"{value:+.1f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("fine-tuned on")
    ax.set_title(f"accuracy change against zero-shot, points ({table['rule']} rule)")
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")
    return path


# metrics.jsonl key -> panel title; a panel is drawn when some file has the key
CURVES = (("reward", "mean reward"), ("accuracy", "training accuracy (share of completions)"),
          ("test_accuracy", "held-out accuracy (%)"),
          ("completion_length", "completion length (tokens)"), ("loss", "loss"))


def plot_curves(metrics_files: list[str], path: str) -> str | None:
    """Reward, accuracy and completion length against the step (the paper's Figures 1 and 3),
    one line per training run."""
    runs = {}
    for file in metrics_files:
        try:
            records = D.read_jsonl(file)
        except (OSError, ValueError) as err:
            raise SystemExit(f"evaluate.py plot: {err}") from None
        label = os.path.basename(os.path.dirname(os.path.abspath(file)))
        runs[label if label not in runs else file] = records
    panels = [(key, title) for key, title in CURVES
              if any(r.get(key) is not None for records in runs.values() for r in records)]
    if not panels:
        raise SystemExit(f"evaluate.py plot: {', '.join(metrics_files)} hold none of "
                         f"{', '.join(k for k, _ in CURVES)}; expected metrics.jsonl of a training run")
    plt = pyplot_or_none(path)
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for label, records in runs.items():
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(runs) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")
    return path


def plot_main(argv):
    parser = argparse.ArgumentParser(
        prog="evaluate.py plot", formatter_class=HelpFormatter,
        description="Training curves (reward, accuracy, completion length: the paper's Figures 1 "
                    "and 3) from metrics.jsonl files, as a PNG. Needs matplotlib (optional).")
    parser.add_argument("metrics", nargs="+", help="metrics.jsonl of one or more training runs")
    parser.add_argument("--output", default=None,
                        help="the PNG to write (default: training_curves.png beside the first file)")
    args = parser.parse_args(argv)
    output = args.output or os.path.join(os.path.dirname(os.path.abspath(args.metrics[0])),
                                         "training_curves.png")
    return plot_curves(args.metrics, output)


COMMANDS = {"table": table_main, "base2new": base2new_main, "matrix": matrix_main, "plot": plot_main}


def main(argv=None):
    """`evaluate.py [flags]` evaluates; `evaluate.py table|base2new|matrix|plot ...` tabulates or draws."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    return run_evaluation(argv)


if __name__ == "__main__":
    main()
