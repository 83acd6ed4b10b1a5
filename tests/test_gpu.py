"""The GPU check: what the CPU tests cannot see (CUDA kernels, bf16 on a GPU, NCCL, fused AdamW on
FSDP's DTensors, CUDA graphs), on a real-size Qwen2-VL-2B: its configuration with random weights
at the real initialisation scale (std 0.02), built here, no download. A few minutes on one GPU:

    python -m pytest -q tests/test_gpu.py

Skipped without CUDA. `CLS_RL_GPU_CHECK=cpu` runs the same checks on the CPU with gloo, at the
2B's widths with 2 text and 2 vision layers (to check the check before a GPU is at hand).
The torchrun jobs have one process (one GPU): DDP itself needs two ranks (run.prepare_training
wraps a policy in DDP only then), so they exercise NCCL, FSDP and the run around them; they run
the 2B's widths at 4 layers deep, since a full 2B checkpoint (fp32 masters, AdamW state, bf16
weights: 31 GB) fits a GPU machine's disk once, not the three times a resume check needs.
"""
import copy
import os
import shutil
import subprocess
import sys

import pytest
import torch

import bench
import model as M
import run as R
import train_grpo as T
from conftest import hf_greedy, never_ending, training_args
from helpers import ROOT, env, max_difference, metrics

ON_CPU = os.environ.get("CLS_RL_GPU_CHECK") == "cpu"
DEVICE = torch.device("cpu" if ON_CPU else "cuda")
DEPTH = 2 if ON_CPU else None  # None: the real 28 text and 32 vision layers
RUN_DEPTH = 1 if ON_CPU else 4  # the torchrun jobs' model
pytestmark = pytest.mark.skipif(not ON_CPU and not torch.cuda.is_available(),
                                reason="needs CUDA (CLS_RL_GPU_CHECK=cpu runs it on the CPU, 2 layers deep)")
cosine = torch.nn.functional.cosine_similarity


def qwen2_vl_2b(depth):
    """(model, processor): Qwen2-VL-2B's shapes (`depth` layers in each tower, None: the real
    ones) with random weights, fp32 on the device (the weights rounded to bf16, as the hub ships
    them). The tokenizer is the offline one, its ids written into the configuration."""
    from transformers import Qwen2VLForConditionalGeneration
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 is fp32
    tokenizer = M.build_tiny_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in M.SPECIAL_TOKENS}
    config = bench.qwen2_vl_config(bench.PRESETS["2b"], depth, depth)
    config.image_token_id, config.video_token_id = ids["<|image_pad|>"], ids["<|video_pad|>"]
    config.vision_start_token_id, config.vision_end_token_id = ids["<|vision_start|>"], ids["<|vision_end|>"]
    config.text_config.eos_token_id = ids[M.END_TOKEN]
    config.text_config.bos_token_id = config.text_config.pad_token_id = ids["<|endoftext|>"]
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16).float().to(DEVICE).eval()
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    return model, M.Processor.from_parts(tokenizer, Qwen2VLImageProcessorPil(), config.text_config.vocab_size)


@pytest.fixture(scope="module")
def real():
    """The real-size Qwen2-VL-2B and its processor."""
    return qwen2_vl_2b(DEPTH)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """The torchrun jobs' model (the 2B's widths, RUN_DEPTH layers) saved as a model folder."""
    model, processor = qwen2_vl_2b(RUN_DEPTH)
    folder = tmp_path_factory.mktemp("run") / "qwen2-vl-2b-random"
    M.save_pretrained(model, processor, str(folder), {k: v.bfloat16() for k, v in model.state_dict().items()})
    return folder, {k: v.float().cpu() for k, v in model.state_dict().items()}


def prompts_and_completions(processor, count=2, G=4, length=16):
    """`count` demo prompts at the authors' 384 px (196 image tokens) and G forced-length
    completions each, of random allowed tokens."""
    from data import load_data, load_image, make_question
    data = load_data("demo", None, "fewshot", "test")
    images = [load_image(data.examples[i].image, 384) for i in range(count)]
    texts = [make_question(data, i, "no-think", seed=100)[0] for i in range(count)]
    prompts = M.build_prompts(processor, images, texts, DEVICE)
    allowed = torch.tensor(sorted(set(range(len(processor.tokenizer))) - set(processor.blocked_ids)))
    ids = allowed[torch.randint(len(allowed), (count * G, length), generator=torch.Generator().manual_seed(0))]
    return prompts, ids.to(DEVICE)


def naive_logprobs(model, prompts, ids, G):
    """Each prompt + completion as its own forward, logits everywhere: what the shortcut replaces."""
    rows = []
    for b in range(prompts.input_ids.shape[0]):
        one = M.slice_prompts(prompts, b, b + 1)
        rows.append(bench.naive_logprobs(model, one, ids[b * G:(b + 1) * G], G))
    return torch.cat(rows)


@torch.no_grad()
def test_shared_prefix_scoring_equals_full_sequences_in_bf16(real):
    """TOLERANCE: bf16 keeps 8 significant bits, so two correct bf16 computations that add in
    different orders (one packed masked forward vs G separate ones, different attention kernels)
    differ by rounding. Each may be as far from the exact (fp32) result as bf16 takes the naive
    one, so the two may differ by twice that, in the largest and in the mean difference."""
    model, processor = real
    prompts, ids = prompts_and_completions(processor)
    fp32 = naive_logprobs(model, prompts, ids, 4)
    assert float((M.completion_logprobs(model, prompts, ids, 4) - fp32).abs().max()) < 1e-3
    with R.compute_context(model, "bf16"):
        ours, naive = M.completion_logprobs(model, prompts, ids, 4), naive_logprobs(model, prompts, ids, 4)
    bf16_error = (naive - fp32).abs()
    assert bf16_error.max() > 0  # bf16 really ran
    assert (ours - naive).abs().max() <= 2 * bf16_error.max() and (ours - naive).abs().mean() <= 2 * bf16_error.mean()


@torch.no_grad()
def test_sampling_equals_generate_and_the_compiled_decode_the_eager_loop(real):
    """fp32 (TF32 off): greedy tokens equal Hugging Face's generate; seeded sampling does not
    depend on the batch a group shares; --compile's decode (CUDA graphs) gives the eager loop's
    tokens, greedy and sampled. Sampling at temperature 0.05: random weights spread the
    probability almost evenly over 151,936 tokens, where the last bit of a logit moves a sample
    (kernels of another shape round differently); the sharpened distribution is what a trained
    model's is like, and samples then move only at true near-ties."""
    model, processor = real
    prompts, _ = prompts_and_completions(processor)
    greedy = M.sample_groups(model, processor, prompts, 1, 16, temperature=0)
    reference = hf_greedy(model, processor, prompts, 16)
    assert torch.equal(greedy.completion_ids, reference[:, :greedy.completion_ids.shape[1]])
    sampled = M.sample_groups(model, processor, prompts, 4, 16, 0.05, seeds=[1, 2])
    alone = M.sample_groups(model, processor, M.slice_prompts(prompts, 1, 2), 4, 16, 0.05, seeds=[2])
    assert torch.equal(sampled.completion_ids[4:, :alone.completion_ids.shape[1]], alone.completion_ids)
    for temperature, G, seeds in ((0, 1, None), (0.05, 4, [1, 2])):
        eager = M.sample_groups(model, never_ending(processor), prompts, G, 16, temperature, seeds=seeds)
        compiled = M.sample_groups(model, never_ending(processor), prompts, G, 16, temperature, seeds=seeds,
                                   compile=True)
        assert torch.equal(compiled.completion_ids, eager.completion_ids), temperature


def test_one_bf16_update_at_lr_1e6_moves_every_weight(real):
    """--precision bf16 at the paper's learning rate: the fp32 masters take AdamW's ~1e-6 steps
    (bf16 weights would round them away: the gap between bf16 numbers near 0.02 is ~1.2e-4)."""
    model, processor = real
    model = copy.deepcopy(model)  # trained here; the fixture's stays as it is
    prompts, ids = prompts_and_completions(processor, count=1)
    mask = M.completion_mask(ids, processor.end_id)
    advantages = T.group_advantages(torch.tensor([[1.0, 0.0, 1.0, 0.0]])).flatten().to(DEVICE)
    before = [p.detach().clone() for p in model.parameters()]
    policy, optimizer = R.prepare_training(training_args(lr=1e-6, precision="bf16"), R.Run(0, 1, DEVICE), model)
    with R.compute_context(model, "bf16"):
        logprobs = policy(prompts, ids, 4)
        loss, _ = T.grpo_loss(logprobs, logprobs.detach(), None, advantages, mask, beta=0.0, epsilon=0.2,
                              loss_norm="sequence", normaliser=4)
        loss.backward()
    R.optimizer_step(model, optimizer, 1e-6, max_grad_norm=1.0)
    moved = sum(int((p != b).sum()) for p, b in zip(model.parameters(), before))
    assert moved / sum(b.numel() for b in before) >= 0.99
    del model, policy, optimizer, before


def torchrun(args, folder, tmp_path, wrapper=None, check=True):
    """`torchrun --nproc_per_node 1` (NCCL on a GPU) of train_grpo.py on the real-size model."""
    script = ROOT / "tests/signal_on_rank1.py" if wrapper else ROOT / "train_grpo.py"
    common = ["--model", str(folder), "--dataset", "demo", "--image-size", "384", "--shots", "2",
              "--max-new-tokens", "8", "--batch-size", "1", "--grad-accum", "2", "--num-generations", "4",
              "--lr", "1e-2", "--weight-decay", "1", "--precision", "bf16", "--max-steps", "3",
              "--keep-checkpoints", "1", "--device", DEVICE.type]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                           str(script), *common, *args], cwd=tmp_path, capture_output=True, text=True,
                          env={**env(tmp_path), "SIGNAL_RANK": "0"}, timeout=600)
    assert not check or done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done


def masters(checkpoint, tmp_path):
    """The fp32 weights a checkpoint resumes from."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
    if "sharded_optimizer" in state:
        dcp_to_torch_save(checkpoint / "sharded", tmp_path / "gathered.pt")
        gathered = torch.load(tmp_path / "gathered.pt", weights_only=False)["model"]
        os.remove(tmp_path / "gathered.pt")
        return gathered
    return state["master_weights"]


@pytest.mark.parametrize("wrap", [[], ["--fsdp"], ["--lora-rank", "16"]])
def test_a_run_under_torchrun_starts_at_its_reference_and_resumes_exactly(run_folder, wrap, tmp_path):
    """The untrained model earns no reward, so step 1's only gradient is the KL's, exactly 0 when
    the policy computes what its reference computes (the same bf16 computation on the same
    weights); weight decay then moves the weights (by 1e-2 of themselves per step: less leaves
    their bf16 roundings, and the bf16 logits, as they were), so later steps have a KL to
    follow; under LoRA it decays A while B stays 0, and the KL with it. A SIGTERM during step 2 saves and stops; --resume
    latest ends on the uninterrupted run's weights. One checkpoint is kept on disk at a time."""
    folder, start = run_folder
    torchrun(wrap + ["--output-dir", "straight"], folder, tmp_path)
    first, *_ = metrics(tmp_path / "straight")
    assert first["zero_spread_share"] == 1 and first["kl"] == 0 and first["grad_norm"] == 0, first
    straight = masters(tmp_path / "straight/checkpoint-000003", tmp_path)
    kl = [r["kl"] for r in metrics(tmp_path / "straight")]
    shutil.rmtree(tmp_path / "straight")
    cut = torchrun(wrap + ["--output-dir", "cut"], folder, tmp_path, wrapper=True, check=False)
    assert cut.returncode != 0 and "SIGTERM" in cut.stdout + cut.stderr, (cut.stdout + cut.stderr)[-3000:]
    torchrun(wrap + ["--output-dir", "cut", "--resume", "latest"], folder, tmp_path)
    assert max_difference(straight, masters(tmp_path / "cut/checkpoint-000003", tmp_path)) == 0
    assert [r["kl"] for r in metrics(tmp_path / "cut")] == kl
    if "--lora-rank" not in wrap:  # (LoRA's masters are its adapters)
        assert kl[-1] > 0 and max_difference(straight, {k: start[k] for k in straight}) > 0
