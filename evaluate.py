"""Evaluate zero-shot, SFT and RL checkpoints the way the paper does: greedy, batched, sharded.

    python evaluate.py --model runs/pets/checkpoint-000600 --dataset oxford_pets --data-root ~/data
    torchrun --nproc_per_node 8 evaluate.py --model Qwen/Qwen2-VL-2B-Instruct --dataset all \\
        --data-root ~/data --prompt no-think --output-dir runs/eval/zero-shot
    python evaluate.py --model tiny --dataset demo --image-size 56 --max-new-tokens 8 --device cpu

--output-dir gets <dataset>/predictions.jsonl, timing.json, summary.json, summary.md and args.json;
--resume finishes an interrupted run; --compare adds the change against a zero-shot run.
Tables and pictures from finished evaluations (a summary.json or its folder):

    python evaluate.py table runs/eval/fewshot/*/                 # Table 2: one model per dataset
    python evaluate.py base2new runs/eval/b2n/*/base runs/eval/b2n/*/new     # Table 1: base, new, H
    python evaluate.py matrix runs/eval/from-imagenet runs/eval/from-pets ...   # Figure 2
    python evaluate.py plot runs/pets/metrics.jsonl [more metrics.jsonl]       # Figures 1, 3

Departures (docs/method.md sections 3, 6): the TRAINING prompt suffix ends the question, candidate
lists are seeded, and a strict judge, hedged answers and think/answer agreement are reported too.
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from rewards import extract_answer, is_correct, named_classes, think_text, thinks
from data import (DATASETS, PROMPT_SUFFIX, SETTINGS, ClassificationData, ImageError, load_data,
                  load_image, make_question, read_json, write_atomic)
from model import Processor, build_prompts, load_model, sample_groups
from run import (HelpFormatter, Run, all_reduce, append_jsonl, barrier, changed_flags, check_flags,
                 compute_context, full_weights, join_job, leave_job, MAX_IMAGE_SIZE, one_line_errors,
                 print0, read_jsonl, saved_state)

# evaluation prompt name -> the training method whose suffix it uses (cls-rl's thinks)
PROMPTS = {"think": "cls-rl", **{method: method for method in PROMPT_SUFFIX if method != "cls-rl"}}
# what a --resume must share with the run it continues, or its records would mix two evaluations
RESUME_MUST_MATCH = ("model", "setting", "prompt", "open_set", "image_size", "max_new_tokens", "seed")
# flags that change what the model is shown (the picture, the order of the candidates): by default
# a checkpoint's training values, else these (the authors')
INPUT_DEFAULTS = {"image_size": 384, "seed": 100}


@torch.no_grad()
def predict(model, processor: Processor, data: ClassificationData, method: str, *,
            batch_size: int = 32, max_new_tokens: int = 1024, image_size: int = 384, seed: int = 1,
            limit: int | None = None, open_set: bool = False, skip: set[int] = frozenset(),
            rank: int = 0, world_size: int = 1, compile: bool = False):
    """Greedy answers (model.sample_groups at temperature 0, which equals transformers' generate)
    for this rank's share of `data`: yields each batch's records, sorted by index, when it is done.
    Batches (not examples) are dealt round-robin to ranks and candidate lists are seeded with
    (seed, example) (data.make_question), so sharded runs and reruns equal one process exactly.
    `skip`: indices already done (resume). An unreadable image gives a record with `error`.
    `compile`: decode with model.decode_compiled (the same answers, fewer launches)."""
    indices = [i for i in range(len(data.examples))[:limit] if i not in skip]
    batches = [indices[s:s + batch_size] for s in range(0, len(indices), batch_size)]
    was_training = model.training
    model.eval()
    try:
        for batch in batches[rank::world_size]:
            records, asked, images = [], [], []
            for i in batch:
                example = data.examples[i]
                text, names = make_question(data, i, method, seed, epoch=0, open_set=open_set)
                question = dict(index=i, image=example.image, label=example.classname,
                                candidates=names, prompt=text)
                try:
                    images.append(load_image(example.image, image_size))
                    asked.append(question)
                except ImageError as error:
                    records.append(dict(question, error=str(error)))
            if asked:
                prompts = build_prompts(processor, images, [q["prompt"] for q in asked], model.device)
                rollout = sample_groups(model, processor, prompts, group_size=1,
                                        max_new_tokens=max_new_tokens, temperature=0, compile=compile)
                records += map(judge, asked, rollout.texts, rollout.completion_mask.sum(1).tolist())
            yield sorted(records, key=lambda r: r["index"])
    finally:
        model.train(was_training)


def judge(question: dict, completion: str, completion_tokens: int) -> dict:
    """One prediction record: what was asked (index, image, label, candidates, prompt), what
    came back, and every judgement of it."""
    answer, label = extract_answer(completion), question["label"]
    return dict(question, completion=completion, answer=answer,
                correct_paper=is_correct(completion, label, "paper"),
                correct_strict=is_correct(completion, label, "strict"),
                named=named_classes(answer, question["candidates"]), thinks=thinks(completion),
                completion_tokens=completion_tokens)


def accuracy(model, processor, data, method, *, rank=0, world_size=1, **predict_kwargs) -> float:
    """Paper-rule accuracy over `data` as a FRACTION in [0, 1], for the training logs: each rank
    predicts its share and every rank returns the accuracy over all of them."""
    batches = predict(model, processor, data, method, rank=rank, world_size=world_size, **predict_kwargs)
    records = [record for batch in batches for record in batch]
    counts = all_reduce(Run(rank, world_size, model.device), {
        "right": sum(r.get("correct_paper", False) for r in records), "images": len(records)})
    return counts["right"] / max(1.0, counts["images"])


def held_out_accuracy(args, run: Run, model, processor, test_data, policy=None,
                      start_log: str | None = None) -> float:
    """The training scripts' --eval-every: greedy accuracy on the test split (a fraction), in
    the run's precision (under FSDP on the full weights, gathered once through its `policy`).
    `start_log`: a JSON-lines log where it is written as step 0 (where the training curve starts)."""
    with torch.no_grad(), full_weights(policy), compute_context(model, args.precision, keep=args.compile):
        fraction = accuracy(model, processor, test_data, args.method, rank=run.rank,
                            world_size=run.world_size, batch_size=args.eval_batch_size,
                            max_new_tokens=args.max_new_tokens, image_size=args.image_size,
                            seed=args.seed, limit=args.eval_limit, compile=args.compile)
    if start_log and run.is_main:
        append_jsonl(start_log, [{"step": 0, "test_accuracy": fraction}])
    return fraction


def images_per_second(timing: dict) -> float | None:
    return timing["timed_images"] / timing["inference_seconds"] if timing["inference_seconds"] else None


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


def summarise(records: list[dict]) -> dict:
    """One dataset's row of summary.json and summary.md, from its prediction records. Rates are
    in percent (None, shown as –, when nothing is counted):
    - images; unreadable_images: records with `error`. An unreadable image counts as WRONG in
      both accuracies (no answer); the other rates are over the answered images.
    - accuracy_paper: the authors' lenient judge (label contained in the answer, ignoring case);
      accuracy_strict: the normalised answer equals the label (rewards.is_correct).
    - hedged_rate: answers that name more than one listed candidate (these pass the paper judge;
      none with --open-set, which lists no candidates).
    - thinking_share: responses with a closed <think> block.
    - think_answer_mismatch_rate: of the thinking responses whose think part and answer both
      name a candidate, the share where the two name no class in common (the reasoning argues
      for one class, the answer gives another); think_answer_pairs is that denominator.
    - mean_completion_tokens: tokens generated per answer, the end token included.
    evaluate_dataset adds inference_seconds (the prediction loop, model loading excluded),
    timed_images and images_per_second, summed over --resume passes (timing.json);
    add_comparison adds change_paper / change_strict; `average` makes the average row."""
    answered = [r for r in records if "error" not in r]
    listed = [r for r in answered if r["candidates"]]  # none with --open-set: nothing to hedge among
    thinking = [r for r in answered if r["thinks"]]
    pairs = [(named_classes(think_text(r["completion"]), r["candidates"]), r["named"]) for r in thinking]
    pairs = [(thought, answer) for thought, answer in pairs if thought and answer]
    return dict(
        images=len(records), unreadable_images=len(records) - len(answered),
        accuracy_paper=percent(sum(r.get("correct_paper", False) for r in records), len(records)),
        accuracy_strict=percent(sum(r.get("correct_strict", False) for r in records), len(records)),
        hedged_rate=percent(sum(len(r["named"]) > 1 for r in listed), len(listed)),
        thinking_share=percent(len(thinking), len(answered)),
        think_answer_mismatch_rate=percent(sum(not set(t) & set(a) for t, a in pairs), len(pairs)),
        think_answer_pairs=len(pairs),
        mean_completion_tokens=mean(r["completion_tokens"] for r in answered))


def average(per_dataset: dict[str, dict]) -> dict:
    """The average row: rates are the plain mean over datasets (the paper's average of the
    per-dataset accuracies); counts and times the sum."""
    rates = ("accuracy_paper", "accuracy_strict", "hedged_rate", "thinking_share",
             "think_answer_mismatch_rate", "mean_completion_tokens", "change_paper", "change_strict")
    counts = ("images", "unreadable_images", "think_answer_pairs", "timed_images", "inference_seconds")
    out = {key: mean(row.get(key) for row in per_dataset.values()) for key in rates}
    out.update({key: sum(row.get(key) or 0 for row in per_dataset.values()) for key in counts})
    return dict(out, images_per_second=images_per_second(out))


def add_comparison(per_dataset: dict[str, dict], baseline: dict) -> list[str]:
    """--compare: change_<rule> = accuracy minus the baseline (zero-shot) run's, for the datasets
    both evaluated; returns the datasets the baseline lacks."""
    for name, row in per_dataset.items():
        other = baseline["datasets"].get(name, {})
        for rule, key in (("paper", "accuracy_paper"), ("strict", "accuracy_strict")):
            row[f"change_{rule}"] = None if other.get(key) is None else row[key] - other[key]
    return [name for name in per_dataset if name not in baseline["datasets"]]


def fmt(value, digits: int = 2, sign: str = "") -> str:
    """A table cell: – for None, counts as they are, else `digits` places (sign="+": +1.23)."""
    if value is None:
        return "–"
    return str(value) if isinstance(value, int) and not sign else f"{value:{sign}.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table of already formatted cells; every table of this script is made here."""
    lines = ["| " + " | ".join(cells) + " |" for cells in [header, *rows]]
    lines.insert(1, "|" + "---|" * len(header))
    return "\n".join(lines) + "\n"


def summary_markdown(summary: dict) -> str:
    compare, args = summary["compare"], summary["args"]
    trained = (f"{summary['trained_on']} ({summary['trained_setting']}, {summary['trained_method']})"
               if summary["trained_on"] else "unknown (no trainer_state.pt: a zero-shot model?)")
    header = ["dataset", "images", "unreadable", "acc. paper", "acc. strict", "hedged %",
              "thinking %", "think≠answer %", "mean tokens", "images/s", "seconds"]
    rows = [[name, fmt(row["images"]), fmt(row["unreadable_images"]), fmt(row["accuracy_paper"]),
             fmt(row["accuracy_strict"]), fmt(row["hedged_rate"]), fmt(row["thinking_share"]),
             fmt(row["think_answer_mismatch_rate"]), fmt(row["mean_completion_tokens"], 1),
             fmt(row["images_per_second"]), fmt(row["inference_seconds"], 1),
             *(fmt(row.get(f"change_{rule}"), sign="+") for rule in ("paper", "strict") if compare)]
            for name, row in [*summary["datasets"].items(),
                              (f"average ({len(summary['datasets'])})", summary["average"])]]
    return (f"# Evaluation of {summary['model']}\n\n"
            f"prompt `{summary['prompt']}` (the `{summary['method']}` training suffix), setting "
            f"{summary['setting']}{', open set' if summary['open_set'] else ''}, greedy, at most "
            f"{args['max_new_tokens']} new tokens, {args['image_size']} px images, seed "
            f"{args['seed']}.\nFine-tuned on: {trained}\n"
            "Accuracies count unreadable images as wrong; the other rates are over answered images.\n"
            + (f"Δ: accuracy change against {compare}.\n\n" if compare else "\n")
            + markdown_table(header + ["Δ paper", "Δ strict"] * bool(compare), rows))


def write_table(folder: str, name: str, table: dict, markdown: str):
    """<folder>/<name>.json and <name>.md, and the markdown on screen."""
    write_atomic(os.path.join(folder, f"{name}.json"), json.dumps(table, indent=2))
    write_atomic(os.path.join(folder, f"{name}.md"), markdown)
    print(markdown + f"\nwrote {folder}/{name}.json and {name}.md", flush=True)


def read_summary(path: str, what: str) -> dict:
    """A summary.json written by this script, from its path or its folder; `what` (the flag or
    argument that named it) starts the error message."""
    file = os.path.join(path, "summary.json") if os.path.isdir(path) else path
    try:
        summary = read_json(file)
        if all({"accuracy_paper", "accuracy_strict"} <= row.keys()
               for row in summary["datasets"].values()):
            return summary
        problem = f"{file} has a dataset without accuracy_paper or accuracy_strict"
    except FileNotFoundError:
        problem = "no summary.json there"
    except ValueError as err:  # "<file> is not valid JSON (...)"
        problem = str(err)
    except (TypeError, KeyError, AttributeError):  # JSON, but no table of rows per dataset
        problem = f"{file} has no 'datasets' table of accuracies"
    raise SystemExit(f"evaluate.py: {what} {path}: {problem}; expected a summary.json written by "
                     "evaluate.py, or the folder holding it")


def write_predictions(folder: str, records: dict[int, dict]):
    write_atomic(os.path.join(folder, "predictions.jsonl"),
                 "".join(json.dumps(records[i]) + "\n" for i in sorted(records)))


def parse_eval_args(argv):
    parser = argparse.ArgumentParser("evaluate.py", description=__doc__, formatter_class=HelpFormatter)
    a = parser.add_argument
    a("--model", default="Qwen/Qwen2-VL-2B-Instruct", help="hub id, checkpoint folder, or 'tiny'")
    a("--dataset", default="demo", help="a dataset, several joined by commas, or 'all' (the 11)")
    a("--data-root", default=None, help="folder holding the datasets in the CoOp layout (see data.py)")
    a("--setting", default="fewshot", choices=SETTINGS, help="base / new: half the classes each")
    a("--prompt", choices=list(PROMPTS), help="its training suffix ends the question (default: "
      "the checkpoint's method, else think = cls-rl's)")
    a("--allow-prompt-mismatch", action="store_true", help="a --prompt of another method is meant")
    a("--open-set", action="store_true", help="ask without the candidate list (Table 4)")
    a("--limit", type=int, default=None, help="evaluate only the first N test images of each dataset")
    a("--batch-size", type=int, default=32, help="images per greedy decoding batch (authors: 32)")
    a("--max-new-tokens", type=int, default=1024, help="answer length limit (authors: 1024)")
    a("--image-size", type=int, help="square LANCZOS resize (default: the checkpoint's training "
      "size, else 384)")
    a("--seed", type=int, help="seed of the candidate lists (default: the checkpoint's training "
      "seed, else 100)")
    a("--output-dir", default="runs/eval", help="predictions, summary.json and summary.md go here")
    a("--resume", action="store_true", help="keep --output-dir's predictions, predict the rest")
    a("--compare", metavar="SUMMARY", help="a zero-shot run's summary.json: report the change")
    a("--device", default=None, help="cpu or cuda (default: cuda when available)")
    a("--compile", action="store_true", help="decode with a static KV cache and a compiled step "
      "(CUDA graphs on GPU): the same answers, fewer launches (README: --compile)")
    a("--dist-timeout", type=float, default=30, help="minutes a rank waits on the others before failing")
    args = parser.parse_args(argv)
    check_flags(args, at_least={"batch_size": 1, "max_new_tokens": 1, "image_size": 1, "limit": 1},
                above={"dist_timeout": 0}, at_most={"image_size": MAX_IMAGE_SIZE})
    return args


def load_test_sets(args) -> dict[str, ClassificationData]:
    """The test split of every --dataset ('all': the paper's 11), checked before the model loads."""
    names = list(DATASETS) if args.dataset == "all" else \
        list(dict.fromkeys(name.strip() for name in args.dataset.split(",") if name.strip()))
    unknown = [name for name in names if name not in DATASETS + ("demo",)]
    if unknown or not names:
        raise SystemExit(f"evaluate.py: --dataset {args.dataset}: unknown "
                         f"{', '.join(unknown) or 'empty'}; expected 'all' or names joined by "
                         f"commas from: {', '.join(DATASETS)}, demo")
    test_sets = {}
    for name in names:
        with one_line_errors(f"evaluate.py: --dataset {name}"):  # an empty split too
            test_sets[name] = load_data(name, args.data_root, args.setting, "test")
    return test_sets


def choose_inputs(args, trained: dict) -> list[str]:
    """What the model is shown, like what it was trained on (`trained`: the checkpoint's flags, from
    its trainer_state.pt). --prompt: else the prompt of its training method, else think; a prompt of
    another method needs --allow-prompt-mismatch. (The authors' scripts ended the question with
    "First output the thinking process..." or "Please directly output the answer name.")
    --image-size and --seed: else its training values, else INPUT_DEFAULTS; a value given that
    differs from training is used. Returns the lines to print about it."""
    trained_method = trained.get("method")
    native = {method: name for name, method in PROMPTS.items()}.get(trained_method, "think")
    if args.prompt is None:
        args.prompt = native
    elif trained_method and PROMPTS[args.prompt] != trained_method and not args.allow_prompt_mismatch:
        raise SystemExit(f"evaluate.py: --prompt {args.prompt} asks with the {PROMPTS[args.prompt]} "
                         f"training suffix, but {args.model} was trained with --method "
                         f"{trained_method}; pass --prompt {native}, or --allow-prompt-mismatch to "
                         "evaluate it with this prompt anyway")
    taken, notes = [], []
    for name, default in INPUT_DEFAULTS.items():
        flag, value, training = f"--{name.replace('_', '-')}", getattr(args, name), trained.get(name)
        if value is None and training is not None:
            taken.append(f"{name.replace('_', ' ')} {training}")
        elif training is not None and value != training:
            notes.append(f"note: {flag} {value}, but {args.model} was trained with {flag} {training}")
        setattr(args, name, next(v for v in (value, training, default) if v is not None))
    return [f"{', '.join(taken)}, from the checkpoint's training flags"] * bool(taken) + notes


def check_output_dir(args, names: list[str]):
    """A new run never mixes into earlier predictions; a resumed one only into its own kind."""
    saved_path = os.path.join(args.output_dir, "args.json")
    if args.resume and os.path.isfile(saved_path):
        changed = changed_flags(read_json(saved_path), args, RESUME_MUST_MATCH)
        if changed:
            raise SystemExit(f"evaluate.py: --resume: {args.output_dir} holds predictions made with "
                             f"other settings ({'; '.join(changed)}); rerun with the same settings, "
                             "or choose another --output-dir")
    busy = [name for name in names  # predictions.jsonl, or the rank files of an interrupted run
            if glob.glob(os.path.join(args.output_dir, name, "predictions*.jsonl"))]
    if busy and not args.resume:
        raise SystemExit(f"evaluate.py: --output-dir {args.output_dir} already holds predictions "
                         f"for {', '.join(busy)}; pass --resume to keep them and predict only the "
                         "missing images, or choose another --output-dir")


def earlier_predictions(run: Run, folder: str, resume: bool) -> tuple[dict[int, dict], set[int]]:
    """With --resume, the records earlier runs left in `folder` (on rank 0; {} elsewhere) and on
    every rank the indices not to predict again. Rank 0 merges predictions.jsonl and the rank files
    of an interrupted run (other machines' only if --output-dir is shared) into one sorted
    predictions.jsonl; later records win. Unreadable images (maybe repaired since) and a last line
    cut short by a kill are predicted again. A bad file stops every rank with one message."""
    done, error = {}, None
    if resume and run.is_main:
        rank_files = sorted(glob.glob(os.path.join(folder, "predictions.rank*.jsonl")))
        try:
            for path in glob.glob(os.path.join(folder, "predictions.jsonl")) + rank_files:
                for number, record in enumerate(read_jsonl(path), 1):
                    if not isinstance(record, dict) or not isinstance(record.get("index"), int):
                        raise ValueError(f"{path}: record {number} has no integer 'index'; "
                                         "expected a record written by evaluate.py")
                    done[record["index"]] = record
            write_predictions(folder, done)
            for path in rank_files:
                os.remove(path)
        except (OSError, ValueError) as err:
            error = f"evaluate.py: {err}"
    shared = [sorted(i for i, record in done.items() if "error" not in record), error]
    if run.world_size > 1:  # the other ranks wait here for rank 0's indices, or its error
        dist.broadcast_object_list(shared, src=0)
    skip, error = shared
    if error:
        raise SystemExit(error)
    return done, set(skip)


def evaluate_dataset(args, run: Run, model, processor, data: ClassificationData) -> dict | None:
    """Predict (or finish predicting) one test split; its summary row, printed, on rank 0. Ranks
    append each finished batch to <dataset>/predictions.rank<R>.jsonl, merged at the end into
    predictions.jsonl; resumed with the same --batch-size, the remaining batches are those of an
    uninterrupted run. timing.json sums inference time and images over --resume passes."""
    folder = os.path.join(args.output_dir, data.dataset)
    count = len(data.examples[:args.limit])
    done, skip = earlier_predictions(run, folder, args.resume)
    todo = count - sum(i < count for i in skip)
    print0(run, f"{data.dataset}: {count} test images, {count - todo} done earlier, {todo} to predict")
    shard = os.path.join(folder, f"predictions.rank{run.rank}.jsonl")
    write_atomic(shard, "")  # emptied: its records are in `done` or redone; makes the folder too
    records = []
    barrier(run)
    t0 = time.perf_counter()
    with tqdm(total=todo, desc=data.dataset, disable=not run.is_main, dynamic_ncols=True) as bar:
        for batch in predict(model, processor, data, PROMPTS[args.prompt], batch_size=args.batch_size,
                             max_new_tokens=args.max_new_tokens, image_size=args.image_size,
                             seed=args.seed, limit=count, open_set=args.open_set, skip=skip,
                             rank=run.rank, world_size=run.world_size, compile=args.compile):
            append_jsonl(shard, batch)  # at once, so an interruption keeps every finished batch
            records += batch
            bar.update(len(batch) * run.world_size)
        barrier(run)
        seconds = time.perf_counter() - t0
    parts = [records]  # every rank's records, on rank 0
    if run.world_size > 1:
        parts = [None] * run.world_size if run.is_main else None
        dist.gather_object(records, parts, dst=0)
    row = None
    if run.is_main:
        done.update((r["index"], r) for part in parts for r in part)
        write_predictions(folder, done)
        # the first `count` images are this evaluation (a longer earlier run may have done more)
        row = summarise([done[i] for i in sorted(done) if i < count])
        timing_path = os.path.join(folder, "timing.json")
        earlier = read_json(timing_path) if args.resume and os.path.isfile(timing_path) else {}
        timing = {"inference_seconds": earlier.get("inference_seconds", 0.0) + seconds,
                  "timed_images": earlier.get("timed_images", 0) + todo}
        write_atomic(timing_path, json.dumps(timing))
        row.update(timing, images_per_second=images_per_second(timing))
        print(f"{data.dataset}: accuracy {row['accuracy_paper']:.2f}% (paper rule), "
              f"{row['accuracy_strict']:.2f}% (strict), {row['images']} images", flush=True)
    barrier(run)  # rank 0 has saved everything: the rank files can go
    os.remove(shard)
    return row


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


def command_parser(command, inputs: str, inputs_help: str, output_help: str, rule_help: str = ""):
    """The parser of a table or picture command, `command` its <name>_main function (its docstring
    is the description): its input files, --output-dir runs/<name> (plot, which writes one picture:
    --output, no default), and --rule where a judge is chosen (`rule_help`)."""
    name = command.__name__.removesuffix("_main")
    parser = argparse.ArgumentParser(prog=f"evaluate.py {name}", description=command.__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument(inputs, nargs="+", help=inputs_help)
    parser.add_argument("--output" if name == "plot" else "--output-dir",
                        default=None if name == "plot" else f"runs/{name}", help=output_help)
    if rule_help:
        parser.add_argument("--rule", default="paper", choices=["paper", "strict"], help=rule_help)
    return parser


def table_main(argv) -> dict:
    """The paper's Table 2: the accuracies of one model per dataset (each evaluated on its own)
    and their plain mean."""
    args = command_parser(table_main, "summaries", "summary.json files (or their folders)",
                          "table.json and table.md go here").parse_args(argv)
    merged = merge_summaries(args.summaries, "SUMMARY")
    table = dict(merged, average=average(merged["datasets"]))
    rows = [[name, fmt(row["accuracy_paper"]), fmt(row["accuracy_strict"]),
             fmt(row.get("hedged_rate")), fmt(row.get("thinking_share")),
             fmt(row.get("mean_completion_tokens"), 1), merged["sources"].get(name, "")]
            for name, row in [*table["datasets"].items(),
                              (f"average ({len(table['datasets'])})", table["average"])]]
    header = ["dataset", "acc. paper", "acc. strict", "hedged %", "thinking %", "mean tokens",
              "evaluation"]
    write_table(args.output_dir, "table", table, markdown_table(header, rows))
    return table


def base2new_main(argv) -> dict:
    """The base-to-new table (the paper's Table 1) from evaluations of models trained on the base
    classes, with --setting base and --setting new (one pair per dataset, or one pair covering
    several datasets)."""
    args = command_parser(base2new_main, "summaries", "summary.json files (or their folders); each is "
                          "sorted into base or new by the --setting it was evaluated with",
                          "base2new.json and base2new.md go here",
                          rule_help="which judge's accuracy to tabulate").parse_args(argv)
    sides = {"base": [], "new": []}
    for path in args.summaries:
        setting = read_summary(path, "SUMMARY").get("setting")
        if setting not in sides:
            raise SystemExit(f"evaluate.py base2new: {path} was evaluated with --setting {setting}; "
                             "expected evaluations with --setting base and --setting new")
        sides[setting].append(path)
    for side in ("base", "new"):
        if not sides[side]:
            raise SystemExit(f"evaluate.py base2new: no --setting {side} evaluation among "
                             f"{', '.join(args.summaries)}")
    base, new = (merge_summaries(sides[side], side)["datasets"] for side in ("base", "new"))
    key = f"accuracy_{args.rule}"
    rows = {name: {"base": base[name][key], "new": new[name][key],
                   "H": harmonic_mean(base[name][key], new[name][key])} for name in base if name in new}
    if not rows:
        raise SystemExit("evaluate.py base2new: the base and new evaluations share no dataset")
    average = {side: mean(row[side] for row in rows.values()) for side in ("base", "new")}
    table = {"rule": args.rule, "datasets": rows, "average": dict(average, H=harmonic_mean(**average)),
             "only_in_base": [name for name in base if name not in new],
             "only_in_new": [name for name in new if name not in base], "sources": sides}
    cells = [[name, fmt(row["base"]), fmt(row["new"]), fmt(row["H"])]
             for name, row in [*rows.items(), ("average", table["average"])]]
    notes = ["H = 2·base·new / (base + new); the average row's H is that of the AVERAGED "
             "accuracies, as the paper computes it (its Table 1), not the mean of the rows' H."]
    notes += [f"Left out, evaluated {side.replace('_', ' ')}: {', '.join(table[side])}."
              for side in ("only_in_base", "only_in_new") if table[side]]
    body = markdown_table(["dataset", "base", "new", "H"], cells) + "\n" + "\n".join(notes) + "\n"
    write_table(args.output_dir, "base2new", table, f"# Base-to-new ({args.rule} rule)\n\n{body}")
    return table


def matrix_main(argv) -> dict:
    """The cross-dataset 'free lunch' matrix (the paper's Figure 2) from evaluations of models
    fine-tuned on different datasets, each run with --dataset all. Rows: the dataset each model
    was fine-tuned on; columns: evaluated datasets; cells: the accuracy change against zero-shot
    (--zero-shot, else the run's own --compare)."""
    parser = command_parser(matrix_main, "runs", "summary.json files (or their folders), one per "
                            "fine-tuned model", "matrix.json, matrix.md and matrix.png go here",
                            rule_help="which judge's accuracy to compare")
    parser.add_argument("--zero-shot", default=None, metavar="SUMMARY",
                        help="the zero-shot run to subtract (default: each run's own --compare)")
    args = parser.parse_args(argv)
    zero_shot = read_summary(args.zero_shot, "--zero-shot") if args.zero_shot else None
    rows = {}
    for path in args.runs:
        summary = read_summary(path, "RUN")
        row_name = summary.get("trained_on")
        if not row_name:
            row_name = os.path.basename(os.path.normpath(summary.get("model", path)))
            print(f"note: {path} does not say what its model was fine-tuned on (no "
                  f"trainer_state.pt); its row is called {row_name!r}")
        if row_name in rows:
            raise SystemExit(f"evaluate.py matrix: two runs are rows for {row_name!r} "
                             f"(the second is {path}); pass one run per training dataset")
        if zero_shot is not None:  # else the change the run's own --compare recorded
            add_comparison(summary["datasets"], zero_shot)
        changes = {name: row.get(f"change_{args.rule}") for name, row in summary["datasets"].items()}
        if all(value is None for value in changes.values()):
            raise SystemExit(f"evaluate.py matrix: {path} has no accuracy change (it was evaluated "
                             "without --compare); pass --zero-shot SUMMARY to compute it")
        rows[row_name] = changes
    seen = {name for changes in rows.values() for name in changes}  # in the paper's order, then the rest
    columns = [name for name in (*DATASETS, "demo") if name in seen] + sorted(seen - {*DATASETS, "demo"})
    table = {"rule": args.rule, "columns": columns, "rows": rows,
             "mean": {r: mean(changes.values()) for r, changes in rows.items()},
             "mean_others": {r: mean(v for name, v in changes.items() if name != r)
                             for r, changes in rows.items()}}
    header = ["fine-tuned on \\ evaluated on", *columns, "mean", "mean of others"]
    cells = [[name, *(fmt(changes.get(column), sign="+") for column in columns),
              fmt(table["mean"][name], sign="+"), fmt(table["mean_others"][name], sign="+")]
             for name, changes in rows.items()]
    write_table(args.output_dir, "matrix", table, f"# Accuracy change against zero-shot ({args.rule} "
                "rule, points)\n\n" + markdown_table(header, cells))
    plot_matrix(rows, columns, args.rule, os.path.join(args.output_dir, "matrix.png"))
    return table


def save_figure(path: str, figsize: tuple[float, float], draw) -> str | None:
    """A matplotlib Figure drawn on by `draw(fig)`, saved as `path`; returns `path`, or None after a
    note when matplotlib is missing: pictures are an optional extra."""
    try:
        from matplotlib.figure import Figure  # without pyplot: no display, no backend to choose
    except ImportError:
        print(f"matplotlib is not installed: skipped {path} (pip install matplotlib to draw it)")
        return None
    fig = Figure(layout="tight", figsize=figsize)
    draw(fig)
    picture = io.BytesIO()  # written by write_atomic, which makes the folder
    fig.savefig(picture, format=os.path.splitext(path)[1][1:] or "png", dpi=150, bbox_inches="tight")
    write_atomic(path, picture.getvalue())
    print(f"wrote {path}")
    return path


def plot_matrix(rows: dict[str, dict], columns: list[str], rule: str, path: str) -> str | None:
    """The free-lunch heat map of matrix.json's rows (fine-tuned on -> evaluated on -> change) and
    columns: green where fine-tuning helped, red where it hurt."""
    grid = [[changes.get(c) for c in columns] for changes in rows.values()]
    limit = max([abs(v) for row in grid for v in row if v is not None] + [1e-9])

    def draw(fig):
        ax = fig.subplots()
        image = ax.imshow([[float("nan") if v is None else v for v in row] for row in grid],
                          cmap="RdYlGn", vmin=-limit, vmax=limit)
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                if value is not None:
                    ax.text(j, i, f"{value:+.1f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
        ax.set_yticks(range(len(rows)), list(rows))
        ax.set(xlabel="evaluated on", ylabel="fine-tuned on",
               title=f"accuracy change against zero-shot, points ({rule} rule)")
        fig.colorbar(image, ax=ax, shrink=0.8)
    return save_figure(path, (1.5 + 0.8 * len(columns), 1.2 + 0.5 * len(rows)), draw)


def plot_main(argv) -> str | None:
    """Training curves (reward, accuracy, completion length: the paper's Figures 1 and 3) from
    metrics.jsonl files, as a PNG. Needs matplotlib (optional)."""
    args = command_parser(
        plot_main, "metrics", "metrics.jsonl of one or more training runs",
        "the PNG to write (default: training_curves.png beside the first file)").parse_args(argv)
    titles = {"reward": "mean reward", "reward_accuracy": "training accuracy (share of completions)",
              "test_accuracy": "held-out accuracy (fraction)",
              "completion_length": "completion length (tokens)", "loss": "loss"}
    runs = {}  # label (the run's folder, else the file) -> its metrics records
    for file in args.metrics:  # a missing or bad file: main's one-line error
        label = os.path.basename(os.path.dirname(os.path.abspath(file)))
        runs[label if label not in runs else file] = read_jsonl(file)
    panels = [(key, title) for key, title in titles.items()
              if any(r.get(key) is not None for records in runs.values() for r in records)]
    if not panels:
        raise SystemExit(f"evaluate.py plot: {', '.join(args.metrics)} hold none of "
                         f"{', '.join(titles)}; expected metrics.jsonl of a training run")

    def draw(fig):
        for ax, (key, title) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
            for label, records in runs.items():
                points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
                if points:
                    ax.plot(*zip(*points), label=label)
            ax.set(title=title, xlabel="step", xlim=(0, None))  # step 0: before training
            if len(runs) > 1:
                ax.legend(fontsize=8)
    return save_figure(args.output or os.path.join(os.path.dirname(os.path.abspath(args.metrics[0])),
                                                   "training_curves.png"), (4 * len(panels), 3.2), draw)


def main(argv=None):
    """`evaluate.py [flags]` evaluates (parse_eval_args); `evaluate.py table|base2new|matrix|plot ...`
    tabulates or draws."""
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {"table": table_main, "base2new": base2new_main, "matrix": matrix_main, "plot": plot_main}
    if argv and argv[0] in commands:
        with one_line_errors(f"evaluate.py {argv[0]}"):  # an output that cannot be written, say
            return commands[argv[0]](argv[1:])
    args = parse_eval_args(argv)
    with one_line_errors("evaluate.py"):  # bad input met while setting up: one line, no traceback
        trained = saved_state(args.model).get("args", {})  # {} for a model not trained here
        input_notes = choose_inputs(args, trained)
        baseline = read_summary(args.compare, "--compare") if args.compare else None
        test_sets = load_test_sets(args)
        check_output_dir(args, list(test_sets))
        run = join_job(args.device, args.dist_timeout)
        if run.is_main:
            write_atomic(os.path.join(args.output_dir, "args.json"), json.dumps(vars(args), indent=2))
        model, processor = load_model(args.model, run.device)
    method = PROMPTS[args.prompt]
    print0(run, *input_notes, f"evaluating {args.model} with the {args.prompt} prompt ({method} suffix) "
           f"on {', '.join(test_sets)} ({args.setting}), {run.world_size} process(es)", sep="\n")
    per_dataset = {name: evaluate_dataset(args, run, model, processor, data)
                   for name, data in test_sets.items()}  # the rows, on rank 0
    if run.is_main:
        if baseline is not None and (missing := add_comparison(per_dataset, baseline)):
            print(f"note: --compare {args.compare} has no {', '.join(missing)}: no change shown")
        summary = dict(model=args.model, prompt=args.prompt, method=method, setting=args.setting,
                       open_set=args.open_set, compare=args.compare, trained_on=trained.get("dataset"),
                       trained_setting=trained.get("setting"), trained_method=trained.get("method"),
                       datasets=per_dataset, average=average(per_dataset), args=vars(args))
        write_table(args.output_dir, "summary", summary, summary_markdown(summary))
    leave_job(run)


if __name__ == "__main__":
    main()
