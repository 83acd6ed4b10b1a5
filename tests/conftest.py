"""Shared fixtures: the tiny offline Qwen2-VL and generated images. No network, no GPU."""
import argparse
import dataclasses
import os
import signal
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


@pytest.fixture(autouse=True)
def default_signal_handlers():
    """A training run in this process catches SIGTERM and SIGINT, and after it finishes ignores
    SIGTERM (a finished run must not die of a late one): the next test starts with the defaults,
    so that the test session itself can still be stopped."""
    yield
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


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


def build_tiny_qwen25(processor):
    """A random-weight Qwen2.5-VL (window-attention vision tower, SwiGLU) sized like `tiny`,
    sharing its tokenizer: the same code must serve both model families."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    qwen2 = M.tiny_config(processor.tokenizer)
    t = qwen2.text_config
    text = dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                num_key_value_heads=t.num_key_value_heads, rope_parameters=dict(t.rope_parameters),
                bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id,
                tie_word_embeddings=True, initializer_range=0.2)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  window_size=56, fullatt_block_indexes=[1], patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, initializer_range=0.2)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                              initializer_range=0.2, image_token_id=qwen2.image_token_id,
                              video_token_id=qwen2.video_token_id,
                              vision_start_token_id=qwen2.vision_start_token_id,
                              vision_end_token_id=qwen2.vision_end_token_id)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(config).eval(), processor


@pytest.fixture(params=["qwen2-vl", "qwen2.5-vl"])
def any_tiny(request):
    """A fresh tiny model of each supported family."""
    model, processor = M.load_model("tiny")
    return (model, processor) if request.param == "qwen2-vl" else build_tiny_qwen25(processor)


def make_image(seed: int, size=(56, 56)) -> Image.Image:
    """A small deterministic picture: a coloured shape on a coloured background."""
    g = torch.Generator().manual_seed(seed)
    colours = [tuple(torch.randint(0, 256, (3,), generator=g).tolist()) for _ in range(2)]
    image = Image.new("RGB", size, colours[0])
    x0, y0 = torch.randint(0, size[0] // 2, (2,), generator=g).tolist()
    ImageDraw.Draw(image).ellipse([x0, y0, x0 + size[0] // 2, y0 + size[1] // 2], fill=colours[1])
    return image


def hf_greedy(model, processor, prompts, max_new_tokens: int, **extra):
    """The independent reference for greedy decoding: transformers' own `generate` on the same
    prompts, blocking what we block and stopping where we stop; its new tokens only."""
    return model.generate(
        input_ids=prompts.input_ids, attention_mask=prompts.attention_mask,
        pixel_values=prompts.pixel_values, image_grid_thw=prompts.image_grid_thw,
        mm_token_type_ids=(prompts.input_ids == processor.image_pad_id).long(),
        do_sample=False, max_new_tokens=max_new_tokens, suppress_tokens=processor.blocked_ids,
        eos_token_id=processor.end_id, pad_token_id=processor.pad_id, **extra,
    )[:, prompts.input_ids.shape[1]:]


def never_ending(processor):
    """The processor with its end token blocked too: every completion runs to max_new_tokens."""
    return dataclasses.replace(processor, blocked_ids=processor.blocked_ids + [processor.end_id])


def training_args(**changes) -> argparse.Namespace:
    """The flags run.prepare_training reads, at their defaults (fp32, no FSDP), with `changes`."""
    return argparse.Namespace(**{**dict(lr=1.0, weight_decay=0.0, grad_checkpointing=False,
                                        fsdp=False, precision="fp32"), **changes})


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
