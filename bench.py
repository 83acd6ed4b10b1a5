"""Time one GRPO step, our path against the naive path the authors' trainer ran, in ONE process.

    python bench.py --preset cpu                                   # ~2 min on 2 cores
    python bench.py --preset 2b                                    # one GPU: real-size Qwen2-VL-2B
    python bench.py --preset 2b --device cpu --precision fp32 --layers 2 --vision-layers 2 \
        --configs 4x8 --groups 2 --repeats 1                      # the 2b code path, on CPU
    python bench.py --preset cpu --configs "" --precision-rollout ""   # only eager vs --compile

Both paths use the same model, weights (random, built from a config: no download) and prompts,
and produce completions of the same forced length, so the ratio is the cost of the method:
- naive: each prompt and image copied G times, then `generate` (vision tower and prefill run G
  times; what `generate(num_return_sequences=G)` did in the authors' transformers), then
  full-sequence forwards over prompt + completion with logits at every position, for the
  reference model and for the policy (with backward);
- ours: model.sample_groups (vision and prefill once per prompt, KV cache repeated G times)
  and model.completion_logprobs (one shared-prefix forward, logits at completion positions).
Each step: rollout of all groups in one batch, then per group (the authors' batch 1 per GPU)
reference and policy forward+backward, then AdamW with lr 0 (full work, weights unchanged so
both paths see the same model). Prompts are synthetic token ids of the stated lengths: the
compute depends on the lengths, not on which tokens they are.

Reported per configuration: seconds per prompt group for each phase, tokens per second, peak
memory, on GPU the model FLOPs utilisation (6·N·tokens for the policy pass, 2·N·tokens for
forward passes, N all parameters, vision tower included, tokens the positions each path runs
through the language model) against the device's bf16 peak, the naive / ours ratio, and the
projected time of the paper's ImageNet run (40,000 prompt groups, No-Thinking) on one device.
Then our rollout in fp32 / bf16 (`--precision-rollout`), and our rollout with the eager decode
loop against `--compile` (`--compile-rollouts`: static KV cache, compiled decode step), with the
one-time compile cost apart, milliseconds per decode step and, on GPU, the time one step needs
to read the language model's weights from memory (its lower bound).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import threading
import time
from dataclasses import dataclass

import torch

from data import write_atomic
from model import (Processor, PromptBatch, adapters, adapters_off, add_adapters, completion_logprobs,
                   pad_prompts, sample_groups, slice_prompts)
from run import HelpFormatter, compute_context
from train_grpo import grpo_loss, timer

# Qwen2-VL's real token ids (docs/method.md section 9) and vocabulary.
IM_START, IM_END, PAD, VISION_START, VISION_END, IMAGE_PAD = 151644, 151645, 151643, 151652, 151653, 151655
VOCAB = 151936

PRESETS = {
    # a scaled-down Qwen2-VL (~48 M parameters, 39 M of them the real-size vocabulary), with a
    # prompt that is mostly image and candidate list, like the real one
    "cpu": dict(text=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, mrope_section=[8, 12, 12]),
                vision=dict(depth=4, embed_dim=256, num_heads=4, mlp_ratio=4),
                image=224, text_tokens=220, groups=2, configs=["4x8", "8x8", "4x128", "8x128"],
                device="cpu", precision="fp32", repeats=2, compile_rollouts=["4x8", "4x128"]),
    # Qwen2-VL-2B (docs/method.md section 9); 384x384 images (196 tokens) and an ImageNet-style
    # question listing 100 class names (~540 text tokens, our estimate for Qwen's tokenizer)
    "2b": dict(text=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, mrope_section=[16, 24, 24]),
               vision=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4),
               image=384, text_tokens=540, groups=4, configs=["4x8", "8x8", "4x256", "8x256"],
               device="cuda", precision="bf16", repeats=3, compile_rollouts=["4x8", "4x256"]),
}
# Qwen2-VL-7B (and, within 1 %, Qwen2.5-VL-7B): only its size, for the memory table
MODEL_7B = dict(text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                          num_attention_heads=28, num_key_value_heads=4, mrope_section=[16, 24, 24],
                          vocab_size=152064, tie_word_embeddings=False),
                vision=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4))
BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense tensor-core FLOP/s
HBM_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}  # bytes/s, SXM parts
IMAGENET_GROUPS = 40_000  # 1,000 classes x 4 shots x 10 epochs


def build_models(preset: dict, layers, vision_layers, device, precision: str):
    """Policy and frozen reference with the same random weights, and a Processor for our path.
    As in training: the policy holds fp32 (master) weights, the reference bf16 under bf16 (its
    rotary buffers fp32, as the policy's)."""
    from transformers import Qwen2VLForConditionalGeneration

    config = qwen2_vl_config(preset, layers, vision_layers)
    torch.manual_seed(0)
    with torch.device(device):
        policy = Qwen2VLForConditionalGeneration(config).float()
        reference = Qwen2VLForConditionalGeneration._from_config(
            config, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    reference.load_state_dict(policy.state_dict())
    reference.requires_grad_(False).eval()
    # specials and unused ids, and the end token too: every completion runs to the forced length
    blocked = list(range(PAD, VOCAB))
    processor = Processor(tokenizer=_NoText(), image_processor=None, end_id=IM_END, pad_id=PAD,
                            image_pad_id=IMAGE_PAD, blocked_ids=blocked)
    return policy, reference, processor


def qwen2_vl_config(preset: dict, layers=None, vision_layers=None):
    """The Qwen2-VL configuration of a preset (its sizes; the real token ids and vocabulary)."""
    from transformers import Qwen2VLConfig

    text = {"vocab_size": VOCAB, "tie_word_embeddings": True, **preset["text"]}
    section = text.pop("mrope_section")
    text.update(rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": section},
                max_position_embeddings=32768, bos_token_id=PAD, eos_token_id=IM_END, pad_token_id=PAD)
    vision = dict(preset["vision"], hidden_size=text["hidden_size"], patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    text["num_hidden_layers"] = layers or text["num_hidden_layers"]
    vision["depth"] = vision_layers or vision["depth"]
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_PAD,
                           tie_word_embeddings=text["tie_word_embeddings"], vision_start_token_id=VISION_START,
                           vision_end_token_id=VISION_END, video_token_id=151656)
    config._attn_implementation = "sdpa"
    return config


class _NoText:
    """Stands in for the tokenizer: the benchmark's token ids are synthetic, nothing to read."""
    def decode(self, ids, **kwargs):
        return ""


def make_prompts(preset: dict, groups: int, device) -> PromptBatch:
    """`groups` chat prompts: system turn, image, question text, assistant header (lengths differ
    by a few tokens, so left padding is exercised). Pixels are random: cost does not depend on them."""
    g = torch.Generator().manual_seed(0)
    side = preset["image"] // 28 * 28 + (28 if preset["image"] % 28 else 0)  # processor's resize
    grid = [1, side // 14, side // 14]
    n_image = grid[1] * grid[2] // 4
    rows = []
    for b in range(groups):
        text = torch.randint(0, PAD, (preset["text_tokens"] + 3 * b,), generator=g).tolist()
        rows.append([IM_START] + text[:20] + [IM_END, IM_START] + [VISION_START] + [IMAGE_PAD] * n_image
                    + [VISION_END] + text[20:] + [IM_END, IM_START, 77091, 198])
    pixel_values = torch.randn(groups * grid[1] * grid[2], 1176, generator=g)  # fp32, as build_prompts
    return pad_prompts(rows, torch.tensor([grid] * groups), pixel_values, PAD, IMAGE_PAD, 2, device)


# ----------------------------------------------------------------------------- the naive path

def repeat_prompts(prompts: PromptBatch, G: int) -> PromptBatch:
    """Each prompt and its image G times over: what the naive trainer feeds its model."""
    per_image = prompts.image_grid_thw.prod(1).tolist()
    pixels = torch.cat([p for p in prompts.pixel_values.split(per_image) for _ in range(G)])
    return PromptBatch(prompts.input_ids.repeat_interleave(G, 0),
                       prompts.attention_mask.repeat_interleave(G, 0),
                       prompts.position_ids.repeat_interleave(G, 1), pixels,
                       prompts.image_grid_thw.repeat_interleave(G, 0),
                       prompts.next_position.repeat_interleave(G))


def naive_rollout(model, processor, prompts: PromptBatch, G: int, length: int):
    repeated = repeat_prompts(prompts, G)
    out = model.generate(input_ids=repeated.input_ids, attention_mask=repeated.attention_mask,
                         pixel_values=repeated.pixel_values, image_grid_thw=repeated.image_grid_thw,
                         mm_token_type_ids=(repeated.input_ids == model.config.image_token_id).long(),
                         do_sample=True,
                         temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=length,
                         suppress_tokens=processor.blocked_ids,
                         eos_token_id=processor.end_id, pad_token_id=processor.pad_id)
    return out[:, repeated.input_ids.shape[1]:]  # (BG, T)


def naive_logprobs(model, prompts: PromptBatch, completion_ids, G: int):
    """Full sequences prompt + completion, G per prompt, logits at every position; the log-softmax
    one sequence at a time (as the authors' trainer did, to bound memory)."""
    repeated = repeat_prompts(prompts, G)
    ids = torch.cat([repeated.input_ids, completion_ids], 1)  # (G, P + T)
    mask = torch.cat([repeated.attention_mask, torch.ones_like(completion_ids)], 1)
    mm = (ids == model.config.image_token_id).long()  # (G, P + T) 1 on image tokens
    logits = model(input_ids=ids, attention_mask=mask, pixel_values=repeated.pixel_values,
                   image_grid_thw=repeated.image_grid_thw, mm_token_type_ids=mm).logits  # (G, L, V)
    logits = logits[:, repeated.input_ids.shape[1] - 1:-1]  # positions predicting the completion
    return torch.stack([row.float().log_softmax(-1).gather(-1, t[:, None]).squeeze(-1)
                        for row, t in zip(logits, completion_ids)])  # (G, T)


# ----------------------------------------------------------------------------- measuring

@dataclass
class Phases:
    rollout: float = 0.0
    reference: float = 0.0
    policy: float = 0.0
    optimizer: float = 0.0
    peak_gb: float = 0.0

    @property
    def total(self):
        return self.rollout + self.reference + self.policy + self.optimizer


class PeakMemory:
    """Peak memory during a block: the CUDA allocator's peak on GPU, sampled RSS on CPU."""

    def __init__(self, device):
        self.device, self.peak, self._running = device, 0, False

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            self._running = True
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        page = os.sysconf("SC_PAGE_SIZE")
        while self._running:
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * page)
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._running = False
            self._thread.join()

    @property
    def gb(self):
        return self.peak / 2**30


def grpo_step(path, policy, reference, processor, optimizer, prompts, G, length, device,
              precision: str) -> Phases:
    """One GRPO step over all prompt groups of `prompts`, phase by phase, on `path`; the math in
    the training's precision (bf16: the fp32 policy computes with bf16 casts of its weights, as
    in train_grpo.py)."""
    B = prompts.input_ids.shape[0]
    phases = Phases()
    with PeakMemory(device) as memory:
        t0 = timer(device)
        with torch.no_grad(), compute_context(policy, precision):
            policy.eval()
            if path == "naive":
                completions = naive_rollout(policy, processor, prompts, G, length)
            else:
                seeds = list(range(B))
                completions = sample_groups(policy, processor, prompts, G, length, 1.0,
                                            seeds=seeds).completion_ids
        assert completions.shape == (B * G, length), completions.shape
        t1 = timer(device)
        groups = [(slice_prompts(prompts, b, b + 1), completions[b * G:(b + 1) * G]) for b in range(B)]
        score = naive_logprobs if path == "naive" else completion_logprobs
        with torch.no_grad(), adapters_off(reference):  # under LoRA the reference is the policy
            ref = [score(reference, p, c, G) for p, c in groups]
        t2 = timer(device)
        policy.train()
        advantages = torch.randn(B, G, generator=torch.Generator().manual_seed(1)).to(device)
        for (p, c), ref_logprobs, adv in zip(groups, ref, advantages):
            with compute_context(policy, precision):
                logprobs = score(policy, p, c, G)
                loss, _ = grpo_loss(logprobs, logprobs.detach(), ref_logprobs, adv,
                                    torch.ones_like(c), beta=0.04, epsilon=0.2,
                                    loss_norm="sequence", normaliser=B * G)
                loss.backward()
        t3 = timer(device)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t4 = timer(device)
    phases.rollout, phases.reference, phases.policy, phases.optimizer = t1 - t0, t2 - t1, t3 - t2, t4 - t3
    phases.peak_gb = memory.gb
    return phases


def rollout_by_precision(policy, processor, prompts, G: int, length: int, device, repeats: int) -> dict:
    """Seconds of our rollout (all groups) in fp32, in bf16 with one compute_context around the
    whole rollout (train_grpo.py: each weight cast to bf16 once), and in bf16 with the weights
    cast again at every decode step (what a region per forward call would cost)."""
    regions = []

    def enter(module, args, kwargs):  # a region of its own for each forward call
        regions.append(compute_context(policy, "bf16"))
        regions[-1].__enter__()

    def leave(module, args, kwargs, output):
        regions.pop().__exit__(None, None, None)
    seeds = list(range(prompts.input_ids.shape[0]))
    times = {}
    for name, precision, per_step in (("fp32", "fp32", False), ("bf16", "bf16", False),
                                      ("bf16_recast_per_step", "fp32", True)):
        hooks = [policy.register_forward_pre_hook(enter, with_kwargs=True),
                 policy.register_forward_hook(leave, with_kwargs=True)] if per_step else []
        runs = []
        for _ in range(repeats + 1):  # the first is a warm-up
            t0 = timer(device)
            with torch.no_grad(), compute_context(policy, precision):
                sample_groups(policy, processor, prompts, G, length, 1.0, seeds=seeds)
            runs.append(timer(device) - t0)
        for hook in hooks:
            hook.remove()
        times[name] = statistics.median(runs[1:])
    return times


def rollout_compiled(policy, processor, prompts, G: int, length: int, device, precision: str,
                     repeats: int) -> dict:
    """Our rollout (all groups, `length` forced tokens) with the eager loop and with `--compile`
    (model.decode_compiled): median seconds of each, and per decode step, (rollout -
    rollout of one token, which is the prefill) / (length - 1). The compiled path's first call
    traces and compiles the decode step, its second captures the CUDA graph on GPU: their time
    beyond two rollouts is compile_s. same_tokens: whether both paths sampled the same tokens."""
    seeds = list(range(prompts.input_ids.shape[0]))

    def run(compile: bool, tokens: int):
        t0 = timer(device)
        with torch.no_grad(), compute_context(policy, precision):
            ids = sample_groups(policy, processor, prompts, G, tokens, 1.0, seeds=seeds,
                                compile=compile).completion_ids
        return timer(device) - t0, ids

    first_two = run(True, length)[0] + run(True, length)[0]
    run(False, length)  # the eager loop's warm-up
    times = {path: {"rollout": [], "prefill": []} for path in ("eager", "compiled")}
    for _ in range(repeats):  # interleaved, so a change in the machine's load hits both paths
        for path in times:
            seconds, completions = run(path == "compiled", length)
            times[path]["rollout"].append(seconds)
            times[path]["prefill"].append(run(path == "compiled", 1)[0])  # one token: the prefill
            times[path]["completions"] = completions
    result = {}
    for path, measured in times.items():
        result[f"{path}_s"] = statistics.median(measured["rollout"])
        prefill = statistics.median(measured["prefill"])
        result[f"{path}_step_ms"] = 1e3 * (result[f"{path}_s"] - prefill) / max(1, length - 1)
    result["compile_s"] = first_two - 2 * result["compiled_s"]
    result["speedup"] = result["eager_s"] / result["compiled_s"]
    result["same_tokens"] = bool(torch.equal(times["eager"]["completions"], times["compiled"]["completions"]))
    return result


def median_phases(runs: list[Phases]) -> Phases:
    return Phases(*(statistics.median(getattr(r, k) for r in runs)
                    for k in ("rollout", "reference", "policy", "optimizer", "peak_gb")))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu", help="model size and prompt shape")
    parser.add_argument("--configs", default=None,
                        help="comma-separated GxT (samples per prompt x forced completion tokens) "
                             "of the GRPO steps timed ('' for none); default: the preset's")
    parser.add_argument("--groups", type=int, default=None, help="prompt groups per rollout batch")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per path and configuration")
    parser.add_argument("--layers", type=int, default=None, help="override the language model's depth")
    parser.add_argument("--vision-layers", type=int, default=None, help="override the vision tower's depth")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: the preset's)")
    parser.add_argument("--precision", default=None, choices=["bf16", "fp32"],
                        help="weights and activations (default: the preset's)")
    parser.add_argument("--precision-rollout", default="4x64", metavar="GxT",
                        help="the rollout timed in fp32, in bf16, and in bf16 recasting every step ('' for none)")
    parser.add_argument("--compile-rollouts", default=None, metavar="GxT,...",
                        help="rollouts timed eager vs --compile ('' for none); default: the preset's")
    parser.add_argument("--json", default=None, help="also write the results here, one record per configuration")
    parser.add_argument("--lora-rank", type=int, default=16,
                        help="also time our step with LoRA adapters of this rank against the full one (0: no)")
    parser.add_argument("--memory", action="store_true",
                        help="print the per-GPU memory table of 2B and 7B (README: What fits where) and stop")
    args = parser.parse_args(argv)
    if args.memory:
        print(what_fits())
        return what_fits()
    preset = PRESETS[args.preset]
    device = torch.device(args.device or preset["device"])
    precision = args.precision or preset["precision"]
    groups = args.groups or preset["groups"]
    repeats = args.repeats or preset["repeats"]
    configs = [tuple(map(int, c.split("x"))) for c in
               (preset["configs"] if args.configs is None else [c for c in args.configs.split(",") if c])]

    policy, reference, processor = build_models(preset, args.layers, args.vision_layers, device, precision)
    n_params = sum(p.numel() for p in policy.parameters())
    optimizer = torch.optim.AdamW(policy.parameters(), lr=0.0, fused=device.type == "cuda")
    prompts = make_prompts(preset, groups, device)
    P = int(prompts.attention_mask.sum(1).float().mean())
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    peak = next((v for k, v in BF16_PEAK.items() if k in name), None) if device.type == "cuda" else None
    import transformers
    print(f"bench: preset {args.preset}, {n_params / 1e6:.1f} M parameters "
          f"({policy.config.text_config.num_hidden_layers} text / {policy.config.vision_config.depth} "
          f"vision layers), {precision} precision, {name}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}; {groups} prompt groups of ~{P} tokens per step")
    header = (f"{'config':<16}{'path':<7}{'rollout':>9}{'reference':>11}{'policy':>9}{'optim':>8}"
              f"{'total':>9}  {'tokens/s':>9}{'peak GB':>9}" + ("  MFU roll/ref/policy" if peak else ""))
    if configs:
        print("seconds per prompt group\n" + header)
    records = []
    for path in ("naive", "ours") if configs else ():  # warm-up: first-call allocations, kernels
        grpo_step(path, policy, reference, processor, optimizer, prompts, 2, 4, device, precision)
    for G, length in configs:
        label = f"G={G} T={length}"
        result = {}
        for path in ("naive", "ours"):
            result[path] = median_phases([grpo_step(path, policy, reference, processor, optimizer,
                                                    prompts, G, length, device, precision)
                                          for _ in range(repeats)])
        # token positions each path runs through the language model, per prompt group
        positions = {"naive": dict(rollout=G * (P + length), reference=G * (P + length)),
                     "ours": dict(rollout=P + G * length, reference=P + G * length)}
        record = dict(preset=args.preset, config=label, G=G, completion_tokens=length,
                      groups=groups, prompt_tokens=P, parameters=n_params, device=name,
                      precision=precision, torch=torch.__version__, transformers=transformers.__version__)
        for path in ("naive", "ours"):
            ph = result[path]
            per = {k: getattr(ph, k) / groups for k in ("rollout", "reference", "policy", "optimizer", "total")}
            useful_tokens = G * (P + length)  # the same work unit for both paths
            row = dict(**{f"{k}_s": v for k, v in per.items()}, peak_gb=ph.peak_gb,
                       tokens_per_s=useful_tokens / per["total"])
            if peak:
                pos = positions[path]
                row["mfu_rollout"] = 2 * n_params * pos["rollout"] / per["rollout"] / peak
                row["mfu_reference"] = 2 * n_params * pos["reference"] / per["reference"] / peak
                row["mfu_policy"] = 6 * n_params * pos["reference"] / per["policy"] / peak
            record[path] = row
            mfu = (f"  {row['mfu_rollout']:.0%}/{row['mfu_reference']:.0%}/{row['mfu_policy']:.0%}"
                   if peak else "")
            print(f"{label if path == 'naive' else '':<16}{path:<7}{per['rollout']:>9.3f}{per['reference']:>11.3f}"
                  f"{per['policy']:>9.3f}{per['optimizer']:>8.3f}{per['total']:>9.3f}  "
                  f"{row['tokens_per_s']:>9.0f}{row['peak_gb']:>9.2f}{mfu}")
        ratio = {k: record["naive"][f"{k}_s"] / record["ours"][f"{k}_s"]
                 for k in ("rollout", "reference", "policy", "optimizer", "total")}
        record["ratio"] = ratio
        print(f"{'':<16}{'ratio':<7}{ratio['rollout']:>8.1f}x{ratio['reference']:>10.1f}x"
              f"{ratio['policy']:>8.1f}x{ratio['optimizer']:>7.1f}x{ratio['total']:>8.1f}x")
        if length <= 8:  # the No-Thinking shape: project the paper's ImageNet run on one device
            for path in ("naive", "ours"):
                record[path]["imagenet_minutes"] = IMAGENET_GROUPS * record[path]["total_s"] / 60
            print(f"{'':<16}projected ImageNet run (40,000 groups, one {name.split(',')[0]}): "
                  f"naive {record['naive']['imagenet_minutes']:.0f} min, ours {record['ours']['imagenet_minutes']:.0f} min")
        records.append(record)
    if args.precision_rollout:
        G, length = map(int, args.precision_rollout.split("x"))
        times = rollout_by_precision(policy, processor, prompts, G, length, device, repeats)
        print(f"\nour rollout of {groups} groups, G={G} T={length}, seconds: " + ", ".join(
              f"{k} {v:.3f}" for k, v in times.items()) + f"; bf16 recast per step / one region: "
              f"{times['bf16_recast_per_step'] / times['bf16']:.2f}x")
        records.append(dict(preset=args.preset, config=f"rollout G={G} T={length}", groups=groups,
                            device=name, rollout_seconds=times))
    compile_rollouts = preset["compile_rollouts"] if args.compile_rollouts is None else \
        [c for c in args.compile_rollouts.split(",") if c]
    # a decode step reads every language-model weight once (the output layer is the embedding)
    weight_bytes = sum(p.numel() * (2 if precision == "bf16" else 4)
                       for p in policy.model.language_model.parameters())
    bandwidth = next((v for k, v in HBM_BANDWIDTH.items() if k in name), None)
    for config in compile_rollouts:
        G, length = map(int, config.split("x"))
        row = rollout_compiled(policy, processor, prompts, G, length, device, precision, repeats)
        if bandwidth:
            row["weight_read_ms"] = 1e3 * weight_bytes / bandwidth
        print(f"our rollout of {groups} groups, G={G} T={length}: eager {row['eager_s']:.3f} s "
              f"({row['eager_step_ms']:.1f} ms/step), --compile {row['compiled_s']:.3f} s "
              f"({row['compiled_step_ms']:.1f} ms/step), {row['speedup']:.2f}x; one-time compile "
              f"{row['compile_s']:.1f} s; same tokens: {row['same_tokens']}"
              + (f"; weight read {row['weight_read_ms']:.2f} ms/step" if bandwidth else ""))
        records.append(dict(preset=args.preset, config=f"compiled rollout G={G} T={length}",
                            groups=groups, device=name, precision=precision, **row))
    if args.lora_rank and configs:  # the full models go first, so that the LoRA step's peak is its own
        state = policy.state_dict()
        del policy, reference, optimizer
        gc.collect()
        records.append(lora_step(args, preset, state, processor, prompts, device, precision, records[0]))
    if args.json:
        write_atomic(args.json, json.dumps(records, indent=2))  # makes the folder too
    return records


def lora_step(args, preset, state, processor, prompts, device, precision, full: dict) -> dict:
    """Our step with LoRA (a frozen base in the compute dtype, adapters, the reference the
    adapters off) on the first configuration, against the full fine-tuning step measured there
    (`full`: fp32 masters, AdamW over every weight, a reference model): seconds per group and
    peak memory, the full models freed first."""
    from transformers import Qwen2VLForConditionalGeneration
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration._from_config(
            qwen2_vl_config(preset, args.layers, args.vision_layers),
            dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    model.load_state_dict(state)
    del state
    add_adapters(model, args.lora_rank, 2 * args.lora_rank, seed=0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    G, length = full["G"], full["completion_tokens"]
    grpo_step("ours", model, model, processor, optimizer, prompts, 2, 4, device, precision)  # warm-up
    lora = median_phases([grpo_step("ours", model, model, processor, optimizer, prompts, G, length,
                                    device, precision) for _ in range(args.repeats or preset["repeats"])])
    phases = ("rollout", "reference", "policy", "optimizer", "total")
    result = {"full": {f"{k}_s": full["ours"][f"{k}_s"] for k in phases} | {"peak_gb": full["ours"]["peak_gb"]},
              "lora": {f"{k}_s": getattr(lora, k) / prompts.input_ids.shape[0] for k in phases}
              | {"peak_gb": lora.peak_gb}}
    print(f"\nours, full vs LoRA r={args.lora_rank}, {full['config']}, seconds per group:")
    for name, row in result.items():
        print(f"{'':<16}{name:<7}" + "".join(f"{row[f'{k}_s']:>9.3f}" for k in phases)
              + f"  peak {row['peak_gb']:.2f} GB")
    print(f"{'':<16}LoRA / full time {result['lora']['total_s'] / result['full']['total_s']:.2f}x")
    return dict(preset=args.preset, config=f"full vs LoRA r={args.lora_rank} {full['config']}", **result)


# ----------------------------------------------------------------------------- what fits where

def memory_budget(model, *, precision="bf16", fsdp=False, compile=False, world_size=1, group_size=4,
                  completion_tokens=8, prompt_tokens=746, image_patches=784, batch_size=1,
                  grad_accum=2, beta=0.04) -> dict[str, float]:
    """Bytes per GPU of a GRPO run, by component. Counted from `model`'s
    parameter shapes (it may live on the meta device; with LoRA adapters added when the run has
    --lora-rank) and the run's flags, as train_grpo.py holds them:
    - weights: the fp32 masters of what trains (4 bytes per parameter; under LoRA the adapters)
      and, under LoRA, the frozen base in the compute dtype; under FSDP 1/world_size of it all;
    - gradients: fp32, of what trains; FSDP keeps them full-size between micro-steps when
      accumulating (--grad-accum > 1) and reduce-scatters them to a shard only on the last;
    - adamw: two fp32 moments of what trains (sharded under FSDP);
    - reference: the frozen KL reference in the compute dtype (none under LoRA: the adapters off;
      none when beta = 0; sharded under FSDP);
    - working copy: the compute-dtype copy a rollout or a micro-step's policy pass computes with
      (run.compute_context; under FSDP the gathered policy); none in fp32 or for a bf16 base;
      with --compile the rollout's copy is kept between rollouts (fixed addresses), a second one;
    - activations: an ESTIMATE for one micro-step's scoring: about 22 x hidden + 8 x FFN bytes
      saved per token per layer in bf16 (norm inputs with their fp32 copies, q/k/v, attention
      output, the MLP's four FFN-wide tensors), twice that in fp32, over the prompt + G
      completions of the language model and the image's patches of the vision tower, for each
      of the micro-step's `batch_size` prompts.
    """
    compute = 2 if precision == "bf16" else 4
    lora = bool(adapters(model))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad or not lora)
    frozen = sum(p.numel() for p in model.parameters()) - trainable
    shard = world_size if fsdp else 1
    text, vision = model.config.text_config, model.config.vision_config
    per_token = compute / 2 * (22 * text.hidden_size + 8 * text.intermediate_size) * text.num_hidden_layers
    per_patch = compute / 2 * (22 * vision.embed_dim + 8 * vision.embed_dim * vision.mlp_ratio) * vision.depth
    return {
        "weights": (4 * trainable + compute * frozen) / shard,
        "gradients": 4 * trainable / (shard if grad_accum == 1 else 1) if fsdp else 4 * trainable,
        "adamw": 8 * trainable / shard,
        "reference": 0 if lora or not beta else compute * trainable / shard,
        "working copy": (compute * trainable if precision == "bf16" or fsdp else 0)
                        * (2 if compile and precision == "bf16" and not fsdp else 1),
        "activations": batch_size * (per_token * (prompt_tokens + group_size * completion_tokens)
                                     + per_patch * image_patches),
    }


# (model, setup, budget flags, command flags): the README's "What fits where" rows
FITS = [(name, setup, flags, command) for name, model_flag in (("2b", ""), ("7b", " --model Qwen/Qwen2-VL-7B-Instruct"))
        for setup, flags, command in (
            ("full, DDP", dict(), "torchrun --nproc_per_node 8 train_grpo.py" + model_flag),
            ("full, FSDP on 8 GPUs", dict(fsdp=True, world_size=8, batch_size=2, grad_accum=1),
             "torchrun --nproc_per_node 8 train_grpo.py --fsdp --batch-size 2 --grad-accum 1" + model_flag),
            ("LoRA r=16, 1 GPU", dict(lora_rank=16),
             "python train_grpo.py --lora-rank 16 --lr 1e-5 --grad-accum 16" + model_flag))]


def what_fits() -> str:
    """The README's table: per-GPU memory of GRPO No-Thinking (746-token ImageNet prompts, 8-token
    answers) for Qwen2-VL-2B and -7B, from their real shapes (built on the meta device: no
    download, no memory), full fine-tuning and LoRA, DDP and FSDP, G = 4 and 8."""
    from transformers import Qwen2VLForConditionalGeneration

    rows = []
    for name, setup, flags, command in FITS:
        with torch.device("meta"):
            model = Qwen2VLForConditionalGeneration(qwen2_vl_config(PRESETS["2b"] if name == "2b" else MODEL_7B))
        flags = dict(flags)
        if flags.pop("lora_rank", 0):
            add_adapters(model, 16, 32, seed=0)
        for G in (4, 8):
            parts = memory_budget(model, group_size=G, **flags)
            gb = {k: v / 1e9 for k, v in parts.items()}
            total = sum(gb.values())
            rows.append(f"| {name.upper()} | {setup} | {G} | " + " | ".join(f"{v:.1f}" for v in gb.values())
                        + f" | **{total:.0f}** | {'yes' if total < 80 else 'no'} | `{command} --num-generations {G}` |")
    header = ("| model | set-up | G | weights | gradients | AdamW | reference | working copy | "
              "activations (est.) | total GB | fits 80 GB | command (with --dataset, --data-root) |\n"
              + "|---" * 12 + "|\n")
    return header + "\n".join(rows)


if __name__ == "__main__":
    main()
