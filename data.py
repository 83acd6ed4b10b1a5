"""Data for CLS-RL: CoOp-layout datasets on disk -> (image path, question, candidates, label).

Every training and evaluation script gets its examples from `load_data` and the text the
model reads from `make_question`; `load_image` gives the pixels. Look at what a run will
see (one JSON object per example, plus a one-line summary):

    python data.py --dataset demo --shots 4 --dump out/demo_train.jsonl
    python data.py --dataset oxford_pets --data-root ~/data --setting base --split test \
        --method no-think --dump out/pets_base_test.jsonl

The layout is CoOp's, so a data root prepared for CoOp / CoCoOp / MaPLe works as it is:

    <root>/imagenet/classnames.txt                      "<wnid> <class name>" per line
    <root>/imagenet/images/{train,val}/<wnid>/*.JPEG    val is the test set
    <root>/fgvc_aircraft/variants.txt                   one class name per line
    <root>/fgvc_aircraft/images_variant_{train,val,test}.txt   "<image id> <variant>" per line
    <root>/fgvc_aircraft/images/<image id>.jpg
    <root>/oxford_pets/split_zhou_OxfordPets.json       {"train": [[path, label, name], ...],
    <root>/oxford_pets/images/<path>                      "val": [...], "test": [...]}
    ... the seven other split-file datasets alike: folders in SPLIT_FILE_LAYOUT below
    <root>/demo/                                        generated shapes, laid out like oxford_pets

`--dataset demo` needs no download: 10 classes of coloured shapes, drawn on first use.

Where this departs from the paper's code, and why:
- ImageNet images inside a class folder are sorted; Dassl lists them in file-system order,
  which differs between machines and would change the few-shot choice.
- Base-to-new with shots samples over all classes, then keeps the base or new half, the
  order CoOp's datasets use, so a seed picks the same files in every setting.
- The candidate list is drawn from a generator seeded with (seed, dataset, setting, split,
  example, epoch) instead of a process-global one, so every rank and every rerun agrees.
"""
import argparse
import functools
import json
import math
import os
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw

DATASETS = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
            "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")
SETTINGS = ("fewshot", "base", "new")
SPLITS = ("train", "test")

# dataset -> (its folder under the data root, the image folder inside it, the split file)
SPLIT_FILE_LAYOUT = {
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "food101": ("food-101", "images", "split_zhou_Food101.json"),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json"),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json"),
    "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
    "demo": ("demo", "images", "split_demo.json")}

PROMPT_SUFFIX = {  # appended to the question, as the authors trained (docs/method.md section 3)
    "cls-rl": "\n Please output the thinking process in <think> </think> and final answer in "
              "<answer> </answer> tags.",
    "no-think": "\n Please directly output the answer.",
    "think-after-answer": " Please first output the answer in <answer> </answer> tags and then "
                          "output a brief reasoning process in <reason> </reason> tags.",
    "adaptive": " Please first identify whether this problem requires intermediate thinking or "
                "calculation. If the problem requires thinking or calculation, output the thinking "
                "and calculation process inside <think> </think> tags and the final answer inside "
                "<answer> </answer> tags. If no thinking or calculation is required, directly output "
                "the final answer inside <answer> </answer> tags. Your output should follow one of "
                "two cases: (1) '<answer> ... </answer>', (2) '<think> ... </think> <answer> ... "
                "</answer>'."}

# Questions with a candidate list, worded as in the authors' data notebook.
QUESTIONS = dict.fromkeys(DATASETS + ("demo",), "What type of object is in the photo?")
QUESTIONS.update(eurosat="What type of object is in the centered satellite photo?",
                 ucf101="What actions is the person performing in the photo?",
                 dtd="What type of texture is in the photo?",
                 fgvc_aircraft="What type of aircraft is in the photo?")

# Open-set questions name what kind of answer is wanted, since no list says it. Only the
# flowers wording is the paper's; the others are ours, written the same way. The object, aircraft
# and texture questions already name the kind, so those datasets ask the same in both modes.
OPEN_SET_QUESTIONS = dict(QUESTIONS, oxford_pets="What breed of pet is in the photo?",
                          stanford_cars="What make and model of car is in the photo?",
                          oxford_flowers="What type of flower is in the photo?",
                          food101="What type of food is in the photo?",
                          sun397="What type of scene is in the photo?",
                          eurosat="What type of land cover is in the centered satellite photo?",
                          ucf101="What action is the person performing in the photo?",
                          demo="What coloured shape is in the photo?")


@dataclass(frozen=True)
class Example:
    image: str      # absolute path
    label: int      # index into the classnames of the subset in use
    classname: str  # underscores turned into spaces


@dataclass
class ClassificationData:
    dataset: str
    setting: str           # "fewshot" | "base" | "new"
    split: str             # "train" | "test"
    classnames: list[str]  # label -> name, for this subset
    examples: list[Example]


class ImageError(OSError):
    """An image file that cannot be opened or decoded."""


def _check_choice(flag: str, value, valid) -> None:
    if value not in valid:
        raise ValueError(f"unknown {flag} {value!r}; expected one of: {', '.join(valid)}")


def _layout(dataset: str, root: str) -> str:
    """The files a dataset needs, for error messages."""
    folder, images, split_file = SPLIT_FILE_LAYOUT.get(dataset, (dataset, "", ""))
    no_split_file = {"imagenet": ["images/train/<wnid>/", "images/val/<wnid>/", "classnames.txt"],
                     "fgvc_aircraft": ["images/", "variants.txt", "images_variant_{train,val,test}.txt"]}
    inside = no_split_file.get(dataset, [os.path.join(images, ""), split_file])  # the dataset's folder
    parts = [os.path.join(root, folder, part) for part in inside]
    return "expected the CoOp layout: " + ", ".join(parts[:-1]) + " and " + parts[-1]


def _require(dataset: str, root: str, *paths: str) -> None:
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found; {_layout(dataset, root)}")


# Each reader returns (dataset folder, raw class names by label, [(path in folder, label)]).
def _read_split_file(root: str, dataset: str, split: str):
    folder, image_folder, split_name = SPLIT_FILE_LAYOUT[dataset]
    dataset_dir = os.path.join(root, folder)
    split_path = os.path.join(dataset_dir, split_name)
    _require(dataset, root, split_path, os.path.join(dataset_dir, image_folder))
    expected = 'expected {"train": [[image_path, label, classname], ...], "val": [...], "test": [...]}'
    content = read_json(split_path, f"; {expected}")
    if not isinstance(content, dict) or split not in content:
        raise ValueError(f"{split_path} has no {split!r} list; {expected}")
    names = {}
    for part in ("train", "val", "test"):  # every part, so a class absent from one still gets its name
        if not isinstance(content.get(part, []), list):
            raise ValueError(f"{split_path}: {part!r} is {content[part]!r}, not a list; {expected}")
        for entry in content.get(part, []):
            if not (isinstance(entry, list) and [type(value) for value in entry] == [str, int, str]):
                raise ValueError(f"{split_path}: bad {part} item {entry!r}; {expected}")
            if names.setdefault(entry[1], entry[2]) != entry[2]:
                raise ValueError(f"{split_path}: label {entry[1]} is called both "
                                 f"{names[entry[1]]!r} and {entry[2]!r}")
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"{split_path}: labels must be 0..C-1 without gaps, got {sorted(names)[:10]}")
    items = [(os.path.join(image_folder, path), label) for path, label, _ in content[split]]
    return dataset_dir, [names[label] for label in range(len(names))], items


def _subfolders(path: str) -> list[str]:
    names = [d for d in os.listdir(path) if not d.startswith(".")]
    return sorted(d for d in names if os.path.isdir(os.path.join(path, d)))


def _read_imagenet(root: str, split: str):
    dataset_dir = os.path.join(root, "imagenet")
    names_path = os.path.join(dataset_dir, "classnames.txt")
    train_dir = os.path.join(dataset_dir, "images", "train")
    split_folder = "train" if split == "train" else "val"  # CoOp tests on the val set
    _require("imagenet", root, names_path, train_dir, os.path.join(dataset_dir, "images", split_folder))
    name_of = {}
    for line_number, line in enumerate(Path(names_path).read_text().splitlines(), 1):
        parts = line.split(maxsplit=1)  # "<wnid> <name>"; names hold spaces
        if len(parts) == 1:  # else a class '' would be listed, and an empty answer judged right
            raise ValueError(f"{names_path} line {line_number}: {parts[0]!r} has no class name; "
                             "expected '<wnid> <class name>'")
        if parts:
            name_of[parts[0]] = parts[1].strip()
    # Labels follow the sorted train folders, as in CoOp, whatever order the names file has.
    wnids = _subfolders(train_dir)
    if not wnids:
        raise FileNotFoundError(f"{train_dir} holds no class folders; {_layout('imagenet', root)}")
    unnamed = [w for w in wnids if w not in name_of]
    if unnamed:
        raise ValueError(f"class folders of {train_dir} without a name in {names_path}: "
                         f"{unnamed[:5]} ({len(unnamed)} in all); expected a line '<wnid> <name>' each")
    label_of = {wnid: label for label, wnid in enumerate(wnids)}
    items = []
    for wnid in _subfolders(os.path.join(dataset_dir, "images", split_folder)):
        if wnid not in label_of:
            raise ValueError(f"{dataset_dir}/images/{split_folder}/{wnid} is not a class of {train_dir}")
        class_dir = os.path.join("images", split_folder, wnid)
        files = sorted(os.listdir(os.path.join(dataset_dir, class_dir)))  # file-system order varies
        items += [(os.path.join(class_dir, f), label_of[wnid]) for f in files if not f.startswith(".")]
    return dataset_dir, [name_of[w] for w in wnids], items


def _read_fgvc_aircraft(root: str, split: str):
    dataset_dir = os.path.join(root, "fgvc_aircraft")
    variants_path = os.path.join(dataset_dir, "variants.txt")
    list_path = os.path.join(dataset_dir, f"images_variant_{split}.txt")
    _require("fgvc_aircraft", root, os.path.join(dataset_dir, "images"), variants_path, list_path)
    names = [line.strip() for line in Path(variants_path).read_text().splitlines() if line.strip()]
    label_of = {name: label for label, name in enumerate(names)}
    items = []
    for line_number, line in enumerate(Path(list_path).read_text().splitlines(), 1):
        image_id, _, variant = line.strip().partition(" ")  # variants hold spaces and '/'
        if not image_id:
            continue
        if variant.strip() not in label_of:
            raise ValueError(f"{list_path} line {line_number}: variant {variant.strip()!r} "
                             f"is not a line of {variants_path}")
        items.append((os.path.join("images", image_id + ".jpg"), label_of[variant.strip()]))
    return dataset_dir, names, items


def _fewshot_items(items: list, dataset: str, shots: int, seed: int, fewshot_file: str | None) -> list:
    """The few-shot training items: read back from `fewshot_file` when it exists, else
    sampled (and saved there when a file is named). The file holds the choice over ALL
    classes, so one file serves the fewshot, base and new settings."""
    wanted = {"dataset": dataset, "shots": shots, "seed": seed}
    if fewshot_file is not None and os.path.exists(fewshot_file):
        saved = read_json(fewshot_file)
        found = {key: saved.get(key) for key in wanted}
        if found != wanted:
            raise ValueError(f"few-shot file {fewshot_file} holds the choice for {found}, but this run "
                             f"asks for {wanted}; pass another file or delete it to sample again")
        label_of = dict(items)
        foreign = [path for path in saved.get("images", []) if path not in label_of]
        if foreign:
            raise ValueError(f"few-shot file {fewshot_file}: {len(foreign)} images are not in the train "
                             f"split of {dataset}, e.g. {foreign[:3]}")
        return [(path, label_of[path]) for path in saved["images"]]
    # Dassl's few-shot rule: per label, in order of first appearance, `shots` items drawn by one
    # generator (all of them when a label has fewer).
    by_label = {}  # dicts keep insertion order: the first-appearance order of the labels
    for item in items:
        by_label.setdefault(item[1], []).append(item)
    rng = random.Random(seed)
    chosen = []
    for group in by_label.values():
        chosen += rng.sample(group, shots) if len(group) >= shots else group
    if fewshot_file is not None:
        write_atomic(fewshot_file, json.dumps(dict(wanted, images=[p for p, _ in chosen]), indent=1))
    return chosen


def load_data(dataset: str, data_root: str | None, setting: str = "fewshot", split: str = "train",
              shots: int | None = None, seed: int = 1,
              fewshot_file: str | None = None) -> ClassificationData:
    """Examples of one dataset, setting and split.

    split "train" keeps `shots` images per class (all when shots is None, sampled with
    `seed`, saved to / read from `fewshot_file` when given); split "test" is always the whole
    test split, and shots / fewshot_file are ignored there. Setting "base" keeps the first
    ceil(C/2) labels, "new" the rest, relabelled from 0.
    """
    _check_choice("dataset", dataset, DATASETS + ("demo",))
    _check_choice("setting", setting, SETTINGS)
    _check_choice("split", split, SPLITS)
    if shots is not None and shots < 1:
        raise ValueError(f"shots must be at least 1 (or None for every training image), got {shots}")
    if dataset != "demo" and data_root is None:
        raise ValueError(f"dataset {dataset!r} needs a data root (--data-root); "
                         f"{_layout(dataset, '<root>')}")
    root = (str(demo_root(data_root).parent) if dataset == "demo"  # the demo is drawn on first use
            else os.path.abspath(os.path.expanduser(data_root)))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data root {root} does not exist; {_layout(dataset, root)}")

    reader = {"imagenet": _read_imagenet, "fgvc_aircraft": _read_fgvc_aircraft}.get(dataset)
    dataset_dir, names, items = reader(root, split) if reader else _read_split_file(root, dataset, split)
    names = [name.replace("_", " ") for name in names]
    half = math.ceil(len(names) / 2)
    first, end = {"fewshot": (0, len(names)), "base": (0, half), "new": (half, len(names))}[setting]
    if not any(first <= label < end for _, label in items):  # not a division by zero in training
        raise ValueError(f"the {dataset} {setting} {split} split has no examples; {_layout(dataset, root)}")
    if split == "train" and shots is not None:
        items = _fewshot_items(items, dataset, shots, seed, fewshot_file)
    examples = [Example(os.path.join(dataset_dir, path), label - first, names[label])
                for path, label in items if first <= label < end]
    # the question lists candidates as "[ a, b, c]": a name holding ", " or brackets reads as several
    ambiguous = [name for name in names[first:end] if any(c in name for c in ",[]")]
    if ambiguous:
        warn_once(f"warning: {dataset} class names with commas or brackets make the candidate list "
                  f"ambiguous to read (scoring is unchanged): {ambiguous}")
    # One report of every missing file now beats a crash per file in the middle of training.
    missing = [e.image for e in examples if not os.path.isfile(e.image)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(examples)} images of the {dataset} {split} "
                                f"split do not exist, e.g. {missing[:3]}; {_layout(dataset, root)}")
    return ClassificationData(dataset, setting, split, names[first:end], examples)


def num_candidates(num_classes: int, setting: str) -> int:
    """How many class names the question lists (docs/method.md section 2).

    >>> [num_candidates(c, "fewshot") for c in (10, 47, 100, 196, 1000)]
    [10, 47, 40, 78, 100]
    >>> [num_candidates(c, "base") for c in (24, 50, 98, 500)]
    [24, 40, 78, 100]
    """
    _check_choice("setting", setting, SETTINGS)
    count = int((0.4 if setting == "fewshot" else 0.8) * num_classes)
    return min(num_classes if count < 30 else count, 100)  # a short list costs few tokens: show all


def make_question(data: ClassificationData, index: int, method: str, seed: int, epoch: int = 0,
                  open_set: bool = False) -> tuple[str, list[str]]:
    """The user text for example `index` and its candidate names, in the order listed.

    The list is a fresh draw per (seed, example, epoch), seeded by a string so every process
    draws the same one (hash() of a string differs between processes). The true class is
    always listed: when the draw missed it, it takes the place of a drawn name.
    """
    _check_choice("method", method, tuple(PROMPT_SUFFIX))
    if not 0 <= index < len(data.examples):
        raise IndexError(f"example index {index} out of range: {data.dataset} {data.split} has "
                         f"{len(data.examples)} examples")
    if open_set:
        return OPEN_SET_QUESTIONS[data.dataset] + PROMPT_SUFFIX[method], []
    rng = random.Random(f"{seed}:{data.dataset}:{data.setting}:{data.split}:{index}:{epoch}")
    count = num_candidates(len(data.classnames), data.setting)
    labels = rng.sample(range(len(data.classnames)), count)  # labels, not names: names can repeat
    truth = data.examples[index].label
    if truth not in labels:
        labels[rng.randrange(count)] = truth
    rng.shuffle(labels)
    candidates = [data.classnames[label] for label in labels]
    return (QUESTIONS[data.dataset] + "\nPlease choose one from list [ " + ", ".join(candidates) + "]."
            + PROMPT_SUFFIX[method], candidates)


def load_image(path: str, size: int) -> Image.Image:
    """RGB image resized to (size, size) with LANCZOS, as the authors fed Qwen2-VL. 16-bit grey
    (a PNG opens as mode I;16 or I) is scaled to 8 bits: converted as it is, every value above
    255 would clip to white."""
    try:
        with Image.open(path) as image:
            if image.mode.startswith("I"):
                image = image.convert("I").point(lambda value: value / 257)  # 65535 -> 255
            image = image.convert("RGB")  # decodes now, so a truncated file fails here
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(f"cannot read image {path}: {err}") from err
    return image.resize((size, size), Image.Resampling.LANCZOS)


# ----------------------------------------------------------------------------- the training stream

def step_picks(seed: int, num_examples: int, step: int, global_batch: int) -> list[tuple[int, int]]:
    """(example index, epoch) of every prompt of optimizer step `step`, for the whole job.

    The training set is read as an endless stream of epochs, each a permutation seeded by
    (seed, epoch); step s takes the next `global_batch` items. Nothing depends on the rank, so
    the same seed and global batch give the same prompts whatever the world size.
    """
    picks = []
    for k in range(step * global_batch, (step + 1) * global_batch):
        epoch, position = divmod(k, num_examples)
        order = list(range(num_examples))
        random.Random(f"{seed}:epoch:{epoch}").shuffle(order)
        picks.append((order[position], epoch))
    return picks


@dataclass
class StepExamples:
    """One rank's prompts for one optimizer step, with their images loaded."""
    indices: list[int]
    images: list
    texts: list[str]
    labels: list[str]
    unreadable: int  # distinct unreadable image files met (each replaced by the next example)


def load_step_examples(data: ClassificationData, step: int, *, seed: int, method: str,
                       image_size: int, rank: int, world_size: int, per_rank: int) -> StepExamples:
    """This rank's contiguous share (`per_rank` prompts) of step `step`: questions built, images
    loaded. An unreadable image is skipped (and reported) by taking the next example instead,
    so the rank still has a full batch and no other rank waits for it."""
    picks = step_picks(seed, len(data.examples), step, world_size * per_rank)
    out, bad = StepExamples([], [], [], [], 0), set()
    for index, epoch in picks[rank * per_rank:(rank + 1) * per_rank]:
        for i in (k % len(data.examples) for k in range(index, index + len(data.examples))):
            try:
                image = load_image(data.examples[i].image, image_size)
                break
            except ImageError as error:
                if data.examples[i].image not in bad:
                    print(f"[rank {rank}] skipping unreadable image: {error}", file=sys.stderr)
                bad.add(data.examples[i].image)
        else:
            raise ValueError(f"no readable image in the {data.dataset} training set")
        out.indices.append(i), out.images.append(image), out.labels.append(data.examples[i].classname)
        out.texts.append(make_question(data, i, method, seed, epoch)[0])
    out.unreadable = len(bad)
    return out


# ----------------------------------------------------------------------------- files

def write_atomic(path: str, content: str | bytes) -> None:
    """Write to a temporary file beside `path`, then rename: a reader (another rank, a resumed
    run) never sees half a file. Every output file of this project is written here, so this is
    where its folder is made; a failed write (a full disk, a folder that cannot be made) names
    the file it was writing."""
    parent = os.path.dirname(os.path.abspath(path))
    # one name per process (ranks write side by side); open(), unlike mkstemp, keeps the umask's
    # permissions, so others may read the results
    tmp = os.path.join(parent, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    try:
        os.makedirs(parent, exist_ok=True)
        with open(tmp, "wb" if isinstance(content, bytes) else "w") as f:
            f.write(content)
        os.replace(tmp, path)
    except OSError as err:
        if os.path.isfile(tmp):
            os.remove(tmp)
        raise OSError(f"could not write {path}: {err}") from err


@functools.cache
def warn_once(message: str) -> None:
    """`message` on stderr, the first time only (the train and test splits share class names)."""
    print(message, file=sys.stderr, flush=True)


def read_json(path: str, hint: str = ""):
    """The content of a JSON file; a malformed one is a ValueError naming the file, then `hint`."""
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as err:  # bad JSON, or bytes that are not text
        raise ValueError(f"{path} is not valid JSON ({err}){hint}") from None


# The demo set: each class differs in colour AND shape, so even a tiny model can learn it.
DEMO_CLASSES = ("red circle", "blue square", "green triangle", "yellow star", "purple diamond",
                "orange cross", "cyan hexagon", "pink pentagon", "white ring", "black arrow")
_COLOURS = dict(red=(220, 30, 30), blue=(30, 60, 220), green=(30, 170, 50), yellow=(240, 220, 30),
                purple=(140, 40, 170), orange=(250, 140, 20), cyan=(30, 210, 220), pink=(250, 120, 190),
                white=(250, 250, 250), black=(15, 15, 15))


def _regular(corners: int, radii=(1.0,)) -> list[tuple[float, float]]:
    angles = [2 * math.pi * i / corners - math.pi / 2 for i in range(corners)]  # first corner up
    # the radii take turns round the corners: a star's alternate outer and inner
    return [(radius * math.cos(a), radius * math.sin(a)) for radius, a in zip(radii * corners, angles)]


# Outlines in units of the shape's radius, centred on (0, 0); circle and ring are ellipses.
_OUTLINES = {
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "diamond": [(0, -1), (0.6, 0), (0, 1), (-0.6, 0)],
    "triangle": _regular(3), "pentagon": _regular(5), "hexagon": _regular(6),
    "star": _regular(10, radii=(1.0, 0.4)),
    "cross": [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1),
              (-0.3, 1), (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)],
    "arrow": [(-1, -0.25), (0.2, -0.25), (0.2, -0.6), (1, 0), (0.2, 0.6), (0.2, 0.25), (-1, 0.25)]}


def _draw_demo_image(rng: random.Random, classname: str) -> Image.Image:
    colour, shape = classname.split()
    grey = rng.randint(100, 150)
    # mild noise, so no two images are identical
    noise = Image.frombytes("RGB", (64, 64), rng.randbytes(64 * 64 * 3)).point(lambda v: v // 8)
    image = ImageChops.add(Image.new("RGB", (64, 64), (grey, grey, grey)), noise)
    fill = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in _COLOURS[colour])
    radius = rng.randint(11, 18)
    cx, cy = rng.randint(radius + 2, 61 - radius), rng.randint(radius + 2, 61 - radius)
    draw = ImageDraw.Draw(image)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=4)
    else:
        draw.polygon([(cx + radius * x, cy + radius * y) for x, y in _OUTLINES[shape]], fill=fill)
    return image


def demo_root(data_root: str | None = None) -> Path:
    """The demo set's folder, drawn on first use: <data_root>/demo, else $CLS_RL_CACHE/demo,
    else ~/.cache/cls-rl/demo.

    It is drawn into a temporary folder beside its place and renamed into place, so ranks
    that start together never see half a data set; a rank that loses the race uses the
    winner's copy, which is identical.
    """
    if data_root is None:
        data_root = os.environ.get("CLS_RL_CACHE") or Path.home() / ".cache" / "cls-rl"
    root = Path(data_root).expanduser().absolute() / "demo"
    if (root / "split_demo.json").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=root.parent))
    try:
        rng = random.Random(0)  # fixed: the demo is the same, file for file, on every machine
        parts = ["train"] * 16 + ["val"] * 8 + ["test"] * 10  # the split of each image of a class
        split = {"train": [], "val": [], "test": []}
        for label, classname in enumerate(DEMO_CLASSES):
            class_folder = classname.replace(" ", "_")  # CoOp-style names: underscores on disk
            (tmp / "images" / class_folder).mkdir(parents=True)
            for number, part in enumerate(parts):
                path = f"{class_folder}/{number}.png"
                _draw_demo_image(rng, classname).save(tmp / "images" / path)
                split[part].append([path, label, class_folder])
        (tmp / "split_demo.json").write_text(json.dumps(split, indent=1))
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / "split_demo.json").exists():
                raise FileExistsError(f"{root} exists but holds no split_demo.json (an interrupted "
                                      f"copy?); delete it and the demo set is drawn again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def main(argv: list[str] | None = None) -> None:
    """Show the questions a CLS-RL run sees: one JSON object per example, and a summary."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    a = parser.add_argument
    a("--dataset", default="demo", choices=DATASETS + ("demo",), help="'demo' needs no download")
    a("--data-root", help="folder holding the CoOp layout (top of data.py); optional for demo")
    a("--setting", default="fewshot", choices=SETTINGS, help="base/new: first/second half of labels")
    a("--split", default="train", choices=SPLITS, help="train or test split")
    a("--shots", type=int, default=4, help="training images per class; 0: all; test ignores it")
    a("--seed", type=int, default=100, help="few-shot choice and candidate lists (as training's)")
    a("--fewshot-file", help="JSON file holding the few-shot choice: read if it exists, else written")
    a("--method", default="no-think", choices=tuple(PROMPT_SUFFIX), help="the prompt suffix")
    a("--open-set", action="store_true", help="ask without a candidate list")
    a("--epoch", type=int, default=0, help="epoch whose candidate lists to draw")
    a("--dump", help="write the examples here as JSON lines")
    args = parser.parse_args(argv)
    try:  # a bad data set or an unwritable --dump: one line, no traceback
        data = load_data(args.dataset, args.data_root, args.setting, args.split,
                         shots=args.shots or None, seed=args.seed, fewshot_file=args.fewshot_file)
        rows = []
        for index, example in enumerate(data.examples):
            question, candidates = make_question(data, index, args.method, args.seed, args.epoch,
                                                 args.open_set)
            rows.append({"index": index, "image": example.image, "label": example.classname,
                         "label_index": example.label, "candidates": candidates, "question": question})
        if args.dump:
            write_atomic(args.dump, "".join(json.dumps(row) + "\n" for row in rows))
    except (OSError, ValueError) as err:
        parser.exit(2, f"data.py: error: {err}\n")
    listed = 0 if args.open_set else num_candidates(len(data.classnames), data.setting)
    print(f"{data.dataset} {data.setting}/{data.split}: {len(data.classnames)} classes, "
          f"{len(data.examples)} examples, {listed} candidates per question"
          + (f"; wrote {args.dump}" if args.dump else ""))
    if rows and not args.dump:
        print(f"first question:\n{rows[0]['question']}")


if __name__ == "__main__":
    main(sys.argv[1:])
