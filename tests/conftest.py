"""Shared fixtures: the tiny offline Qwen2-VL and generated images. No network, no GPU."""
import os
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

import model as M  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def demo_cache(tmp_path_factory):
    """One generated demo dataset for the whole session (subprocesses inherit the variable)."""
    os.environ["CLS_RL_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def warm_tiny(tmp_path_factory, demo_cache):
    """A tiny model fine-tuned on the demo set (SFT, ~3 s): unlike the random one it answers
    with class names, so GRPO groups get different rewards and training really moves weights."""
    import train_sft
    out = tmp_path_factory.mktemp("warm")
    train_sft.main(["--model", "tiny", "--dataset", "demo", "--image-size", "56", "--shots", "4",
                    "--device", "cpu", "--lr", "3e-3", "--lr-schedule", "constant", "--max-steps", "50",
                    "--batch-size", "4", "--grad-accum", "1", "--output-dir", str(out)])
    return str(out / "checkpoint-000050")


@pytest.fixture(scope="session")
def tiny():
    """(model, processor) of the deterministic tiny Qwen2-VL, fp32 on CPU, eval mode.
    Session-wide: tests that change weights must use `fresh_tiny` instead."""
    return M.load_model("tiny")


@pytest.fixture
def fresh_tiny():
    return M.load_model("tiny")


def make_image(seed: int, size=(56, 56)) -> Image.Image:
    """A small deterministic picture: a coloured shape on a coloured background."""
    g = torch.Generator().manual_seed(seed)
    colours = [tuple(torch.randint(0, 256, (3,), generator=g).tolist()) for _ in range(2)]
    image = Image.new("RGB", size, colours[0])
    x0, y0 = torch.randint(0, size[0] // 2, (2,), generator=g).tolist()
    ImageDraw.Draw(image).ellipse([x0, y0, x0 + size[0] // 2, y0 + size[1] // 2], fill=colours[1])
    return image


@pytest.fixture
def images():
    """Three images of different sizes (4, 6 and 9 image tokens)."""
    return [make_image(0), make_image(1, (84, 56)), make_image(2, (84, 84))]


@pytest.fixture
def texts():
    """Three user texts of different lengths."""
    return ["What type of object is in the photo?",
            "What type of object is in the photo?\nPlease choose one from list [ red circle, blue square].",
            "red"]
