"""Running the training scripts from tests: in-process, or as real torchrun jobs."""
import json
import os
import subprocess
import sys
from pathlib import Path


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
    process = launch(script, args, tmp_path, nproc)
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[-4000:]
    return out


def metrics(output_dir, name="metrics.jsonl") -> list[dict]:
    with open(Path(output_dir) / name) as f:
        return [json.loads(line) for line in f]


def weights(checkpoint) -> dict:
    import model as M
    return M.load_model(str(checkpoint))[0].state_dict()


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)
