"""train_sft.py: the loss mask token by token, the loss against Hugging Face's own cross-entropy,
a short run that learns, and DDP equal to gradient accumulation."""
import argparse
import dataclasses
import json

import pytest
import torch

import data as D
import evaluate as E
import model as M
import run as R
import train_sft as S
from conftest import make_image
from helpers import metrics

# What each method is taught, written out here rather than read from train_sft.py.
TARGETS = {"no-think": "{}", "cls-rl": "<answer>{}</answer>",
           "think-after-answer": "<answer>{}</answer>", "adaptive": "<answer>{}</answer>"}
LABELS = ["red circle", "white ring", "purple diamond or a pink pentagon"]  # 3 different lengths
QUESTION = "What type of object is in the photo?\nPlease choose one from list [ red circle, white ring]."


def answer_ids(processor, method, label) -> list[int]:
    text = TARGETS[method].format(label)
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"] + [processor.end_id]


@pytest.mark.parametrize("method", list(TARGETS))
def test_loss_mask_is_the_answer_and_the_end_token(tiny, method):
    _, processor = tiny
    ids, mask = S.sft_batch(processor, LABELS, method, "cpu")
    T = ids.shape[1]
    for b, label in enumerate(LABELS):
        expected = answer_ids(processor, method, label)
        n = len(expected)
        assert ids[b, :n].tolist() == expected
        assert mask[b].tolist() == [1] * n + [0] * (T - n)
        assert (ids[b, n:] == processor.pad_id).all()
        masked = ids[b][mask[b].bool()].tolist()
        assert processor.tokenizer.decode(masked) == TARGETS[method].format(label) + "<|im_end|>"
        assert masked[-1] == processor.end_id
    assert mask.sum(1).tolist() != [mask.shape[1]] * 3  # the shorter rows really are padded


def test_loss_mask_does_not_depend_on_the_pad_id(tiny):
    """Padding with the end token itself (as some tokenizers do) must not change the mask."""
    _, processor = tiny
    same = dataclasses.replace(processor, pad_id=processor.end_id)
    ids, mask = S.sft_batch(processor, LABELS, "no-think", "cpu")
    ids_same, mask_same = S.sft_batch(same, LABELS, "no-think", "cpu")
    assert torch.equal(mask, mask_same)
    assert ((ids_same == processor.end_id) & (mask_same == 0)).any()  # padding is end ids now


def hugging_face_loss(model, processor, prompts, b, target_ids, target_mask) -> torch.Tensor:
    """Transformers' own cross-entropy for row b: one unpadded prompt + the target row (its
    padding included), labels -100 on the prompt and on the padding."""
    prompt = prompts.input_ids[b, prompts.attention_mask[b].bool()]
    ids = torch.cat([prompt, target_ids[b]])[None]  # (1, L)
    labels = ids.clone()
    labels[0, :len(prompt)] = -100
    labels[0, len(prompt):][target_mask[b] == 0] = -100
    pixel_values = prompts.pixel_values.split(prompts.image_grid_thw.prod(1).tolist())[b]
    return model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values,
                 image_grid_thw=prompts.image_grid_thw[b:b + 1],
                 mm_token_type_ids=(ids == processor.image_pad_id).long(), labels=labels).loss


@pytest.mark.parametrize("method", ["no-think", "cls-rl"])
def test_sft_loss_equals_hugging_face_cross_entropy(tiny, method):
    model, processor = tiny
    images = [make_image(0), make_image(1, (84, 56)), make_image(2, (84, 84))]
    prompts = M.build_prompts(processor, images, [QUESTION, "What is it?", QUESTION + " Say it."])
    target_ids, target_mask = S.sft_batch(processor, LABELS, method, "cpu")
    with torch.no_grad():
        logprobs = M.completion_logprobs(model, prompts, target_ids, 1)  # (B, T), as fit() scores
        ours = -(logprobs * target_mask).sum(1) / target_mask.sum(1)  # (B,) per-answer mean
        for b in range(len(LABELS)):
            reference = hugging_face_loss(model, processor, prompts, b, target_ids, target_mask)
            assert float(ours[b]) == pytest.approx(float(reference), abs=1e-5)


def test_logged_loss_is_the_mean_hugging_face_loss_of_the_step(tmp_path):
    """Step 1's logged loss (before any update) covers all prompts of every micro-step."""
    out = tmp_path / "run"
    S.main(["--model", "tiny", "--dataset", "demo", "--image-size", "56", "--shots", "2",
            "--device", "cpu", "--max-steps", "1", "--batch-size", "2", "--grad-accum", "2",
            "--method", "cls-rl", "--output-dir", str(out)])
    args = argparse.Namespace(**json.loads((out / "args.json").read_text()))
    train, _ = R.load_train_test(args)
    step = D.load_step_examples(train, 0, seed=args.seed, method=args.method,
                                image_size=args.image_size, rank=0, world_size=1, per_rank=4)
    model, processor = M.load_model("tiny")
    losses = []
    with torch.no_grad():
        for image, text, label in zip(step.images, step.texts, step.labels):
            prompts = M.build_prompts(processor, [image], [text])
            ids = torch.tensor([answer_ids(processor, "cls-rl", label)])
            losses.append(float(hugging_face_loss(model, processor, prompts, 0, ids, torch.ones_like(ids))))
    assert len(losses) == 4
    assert metrics(out)[0]["loss"] == pytest.approx(sum(losses) / 4, abs=1e-5)


def test_short_run_lowers_the_loss_and_raises_held_out_accuracy(tmp_path):
    out = tmp_path / "run"
    S.main(["--model", "tiny", "--dataset", "demo", "--image-size", "56", "--shots", "4",
            "--device", "cpu", "--lr", "3e-3", "--lr-schedule", "constant", "--max-steps", "48",
            "--batch-size", "4", "--grad-accum", "1", "--eval-every", "48",
            "--eval-batch-size", "50", "--output-dir", str(out)])
    start, *records = metrics(out)
    losses = [r["loss"] for r in records]
    assert len(losses) == 48
    assert sum(losses[-12:]) / 12 < 0.5 * sum(losses[:12]) / 12
    test = D.load_data("demo", None, "fewshot", "test")  # 100 images, 10 per class
    settings = dict(batch_size=50, max_new_tokens=64, image_size=56, seed=100)
    before = E.accuracy(*M.load_model("tiny"), test, "no-think", **settings)
    assert start == {"step": 0, "test_accuracy": before}  # --eval-every measures step 0 too
    after = records[-1]["test_accuracy"]
    assert after >= before + 0.2, (before, after)  # fractions
    # the logged number is what evaluate.py gives for the saved checkpoint
    assert E.accuracy(*M.load_model(str(out / "checkpoint-000048")), test, "no-think",
                      **settings) == after


