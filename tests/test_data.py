"""data.py: every CoOp layout on a tiny fake tree, the few-shot and candidate rules against
hand-computed values, the demo set, and every error a user can hit."""
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

import data

ROOT = Path(__file__).resolve().parents[1]
TRAIN, VAL, TEST = 6, 2, 3  # images per class in every fake tree
# Raw class names as the split files spell them; underscores must become spaces.
RAW_NAMES = ["Abyssinian", "american_bulldog", "great_white_shark", "Bengal", "tiger_cat"]
APPEARANCE = [2, 0, 4, 1, 3]  # label order in the split files: not sorted, on purpose


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (len(path.name) * 20 % 256, 40, 90)).save(path)


def build_tree(root: Path, dataset: str) -> list[str]:
    """Write a 5-class fake copy of `dataset` in the CoOp layout; return its class names."""
    if dataset == "imagenet":
        d = root / "imagenet"
        names = {"n01": "tench", "n02": "goldfish", "n03": "great white shark", "n04": "tiger_shark", "n05": "hen"}
        d.mkdir(parents=True)
        # Written in reverse: labels must follow the sorted folders, not this file.
        (d / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in reversed(names.items())))
        for wnid in names:
            for i in range(TRAIN):
                _image(d / "images" / "train" / wnid / f"{wnid}_{i}.JPEG")
            for i in range(TEST):
                _image(d / "images" / "val" / wnid / f"val_{wnid}_{i}.JPEG")
        return ["tench", "goldfish", "great white shark", "tiger shark", "hen"]
    if dataset == "fgvc_aircraft":
        d = root / "fgvc_aircraft"
        variants = ["707-320", "A300B4", "F/A-18", "Cessna 172", "DHC-1"]
        d.mkdir(parents=True)
        (d / "variants.txt").write_text("\n".join(variants) + "\n")
        for part, count in (("train", TRAIN), ("val", VAL), ("test", TEST)):
            lines = []
            for label, variant in enumerate(variants):
                for i in range(count):
                    image_id = f"{part}{label}{i:03d}"
                    _image(d / "images" / f"{image_id}.jpg")
                    lines.append(f"{image_id} {variant}\n")
            (d / f"images_variant_{part}.txt").write_text("".join(lines))
        return variants
    folder, image_folder, split_name = data.SPLIT_FILE_LAYOUT[dataset]
    d = root / folder
    split = {}
    for part, count in (("train", TRAIN), ("val", VAL), ("test", TEST)):
        split[part] = []
        for i in range(count):  # round robin over the classes, in APPEARANCE order
            for label in APPEARANCE:
                path = f"{RAW_NAMES[label]}/{part}_{i}.jpg"
                _image(d / image_folder / path)
                split[part].append([path, label, RAW_NAMES[label]])
    (d / split_name).write_text(json.dumps(split))
    return [name.replace("_", " ") for name in RAW_NAMES]


@pytest.fixture(scope="module")
def coop_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coop")
    names = {dataset: build_tree(root, dataset) for dataset in data.DATASETS}
    return root, names


def in_memory(num_classes: int, setting: str = "fewshot", dataset: str = "imagenet", examples: int = 200):
    """A data set that never touches the disk: make_question only needs names and labels."""
    names = [f"class {i}" for i in range(num_classes)]
    items = [data.Example(f"/img/{i}.png", i % num_classes, names[i % num_classes]) for i in range(examples)]
    return data.ClassificationData(dataset, setting, "train", names, items)


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


# ---- every layout -------------------------------------------------------------------------

def test_the_eleven_coop_names_in_order():
    assert data.DATASETS == ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers",
                             "food101", "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")
    assert set(data.QUESTIONS) == set(data.OPEN_SET_QUESTIONS) == set(data.DATASETS) | {"demo"}


@pytest.mark.parametrize("dataset", data.DATASETS)
def test_every_layout_loads_names_and_counts(coop_root, dataset):
    root, names = coop_root
    train = data.load_data(dataset, str(root), split="train")
    test = data.load_data(dataset, str(root), split="test")
    assert train.classnames == test.classnames == names[dataset]
    assert len(train.examples) == 5 * TRAIN and len(test.examples) == 5 * TEST
    for example in train.examples + test.examples:
        assert os.path.isabs(example.image) and os.path.isfile(example.image)
        assert example.classname == names[dataset][example.label]
    assert {e.label for e in test.examples} == set(range(5))
    assert not {e.image for e in train.examples} & {e.image for e in test.examples}


def test_imagenet_tests_on_val_and_labels_follow_sorted_folders(coop_root):
    root, _ = coop_root
    test = data.load_data("imagenet", str(root), split="test")
    assert all(f"{os.sep}images{os.sep}val{os.sep}" in e.image for e in test.examples)
    assert [e.label for e in test.examples if os.path.basename(e.image) == "val_n04_0.JPEG"] == [3]


def test_fgvc_variants_with_slash_and_space(coop_root):
    root, _ = coop_root
    test = data.load_data("fgvc_aircraft", str(root), split="test")
    assert {e.classname for e in test.examples} >= {"F/A-18", "Cessna 172"}
    assert all(e.image.endswith(".jpg") and f"{os.sep}images{os.sep}" in e.image for e in test.examples)


# ---- few-shot sampling --------------------------------------------------------------------

def dassl_reference(split_path: Path, image_dir: Path, shots: int, seed: int) -> list[str]:
    """Dassl's rule written out again on the raw split file."""
    groups = {}
    for path, label, _ in json.loads(split_path.read_text())["train"]:
        groups.setdefault(label, []).append(str(image_dir / path))
    rng = random.Random(seed)
    return [p for items in groups.values() for p in (rng.sample(items, shots) if len(items) >= shots else items)]


def test_fewshot_matches_dassl_and_is_deterministic(coop_root):
    root, _ = coop_root
    files = lambda seed, shots=2: [e.image for e in data.load_data("oxford_pets", str(root), shots=shots, seed=seed).examples]
    assert files(1) == dassl_reference(root / "oxford_pets/split_zhou_OxfordPets.json",
                                       root / "oxford_pets/images", 2, 1)
    assert files(1) == files(1) and files(1) != files(2)
    chosen = data.load_data("oxford_pets", str(root), shots=2, seed=1).examples
    assert [e.label for e in chosen] == [label for label in APPEARANCE for _ in range(2)]
    assert len(files(1, shots=100)) == 5 * TRAIN  # fewer images than shots: keep them all
    other_process = run_python(f"import data, json; print(json.dumps([e.image for e in "
                               f"data.load_data('oxford_pets', {str(root)!r}, shots=2, seed=1).examples]))")
    assert json.loads(other_process) == files(1)


def test_fewshot_on_folder_and_list_layouts(coop_root):
    root, _ = coop_root
    for dataset in ("imagenet", "fgvc_aircraft"):
        first = data.load_data(dataset, str(root), shots=3, seed=5).examples
        assert len(first) == 15 and [e.image for e in first] == [
            e.image for e in data.load_data(dataset, str(root), shots=3, seed=5).examples]
        assert sorted(e.label for e in first) == [label for label in range(5) for _ in range(3)]


def test_imagenet_choice_ignores_file_system_order(coop_root, monkeypatch):
    root, _ = coop_root
    before = data.load_data("imagenet", str(root), shots=3, seed=5).examples
    listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda path: sorted(listdir(path), reverse=True))
    assert data.load_data("imagenet", str(root), shots=3, seed=5).examples == before


def test_base_and_new_halves(coop_root):
    root, names = coop_root
    base = data.load_data("dtd", str(root), setting="base", split="test")
    new = data.load_data("dtd", str(root), setting="new", split="test")
    assert base.classnames == names["dtd"][:3] and new.classnames == names["dtd"][3:]  # odd n: base gets ceil
    assert {e.label for e in base.examples} == {0, 1, 2} and {e.label for e in new.examples} == {0, 1}
    assert all(e.classname == new.classnames[e.label] for e in new.examples)
    assert not {e.image for e in base.examples} & {e.image for e in new.examples}
    assert len(base.examples) + len(new.examples) == 5 * TEST
    # Few-shot first over all classes, then the half (CoOp's order): same files as fewshot.
    fewshot = data.load_data("dtd", str(root), shots=2, seed=3).examples
    base_train = data.load_data("dtd", str(root), setting="base", shots=2, seed=3).examples
    assert [e.image for e in base_train] == [e.image for e in fewshot if e.label < 3]
    assert len(base_train) == 3 * 2


def test_fewshot_file_round_trip(coop_root, tmp_path):
    root, _ = coop_root
    path = tmp_path / "sub" / "pets_2shot_seed1.json"
    written = data.load_data("oxford_pets", str(root), shots=2, seed=1, fewshot_file=str(path))
    saved = json.loads(path.read_text())
    assert saved["shots"] == 2 and len(saved["images"]) == 10 and os.listdir(path.parent) == [path.name]
    # Read back, the file wins over sampling: reorder it and the order follows the file.
    saved["images"].reverse()
    path.write_text(json.dumps(saved))
    read = data.load_data("oxford_pets", str(root), shots=2, seed=1, fewshot_file=str(path))
    assert [e.image for e in read.examples] == [e.image for e in written.examples][::-1]
    new = data.load_data("oxford_pets", str(root), setting="new", shots=2, seed=1, fewshot_file=str(path))
    assert len(new.examples) == 4 and {e.label for e in new.examples} == {0, 1}

    saved["images"][0] = "images/Bengal/not_in_the_split.jpg"
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="not in the train split of oxford_pets.*not_in_the_split"):
        data.load_data("oxford_pets", str(root), shots=2, seed=1, fewshot_file=str(path))
    with pytest.raises(ValueError, match=f"few-shot file {path}.*'shots': 2.*'shots': 4"):
        data.load_data("oxford_pets", str(root), shots=4, seed=1, fewshot_file=str(path))


# ---- the question -------------------------------------------------------------------------

def test_exact_question_for_a_fixed_seed():
    three = data.ClassificationData("dtd", "fewshot", "train", ["banded", "dotted", "zigzagged"],
                                    [data.Example("/x.png", 1, "dotted")])
    text, candidates = data.make_question(three, 0, "no-think", seed=1)
    # The order is pinned: changing the draw changes every run's prompts.
    assert candidates == ["dotted", "zigzagged", "banded"]
    assert text == ("What type of texture is in the photo?\n"
                    "Please choose one from list [ dotted, zigzagged, banded].\n"
                    " Please directly output the answer.")
    text, _ = data.make_question(three, 0, "cls-rl", seed=1)
    assert text.endswith("banded].\n Please output the thinking process in <think> </think> and "
                         "final answer in <answer> </answer> tags.")
    assert data.make_question(three, 0, "adaptive", seed=1)[0].endswith(
        "(2) '<think> ... </think> <answer> ... </answer>'.")
    assert data.make_question(three, 0, "think-after-answer", seed=1)[0].endswith(
        "banded]. Please first output the answer in <answer> </answer> tags and then output a "
        "brief reasoning process in <reason> </reason> tags.")


@pytest.mark.parametrize("setting,expected", [
    ("fewshot", {10: 10, 37: 37, 47: 47, 100: 40, 196: 78, 397: 100, 1000: 100}),
    # 0.8 C: 8 -> all 10; 29 -> all 37; 37 stays; 80; 156; 317 -> 100; 800 -> 100
    ("base", {10: 10, 37: 37, 47: 37, 100: 80, 196: 100, 397: 100, 1000: 100}),
    ("new", {10: 10, 37: 37, 47: 37, 100: 80, 98: 78, 397: 100, 1000: 100}),
])
def test_candidate_counts(setting, expected):
    assert {c: data.num_candidates(c, setting) for c in expected} == expected


@pytest.mark.parametrize("num_classes,setting,listed", [(100, "fewshot", 40), (1000, "fewshot", 100),
                                                        (47, "base", 37), (10, "new", 10)])
def test_truth_always_listed_once_among_distinct_names(num_classes, setting, listed):
    subset = in_memory(num_classes, setting, examples=300)
    for index, example in enumerate(subset.examples):
        text, candidates = data.make_question(subset, index, "no-think", seed=7)
        assert len(candidates) == len(set(candidates)) == listed
        assert candidates.count(example.classname) == 1 and set(candidates) <= set(subset.classnames)
        assert f"[ {', '.join(candidates)}]." in text


def test_candidates_fixed_per_seed_index_epoch_and_vary_across_epochs():
    subset = in_memory(100)
    lists = lambda epoch, seed=1: [data.make_question(subset, i, "no-think", seed, epoch)[1] for i in range(20)]
    assert lists(0) == lists(0)
    assert sum(a != b for a, b in zip(lists(0), lists(1))) >= 19
    assert lists(0) != lists(0, seed=2)
    assert len({tuple(c) for c in lists(0)}) == 20  # and across examples
    other_process = run_python("import data, json, tests.test_data as t; s = t.in_memory(100); print(json.dumps("
                               "[data.make_question(s, i, 'no-think', 1, 0)[1] for i in range(20)]))")
    assert json.loads(other_process) == lists(0)


def test_open_set_question():
    flowers = in_memory(102, dataset="oxford_flowers")
    text, candidates = data.make_question(flowers, 3, "no-think", seed=1, open_set=True)
    assert (text, candidates) == ("What type of flower is in the photo?\n Please directly output the answer.", [])
    for dataset in data.DATASETS:
        assert data.OPEN_SET_QUESTIONS[dataset].endswith("?") and "list" not in data.OPEN_SET_QUESTIONS[dataset]


# ---- images -------------------------------------------------------------------------------

def test_load_image_size_mode_and_errors(tmp_path):
    grey = tmp_path / "grey.png"
    Image.new("L", (30, 17), 128).save(grey)
    image = data.load_image(str(grey), 384)
    assert image.mode == "RGB" and image.size == (384, 384)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(data.ImageError, match=str(corrupt)) as caught:
        data.load_image(str(corrupt), 384)
    assert isinstance(caught.value, OSError)
    truncated = tmp_path / "truncated.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "whole.png")
    truncated.write_bytes((tmp_path / "whole.png").read_bytes()[:60])
    with pytest.raises(data.ImageError, match="truncated.png"):
        data.load_image(str(truncated), 32)
    with pytest.raises(data.ImageError, match="missing.png"):
        data.load_image(str(tmp_path / "missing.png"), 32)


def test_16_bit_grey_png_loads_as_its_8_bit_picture(tmp_path):
    """A 16-bit PNG opens as mode I;16; converted as it is, every value above 255 clips to white."""
    import numpy as np
    ramp = np.tile(np.arange(256, dtype=np.uint16), (40, 1))  # (40, 256) dark to light
    Image.fromarray(ramp.astype(np.uint8)).save(tmp_path / "8.png")
    Image.fromarray(ramp * 257).save(tmp_path / "16.png")  # the same levels on 0..65535
    with Image.open(tmp_path / "16.png") as image:
        assert image.mode == "I;16"
    eight, sixteen = (np.asarray(data.load_image(str(tmp_path / name), 64)) for name in ("8.png", "16.png"))
    assert eight.mean() == pytest.approx(127.5, abs=1)
    assert np.array_equal(sixteen, eight)


# ---- the demo set -------------------------------------------------------------------------

def test_demo_is_reproducible_byte_for_byte_and_loads(tmp_path):
    start = time.perf_counter()
    first = data.demo_root(str(tmp_path / "a"))
    assert time.perf_counter() - start < 2.0
    second = data.demo_root(str(tmp_path / "b"))
    assert first == (tmp_path / "a" / "demo").absolute()
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["demo"]  # no temporary left behind

    train = data.load_data("demo", str(tmp_path / "a"))
    test = data.load_data("demo", str(tmp_path / "a"), split="test")
    assert len(train.classnames) >= 10 and len(set(train.classnames)) == len(train.classnames)
    assert all(len(name.split()) == 2 for name in train.classnames) and "red circle" in train.classnames
    assert len(train.examples) == 16 * 10 and len(test.examples) == 10 * 10
    assert data.load_image(test.examples[0].image, 64).size == (64, 64)
    four = data.load_data("demo", str(tmp_path / "a"), shots=4)
    assert len(four.examples) == 40
    images = {(first / "images" / f"{name.replace(' ', '_')}" / "0.png").read_bytes() for name in train.classnames}
    assert len(images) == 10


def test_demo_location_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CLS_RL_CACHE", str(tmp_path / "cache"))
    assert data.demo_root() == (tmp_path / "cache" / "demo").absolute()
    assert data.load_data("demo", None).examples[0].image.startswith(str(tmp_path / "cache" / "demo"))


def test_two_processes_drawing_the_demo_at_once(tmp_path):
    code = f"import data; print(data.demo_root({str(tmp_path)!r}))"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    assert all(p.wait(timeout=60) == 0 for p in procs)
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]
    assert len(data.load_data("demo", str(tmp_path), split="test").examples) == 100


def test_interrupted_demo_copy_is_reported(tmp_path):
    (tmp_path / "demo" / "images").mkdir(parents=True)
    with pytest.raises(FileExistsError, match=f"{tmp_path / 'demo'} exists but holds no split_demo.json"):
        data.demo_root(str(tmp_path))


# ---- bad input ----------------------------------------------------------------------------

def test_bad_names_and_values(coop_root):
    root, _ = coop_root
    with pytest.raises(ValueError, match="unknown dataset 'pets'.*oxford_pets.*ucf101.*demo"):
        data.load_data("pets", str(root))
    with pytest.raises(ValueError, match="unknown setting 'base2new'.*fewshot, base, new"):
        data.load_data("dtd", str(root), setting="base2new")
    with pytest.raises(ValueError, match="unknown split 'val'.*train, test"):
        data.load_data("dtd", str(root), split="val")
    with pytest.raises(ValueError, match="shots must be at least 1.*got 0"):
        data.load_data("dtd", str(root), shots=0)
    with pytest.raises(ValueError, match="unknown method 'grpo'.*cls-rl, no-think, think-after-answer, adaptive"):
        data.make_question(in_memory(10), 0, "grpo", seed=1)
    with pytest.raises(ValueError, match="unknown setting 'all'"):
        data.num_candidates(10, "all")
    with pytest.raises(IndexError, match="example index 200 out of range"):
        data.make_question(in_memory(10), 200, "no-think", seed=1)


def test_missing_root_and_layout_files(tmp_path):
    with pytest.raises(ValueError, match=r"needs a data root \(--data-root\)"):
        data.load_data("dtd", None)
    with pytest.raises(FileNotFoundError, match=f"data root {tmp_path / 'nowhere'} does not exist"):
        data.load_data("dtd", str(tmp_path / "nowhere"))
    expected = (f"{tmp_path}/oxford_pets/split_zhou_OxfordPets.json not found; expected the CoOp layout: "
                f"{tmp_path}/oxford_pets/images/ and {tmp_path}/oxford_pets/split_zhou_OxfordPets.json")
    with pytest.raises(FileNotFoundError) as caught:
        data.load_data("oxford_pets", str(tmp_path))
    assert str(caught.value) == expected
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/imagenet/classnames.txt not found.*images/val/<wnid>/"):
        data.load_data("imagenet", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/fgvc_aircraft/images not found.*variants.txt"):
        data.load_data("fgvc_aircraft", str(tmp_path))
    build_tree(tmp_path, "oxford_pets")
    shutil.rmtree(tmp_path / "oxford_pets" / "images")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/oxford_pets/images not found; expected the CoOp"):
        data.load_data("oxford_pets", str(tmp_path))


def test_missing_images_reported_together(tmp_path):
    build_tree(tmp_path, "eurosat")
    gone = sorted((tmp_path / "eurosat" / "2750").rglob("test_*.jpg"))[:4]
    for path in gone:
        path.unlink()
    with pytest.raises(FileNotFoundError, match=r"4 of 15 images of the eurosat test split do not exist") as caught:
        data.load_data("eurosat", str(tmp_path), split="test")
    assert sum(str(path) in str(caught.value) for path in gone) == 3  # the first few, not all
    assert len(data.load_data("eurosat", str(tmp_path), split="train").examples) == 30


def test_bad_contents(tmp_path):
    build_tree(tmp_path, "imagenet")
    (tmp_path / "imagenet" / "images" / "train" / "n99").mkdir()
    with pytest.raises(ValueError, match=r"class folders of .*train without a name in .*classnames.txt: \['n99'\] \(1 in all\)"):
        data.load_data("imagenet", str(tmp_path))
    build_tree(tmp_path, "fgvc_aircraft")
    with open(tmp_path / "fgvc_aircraft" / "images_variant_test.txt", "a") as f:
        f.write("1234567 Boeing 999\n")
    with pytest.raises(ValueError, match=r"images_variant_test.txt line 16: variant 'Boeing 999' is not a line of"):
        data.load_data("fgvc_aircraft", str(tmp_path), split="test")
    build_tree(tmp_path, "ucf101")
    split_path = tmp_path / "ucf101" / "split_zhou_UCF101.json"
    split_path.write_text("{not json")
    with pytest.raises(ValueError, match=f"{split_path} is not valid JSON"):
        data.load_data("ucf101", str(tmp_path))
    split_path.write_text(json.dumps({"train": [["a.jpg", 0, "a"], ["b.jpg", 2, "b"]], "test": []}))
    with pytest.raises(ValueError, match="labels must be 0..C-1"):
        data.load_data("ucf101", str(tmp_path))


def test_malformed_split_files_and_classnames_are_named_before_any_model_loads(tmp_path, monkeypatch):
    build_tree(tmp_path, "ucf101")
    split_path = tmp_path / "ucf101" / "split_zhou_UCF101.json"
    good = json.loads(split_path.read_text())
    for content, problem in [
            (dict(good, train=None), "'train' is None, not a list"),
            (dict(good, val={"a.jpg": 0}), "'val' is {'a.jpg': 0}, not a list"),
            (dict(good, train=[[7, 0, "Abyssinian"]]), "bad train item [7, 0, 'Abyssinian']"),
            ({"train": [["a.jpg", 0, 5]], "test": [["a.jpg", 0, 5]]}, "bad train item ['a.jpg', 0, 5]")]:
        split_path.write_text(json.dumps(content))
        with pytest.raises(ValueError) as caught:
            data.load_data("ucf101", str(tmp_path))
        message = str(caught.value)
        assert message.startswith(f"{split_path}: {problem}; expected " + '{"train": [[image_path'), message
    # an empty training list: one line from the training script, before the model loads
    import run
    import train_sft
    monkeypatch.setattr(run, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    split_path.write_text(json.dumps(dict(good, train=[])))
    with pytest.raises(SystemExit) as caught:
        train_sft.main(["--dataset", "ucf101", "--data-root", str(tmp_path), "--device", "cpu",
                        "--output-dir", str(tmp_path / "run")])
    assert str(caught.value.code) == (f"train_sft.py: error: the ucf101 fewshot train split has no "
                                      f"examples; {data._layout('ucf101', str(tmp_path))}")
    assert not (tmp_path / "run/fewshot.json").exists()  # no empty choice kept for the next run
    # an id without a name would list a class '' (and an empty answer would be judged right)
    build_tree(tmp_path, "imagenet")
    for folder in ("train", "val"):
        _image(tmp_path / "imagenet/images" / folder / "n06/x.JPEG")
    with open(tmp_path / "imagenet/classnames.txt", "a") as f:
        f.write("n06\n")
    with pytest.raises(ValueError, match=rf"classnames.txt line 6: 'n06' has no class name; "
                                         r"expected '<wnid> <class name>'"):
        data.load_data("imagenet", str(tmp_path))


def test_class_names_with_commas_or_brackets_are_named_once(tmp_path, capsys):
    build_tree(tmp_path, "eurosat")
    split_path = tmp_path / "eurosat" / "split_zhou_EuroSAT.json"
    renamed = {"Abyssinian": "Annual_Crop,_Land", "Bengal": "Forest_[dense]"}
    split = {part: [[path, label, renamed.get(name, name)] for path, label, name in entries]
             for part, entries in json.loads(split_path.read_text()).items()}
    split_path.write_text(json.dumps(split))
    train = data.load_data("eurosat", str(tmp_path), shots=2)
    test = data.load_data("eurosat", str(tmp_path), split="test")
    warnings = capsys.readouterr().err.strip().splitlines()
    assert warnings == ["warning: eurosat class names with commas or brackets make the candidate list "
                        "ambiguous to read (scoring is unchanged): ['Annual Crop, Land', 'Forest [dense]']"]
    # listed as they are: the question holds them, the truth among them
    question, candidates = data.make_question(test, 0, "no-think", seed=1)
    assert test.examples[0].classname in candidates and "Annual Crop, Land" in candidates
    assert "Forest [dense]" in question and train.classnames == test.classnames


# ---- the command line ---------------------------------------------------------------------

def test_cli_dump_on_the_demo(tmp_path):
    dump = tmp_path / "out" / "demo.jsonl"
    done = subprocess.run([sys.executable, "data.py", "--dataset", "demo", "--data-root", str(tmp_path),
                           "--setting", "base", "--split", "train", "--shots", "2", "--seed", "3",
                           "--method", "cls-rl", "--epoch", "1", "--dump", str(dump)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("demo base/train: 5 classes, 10 examples, 5 candidates per question")
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    subset = data.load_data("demo", str(tmp_path), setting="base", shots=2, seed=3)
    assert [row["image"] for row in rows] == [e.image for e in subset.examples]
    for index, row in enumerate(rows):
        assert row["label"] in row["candidates"] and len(row["candidates"]) == 5
        assert (row["question"], row["candidates"]) == data.make_question(subset, index, "cls-rl", 3, epoch=1)
    bad = subprocess.run([sys.executable, "data.py", "--dataset", "dtd", "--data-root", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "split_zhou_DescribableTextures.json not found" in bad.stderr
