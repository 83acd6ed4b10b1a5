"""evaluate.py: summaries recomputed by hand from predictions.jsonl, sharded == one process,
resume, every bad input, and the base2new / matrix / plot commands on hand-made numbers."""
import doctest
import json
import re
import shutil
import sys

import pytest
import torch

import data as D
import evaluate as E
import model as M
from helpers import ROOT, run_script

# warm_tiny answers with demo class names; 40 images in 5 batches of 8 (3 + 2 on two ranks)
ARGS = ["--dataset", "demo", "--image-size", "56", "--max-new-tokens", "8", "--limit", "40",
        "--batch-size", "8", "--device", "cpu"]
BASELINE = {"model": "zero-shot", "setting": "fewshot",
            "datasets": {"demo": {"accuracy_paper": 10.0, "accuracy_strict": 5.0}}}
RECORD_KEYS = {"index", "image", "label", "candidates", "prompt", "completion", "answer",
               "correct_paper", "correct_strict", "named", "thinks", "completion_tokens"}


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def read_json(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def single(warm_tiny, tmp_path_factory):
    """One process, with --compare against a hand-made zero-shot summary."""
    tmp = tmp_path_factory.mktemp("eval")
    (tmp / "zero").mkdir()
    (tmp / "zero/summary.json").write_text(json.dumps(BASELINE))
    out = run_script(ROOT / "evaluate.py", ["--model", warm_tiny, *ARGS, "--output-dir", "one",
                                            "--compare", "zero"], tmp)
    return tmp, out


def test_doctests():
    result = doctest.testmod(E)
    assert result.failed == 0 and result.attempted >= 1, result


def test_summary_equals_the_numbers_recomputed_from_the_predictions(single):
    tmp, out = single
    records = read_jsonl(tmp / "one/demo/predictions.jsonl")
    summary = read_json(tmp / "one/summary.json")
    assert [r["index"] for r in records] == list(range(40))
    assert all(set(r) == RECORD_KEYS for r in records)
    # what the model was asked: the question, the listed candidates, the no-think suffix
    for r in records:
        assert r["prompt"] == ("What type of object is in the photo?\nPlease choose one from list [ "
                               + ", ".join(r["candidates"]) + "].\n Please directly output the answer.")
        assert r["label"] in r["candidates"] and len(r["candidates"]) == 10

    # every judgement again, with plain string operations
    def answer_of(completion):
        found = re.search(r"<answer>\s*(.*?)\s*</answer>", completion, re.DOTALL)
        return found.group(1) if found else completion.strip()

    for r in records:
        answer, label = answer_of(r["completion"]), r["label"]
        assert r["answer"] == answer
        assert r["correct_paper"] == (label.lower() in answer.lower())
        assert r["correct_strict"] == (" ".join(answer.lower().split()).rstrip(".") == label.lower())
    n = len(records)
    paper = 100 * sum(r["correct_paper"] for r in records) / n
    strict = 100 * sum(r["correct_strict"] for r in records) / n
    hedged = 100 * sum(len(r["named"]) > 1 for r in records) / n
    thinking = 100 * sum("<think>" in r["completion"] and "</think>" in r["completion"]
                         for r in records) / n
    tokens = sum(r["completion_tokens"] for r in records) / n
    assert 0 < paper < 100  # some right, some wrong: the numbers mean something

    row = summary["datasets"]["demo"]
    assert row["images"] == 40 and row["unreadable_images"] == 0
    assert row["accuracy_paper"] == pytest.approx(paper)
    assert row["accuracy_strict"] == pytest.approx(strict)
    assert row["hedged_rate"] == pytest.approx(hedged)
    assert row["thinking_share"] == pytest.approx(thinking)
    assert row["think_answer_mismatch_rate"] is None and row["think_answer_pairs"] == 0
    assert row["mean_completion_tokens"] == pytest.approx(tokens)
    assert row["change_paper"] == pytest.approx(paper - 10.0)
    assert row["change_strict"] == pytest.approx(strict - 5.0)
    assert row["timed_images"] == 40 and row["inference_seconds"] > 0
    assert row["images_per_second"] == pytest.approx(40 / row["inference_seconds"])
    for key in ("accuracy_paper", "accuracy_strict", "change_paper", "images"):
        assert summary["average"][key] == pytest.approx(row[key])  # one dataset: its own mean
    # the checkpoint's own training method chose the prompt; where it was trained is recorded
    assert summary["prompt"] == "no-think" and summary["trained_on"] == "demo"
    assert summary["trained_method"] == "no-think"
    markdown = (tmp / "one/summary.md").read_text()
    assert f"| demo | 40 | 0 | {paper:.2f} | {strict:.2f} | {hedged:.2f} |" in markdown
    assert f"| {paper - 10:+.2f} |" in markdown
    assert f"demo: accuracy {paper:.2f}% (paper rule)" in out
    assert sorted(p.name for p in (tmp / "one/demo").iterdir()) == ["predictions.jsonl", "timing.json"]


def test_two_processes_give_what_one_process_gives(single):
    tmp, _ = single
    args = read_json(tmp / "one/args.json")
    run_script(ROOT / "evaluate.py", ["--model", args["model"], *ARGS, "--output-dir", "two",
                                      "--compare", "zero"], tmp, nproc=2)
    one = (tmp / "one/demo/predictions.jsonl").read_text()
    two = (tmp / "two/demo/predictions.jsonl").read_text()
    assert sorted(one.splitlines()) == sorted(two.splitlines())
    assert one == two  # and in the same order: sorted by image index
    a, b = read_json(tmp / "one/summary.json"), read_json(tmp / "two/summary.json")
    for key in ("images", "accuracy_paper", "accuracy_strict", "hedged_rate", "change_paper",
                "mean_completion_tokens"):
        assert a["datasets"]["demo"][key] == b["datasets"]["demo"][key], key
    assert not list((tmp / "two/demo").glob("predictions.rank*"))  # merged, then removed


def test_resume_predicts_only_the_missing_images(warm_tiny, tmp_path, monkeypatch, capsys):
    predicted = []
    sample_groups = M.sample_groups

    def counting(model, processor, prompts, *args, **kwargs):
        predicted.append(prompts.input_ids.shape[0])
        return sample_groups(model, processor, prompts, *args, **kwargs)

    monkeypatch.setattr(E, "sample_groups", counting)  # evaluate.py imports it by name
    args = ["--model", warm_tiny, *ARGS, "--limit", "20", "--batch-size", "4"]
    E.main(args + ["--output-dir", str(tmp_path / "clean")])
    assert sum(predicted) == 20
    clean = (tmp_path / "clean/demo/predictions.jsonl").read_text()
    lines = clean.splitlines(keepends=True)

    # A two-rank run killed mid-way: batches 0 (0-3) and 1 (4-7) merged by an earlier resume,
    # rank 1 then finished batch 3 (12-15), rank 0 was killed while writing batch 2 (8-11).
    (tmp_path / "killed/demo").mkdir(parents=True)
    shutil.copy(tmp_path / "clean/args.json", tmp_path / "killed/args.json")
    killed = tmp_path / "killed/demo"
    (killed / "predictions.jsonl").write_text("".join(lines[:8]))
    (killed / "predictions.rank1.jsonl").write_text("".join(lines[12:16]))
    (killed / "predictions.rank0.jsonl").write_text(lines[8][:50])  # cut short, no newline
    predicted.clear()
    capsys.readouterr()
    E.main(args + ["--output-dir", str(tmp_path / "killed"), "--resume"])
    log = capsys.readouterr().out
    assert "demo: 20 test images, 12 done earlier, 8 to predict" in log
    assert "dropped an incomplete last line" in log
    assert predicted == [4, 4]  # batches 8-11 and 16-19, nothing else
    assert (killed / "predictions.jsonl").read_text() == clean
    assert not list(killed.glob("predictions.rank*"))
    a = read_json(tmp_path / "clean/summary.json")["datasets"]["demo"]
    b = read_json(tmp_path / "killed/summary.json")["datasets"]["demo"]
    assert a["accuracy_paper"] == b["accuracy_paper"] and b["timed_images"] == 8

    predicted.clear()  # a finished evaluation resumed: nothing to predict, same summary
    E.main(args + ["--output-dir", str(tmp_path / "killed"), "--resume"])
    assert predicted == [] and (killed / "predictions.jsonl").read_text() == clean


# Answers chosen by hand for the first 10 test images (all "red circle"); image 6 is unreadable.
SCRIPT = {
    0: "red circle",                                                          # right
    1: "<think>a red circle</think><answer>red circle</answer>",              # right, thinks
    2: "<think>looks like a blue square</think><answer>red circle</answer>",  # thinks one, answers another
    3: "red circle or blue square",                                           # hedged: paper only
    4: "blue square",                                                         # wrong
    5: "<answer>Red Circle.</answer>",                                        # right by both rules
    7: "<think>red circle or green triangle</think><answer>green triangle</answer>",  # wrong, agrees
    8: "",                                                                    # wrong, names nothing
    9: "the red circle",                                                      # paper only
}


def test_summary_of_scripted_answers_and_an_unreadable_image(tmp_path, monkeypatch):
    monkeypatch.setenv("CLS_RL_CACHE", str(tmp_path / "cache"))  # its own copy, to corrupt
    test = D.load_data("demo", None, "fewshot", "test")
    assert {e.classname for e in test.examples[:10]} == {"red circle"}
    with open(test.examples[6].image, "wb") as f:
        f.write(b"not a png")
    answers = iter(SCRIPT.values())

    def scripted(model, processor, prompts, *args, **kwargs):  # instead of the model
        texts = [next(answers) for _ in range(prompts.input_ids.shape[0])]
        rows = [processor.tokenizer(t, add_special_tokens=False)["input_ids"] + [processor.end_id]
                for t in texts]
        ids = torch.full((len(rows), max(map(len, rows))), processor.pad_id)
        for b, row in enumerate(rows):
            ids[b, :len(row)] = torch.tensor(row)
        return M.Rollout(ids, M.completion_mask(ids, processor.end_id), texts)

    monkeypatch.setattr(E, "sample_groups", scripted)
    E.main(["--model", "tiny", "--prompt", "think", "--dataset", "demo", "--limit", "10",
            "--batch-size", "4", "--image-size", "56", "--device", "cpu",
            "--output-dir", str(tmp_path / "run")])
    records = read_jsonl(tmp_path / "run/demo/predictions.jsonl")
    row = read_json(tmp_path / "run/summary.json")["datasets"]["demo"]
    assert "cannot read image" in records[6]["error"] and "completion" not in records[6]
    assert [r.get("completion") for r in records if "error" not in r] == list(SCRIPT.values())

    # by hand: right (paper) 0 1 2 3 5 9; right (strict) 0 1 2 5; hedged 3; thinking 1 2 7;
    # think part and answer both name a class in 1 2 7, with nothing in common in 2
    _, processor = M.load_model("tiny")
    tokens = [len(processor.tokenizer(t, add_special_tokens=False)["input_ids"]) + 1
              for t in SCRIPT.values()]
    expected = dict(images=10, unreadable_images=1, accuracy_paper=60.0, accuracy_strict=40.0,
                    hedged_rate=100 / 9, thinking_share=300 / 9, think_answer_mismatch_rate=100 / 3,
                    think_answer_pairs=3, mean_completion_tokens=sum(tokens) / 9)
    for key, value in expected.items():
        assert row[key] == pytest.approx(value), key

    # the same from the raw records, with plain Python
    answered = [r for r in records if "error" not in r]
    assert 100 * sum(r.get("correct_paper", False) for r in records) / len(records) == 60.0
    assert 100 * sum(r.get("correct_strict", False) for r in records) / len(records) == 40.0
    pairs = []
    for r in answered:
        if "</think>" in r["completion"]:
            thought = r["completion"].split("<think>")[1].split("</think>")[0]
            in_thought = {c for c in r["candidates"] if c in thought}
            if in_thought and r["named"]:
                pairs.append(not in_thought & set(r["named"]))
    assert 100 * sum(pairs) / len(pairs) == pytest.approx(row["think_answer_mismatch_rate"])
    assert 100 * sum(len(r["named"]) > 1 for r in answered) / len(answered) == \
        pytest.approx(row["hedged_rate"])
    assert records[3]["named"] == ["red circle", "blue square"]


def fake_split(root, test_items):
    """An oxford_pets tree in the CoOp layout with one training image and the given test list."""
    folder = root / "oxford_pets"
    (folder / "images").mkdir(parents=True)
    split = {"train": [["a.jpg", 0, "abyssinian"]], "val": [], "test": test_items}
    (folder / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    from PIL import Image
    Image.new("RGB", (8, 8)).save(folder / "images/a.jpg")


def exit_message(argv) -> str:
    with pytest.raises(SystemExit) as caught:
        E.main(argv)
    return str(caught.value.code)


def test_bad_inputs_give_clear_messages(tmp_path, warm_tiny):
    out = ["--output-dir", str(tmp_path / "out")]
    (tmp_path / "not_a_model").mkdir()
    message = exit_message(["--model", str(tmp_path / "not_a_model"), *ARGS, *out])
    assert "config.json" in message and "not_a_model" in message and "\n" not in message

    (tmp_path / "empty_root").mkdir()
    message = exit_message(["--model", warm_tiny, *ARGS, *out, "--dataset", "oxford_pets",
                            "--data-root", str(tmp_path / "empty_root")])
    assert "--dataset oxford_pets" in message and "split_zhou_OxfordPets.json not found" in message

    message = exit_message(["--model", warm_tiny, *ARGS, *out, "--dataset", "demo,pets"])
    assert "unknown pets" in message and "oxford_pets" in message

    fake_split(tmp_path / "root", test_items=[])
    message = exit_message(["--model", warm_tiny, *ARGS, *out, "--dataset", "oxford_pets",
                            "--data-root", str(tmp_path / "root")])
    assert "test split has no examples" in message

    # flags are checked before anything is loaded, each with one line naming flag, value and bound
    message = exit_message(["--model", warm_tiny, *ARGS, *out, "--limit", "0"])
    assert "--limit 0: expected at least 1" in message and "\n" not in message
    message = exit_message(["--model", warm_tiny, *ARGS, *out, "--dist-timeout", "0"])
    assert "--dist-timeout 0.0: expected more than 0" in message

    message = exit_message(["--model", warm_tiny, *ARGS, *out, "--prompt", "think"])
    assert "--prompt think" in message and "cls-rl" in message and "--method no-think" in message
    assert "--prompt no-think" in message and "--allow-prompt-mismatch" in message

    message = exit_message(["--model", warm_tiny, *ARGS, *out, "--compare", str(tmp_path)])
    assert "--compare" in message and "no summary.json" in message

    # a mismatch that is meant runs; then the output folder is taken
    E.main(["--model", warm_tiny, *ARGS, *out, "--prompt", "think", "--allow-prompt-mismatch",
            "--limit", "2"])
    assert read_json(tmp_path / "out/summary.json")["method"] == "cls-rl"
    message = exit_message(["--model", warm_tiny, *ARGS, *out, "--prompt", "think",
                            "--allow-prompt-mismatch", "--limit", "2"])
    assert "already holds predictions for demo" in message and "--resume" in message
    message = exit_message(["--model", warm_tiny, *ARGS, *out, "--prompt", "think",
                            "--allow-prompt-mismatch", "--limit", "2", "--resume",
                            "--max-new-tokens", "9"])
    assert "--max-new-tokens was 8, now 9" in message


def test_h_is_the_harmonic_mean_of_the_averaged_accuracies():
    assert round(E.harmonic_mean(81.17, 79.15), 2) == 80.15  # the paper's Table 1, CLS-RL
    assert E.harmonic_mean(0.0, 0.0) == 0.0


def write_summary(path, setting, accuracies, **extra):
    path.mkdir(parents=True)
    datasets = {name: {"accuracy_paper": value, "accuracy_strict": value - 1}
                for name, value in accuracies.items()}
    (path / "summary.json").write_text(json.dumps({"model": "m", "setting": setting,
                                                   "datasets": datasets, **extra}))


def test_base2new_table(tmp_path, capsys):
    # averages 81.17 (base) and 79.15 (new), spread so the mean of the rows' H is far from 80.15
    # one model per dataset, as in the paper: a base and a new evaluation of each
    write_summary(tmp_path / "pets_base", "base", {"oxford_pets": 95.0})
    write_summary(tmp_path / "dtd_base", "base", {"dtd": 67.34, "eurosat": 50.0})
    write_summary(tmp_path / "new", "new", {"oxford_pets": 60.0, "dtd": 98.30})
    table = E.main(["base2new", str(tmp_path / "new"), str(tmp_path / "pets_base"),
                    str(tmp_path / "dtd_base"), "--output-dir", str(tmp_path / "out")])
    h_pets, h_dtd = 2 * 95 * 60 / 155, 2 * 67.34 * 98.30 / (67.34 + 98.30)
    assert table["datasets"]["oxford_pets"]["H"] == pytest.approx(h_pets)
    assert table["datasets"]["dtd"]["H"] == pytest.approx(h_dtd)
    assert table["average"]["base"] == pytest.approx(81.17)
    assert table["average"]["new"] == pytest.approx(79.15)
    assert round(table["average"]["H"], 2) == 80.15
    assert abs((h_pets + h_dtd) / 2 - 80.15) > 3  # not the mean of the rows' H
    markdown = (tmp_path / "out/base2new.md").read_text()
    assert "| average | 81.17 | 79.15 | 80.15 |" in markdown
    assert f"| oxford_pets | 95.00 | 60.00 | {h_pets:.2f} |" in markdown
    assert "only in base: eurosat" in markdown and markdown in capsys.readouterr().out
    assert read_json(tmp_path / "out/base2new.json")["average"]["H"] == pytest.approx(table["average"]["H"])

    assert table["sources"]["base"] == [str(tmp_path / "pets_base"), str(tmp_path / "dtd_base")]

    message = exit_message(["base2new", str(tmp_path / "new"), str(tmp_path / "new")])
    assert "no --setting base evaluation" in message
    write_summary(tmp_path / "pets_again", "base", {"oxford_pets": 1.0})
    message = exit_message(["base2new", str(tmp_path / "pets_base"), str(tmp_path / "pets_again"),
                            str(tmp_path / "new")])
    assert "oxford_pets is in both" in message
    write_summary(tmp_path / "few", "fewshot", {"dtd": 1.0})
    message = exit_message(["base2new", str(tmp_path / "few"), str(tmp_path / "new")])
    assert "--setting fewshot" in message and "--setting base and --setting new" in message


def test_table_averages_one_evaluation_per_dataset(tmp_path):
    write_summary(tmp_path / "pets", "fewshot", {"oxford_pets": 86.13})
    write_summary(tmp_path / "dtd", "fewshot", {"dtd": 73.52})
    write_summary(tmp_path / "euro", "fewshot", {"eurosat": 58.02})
    table = E.main(["table", *(str(tmp_path / r) for r in ("pets", "dtd", "euro")),
                    "--output-dir", str(tmp_path / "out")])
    assert table["average"]["accuracy_paper"] == pytest.approx((86.13 + 73.52 + 58.02) / 3)
    assert table["average"]["accuracy_strict"] == pytest.approx((85.13 + 72.52 + 57.02) / 3)
    markdown = (tmp_path / "out/table.md").read_text()
    assert f"| average (3) | {(86.13 + 73.52 + 58.02) / 3:.2f} |" in markdown
    assert read_json(tmp_path / "out/table.json")["sources"]["dtd"] == str(tmp_path / "dtd")


def test_matrix_from_hand_made_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    zero = {"imagenet": 60.0, "oxford_pets": 70.0, "dtd": 40.0}
    write_summary(tmp_path / "zero", "fewshot", zero)
    write_summary(tmp_path / "a", "fewshot", {"imagenet": 70.0, "oxford_pets": 75.0, "dtd": 38.0},
                  trained_on="imagenet")
    write_summary(tmp_path / "b", "fewshot", {"imagenet": 61.0, "oxford_pets": 90.0, "dtd": 46.0},
                  trained_on="oxford_pets")
    write_summary(tmp_path / "c", "fewshot", {"dtd": 55.5, "imagenet": 59.0}, trained_on="dtd")
    table = E.main(["matrix", *(str(tmp_path / r) for r in "abc"), "--zero-shot",
                    str(tmp_path / "zero"), "--output-dir", str(tmp_path / "out")])
    assert table["columns"] == ["imagenet", "oxford_pets", "dtd"]  # the paper's dataset order
    assert table["rows"] == {"imagenet": {"imagenet": 10.0, "oxford_pets": 5.0, "dtd": -2.0},
                             "oxford_pets": {"imagenet": 1.0, "oxford_pets": 20.0, "dtd": 6.0},
                             "dtd": {"dtd": 15.5, "imagenet": -1.0}}
    assert table["mean"]["imagenet"] == pytest.approx(13 / 3)
    assert table["mean_others"]["imagenet"] == pytest.approx(1.5)
    assert table["mean_others"]["dtd"] == pytest.approx(-1.0)
    markdown = (tmp_path / "out/matrix.md").read_text()
    assert "| oxford_pets | +1.00 | +20.00 | +6.00 | +9.00 | +3.50 |" in markdown
    assert "| dtd | -1.00 | – | +15.50 | +7.25 | -1.00 |" in markdown
    assert read_json(tmp_path / "out/matrix.json") == table
    out = capsys.readouterr().out
    assert "matplotlib is not installed: skipped" in out and "matrix.png" in out
    assert not (tmp_path / "out/matrix.png").exists()

    # without --zero-shot, each run's own --compare numbers are used
    write_summary(tmp_path / "d", "fewshot", {"dtd": 50.0}, trained_on="dtd")
    summary = read_json(tmp_path / "d/summary.json")
    summary["datasets"]["dtd"]["change_paper"] = 7.5
    (tmp_path / "d/summary.json").write_text(json.dumps(summary))
    table = E.main(["matrix", str(tmp_path / "d"), "--output-dir", str(tmp_path / "out2")])
    assert table["rows"] == {"dtd": {"dtd": 7.5}}
    message = exit_message(["matrix", str(tmp_path / "a"), "--output-dir", str(tmp_path / "out3")])
    assert "without --compare" in message and "--zero-shot" in message


def test_plot_is_skipped_cleanly_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    metrics = tmp_path / "run/metrics.jsonl"
    metrics.parent.mkdir()
    metrics.write_text("".join(json.dumps({"step": s, "reward": s / 10, "accuracy": s / 20,
                                           "completion_length": 30 - s}) + "\n" for s in range(1, 6)))
    assert E.main(["plot", str(metrics)]) is None
    assert "matplotlib is not installed: skipped" in capsys.readouterr().out
    assert list(tmp_path.rglob("*.png")) == []
    message = exit_message(["plot", str(tmp_path / "missing.jsonl")])
    assert "missing.jsonl not found" in message


# ---- pictures -------------------------------------------------------------------------------

class FakeAxes:
    def __init__(self):
        self.lines, self.settings = [], {}

    def plot(self, xs, ys, label=None):
        self.lines.append((list(xs), list(ys)))

    def set(self, **settings):
        self.settings.update(settings)

    def legend(self, **kwargs):
        pass


class FakeFigure:
    """matplotlib.figure.Figure as `plot` uses it (matplotlib is optional, and absent in CI):
    it records what each panel is given; savefig writes where it is told, as the real one."""
    made = []

    def __init__(self, **kwargs):
        self.panels = []
        FakeFigure.made.append(self)

    def subplots(self, rows, columns, squeeze):
        self.panels = [FakeAxes() for _ in range(columns)]
        return [self.panels]

    def savefig(self, file, **kwargs):
        if isinstance(file, str):
            with open(file, "wb") as f:
                f.write(b"picture")
        else:
            file.write(b"picture")


@pytest.fixture
def fake_matplotlib(monkeypatch):
    import types
    figure = types.ModuleType("matplotlib.figure")
    figure.Figure = FakeFigure
    monkeypatch.setitem(sys.modules, "matplotlib", types.ModuleType("matplotlib"))
    monkeypatch.setitem(sys.modules, "matplotlib.figure", figure)
    FakeFigure.made.clear()
    return FakeFigure.made


def test_plot_output_into_a_missing_folder(tmp_path, fake_matplotlib):
    metrics = tmp_path / "run/metrics.jsonl"
    metrics.parent.mkdir()
    metrics.write_text("".join(json.dumps({"step": s, "reward": s / 10}) + "\n" for s in (1, 2)))
    output = tmp_path / "plots/new/curves.png"
    assert E.main(["plot", str(metrics), "--output", str(output)]) == str(output)
    assert output.read_bytes() == b"picture"
    (tmp_path / "a_file").write_text("")
    message = exit_message(["plot", str(metrics), "--output", str(tmp_path / "a_file/curves.png")])
    assert message.startswith("evaluate.py plot: error: could not write") and "a_file" in message
    assert "\n" not in message


# ---- a checkpoint evaluated as it was trained -----------------------------------------------

@pytest.fixture(scope="module")
def trained_at_112(tmp_path_factory):
    """A demo-sized SFT run at 112 px with seed 7 (neither is evaluate.py's documented default),
    its held-out accuracy logged before training and at its last step."""
    import train_sft
    out = tmp_path_factory.mktemp("sft112") / "run"
    train_sft.main(["--model", "tiny", "--dataset", "demo", "--image-size", "112", "--seed", "7",
                    "--shots", "4", "--device", "cpu", "--lr", "3e-3", "--lr-schedule", "constant",
                    "--max-steps", "20", "--batch-size", "4", "--grad-accum", "1", "--eval-every", "20",
                    "--eval-limit", "20", "--max-new-tokens", "8", "--output-dir", str(out)])
    return out


def test_a_checkpoint_is_evaluated_on_the_inputs_it_was_trained_on(trained_at_112, tmp_path, capsys):
    budget = ["--dataset", "demo", "--limit", "20", "--max-new-tokens", "8", "--device", "cpu"]
    E.main(["--model", str(trained_at_112 / "final"), *budget, "--output-dir", str(tmp_path / "own")])
    assert "image size 112, seed 7, from the checkpoint's training flags" in capsys.readouterr().out
    summary = read_json(tmp_path / "own/summary.json")
    assert (summary["args"]["image_size"], summary["args"]["seed"]) == (112, 7)
    # the number the training run logged for its last step, from the same 20 images
    trained = [r for r in read_jsonl(trained_at_112 / "metrics.jsonl") if "test_accuracy" in r][-1]
    assert trained["step"] == 20 and trained["test_accuracy"] > 0.2
    assert summary["datasets"]["demo"]["accuracy_paper"] / 100 == pytest.approx(trained["test_accuracy"],
                                                                                abs=1e-9)
    # other inputs are allowed when asked for, with a note each
    E.main(["--model", str(trained_at_112 / "final"), *budget, "--image-size", "56",
            "--output-dir", str(tmp_path / "other")])
    out = capsys.readouterr().out
    assert "note: --image-size 56, but" in out and "was trained with --image-size 112" in out
    assert "seed 7, from the checkpoint's training flags" in out
    assert read_json(tmp_path / "other/summary.json")["args"]["image_size"] == 56
    # a model that is not one of our checkpoints: the documented defaults, nothing to say
    args = E.parse_eval_args(["--model", "tiny"])
    assert (args.image_size, args.seed) == (None, None)  # "not given" stays visible
    assert E.choose_inputs(args, {}) == [] and (args.image_size, args.seed) == (384, 100)


def test_the_accuracy_before_training_is_step_0_of_the_log_and_the_plot(trained_at_112, tmp_path,
                                                                        fake_matplotlib):
    records = read_jsonl(trained_at_112 / "metrics.jsonl")
    assert [(r["step"], list(r)) for r in records[:1]] == [(0, ["step", "test_accuracy"])]
    assert [r["step"] for r in records[1:]] == list(range(1, 21))
    test = D.load_data("demo", None, "fewshot", "test")
    untrained = E.accuracy(*M.load_model("tiny"), test, "no-think", batch_size=32, max_new_tokens=8,
                           image_size=112, seed=7, limit=20)
    assert records[0]["test_accuracy"] == untrained
    E.main(["plot", str(trained_at_112 / "metrics.jsonl"), "--output", str(tmp_path / "curves.png")])
    panels = dict(zip(["test_accuracy", "loss"], fake_matplotlib[0].panels))
    assert panels["test_accuracy"].lines == [([0, 20], [untrained, records[-1]["test_accuracy"]])]
    assert panels["loss"].lines[0][0] == list(range(1, 21))
    assert all(p.settings["xlim"] == (0, None) for p in panels.values())  # every panel from step 0
