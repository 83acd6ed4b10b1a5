"""model.py against independent references: Hugging Face's generate and forward, naive math."""
import doctest

import pytest
import torch

import model as M
from conftest import hf_greedy, make_image, never_ending


def test_doctests():
    result = doctest.testmod(M)
    assert result.failed == 0 and result.attempted >= 5, result


def test_prompt_text_is_the_qwen2_vl_chat_format(tiny):
    _, processor = tiny
    batch = M.build_prompts(processor, [make_image(0)], ["Hi?"])
    text = processor.tokenizer.decode(batch.input_ids[0])
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>Hi?<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_positions_equal_transformers_rope_index(any_tiny, images, texts):
    model, processor = any_tiny
    batch = M.build_prompts(processor, images, texts)
    assert batch.image_grid_thw.tolist() == [[1, 4, 4], [1, 4, 6], [1, 6, 6]]
    image_tokens = (batch.input_ids == processor.image_pad_id).long()  # (B, P)
    assert image_tokens.sum(1).tolist() == [4, 6, 9]
    reference, deltas = model.model.get_rope_index(
        batch.input_ids, image_tokens, batch.image_grid_thw,
        attention_mask=batch.attention_mask)
    real = batch.attention_mask.bool()
    assert torch.equal(batch.position_ids[:, real], reference[:, real])
    assert torch.equal(batch.next_position, batch.attention_mask.sum(1) + deltas.squeeze(1))


def test_greedy_equals_transformers_generate(any_tiny, images, texts):
    model, processor = any_tiny
    batch = M.build_prompts(processor, images, texts)
    ours = M.sample_groups(model, processor, batch, group_size=1, max_new_tokens=12, temperature=0)
    reference = hf_greedy(model, processor, batch, 12)
    T = ours.completion_ids.shape[1]
    assert torch.equal(ours.completion_ids, reference[:, :T])
    assert (reference[:, T:] == processor.pad_id).all()  # generate only padded past our length
    assert len(set(map(tuple, ours.completion_ids.tolist()))) == 3  # the rows really differ


def test_greedy_of_a_group_is_g_copies(tiny, images, texts):
    model, processor = tiny
    batch = M.build_prompts(processor, images, texts)
    one = M.sample_groups(model, processor, batch, 1, 8, temperature=0)
    four = M.sample_groups(model, processor, batch, 4, 8, temperature=0)
    assert torch.equal(four.completion_ids, one.completion_ids.repeat_interleave(4, 0))


def _naive_logprobs(model, processor, batch, completion_ids, G):
    """Each (prompt, completion) as its own unpadded sequence, positions computed by transformers,
    logits at every position, full log-softmax: what the shortcut must reproduce."""
    rows, patches = [], batch.image_grid_thw.prod(1).tolist()
    pixel_values = batch.pixel_values.split(patches)
    for b in range(batch.input_ids.shape[0]):
        prompt = batch.input_ids[b, batch.attention_mask[b].bool()]
        for g in range(G):
            completion = completion_ids[b * G + g]
            ids = torch.cat([prompt, completion])[None]
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                           pixel_values=pixel_values[b], image_grid_thw=batch.image_grid_thw[b:b + 1],
                           mm_token_type_ids=(ids == processor.image_pad_id).long()).logits[0]
            logprobs = logits[len(prompt) - 1:-1].float().log_softmax(-1)
            rows.append(logprobs.gather(-1, completion[:, None]).squeeze(-1))
    return torch.stack(rows)


def test_shared_prefix_logprobs_and_gradients_equal_naive(any_tiny, images, texts):
    model, processor = any_tiny
    G = 3
    batch = M.build_prompts(processor, images, texts)
    torch.manual_seed(0)
    rollout = M.sample_groups(model, never_ending(processor), batch, G, max_new_tokens=8,
                              temperature=1.0, seeds=[1, 2, 3])
    completion_ids = rollout.completion_ids.clone()
    for row, end in ((0, 2), (4, 5)):  # two completions end early: padding follows them
        completion_ids[row, end], completion_ids[row, end + 1:] = processor.end_id, processor.pad_id
    mask = M.completion_mask(completion_ids, processor.end_id)
    assert mask.sum() == mask.numel() - 5 - 2
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(0)) * mask

    def loss_and_grads(fn):
        model.zero_grad()
        logprobs = fn()
        (logprobs * weights).sum().backward()
        return logprobs.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ours, our_grads = loss_and_grads(lambda: M.completion_logprobs(model, batch, completion_ids, G))
    ref, ref_grads = loss_and_grads(
        lambda: _naive_logprobs(model, processor, batch, completion_ids, G))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    assert our_grads.keys() == ref_grads.keys()
    assert any("visual" in n for n in our_grads)  # the vision tower is trained too
    for name, grad in our_grads.items():
        assert ref_grads[name].abs().sum() > 0, name
        error = (grad - ref_grads[name]).norm() / ref_grads[name].norm()
        assert error < 1e-4, (name, float(error))


@pytest.mark.parametrize("max_chunk_elements", [1 << 25, 7 * 50, 50])  # all rows, 7 rows, 1 row
def test_token_logprobs_equal_full_log_softmax(max_chunk_elements):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(19, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 8, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (19,), generator=g)
    upstream = torch.randn(19, generator=g, dtype=torch.float64)

    ours = M.token_logprobs(hidden, weight, targets, max_chunk_elements)
    our_grads = torch.autograd.grad((ours * upstream).sum(), (hidden, weight))
    ref = (hidden @ weight.T).log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), (hidden, weight))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    for a, b in zip(our_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny, images, texts):
    model, processor = tiny
    batch = M.build_prompts(processor, images, texts)
    kw = dict(group_size=4, max_new_tokens=10, temperature=1.0)
    a = M.sample_groups(model, processor, batch, seeds=[5, 6, 7], **kw)
    b = M.sample_groups(model, processor, batch, seeds=[5, 6, 7], **kw)
    c = M.sample_groups(model, processor, batch, seeds=[8, 6, 7], **kw)
    assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts
    assert not torch.equal(a.completion_ids[:4], c.completion_ids[:4])
    # the last prompt sampled alone with its seed gives the same completions as inside the batch
    alone = M.sample_groups(model, processor, M.build_prompts(processor, images[2:], texts[2:]),
                            seeds=[7], **kw)
    T = alone.completion_ids.shape[1]
    assert torch.equal(alone.completion_ids, a.completion_ids[8:, :T])
    assert (a.completion_ids[8:, T:] == processor.pad_id).all()


def test_blocked_tokens_never_appear(tiny, images, texts):
    model, processor = tiny
    batch = M.build_prompts(processor, images, texts)
    # temperature 1000 makes the distribution nearly uniform: unblocked, ~4% of tokens would be special
    rollout = M.sample_groups(model, processor, batch, group_size=8, max_new_tokens=40,
                              temperature=1000.0, seeds=[0, 1, 2])
    sampled = rollout.completion_ids[rollout.completion_mask.bool()]
    assert sampled.numel() > 300
    assert not torch.isin(sampled, torch.tensor(processor.blocked_ids)).any()
    assert processor.image_pad_id in processor.blocked_ids
    assert processor.end_id not in processor.blocked_ids


def test_masks_and_texts_stop_at_the_first_end_token(tiny, images, texts):
    model, processor = tiny
    batch = M.build_prompts(processor, images, texts)
    rollout = M.sample_groups(model, processor, batch, group_size=1, max_new_tokens=12,
                              temperature=0)
    ended = 0
    for ids, mask, text in zip(rollout.completion_ids.tolist(), rollout.completion_mask.tolist(),
                               rollout.texts):
        if processor.end_id in ids:
            ended += 1
            stop = ids.index(processor.end_id) + 1
            assert mask == [1] * stop + [0] * (len(ids) - stop)
            assert all(t == processor.pad_id for t in ids[stop:])
            assert text == processor.tokenizer.decode(ids[:stop - 1])
        else:  # hit max_new_tokens
            assert len(ids) == 12 and mask == [1] * 12
            assert text == processor.tokenizer.decode(ids)
    assert 0 < ended < 3  # both cases happen in this batch


def test_blocking_the_end_token_forces_the_length_as_generate_does(tiny, images, texts):
    """How bench.py and these tests force every completion to the same length."""
    model, processor = tiny
    batch = M.build_prompts(processor, images, texts)
    ours = M.sample_groups(model, never_ending(processor), batch, 1, 10, temperature=0)
    reference = hf_greedy(model, processor, batch, 10, min_new_tokens=10)
    assert torch.equal(ours.completion_ids, reference)
    assert ours.completion_mask.all()  # no row may stop early


def test_top_p_near_zero_is_greedy(tiny, images, texts):
    model, processor = tiny
    batch = M.build_prompts(processor, images, texts)
    greedy = M.sample_groups(model, processor, batch, 2, 8, temperature=0)
    nucleus = M.sample_groups(model, processor, batch, 2, 8, temperature=1.0, top_p=1e-6,
                              seeds=[1, 2, 3])
    assert torch.equal(greedy.completion_ids, nucleus.completion_ids)


@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_pick_tokens_follows_the_distribution(top_p):
    logits = torch.tensor([[2.0, 1.0, float("-inf"), 0.0, -1.0]])
    probs = logits.softmax(-1)[0]
    if top_p < 1:  # nucleus: 0.64 + 0.24 reaches 0.7, the rest is cut
        probs = torch.tensor([0.6439, 0.2369, 0, 0, 0])
        probs = probs / probs.sum()
    n = 20000
    uniform = 1.0 - torch.rand(n, generator=torch.Generator().manual_seed(0))
    tokens = M._pick_tokens(logits.expand(n, -1), 1.0, top_p, uniform)
    frequencies = torch.bincount(tokens, minlength=5).float() / n
    torch.testing.assert_close(frequencies, probs, rtol=0, atol=0.015)
    assert (tokens != 2).all()


def test_save_load_round_trip_gives_identical_logits(tiny, images, texts, tmp_path):
    model, processor = tiny
    M.save_pretrained(model, processor, str(tmp_path))
    loaded, loaded_processor = M.load_model(str(tmp_path))
    batch = M.build_prompts(processor, images, texts)
    assert torch.equal(batch.input_ids, M.build_prompts(loaded_processor, images, texts).input_ids)
    assert loaded_processor.tokenizer.chat_template == processor.tokenizer.chat_template
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  position_ids=batch.position_ids, pixel_values=batch.pixel_values,
                  image_grid_thw=batch.image_grid_thw)
    with torch.no_grad():
        assert torch.equal(model(**kwargs).logits, loaded(**kwargs).logits)
    from transformers import AutoModelForImageTextToText
    plain = AutoModelForImageTextToText.from_pretrained(str(tmp_path))
    assert type(plain).__name__ == "Qwen2VLForConditionalGeneration"


def test_saving_and_loading_print_no_bars_of_their_own(tiny, tmp_path, capsys):
    """transformers' "Writing model shards" and "Loading weights" bars would break the training
    bar's line at every checkpoint; our own tqdm bars, and transformers' outside our calls, stay."""
    from tqdm import tqdm
    from transformers import AutoModelForImageTextToText
    model, processor = tiny
    M.save_pretrained(model, processor, str(tmp_path))
    M.load_model(str(tmp_path))
    for _ in tqdm(range(2), desc="our bar"):
        pass
    quiet = capsys.readouterr().err
    assert "our bar" in quiet and "Writing model shards" not in quiet and "Loading weights" not in quiet
    AutoModelForImageTextToText.from_pretrained(str(tmp_path))  # not through load_model: as it was
    assert "Loading weights" in capsys.readouterr().err


def test_loading_a_directory_that_is_not_a_model_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        M.load_model(str(tmp_path))


def test_gradient_checkpointing_gives_the_same_gradients(fresh_tiny, images, texts):
    """--grad-checkpointing recomputes activations in backward: same numbers, less memory."""
    model, processor = fresh_tiny
    batch = M.build_prompts(processor, images, texts)
    ids = M.sample_groups(model, processor, batch, 2, 6, 1.0, seeds=[1, 2, 3]).completion_ids
    model.train()

    def gradients():
        model.zero_grad()
        M.completion_logprobs(model, batch, ids, 2).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = gradients()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.model.language_model.layers[0].gradient_checkpointing
    checkpointed = gradients()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7)
