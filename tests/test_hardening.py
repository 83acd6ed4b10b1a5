"""A run never lies: signals, resume, flags and errors, one test per way a run could mislead."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open

import data as D
import evaluate as E
import model as M
import run as R
import train_grpo as T
import train_sft as S
from helpers import FAST, ROOT, env, launch, max_difference, metrics, run_script, weights

GRPO = FAST + ["--method", "no-think", "--batch-size", "2", "--num-generations", "2"]


def wait_for(path, process, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline and not path.exists() and process.poll() is None:
        time.sleep(0.02)
    assert path.exists(), "the run never got that far"


def cli(script, args, tmp_path, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=tmp_path, env=env(tmp_path),
                          capture_output=True, text=True, timeout=timeout)


# a tqdm progress bar: "desc:  67%|######    | 2/3 [00:00<00:00, 3.36it/s, postfix]"
PROGRESS_BAR = re.compile(r"^[^|]*\|[^|]*\| *\d+/\d+ \[[^\]]*\]")


def one_line_error(done: subprocess.CompletedProcess) -> str:
    """The error a script stopped with: non-zero exit, no traceback, one line on stderr (besides
    progress bars, which it may follow on the terminal line of the last one)."""
    assert done.returncode != 0, done.stdout[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [PROGRESS_BAR.sub("", line).replace("\x1b[A", "").strip() for line in done.stderr.splitlines()]
    lines = [line for line in lines if line]
    assert len(lines) == 1, done.stderr[-3000:]
    return lines[0]


@pytest.fixture
def no_loading(monkeypatch):
    """Flag errors must stop a script before any model is loaded."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the flags were checked")
    for module in (M, R, E, T):  # every module that imports load_model by name
        monkeypatch.setattr(module, "load_model", refuse)


# 1. a signal during the warm start -------------------------------------------------------------

def test_sigterm_during_the_warm_start_saves_it_and_resume_equals_an_uninterrupted_run(tmp_path):
    args = GRPO + ["--max-steps", "2", "--warm-start-steps", "60", "--warm-start-lr", "1e-3",
                   "--lr", "1e-3", "--shots", "4"]
    run_script(ROOT / "train_grpo.py", args + ["--output-dir", "straight"], tmp_path)
    process = launch(ROOT / "train_grpo.py", args + ["--output-dir", "cut"], tmp_path)
    wait_for(tmp_path / "cut/warm_start.jsonl", process)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, out[-3000:]
    saved = sorted(p.name for p in (tmp_path / "cut").iterdir())
    assert [n for n in saved if n.startswith("warm_start-")] and not any(
        n.startswith("checkpoint-") or n in ("warm_start", "final") for n in saved), saved
    run_script(ROOT / "train_grpo.py", args + ["--output-dir", "cut", "--resume", "latest"], tmp_path)
    assert max_difference(weights(tmp_path / "cut/warm_start"), weights(tmp_path / "straight/warm_start")) == 0
    assert max_difference(weights(tmp_path / "cut/final"), weights(tmp_path / "straight/final")) == 0
    assert [r["step"] for r in metrics(tmp_path / "cut", "warm_start.jsonl")] == list(range(1, 61))


# 2. --resume refuses a different run, and keeps the record of the original ---------------------

def test_resume_refuses_flags_that_change_the_trajectory_and_keeps_args_json(tmp_path):
    args = GRPO + ["--max-steps", "2", "--save-every", "1", "--output-dir", "run"]
    run_script(ROOT / "train_grpo.py", args, tmp_path)
    original = (tmp_path / "run/args.json").read_text()
    resume = ["--resume", str(tmp_path / "run/checkpoint-000001")]
    changed = ["--lr", "1e-2", "--num-generations", "3", "--model", str(tmp_path / "run/checkpoint-000002"),
               "--image-size", "84", "--max-new-tokens", "5"]
    message = one_line_error(cli("train_grpo.py", args + changed + resume, tmp_path))
    for flag in ("--lr", "--num-generations", "--model", "--image-size", "--max-new-tokens"):
        assert flag + " was" in message, (flag, message)
    assert (tmp_path / "run/args.json").read_text() == original
    # flags that cannot change the trajectory may change
    run_script(ROOT / "train_grpo.py", args + ["--save-every", "2", "--keep-checkpoints", "3"] + resume,
               tmp_path)
    assert json.loads((tmp_path / "run/args.json").read_text())["keep_checkpoints"] == 3


# 3 and 7. every flag is checked before anything is loaded -------------------------------------

@pytest.mark.parametrize("script, flag, value, expected", [
    (T, "--epochs", "0", "more than 0"), (T, "--max-steps", "0", "at least 1"),
    (T, "--max-steps", "-1", "at least 1"), (T, "--keep-checkpoints", "0", "at least 1"),
    (T, "--save-every", "-1", "at least 0"), (T, "--max-new-tokens", "0", "at least 1"),
    (T, "--lr", "-1", "more than 0"), (T, "--num-iterations", "0", "at least 1"),
    (T, "--eval-batch-size", "0", "at least 1"), (T, "--num-generations", "1", "at least 2"),
    (T, "--top-p", "1.5", "at most 1"), (S, "--epochs", "0", "more than 0"),
    (S, "--lr", "nan", "a finite number"), (S, "--batch-size", "0", "at least 1"),
])
def test_a_bad_flag_stops_before_loading_with_its_name_and_value(script, flag, value, expected,
                                                                tmp_path, no_loading):
    with pytest.raises(SystemExit) as stop:
        script.main(FAST + [flag, value, "--output-dir", str(tmp_path / "run")])
    assert str(stop.value).startswith(f"{flag} ") and str(stop.value).endswith(f"expected {expected}")
    assert not (tmp_path / "run/args.json").exists()


def test_evaluate_checks_its_flags_too(tmp_path, no_loading):
    with pytest.raises(SystemExit) as stop:
        E.main(["--model", "tiny", "--dataset", "demo", "--batch-size", "0", "--output-dir", str(tmp_path)])
    assert "--batch-size 0" in str(stop.value)


# 4. --demo keeps the other flags ---------------------------------------------------------------

def test_demo_flag_with_other_flags_runs_the_demo_with_them_changed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    T.main(["--demo", "--max-steps", "2", "--warm-start-steps", "1", "--eval-limit", "4",
            "--output-dir", str(tmp_path / "demo")])
    saved = json.loads((tmp_path / "demo/args.json").read_text())
    assert saved["model"] == "tiny" and saved["dataset"] == "demo" and saved["demo"]
    assert saved["max_steps"] == 2 and saved["warm_start_steps"] == 1 and saved["num_generations"] == 8
    assert [r["step"] for r in metrics(tmp_path / "demo")] == [0, 1, 2]  # 0: the accuracy before


# 5. a signal on one rank only ------------------------------------------------------------------

def test_sigterm_on_rank_1_alone_stops_every_rank_without_a_final_link(tmp_path):
    process = launch(ROOT / "tests/signal_on_rank1.py", GRPO + ["--max-steps", "6", "--output-dir", "run"],
                     tmp_path, nproc=2)
    out, _ = process.communicate(timeout=300)
    assert process.returncode != 0, out[-3000:]
    assert [p.name for p in (tmp_path / "run").glob("checkpoint-*")] == ["checkpoint-000002"]
    assert not (tmp_path / "run/final").exists()
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2]


# 6. data.py shows what training reads ----------------------------------------------------------

def test_data_py_defaults_to_the_training_seed(tmp_path):
    dump = tmp_path / "dump.jsonl"
    D.main(["--dataset", "demo", "--dump", str(dump)])
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    seed = T.parse_args(["--dataset", "demo"]).seed
    train = D.load_data("demo", None, "fewshot", "train", 4, seed)
    assert [r["image"] for r in rows] == [e.image for e in train.examples]
    assert [r["candidates"] for r in rows] == [D.make_question(train, i, "no-think", seed)[1]
                                               for i in range(len(rows))]


# 8. data, model and output-dir errors: one line, early -----------------------------------------

@pytest.mark.parametrize("script", [T, S])
def test_input_errors_are_one_line_messages(script, tmp_path, monkeypatch):
    """The first as the user meets it (a process: one line on stderr, no traceback); the others
    in this process, as the SystemExit that Python prints as that one line."""
    name = f"{script.__name__}.py"
    message = one_line_error(cli(name, FAST + ["--dataset", "dtd", "--data-root", str(tmp_path)], tmp_path))
    assert "split_zhou_DescribableTextures.json not found" in message
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("")
    for args, expected in ((["--model", "./no/such/model"], "no/such/model: no such directory"),
                           (["--output-dir", "a_file"], "--output-dir a_file is a file"),
                           (["--output-dir", "a_file/run"], "a_file/run")):
        with pytest.raises(SystemExit) as stop:
            script.main(FAST + args)
        message = str(stop.value.code)
        assert message.startswith(f"{name}: error: ") and "\n" not in message and expected in message, message


def test_sft_checks_the_dataset_before_loading_the_model(tmp_path, no_loading):
    with pytest.raises(SystemExit) as stop:
        S.main(FAST + ["--dataset", "dtd", "--data-root", str(tmp_path), "--output-dir", str(tmp_path / "r")])
    assert "split_zhou_DescribableTextures.json not found" in str(stop.value)


# 9. unreadable files, a crashed link, a full disk ----------------------------------------------

def test_unreadable_images_count_files_not_retries(tmp_path, monkeypatch):
    monkeypatch.setenv("CLS_RL_CACHE", str(tmp_path / "cache"))  # its own copy, to corrupt
    train = D.load_data("demo", None, "fewshot", "train", 2, 100)  # 20 images
    (tmp_path / "bad").write_bytes(b"not a png")
    bad = str(tmp_path / "bad")
    train.examples[3] = D.Example(bad, train.examples[3].label, train.examples[3].classname)
    train.examples[4] = D.Example(bad, train.examples[4].label, train.examples[4].classname)
    # 40 picks: every example twice, the bad file at two indices: four failed reads, one file
    batch = D.load_step_examples(train, 0, seed=100, method="no-think", image_size=56, rank=0,
                                 world_size=1, per_rank=40)
    assert batch.unreadable == 1 and len(batch.images) == 40


def test_a_leftover_final_tmp_does_not_break_the_next_run(tmp_path):
    (tmp_path / "run").mkdir()
    os.symlink("checkpoint-999999", tmp_path / "run/final.tmp")
    T.main(GRPO + ["--max-steps", "1", "--output-dir", str(tmp_path / "run")])
    assert (tmp_path / "run/final").resolve().name == "checkpoint-000001"


def test_a_full_disk_names_the_checkpoint_being_written(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(SystemExit, match="checkpoint-000001.*No space left"):
        T.main(GRPO + ["--max-steps", "1", "--output-dir", str(tmp_path / "run")])


# 10 and 11. the README's first commands, and references that resolve ---------------------------

def test_readme_first_block_installs_cpu_torch_before_the_requirements():
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    assert "whl/cpu" in block and block.index("whl/cpu") < block.index("-r requirements.txt")


def test_every_file_a_tracked_file_cites_is_in_the_repository():
    """The repository stands alone: a path that climbs out of it (two dots, then a slash) or a
    docs/ file that is not there would leave a reader of the file with a dead reference."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    for name in tracked:
        if name.endswith((".py", ".md", ".txt", ".ini")) or name == ".ci/run":
            text = (ROOT / name).read_text()
            assert not re.findall(r"(?<![\w.])\.\./\w", text), name
            for cited in re.findall(r"(?<![\w./])docs/[\w./-]*\w", text):
                assert (ROOT / cited).exists(), (name, cited)


# ================================================================================================
# Output folders, resume, restarts, corrupt and absurd input: one test per way a run could lose
# the user's files, silently continue another run, or end 0 with a broken result.

def folder_listing(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def stop_warm_start_at_step_1(monkeypatch):
    """A SIGTERM to this process in the warm start's first step: it saves warm_start-000001."""
    original, calls = S.sft_batch, []

    def signalled(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)
    monkeypatch.setattr(S, "sft_batch", signalled)


def test_demo_starts_over_only_a_folder_of_demo_outputs(tmp_path):
    user = tmp_path / "thesis"
    (user / "src").mkdir(parents=True)
    (user / "results.csv").write_text("1\n")
    (user / "src/thesis.py").write_text("")
    before = folder_listing(user)
    demo = ["--demo", "--dataset", "eurosat", "--data-root", "/nonexistent"]  # stops at the data
    assert "results.csv" in one_line_error(cli("train_grpo.py", demo + ["--output-dir", "."], user))
    assert folder_listing(user) == before
    # another run's folder, though every name in it is one a demo writes
    other = tmp_path / "other"
    (other / "checkpoint-000001").mkdir(parents=True)
    (other / "args.json").write_text(json.dumps({"demo": False}))
    with pytest.raises(SystemExit, match="args.json of a demo run"):
        T.main(demo + ["--output-dir", str(other)])
    assert folder_listing(other) == ["args.json", "checkpoint-000001"]
    # an earlier demo's outputs, and the leftovers of its interrupted saves, are deleted
    earlier = tmp_path / "demo"
    for folder in ("checkpoint-000003", "checkpoint-000004.tmp", "warm_start", "warm_start-000002"):
        (earlier / folder).mkdir(parents=True)
        (earlier / folder / "model.safetensors").write_text("")
    for name in ("metrics.jsonl", "warm_start.jsonl", "fewshot.json", ".tmp-x1y2"):
        (earlier / name).write_text("")
    (earlier / "args.json").write_text(json.dumps({"demo": True}))
    os.symlink("checkpoint-000003", earlier / "final")
    with pytest.raises(SystemExit, match="eurosat"):
        T.main(demo + ["--output-dir", str(earlier)])
    assert folder_listing(earlier) == ["args.json"]
    assert json.loads((earlier / "args.json").read_text())["dataset"] == "eurosat"


def test_resume_with_another_number_of_processes_is_refused_naming_both(tmp_path):
    args = GRPO + ["--max-steps", "2", "--save-every", "1", "--output-dir", str(tmp_path / "run")]
    T.main(args)
    process = launch(ROOT / "train_grpo.py", args + ["--resume", "latest"], tmp_path, nproc=2)
    out, _ = process.communicate(timeout=300)
    assert process.returncode != 0, out[-3000:]
    assert "saved by a run of 1 processes, resumed with 2" in out, out[-3000:]
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2]


def test_torchrun_restart_after_a_sigkill_continues_to_the_uninterrupted_weights(tmp_path):
    # the README's command line, for the first start and the restart alike (--resume latest)
    args = GRPO + ["--max-steps", "4", "--save-every", "2", "--resume", "latest"]
    run_script(ROOT / "train_grpo.py", args + ["--output-dir", "straight"], tmp_path, nproc=2)
    restarts = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "--max-restarts=1", "--monitor-interval=0.1", str(ROOT / "tests/kill_rank1.py")]
    done = subprocess.run(restarts + args + ["--output-dir", "cut"], cwd=tmp_path, text=True, timeout=400,
                          env={**env(tmp_path), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}, capture_output=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "exitcode: -9" in done.stderr and done.stdout.count("GRPO (no-think) on demo") == 2
    assert "no checkpoint in cut yet; starting the run" in done.stdout  # the first start
    assert [r["step"] for r in metrics(tmp_path / "cut")] == [1, 2, 3, 4]
    assert max_difference(weights(tmp_path / "cut/final"), weights(tmp_path / "straight/final")) == 0


def test_resume_of_a_warm_start_with_a_trailing_slash_or_into_another_folder(tmp_path, monkeypatch):
    args = GRPO + ["--max-steps", "2", "--warm-start-steps", "2", "--warm-start-lr", "1e-3", "--lr", "1e-3"]
    T.main(args + ["--save-every", "1", "--output-dir", str(tmp_path / "straight")])
    with monkeypatch.context() as patch:
        stop_warm_start_at_step_1(patch)
        with pytest.raises(SystemExit) as stop:
            T.main(args + ["--output-dir", str(tmp_path / "a")])
    assert stop.value.code == 128 + signal.SIGTERM
    # an old warm start of run a, which must not become the reference of a run continued in b
    untrained, processor = M.load_model("tiny")
    M.save_pretrained(untrained, processor, str(tmp_path / "a/warm_start"))
    T.main(args + ["--resume", str(tmp_path / "a/warm_start-000001"), "--output-dir", str(tmp_path / "b")])
    T.main(args + ["--resume", str(tmp_path / "a/warm_start-000001") + "/", "--output-dir", str(tmp_path / "a")])
    # a GRPO checkpoint of a warm-started run: the reference is that run's warm start
    T.main(args + ["--resume", str(tmp_path / "straight/checkpoint-000001") + "/",
                   "--output-dir", str(tmp_path / "c")])
    straight = weights(tmp_path / "straight/final")
    for run in ("a", "b", "c"):
        assert max_difference(weights(tmp_path / run / "final"), straight) == 0, run
    assert [r["step"] for r in metrics(tmp_path / "b")] == [1, 2]


def test_warm_start_lr_defaults_to_sfts_and_the_demo_keeps_its_own():
    assert T.parse_args(["--model", "tiny", "--warm-start-steps", "10"]).warm_start_lr == 1e-5
    assert T.parse_args([]).warm_start_lr == T.parse_args(["--demo"]).warm_start_lr == 3e-3


@pytest.mark.parametrize("script, flag, value, expected", [
    (T, "--lr", "inf", "a finite number"), (T, "--weight-decay", "inf", "a finite number"),
    (T, "--warm-start-lr", "inf", "a finite number"), (T, "--beta", "inf", "a finite number"),
    (T, "--epochs", "inf", "a finite number"), (T, "--dist-timeout", "inf", "a finite number"),
    (T, "--temperature", "nan", "a finite number"), (S, "--max-grad-norm", "inf", "a finite number"),
    (T, "--image-size", "100000", "at most 3584"),
    (E, "--image-size", "100000", "at most 3584"),
    (E, "--dist-timeout", "nan", "a finite number"),
])
def test_absurd_flag_values_stop_before_loading(script, flag, value, expected, tmp_path, no_loading):
    common = ["--model", "tiny", "--dataset", "demo"] if script is E else FAST
    with pytest.raises(SystemExit) as stop:
        script.main(common + [flag, value, "--output-dir", str(tmp_path / "run")])
    assert str(stop.value) == f"{flag} {value}: expected {expected}"


def test_a_run_ending_with_non_finite_weights_or_no_update_exits_non_zero_without_final(tmp_path, monkeypatch):
    # finite flags that still blow every weight up: the decay factor 1 - lr * wd overflows fp32
    with pytest.raises(SystemExit) as stop:
        T.main(GRPO + ["--max-steps", "1", "--lr", "1", "--weight-decay", "1e39",
                       "--output-dir", str(tmp_path / "diverged")])
    assert stop.value.code != 0 and "not all finite" in str(stop.value)
    assert not os.path.lexists(tmp_path / "diverged/final")
    original = T.grpo_loss

    def nan_loss(*args, **kwargs):
        loss, stats = original(*args, **kwargs)
        return loss * float("nan"), stats
    monkeypatch.setattr(T, "grpo_loss", nan_loss)
    with pytest.raises(SystemExit) as stop:
        T.main(GRPO + ["--max-steps", "2", "--output-dir", str(tmp_path / "skipped")])
    assert stop.value.code != 0 and "every update of the run was skipped" in str(stop.value)
    assert not os.path.lexists(tmp_path / "skipped/final")


@pytest.mark.parametrize("how", ["torch", "safetensors"])
def test_a_full_disk_is_one_line_naming_the_checkpoint_and_keeps_the_earlier_ones(how, tmp_path):
    done = cli("tests/full_disk.py", [how] + GRPO + ["--max-steps", "3", "--save-every", "1",
                                                      "--output-dir", "run"], tmp_path)
    message = one_line_error(done)
    assert "could not write checkpoint run/checkpoint-000002" in message, message
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if "checkpoint" in p.name) == ["checkpoint-000001"]
    assert R.saved_state(str(tmp_path / "run/checkpoint-000001"))["step"] == 1
    weights(tmp_path / "run/checkpoint-000001")  # loads


def test_a_damaged_checkpoint_is_named_and_latest_names_the_newest_intact_one(tmp_path):
    args = GRPO + ["--max-steps", "2", "--save-every", "1", "--output-dir", str(tmp_path / "run")]
    T.main(args)
    newest, intact = tmp_path / "run/checkpoint-000002", str(tmp_path / "run/checkpoint-000001")
    damages = {"truncated": lambda data: data[:len(data) // 2], "zeroed": lambda data: bytes(len(data)),
               "random": lambda data: os.urandom(len(data)), "missing": None}
    for name in ("trainer_state.pt", "model.safetensors", "config.json"):
        original = (newest / name).read_bytes()
        for how, damage in damages.items():
            if damage:
                (newest / name).write_bytes(damage(original))
            else:
                (newest / name).unlink()
            before = folder_listing(tmp_path / "run")
            with pytest.raises(SystemExit) as stop:
                T.main(args + ["--resume", "latest"])
            assert f"{newest / name} is {'missing' if how == 'missing' else 'damaged'}" in str(stop.value)
            assert f"pass --resume {intact}" in str(stop.value), str(stop.value)
            with pytest.raises(SystemExit) as stop:
                T.main(args + ["--resume", str(newest)])
            assert f"{newest}" in str(stop.value) and name in str(stop.value), (name, how)
            assert folder_listing(tmp_path / "run") == before  # nothing deleted
            (newest / name).write_bytes(original)
    (newest / "trainer_state.pt").write_bytes(b"\0" * 100)
    message = one_line_error(cli("train_grpo.py", args + ["--resume", "latest"], tmp_path))
    assert "checkpoint-000002/trainer_state.pt is damaged" in message, message
    # a local folder that is no model is not a matter of hub ids or network access
    (newest / "model.safetensors").unlink()
    message = one_line_error(cli("train_grpo.py", GRPO + ["--model", str(newest)], tmp_path))
    assert str(newest) in message and "hub" not in message and "network" not in message, message


def test_a_fresh_run_refuses_a_folder_holding_a_stopped_warm_start(tmp_path):
    for leftover in ("warm_start-000002", "warm_start"):
        (tmp_path / leftover / leftover).mkdir(parents=True)
        with pytest.raises(SystemExit, match=f"already holds checkpoints of another run \\({leftover}\\)"):
            T.main(GRPO + ["--max-steps", "1", "--output-dir", str(tmp_path / leftover)])
        assert folder_listing(tmp_path / leftover) == [leftover]
    # killed after its warm start, before GRPO's first checkpoint: a restart of the same run
    # (--resume latest, the same flags) starts it again; another run's is refused
    args = GRPO + ["--max-steps", "1", "--warm-start-steps", "1", "--output-dir", str(tmp_path / "run")]
    T.main(args)
    shutil.rmtree(tmp_path / "run/checkpoint-000001")
    os.remove(tmp_path / "run/final")
    with pytest.raises(SystemExit, match="another run \\(warm_start\\)"):
        T.main(args + ["--resume", "latest", "--lr", "1e-3"])
    T.main(args + ["--resume", "latest"])
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1]


def test_resume_cuts_the_logs_back_to_the_checkpoint(tmp_path, monkeypatch):
    # killed (-9) after logging step 3, before checkpointing it: the newest checkpoint is step 2
    args = GRPO + ["--max-steps", "3", "--save-every", "2", "--output-dir", str(tmp_path / "run")]
    T.main(args)
    shutil.rmtree(tmp_path / "run/checkpoint-000003")
    os.remove(tmp_path / "run/final")
    T.main(args + ["--resume", "latest"])
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2, 3]
    # the same in a warm start: stopped after step 1, then a record of step 2 logged by a kill -9
    args = GRPO + ["--max-steps", "1", "--warm-start-steps", "2", "--output-dir", str(tmp_path / "warm")]
    with monkeypatch.context() as patch:
        stop_warm_start_at_step_1(patch)
        with pytest.raises(SystemExit):
            T.main(args)
    log = tmp_path / "warm/warm_start.jsonl"
    log.write_text(log.read_text() + log.read_text().replace('"step": 1', '"step": 2'))
    T.main(args + ["--resume", "latest"])
    assert [r["step"] for r in metrics(tmp_path / "warm", "warm_start.jsonl")] == [1, 2]


def test_bf16_checkpoints_store_the_tied_embedding_once(tmp_path):
    T.main(GRPO + ["--max-steps", "1", "--precision", "bf16", "--output-dir", str(tmp_path / "run")])
    untrained, processor = M.load_model("tiny")  # Hugging Face's own save of the fp32 model
    M.save_pretrained(untrained, processor, str(tmp_path / "fp32"))
    with safe_open(tmp_path / "run/final/model.safetensors", "pt") as bf16, \
            safe_open(tmp_path / "fp32/model.safetensors", "pt") as fp32:
        assert sorted(bf16.keys()) == sorted(fp32.keys())
        assert {bf16.get_tensor(k).dtype for k in bf16.keys()} == {torch.bfloat16}


def test_sigterm_after_final_is_linked_keeps_the_finished_run_successful(tmp_path):
    process = launch(ROOT / "train_grpo.py", GRPO + ["--max-steps", "1", "--output-dir", "run"], tmp_path)
    wait_for(tmp_path / "run/final", process)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0, out[-3000:]
