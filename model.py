"""The network: load Qwen2-VL, build its inputs, sample groups of completions, score them.

Transformers supplies the network, the tokenizer and the image processor; generation and
scoring are driven here, because GRPO needs two things `generate` does not do well:

1. Group sampling. `generate(num_return_sequences=G)` copies each prompt G times BEFORE the
   prefill, so the vision tower and the prompt run G times. `sample_groups` runs them once per
   prompt, repeats the KV cache G times and decodes all B*G rows together.
2. Shared-prefix scoring (the Prefix Grouper idea). The naive way to score G completions is G
   full sequences `prompt + completion_g` with logits at every position. `completion_logprobs`
   packs `prompt, completion_1, ..., completion_G` into ONE sequence whose attention mask lets
   each completion see the prompt and itself only, computes logits at completion positions
   only, and takes the log-softmax a chunk of rows at a time in fp32 (`token_logprobs`).

Both paths are checked against Hugging Face's own `generate` and a naive full-sequence forward
in tests/test_model.py, and timed against them in bench.py.

Qwen2-VL pitfalls handled here (docs/method.md section 9): 3-D mRoPE positions are always
passed explicitly (the model's hidden `rope_deltas` state is never relied on); vision and other
special tokens are blocked while sampling (one sampled <|image_pad|> breaks the next forward);
prompts are never truncated (the authors' trainer cut prompt ids but generated from uncut ones).

`load_model("tiny")` builds a deterministic random-weight Qwen2-VL with an offline tokenizer
that has the real special tokens and chat template, for tests and the CPU demo. How the network
is trained across processes (precision, DDP / FSDP, checkpoints) is run.py's.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from safetensors import SafetensorError

SYSTEM_PROMPT = "You are a helpful assistant."
# Qwen2-VL's special tokens, in the order (and so with the relative ids) the real tokenizer has.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
END_TOKEN = "<|im_end|>"  # end of turn: where every completion stops
# The Qwen2-VL chat format, used for the tiny model and for any checkpoint that ships none.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# ----------------------------------------------------------------------------- processor

@dataclass
class Processor:
    """Tokenizer + image processor + the token ids the rest of the code needs.

    Transformers' `Qwen2VLProcessor` needs torchvision, which CPU-only machines may lack; the
    tokenizer and the (PIL) image processor are all we use, so we hold them directly.
    """
    tokenizer: object
    image_processor: object
    end_id: int          # <|im_end|>
    pad_id: int          # fills padding; never attended to, never in a loss
    image_pad_id: int    # <|image_pad|>, expanded to one token per merged 2x2 patch
    blocked_ids: list[int]  # may never be sampled: every special token but the end, ids past the tokenizer

    @classmethod
    def from_parts(cls, tokenizer, image_processor, vocab_size: int) -> "Processor":
        tokenizer.chat_template = tokenizer.chat_template or CHAT_TEMPLATE
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        special = set(ids.values()) | set(tokenizer.all_special_ids)
        blocked = sorted(special - {ids[END_TOKEN]}) + list(range(len(tokenizer), vocab_size))
        return cls(tokenizer, image_processor, ids[END_TOKEN], ids["<|endoftext|>"],
                   ids["<|image_pad|>"], blocked)


# ----------------------------------------------------------------------------- loading

def build_tiny_tokenizer():
    """A small byte-level BPE tokenizer with Qwen2's pre-tokenizer, special tokens and chat format.

    Trained in milliseconds on a fixed corpus (the prompt wording and common class words), so it is
    identical on every machine and needs no download. Ids differ from the real tokenizer's; no code
    here hard-codes an id.
    """
    from tokenizers import pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    words = ("What type of object texture aircraft is in the photo centered satellite actions person "
             "performing Please choose one from list output thinking process and final answer tags "
             "directly first then a brief reasoning identify whether this problem requires intermediate "
             "or calculation If no inside Your should follow two cases think reason the image shows red "
             "green blue yellow purple orange pink brown black white gray cyan circle square triangle "
             "star cross diamond ring heart moon arrow pentagon hexagon ellipse bar dog cat car flower "
             "food plane scene dotted striped").split()
    corpus = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    corpus += ["<think> </think> <answer> </answer> <reason> </reason> [ , ]. ?\n 0123456789"] * 8
    tokenizer = Qwen2Tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer._tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(tokenizer):
    """A Qwen2-VL of ~0.2 M parameters with the real architecture (mRoPE, 2x2 merge, tied embeddings)."""
    from transformers import Qwen2VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    # a wide init (initializer_range 0.2, not 0.02) so that random weights give input-dependent,
    # varied greedy outputs: tests comparing against `generate` are then meaningful
    text = dict(vocab_size=(len(tokenizer) + 63) // 64 * 64, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
                max_position_embeddings=4096, bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids[END_TOKEN], pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=True)
    vision = dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, initializer_range=0.2)
    return Qwen2VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=True, initializer_range=0.2,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


@contextmanager
def no_transformers_bars():
    """Without transformers' own progress bars ("Loading weights", "Writing model shards"): a
    checkpoint saved mid-run would print them between the lines of the training bar. Ours
    (plain tqdm) and huggingface_hub's download bars are not routed through this hook."""
    from transformers.utils import logging
    previous = logging.set_tqdm_hook(lambda factory, args, kwargs: logging.EmptyTqdm(*args, **kwargs))
    try:
        yield
    finally:
        logging.set_tqdm_hook(previous)


def load_model(name: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Return (model, processor) for `tiny`, a hub id or a local directory.

    bf16 on GPU, fp32 on CPU unless `dtype` says otherwise. The model is in eval mode. Attention
    is SDPA throughout: the shared-prefix scoring mask is a custom 4-D mask, which
    FlashAttention-2 cannot take, and SDPA picks its own flash kernel where there is no mask
    (the vision tower's).
    >>> model, processor = load_model("tiny")
    >>> type(model).__name__, model.dtype
    ('Qwen2VLForConditionalGeneration', torch.float32)
    """
    from transformers import AutoModelForImageTextToText, AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if name == "tiny":
        from transformers import Qwen2VLForConditionalGeneration

        tokenizer = build_tiny_tokenizer()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            # weights in `dtype`, rotary buffers in fp32, as from_pretrained(dtype=...) gives
            model = Qwen2VLForConditionalGeneration._from_config(
                tiny_config(tokenizer), dtype=dtype, attn_implementation="sdpa").to(device)
        image_processor = Qwen2VLImageProcessorPil()
    else:
        name = os.path.expanduser(name)
        if not os.path.isfile(os.path.join(name, "config.json")) and (
                os.path.isdir(name) or name.startswith(("/", ".")) or name.count("/") > 1):  # a path
            raise FileNotFoundError(f"--model {name}: no such directory, or no config.json there; "
                                    "expected a Hugging Face model directory (config.json, weights, "
                                    "tokenizer) or a hub id such as Qwen/Qwen2-VL-2B-Instruct")
        try:
            with no_transformers_bars():
                model = AutoModelForImageTextToText.from_pretrained(
                    name, dtype=dtype, attn_implementation="sdpa").to(device)
            tokenizer = AutoTokenizer.from_pretrained(name)
            # the PIL one (Qwen2-VL's and Qwen2.5-VL's), as the authors' transformers used, with
            # or without torchvision: the same pixels on every machine
            image_processor = Qwen2VLImageProcessorPil.from_pretrained(name)
        except (OSError, ValueError, SafetensorError) as error:
            hub = "" if os.path.isdir(name) else " (a hub id needs network access or a cached copy)"
            raise OSError(f"--model {name}: could not load a Qwen2-VL / Qwen2.5-VL model from it"
                          f"{hub}: {error}") from error
    model.eval()
    return model, Processor.from_parts(tokenizer, image_processor, model.config.text_config.vocab_size)


def save_pretrained(model, processor: Processor, path: str, state_dict: dict | None = None) -> None:
    """Write a complete Hugging Face directory: weights (`state_dict` when given, in its dtype),
    config, tokenizer + chat template, image processor config. `load_model(path)` and
    transformers' `from_pretrained` both read it."""
    with no_transformers_bars():
        model.save_pretrained(path, state_dict=state_dict)
    if state_dict is not None:  # the config names the dtype the weights are stored in
        saved, model.config.dtype = model.config.dtype, next(
            v.dtype for v in state_dict.values() if v.is_floating_point())
        model.config.save_pretrained(path)
        model.config.dtype = saved
    processor.tokenizer.save_pretrained(path)
    processor.image_processor.save_pretrained(path)


# ----------------------------------------------------------------------------- inputs

@dataclass
class PromptBatch:
    """B chat prompts (one image + one user text each), LEFT-padded so every prompt ends at the
    same index: the last prompt token is column P-1 in every row."""
    input_ids: torch.Tensor        # (B, P)
    attention_mask: torch.Tensor   # (B, P) 1 on real tokens
    position_ids: torch.Tensor     # (3, B, P) mRoPE (temporal, height, width)
    pixel_values: torch.Tensor     # (patches, 1176) all images' patches, flattened
    image_grid_thw: torch.Tensor   # (B, 3)
    next_position: torch.Tensor    # (B,) position of the first completion token


def mrope_positions(input_ids: list[int], image_pad_id: int, grids: list[list[int]], merge_size: int):
    """3-D rotary positions of one unpadded prompt, and the position that follows it.

    Text tokens advance all three axes together; an image's tokens share the start position on
    the temporal axis and take their (row, column) in the merged grid on the other two; the text
    after an image resumes at start + max(rows, columns).
    >>> ids = [7, 9, 9, 9, 9, 8]          # text, a 2x2 image (grid 1x4x4 before merging), text
    >>> pos, nxt = mrope_positions(ids, 9, [[1, 4, 4]], 2)
    >>> pos.tolist(), nxt
    ([[0, 1, 1, 1, 1, 3], [0, 1, 1, 2, 2, 3], [0, 1, 2, 1, 2, 3]], 4)
    """
    columns, start, i, images = [], 0, 0, iter(grids)
    while i < len(input_ids):
        if input_ids[i] == image_pad_id:
            t, h, w = next(images)
            h, w = h // merge_size, w // merge_size
            # (3, t*h*w): the (time, row, column) of each of the image's tokens
            grid = torch.cartesian_prod(torch.arange(t), torch.arange(h), torch.arange(w)).T
            columns.append(grid + start)
            i, start = i + t * h * w, start + max(t, h, w)
        else:
            columns.append(torch.full((3, 1), start))
            i, start = i + 1, start + 1
    positions = torch.cat(columns, 1)  # (3, L)
    return positions, int(positions.max()) + 1


def build_prompts(processor: Processor, images: list, texts: list[str], device="cpu") -> PromptBatch:
    """Tokenize B (image, user text) pairs with the chat template and left-pad them into a batch.

    Each <|image_pad|> is expanded to one token per merged patch (a 384x384 image becomes 392x392
    after the processor's resize to multiples of 28: 14x14 merged patches = 196 tokens).
    Prompts are never truncated.
    """
    vision = processor.image_processor(images=images, return_tensors="pt")
    grids = vision["image_grid_thw"]  # (B, 3)
    rows = []
    for text, grid in zip(texts, grids.tolist()):
        # one user turn (image then text) and the assistant header, the image not yet expanded
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        chat = processor.tokenizer.apply_chat_template(messages, tokenize=False,
                                                       add_generation_prompt=True)
        ids = processor.tokenizer(chat, add_special_tokens=False)["input_ids"]
        if ids.count(processor.image_pad_id) != 1:
            raise ValueError("the chat template must place exactly one <|image_pad|> per prompt")
        at = ids.index(processor.image_pad_id)
        n_image = grid[0] * grid[1] * grid[2] // processor.image_processor.merge_size ** 2
        rows.append(ids[:at] + [processor.image_pad_id] * n_image + ids[at + 1:])
    return pad_prompts(rows, grids, vision["pixel_values"], processor.pad_id, processor.image_pad_id,
                       processor.image_processor.merge_size, device)


def pad_prompts(rows: list[list[int]], grids: torch.Tensor, pixel_values: torch.Tensor, pad_id: int,
                image_pad_id: int, merge_size: int, device="cpu") -> PromptBatch:
    """Left-pad B token rows (images already expanded) into a PromptBatch with mRoPE positions."""
    B, P = len(rows), max(len(r) for r in rows)
    input_ids = torch.tensor([[pad_id] * (P - len(ids)) + ids for ids in rows])  # (B, P)
    attention_mask = torch.tensor([[0] * (P - len(ids)) + [1] * len(ids) for ids in rows])  # (B, P)
    position_ids = torch.ones(3, B, P, dtype=torch.long)  # (3, B, P)
    next_position = []
    for b, (ids, grid) in enumerate(zip(rows, grids.tolist())):
        pos, nxt = mrope_positions(ids, image_pad_id, [grid], merge_size)
        position_ids[:, b, P - len(ids):] = pos
        next_position.append(nxt)
    return PromptBatch(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                       position_ids=position_ids.to(device),
                       pixel_values=pixel_values.to(device), image_grid_thw=grids.to(device),
                       next_position=torch.tensor(next_position, device=device))


def slice_prompts(prompts: PromptBatch, start: int, end: int) -> PromptBatch:
    """Rows start:end of a prompt batch (their images' patches included), with the left padding
    that no remaining row needs removed. Lets one batch built for sampling feed micro-steps."""
    patches = prompts.image_grid_thw.prod(1)  # (B,) patches per image, stored row after row
    first, last = int(patches[:start].sum()), int(patches[:end].sum())
    keep = int(prompts.attention_mask[start:end].sum(1).max())

    def cut(tokens: torch.Tensor) -> torch.Tensor:  # (..., B, P) -> (..., end - start, keep)
        return tokens[..., start:end, -keep:]
    return PromptBatch(cut(prompts.input_ids), cut(prompts.attention_mask), cut(prompts.position_ids),
                       prompts.pixel_values[first:last],
                       prompts.image_grid_thw[start:end], prompts.next_position[start:end])


# ----------------------------------------------------------------------------- sampling

@dataclass
class Rollout:
    """What group sampling returns: B*G completions, row b*G + g is sample g of prompt b."""
    completion_ids: torch.Tensor   # (B*G, T) padded with pad_id after the end token
    completion_mask: torch.Tensor  # (B*G, T) 1 up to and including the first end token
    texts: list[str]               # decoded completions, without the end token


def _pick_tokens(logits: torch.Tensor, temperature: float, top_p: float, uniform: torch.Tensor):
    """Next token per row: greedy when temperature == 0, else inverse-CDF sampling of
    softmax(logits / temperature) restricted to the top-p nucleus.

    One uniform number in (0, 1] per row (from that row's own generator) decides the token, so a
    row's sample does not depend on which other rows share the batch.
    """
    if temperature == 0:
        return logits.argmax(-1)  # (N,)
    probs = torch.softmax(logits / temperature, dim=-1)  # (N, V) fp32
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always survives)
        probs = probs * ((probs.cumsum(-1) - probs) < top_p)
    cdf = probs.cumsum(-1)  # (N, V)
    target = (uniform * cdf[:, -1]).unsqueeze(-1)  # (N, 1), > 0 so zero-probability tokens lose
    index = torch.searchsorted(cdf, target).clamp_(max=cdf.shape[-1] - 1)  # (N, 1)
    return (index if order is None else order.gather(-1, index)).squeeze(-1)  # (N,)


@torch.no_grad()
def sample_groups(model, processor: Processor, prompts: PromptBatch, group_size: int = 1,
                  max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0,
                  seeds: list[int] | None = None, compile: bool = False) -> Rollout:
    """Sample `group_size` completions for each of the B prompts.

    The vision tower and the prompt prefill run once per prompt; the KV cache is then repeated
    G times and all B*G rows decode together until each has produced the end-of-turn token or
    `max_new_tokens` tokens. Blocked tokens (vision and other specials) get zero probability.
    `temperature=0` is greedy decoding. `seeds` (one per prompt) make each group's random stream
    independent of the batch it shares; without them the global torch RNG is used. This loop is
    the reference; `compile` (`--compile`) decodes over a static cache with `decode_compiled`.
    """
    from transformers import DynamicCache, StaticCache

    (B, P), G = prompts.input_ids.shape, group_size
    device = prompts.input_ids.device
    if seeds is None:
        seeds = torch.randint(0, 2**62, (B,)).tolist()
    # (BG, T) uniforms in (0, 1]: rows b*G .. b*G + G-1 draw from a generator seeded with seeds[b]
    uniforms = torch.cat([1.0 - torch.rand(G, max_new_tokens, dtype=torch.float64,
                                           generator=torch.Generator().manual_seed(int(seed)))
                          for seed in seeds]).float().to(device)
    blocked = torch.tensor(processor.blocked_ids, device=device, dtype=torch.long)

    cache = StaticCache(model.config, BUCKET * -(-(P + max_new_tokens) // BUCKET)) if compile else \
        DynamicCache(config=model.config)
    logits = model(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask,
                   position_ids=prompts.position_ids, pixel_values=prompts.pixel_values,
                   image_grid_thw=prompts.image_grid_thw, past_key_values=cache, use_cache=True,
                   logits_to_keep=1).logits[:, -1].float().repeat_interleave(G, 0)  # (BG, V)
    if compile:
        return decode_compiled(model, processor, prompts, cache, logits, uniforms, blocked, temperature, top_p)
    cache.batch_repeat_interleave(G)  # the prompt's keys/values, shared by its G samples
    attention_mask = prompts.attention_mask.repeat_interleave(G, 0)  # (BG, P)
    next_position = prompts.next_position.repeat_interleave(G)  # (BG,)

    tokens, finished = [], torch.zeros(B * G, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        logits[:, blocked] = float("-inf")
        token = _pick_tokens(logits, temperature, top_p, uniforms[:, step])  # (BG,)
        token = token.masked_fill(finished, processor.pad_id)
        tokens.append(token)
        finished |= token == processor.end_id
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B * G, 1)], 1)
        position = (next_position + step).view(1, B * G, 1).expand(3, B * G, 1)  # (3, BG, 1)
        logits = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=position,
                       past_key_values=cache, use_cache=True).logits[:, -1].float()  # (BG, V)

    completion_ids = torch.stack(tokens, 1)  # (BG, T)
    return Rollout(completion_ids, completion_mask(completion_ids, processor.end_id),
                   decode_completions(processor, completion_ids))


BUCKET = 64  # --compile rounds the cache length up to a multiple: one compile per bucket, not per length
_COMPILED, _CACHES = {}, {}  # the compiled decode step per device type; a decode cache per shape


def decode_step(model, cache, token, step, prompt_width, finished, key_is_real, next_position, uniform,
                blocked, temperature: float, top_p: float, end_id: int, pad_id: int):
    """One decode step of all N = B*G rows, what `--compile` compiles: each row's last token through
    the model (keys and values to column prompt_width + step of the static `cache`), the next one
    picked as `sample_groups` does. Static (no tensor changes shape or address; step and width are
    tensors, not ints; the mask follows the step): one compile per shape, replayed as a CUDA graph."""
    columns = torch.arange(key_is_real.shape[1], device=token.device)
    visible = key_is_real & (columns <= prompt_width + step)  # (N, L) prompt and tokens so far
    position = (next_position + step).view(1, -1, 1).expand(3, -1, 1)  # (3, N, 1)
    logits = model(input_ids=token[:, None], attention_mask=visible[:, None, None], position_ids=position,
                   past_key_values=cache, use_cache=True).logits[:, -1].float()  # (N, V)
    logits[:, blocked] = float("-inf")
    token = _pick_tokens(logits, temperature, top_p, uniform).masked_fill(finished, pad_id)  # (N,)
    return token, finished | (token == end_id)


def decode_compiled(model, processor: Processor, prompts: PromptBatch, prefill, logits, uniforms,
                    blocked, temperature: float, top_p: float) -> Rollout:
    """`sample_groups` under --compile: the prompts' keys and values (`prefill`, B rows) go G times into a
    StaticCache of B*G rows kept per shape (CUDA graphs replay on fixed addresses), then `decode_step`."""
    (B, P), (N, T), keys = prompts.input_ids.shape, uniforms.shape, prefill.layers[0].keys  # keys (B, H, L, D)
    shape = (len(prefill.layers), N, *keys.shape[1:], keys.dtype, keys.device)
    cache = _CACHES.setdefault(shape, type(prefill)(config=model.config, max_cache_len=keys.shape[2]))
    cache.early_initialization(N, keys.shape[1], keys.shape[3], keys.dtype, keys.device)  # once
    for source, target in zip(prefill.layers, cache.layers):  # each prompt's, G times
        target.keys.copy_(source.keys.repeat_interleave(N // B, 0))
        target.values.copy_(source.values.repeat_interleave(N // B, 0))
        target.cumulative_length.copy_(source.cumulative_length)  # the column the next token takes
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)  # a few shapes
    compiled_step = _COMPILED.setdefault(keys.device.type, torch.compile(decode_step, dynamic=False, options={
        "triton.cudagraphs": keys.device.type == "cuda",  # as mode="reduce-overhead": a CUDA graph per shape
        "emulate_precision_casts": True}))  # bf16: rounded where eager rounds, for the eager loop's tokens
    logits[:, blocked] = float("-inf")
    completion_ids = torch.full((N, T), processor.pad_id, device=keys.device)  # (N, T)
    completion_ids[:, 0] = _pick_tokens(logits, temperature, top_p, uniforms[:, 0])
    finished = completion_ids[:, 0] == processor.end_id  # (N,)
    key_is_real = torch.cat([prompts.attention_mask.bool(), finished.new_ones(B, keys.shape[2] - P)], 1)  # (B, L)
    key_is_real, next_position = key_is_real.repeat_interleave(N // B, 0), prompts.next_position.repeat_interleave(N // B)
    steps, width = torch.arange(T, device=keys.device), torch.tensor(P, device=keys.device)
    for step in range(T - 1):
        if step % 8 == 0 and bool(finished.all()):  # every 8 steps only: each check waits for the GPU
            break
        token, finished = compiled_step(model, cache, completion_ids[:, step], steps[step], width,
                                        finished, key_is_real, next_position, uniforms[:, step + 1], blocked,
                                        temperature, top_p, processor.end_id, processor.pad_id)
        completion_ids[:, step + 1], finished = token, finished.clone()  # a graph's next replay overwrites them
    length = int(completion_mask(completion_ids, processor.end_id).sum(1).max())  # the eager loop's
    completion_ids = completion_ids[:, :length].contiguous()
    return Rollout(completion_ids, completion_mask(completion_ids, processor.end_id),
                   decode_completions(processor, completion_ids))


def completion_mask(completion_ids: torch.Tensor, end_id: int) -> torch.Tensor:
    """1 on every token up to and including the first end token, 0 after it (by position, never
    by comparing with a pad id, which may equal the end id).
    >>> completion_mask(torch.tensor([[5, 2, 2, 2], [5, 6, 7, 8]]), end_id=2).tolist()
    [[1, 1, 0, 0], [1, 1, 1, 1]]
    """
    is_end = (completion_ids == end_id).long()
    # (N, T): no end token strictly before the position
    return (is_end.cumsum(1) - is_end == 0).long()


def decode_completions(processor: Processor, completion_ids: torch.Tensor) -> list[str]:
    """Decoded text of each row up to (not including) its first end token."""
    end = processor.end_id
    rows = [row[:row.index(end)] if end in row else row for row in completion_ids.tolist()]
    return [processor.tokenizer.decode(row, skip_special_tokens=False) for row in rows]


# ----------------------------------------------------------------------------- scoring

class _TokenLogprobs(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[target] per row, a chunk of rows at a time.

    Only (chunk, V) logits exist at once, in forward AND backward (recomputed there), instead of
    the (N, V) logits, their fp32 copy and the softmax that autograd would otherwise keep. The
    matmuls run in the hidden states' dtype (bf16 under --precision bf16), softmax and sums in
    fp32 (fp64 stays fp64).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        compute = hidden.dtype
        dtype = torch.promote_types(compute, torch.float32)  # bf16 -> fp32, fp64 stays
        h, w = hidden.to(compute), weight.to(compute)
        logprobs = torch.empty(hidden.shape[0], dtype=dtype, device=hidden.device)  # (N,)
        lse = torch.empty_like(logprobs)
        for s in range(0, h.shape[0], chunk_size):
            logits = (h[s:s + chunk_size] @ w.T).to(dtype)  # (n, V)
            lse[s:s + chunk_size] = logits.logsumexp(-1)
            logprobs[s:s + chunk_size] = logits.gather(-1, targets[s:s + chunk_size, None]).squeeze(-1)
        logprobs -= lse
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_size, ctx.compute = chunk_size, compute
        return logprobs

    @staticmethod
    def backward(ctx, grad_logprobs):
        hidden, weight, targets, lse = ctx.saved_tensors
        h_all, w = hidden.to(ctx.compute), weight.to(ctx.compute)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = None  # (V, H), accumulated in fp32 (fp64 for fp64 inputs) over chunks
        for s in range(0, hidden.shape[0], ctx.chunk_size):
            h, g = h_all[s:s + ctx.chunk_size], grad_logprobs[s:s + ctx.chunk_size]
            probs = ((h @ w.T).to(lse.dtype) - lse[s:s + ctx.chunk_size, None]).exp_()  # (n, V)
            # d logp[target] / d logits = onehot(target) - softmax
            grad_logits = probs.mul_(-g[:, None])
            grad_logits[torch.arange(len(h), device=h.device), targets[s:s + ctx.chunk_size]] += g
            grad_logits = grad_logits.to(ctx.compute)
            if grad_hidden is not None:
                grad_hidden[s:s + ctx.chunk_size] = grad_logits @ w
            if ctx.needs_input_grad[1]:
                chunk_grad = (grad_logits.T @ h).to(lse.dtype)  # a no-op cast for fp32
                grad_weight = chunk_grad if grad_weight is None else grad_weight.add_(chunk_grad)
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   max_chunk_elements: int = 1 << 25) -> torch.Tensor:
    """(N,) log-probabilities (fp32, or fp64 for fp64 inputs) of `targets` (N,) under logits
    hidden (N, H) @ weight (V, H).T.

    At most `max_chunk_elements` logits (128 MB in fp32 by default) exist at any time.
    """
    return _TokenLogprobs.apply(hidden, weight, targets, max(1, max_chunk_elements // weight.shape[0]))


def shared_prefix_mask(prompt_mask: torch.Tensor, group_size: int, completion_len: int):
    """(B, 1, L, L) boolean attention mask for `prompt, completion_1, ..., completion_G` rows.

    Prompt tokens attend causally to real prompt tokens; completion g attends to the whole prompt
    and causally to itself, never to another completion. Padding attends only to itself (a row
    with nothing to attend to would make NaNs).
    >>> m = shared_prefix_mask(torch.tensor([[0, 1]]), group_size=2, completion_len=2)
    >>> m[0, 0].int().tolist()   # columns: pad, prompt, c1 c1, c2 c2
    [[1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0], [0, 1, 1, 1, 0, 0], [0, 1, 0, 0, 1, 0], [0, 1, 0, 0, 1, 1]]
    """
    B, P = prompt_mask.shape
    L = P + group_size * completion_len
    device = prompt_mask.device
    # segment: 0 for the prompt, g + 1 for completion g; -1 for padding
    segment = torch.arange(group_size, device=device).repeat_interleave(completion_len) + 1
    segment = torch.cat([torch.where(prompt_mask.bool(), 0, -1), segment.expand(B, -1)], 1)  # (B, L)
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()  # (L, L)
    query, key = segment[:, :, None], segment[:, None, :]  # (B, L, 1), (B, 1, L)
    visible = causal & (key >= 0) & ((key == 0) | (key == query)) & (query >= 0)
    return (visible | torch.eye(L, dtype=torch.bool, device=device)).unsqueeze(1)  # (B, 1, L, L)


def completion_logprobs(model, prompts: PromptBatch, completion_ids: torch.Tensor,
                        group_size: int) -> torch.Tensor:
    """(B*G, T) fp32 log-probabilities of each completion token given its prompt and the tokens
    before it, from ONE forward over `prompt, completion_1, ..., completion_G` per prompt.

    Positions after a completion's end token are scored too (harmless padding): multiply by the
    completion mask. Gradients reach every parameter, the vision tower included.
    """
    B, P = prompts.input_ids.shape
    G, T = group_size, completion_ids.shape[1]
    device = completion_ids.device
    steps = torch.arange(T, device=device)
    input_ids = torch.cat([prompts.input_ids, completion_ids.view(B, G * T)], 1)  # (B, L)
    # every completion's positions continue from its prompt's: (3, B, G*T), on all three axes
    completion_positions = (prompts.next_position[:, None] + steps).repeat(1, G).expand(3, -1, -1)
    position_ids = torch.cat([prompts.position_ids, completion_positions], 2)  # (3, B, L)
    mask = shared_prefix_mask(prompts.attention_mask, G, T)  # (B, 1, L, L)
    hidden = model.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                         pixel_values=prompts.pixel_values, image_grid_thw=prompts.image_grid_thw,
                         use_cache=False).last_hidden_state  # (B, L, H)
    # token t of completion g is predicted by token t-1 of completion g, or for t = 0 by the
    # last prompt token, which all G completions share
    source = P + torch.arange(G, device=device)[:, None] * T + steps - 1  # (G, T)
    source[:, 0] = P - 1
    hidden = hidden[:, source.flatten()].reshape(B * G * T, -1)  # (BGT, H)
    return token_logprobs(hidden, model.lm_head.weight, completion_ids.flatten()).view(B * G, T)


class GroupScorer(torch.nn.Module):
    """`completion_logprobs` as a module, so one DDP-wrapped forward covers the whole scoring
    (vision tower, shared-prefix forward, chunked log-softmax) and DDP syncs every gradient.
    Under FSDP it is the root unit, so the output layer's weight is gathered for its forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, prompts: PromptBatch, completion_ids: torch.Tensor, group_size: int):
        # not a view (FSDP warns of in-place ops on a view: they would skip its backward hook)
        return completion_logprobs(self.model, prompts, completion_ids, group_size).clone()


# ----------------------------------------------------------------------------- LoRA

# The language model's attention and MLP projections (Qwen2-VL and Qwen2.5-VL name them so).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(torch.nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: W x + (alpha / r) B A x (Hu et al.,
    2021). A (r, in) starts small and random, B (out, r) at zero, so the model starts exactly as
    the base model; `enabled = False` (adapters_off) is the base model itself."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale, self.enabled = base, alpha / rank, True
        self.lora_A = torch.nn.Parameter(torch.zeros(rank, base.in_features, device=base.weight.device))
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))

    def forward(self, x):
        out = self.base(x)
        if self.enabled:
            out = out + (x @ self.lora_A.to(x.dtype).T) @ self.lora_B.to(x.dtype).T * self.scale
        return out

    @torch.no_grad()
    def reset(self, generator: torch.Generator):
        """A ~ U(-1/sqrt(in), 1/sqrt(in)) (nn.Linear's own init), B = 0: the update starts at 0."""
        bound = self.base.in_features ** -0.5
        self.lora_A.copy_(torch.rand(self.lora_A.shape, generator=generator) * 2 * bound - bound)
        self.lora_B.zero_()

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / r) B A, added in fp32, in W's dtype."""
        update = self.lora_B.float() @ self.lora_A.float() * self.scale
        return (self.base.weight.float() + update).to(self.base.weight.dtype)


def add_adapters(model, rank: int, alpha: float, seed: int) -> None:
    """Freeze every weight of `model` and wrap each language-model projection in a LoRALinear
    with fp32 adapters, drawn from `seed` (the same on every rank). The vision tower, the
    embeddings, the norms and the output layer stay frozen."""
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for name, module in list(model.model.language_model.named_modules()):
        for target in LORA_TARGETS:
            if isinstance(getattr(module, target, None), torch.nn.Linear):
                adapter = LoRALinear(getattr(module, target), rank, alpha)
                adapter.reset(generator)
                setattr(module, target, adapter)


def adapters(model) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@contextmanager
def adapters_off(model):
    """The base model: under LoRA, the KL reference is the policy with its adapters switched off."""
    for adapter in adapters(model):
        adapter.enabled = False
    try:
        yield
    finally:
        for adapter in adapters(model):
            adapter.enabled = True


def merge_adapters(model, seed: int) -> None:
    """Fold every adapter into its frozen weight (W <- W + (alpha / r) B A) and start it afresh,
    in place (the optimizer and DDP keep the same parameters): "adapters off" is then the model
    trained so far (a warm start's result, GRPO's KL reference)."""
    generator = torch.Generator().manual_seed(seed)
    for adapter in adapters(model):
        adapter.base.weight.data.copy_(adapter.merged_weight())
        adapter.reset(generator)


def merged_state_dict(model) -> dict:
    """The model's weights under Hugging Face's names, each adapter merged into its weight: what
    a checkpoint's model folder holds, for from_pretrained and evaluate.py unchanged."""
    state = {name: value for name, value in model.state_dict().items() if ".lora_" not in name}
    for name, adapter in ((n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)):
        state.pop(f"{name}.base.weight")
        state[f"{name}.weight"] = adapter.merged_weight()
        if adapter.base.bias is not None:
            state[f"{name}.bias"] = state.pop(f"{name}.base.bias")
    return state
