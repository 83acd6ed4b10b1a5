"""Running the training scripts from tests: in-process, or as real torchrun jobs."""
import contextlib
import importlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[1]

# Small, fast settings shared by the training tests: tiny model, 56 px demo images.
FAST = ["--model", "tiny", "--dataset", "demo", "--image-size", "56", "--shots", "2",
        "--device", "cpu", "--max-new-tokens", "6", "--eval-batch-size", "16"]


def env(tmp_path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT) + os.pathsep + str(ROOT / "tests")}


def launch(script, args, tmp_path, nproc=1, **kwargs) -> subprocess.Popen:
    """Start `script` as `python script` or a `torchrun --nproc_per_node nproc` job (gloo, CPU)."""
    prefix = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.Popen(prefix + [str(script)] + list(args), cwd=tmp_path, env=env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def run_script(script, args, tmp_path, nproc=1, timeout=300) -> str:
    """Run `script` to success in `tmp_path`; returns what it printed. A torchrun job, or any
    other script, is a process; one process of train_grpo.py, train_sft.py or evaluate.py runs
    in this one, as `python script` would (its main, one thread as OMP_NUM_THREADS=1 gives the
    processes, the signal handlers restored after), without starting Python and importing torch
    again (~4 s a run)."""
    if nproc > 1 or Path(script).resolve().parent != ROOT:
        process = launch(script, args, tmp_path, nproc)
        out, _ = process.communicate(timeout=timeout)
        assert process.returncode == 0, out[-4000:]
        return out
    module = importlib.import_module(Path(script).stem)
    out, cwd, threads = io.StringIO(), os.getcwd(), torch.get_num_threads()
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        os.chdir(tmp_path)
        torch.set_num_threads(1)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            module.main(list(args))
    except SystemExit as stop:
        assert stop.code in (None, 0), f"{out.getvalue()[-4000:]}\nexit: {stop.code}"
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    return out.getvalue()


def metrics(output_dir, name="metrics.jsonl") -> list[dict]:
    with open(Path(output_dir) / name) as f:
        return [json.loads(line) for line in f]


def weights(checkpoint) -> dict:
    import model as M
    return M.load_model(str(checkpoint))[0].state_dict()


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)
