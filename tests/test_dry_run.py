"""`train.py --dry-run`: parameter counts, FLOPs per clip against the anchors doc, the memory arithmetic, the
activation formula against what a block really saves, and the global-batch warning."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import models.blocks
from engine import dry_run
from engine.config import load_config
from engine.dry_run import block_activation_bytes, dry_run_report, format_report, launch_world_size, memory_estimate
from models import VARIANTS, VisionTransformer

from .conftest import ROOT


def _config(name: str, *overrides: str):
    return load_config(ROOT / "configs" / name, list(overrides))


@pytest.fixture(scope="module")
def reports():
    """The recipes' own world sizes (240 and 128 GPUs): the global batch matches."""
    return {name: dry_run_report(_config(f"{name}.json")) for name in ("vith16_384", "vitl16")}


def _vit_params(d: int, depth: int) -> int:
    # per block: qkv 3d^2+3d, proj d^2+d, fc1 4d^2+4d, fc2 4d^2+d, two LayerNorms 4d; tubelet conv 1536d+d; final LN
    return depth * (12 * d * d + 13 * d) + 1536 * d + d + 2 * d


def _predictor_params(enc_dim: int, d: int = 384, depth: int = 12, mask_tokens: int = 2) -> int:
    # blocks, final LN, embed enc_dim -> d, projection d -> enc_dim, one d-wide token per mask generator
    return depth * (12 * d * d + 13 * d) + 2 * d + (enc_dim * d + d) + (d * enc_dim + enc_dim) + mask_tokens * d


def test_parameter_counts_match_meta_models_and_published_figures(reports):
    for name, variant, crop, published in (("vitl16", "vit_large", 224, 303.9e6), ("vith16_384", "vit_huge", 384,
                                                                                    631.6e6)):
        model = reports[name].model
        with torch.device("meta"):
            encoder = VisionTransformer(VARIANTS[variant], img_size=crop)
        assert model.encoder_params == sum(p.numel() for p in encoder.parameters() if p.requires_grad)
        assert model.encoder_total == sum(p.numel() for p in encoder.parameters())  # + the frozen position table
        v = VARIANTS[variant]
        assert model.encoder_params == _vit_params(v.dim, v.depth) == pytest.approx(published, abs=0.05e6)  # spec 1.1
        assert model.predictor_params == _predictor_params(v.dim) == pytest.approx(22.1e6, rel=0.01)  # "~22M"
        assert model.trained_params == model.encoder_params + model.predictor_params
    assert reports["vitl16"].model.encoder_params == 303_885_312
    assert reports["vith16_384"].model.encoder_params == 631_648_000


def test_flops_per_clip_near_the_anchors(reports):
    # performance_anchors.md 7.2, "config-simulated" rows: batch-min truncation 20.2 (ViT-H/384) and 2.75 (ViT-L/224)
    # TFLOP/clip, mean kept (our packed mode) 24.9 for ViT-H/384; target forward 9.30 / 1.19, predictor 3.55 / 0.68
    # with N tokens per predictor sequence, which is exactly the packed case (the truncated predictor sees fewer).
    for name, truncated, packed, target, predictor in (("vith16_384", 20.2, 24.9, 9.30, 3.55),
                                                      ("vitl16", 2.75, None, 1.19, 0.68)):
        r = reports[name]
        assert r.truncated.flops_per_clip / 1e12 == pytest.approx(truncated, rel=0.10)
        if packed:
            assert r.packed.flops_per_clip / 1e12 == pytest.approx(packed, rel=0.05)
        assert r.packed.flops_per_clip > 1.2 * r.truncated.flops_per_clip
        assert r.packed.flops[0] / 1e12 == r.truncated.flops[0] / 1e12 == pytest.approx(target, rel=0.01)
        assert r.packed.flops[2] / 1e12 == pytest.approx(predictor, rel=0.01)
        assert r.packed.clips_per_s == pytest.approx(0.5 * 790e12 / r.packed.flops_per_clip)
    # kept fractions of the anchors' simulation of the reference sampler (mean / batch minimum, section 1.1)
    for name, kept in (("vith16_384", [(0.39, 0.28), (0.19, 0.09)]), ("vitl16", [(0.37, 0.23), (0.19, 0.063)])):
        r = reports[name]
        for g, (mean, batch_min) in enumerate(kept):
            assert r.packed.context_tokens[g] / r.num_tokens == pytest.approx(mean, abs=0.02)
            assert r.truncated.context_tokens[g] / r.num_tokens == pytest.approx(batch_min, abs=0.02)


# tiny_synthetic.json: encoder width 96, depth 4, 3 heads, 8x8x2 tubelets on a 4x8x8 grid; predictor 64 wide, 2 deep
TINY_ENCODER, TINY_ENCODER_POS = 484_512, 256 * 96  # blocks 4*111_840 + tubelet 384*96+96 + final LN 192
TINY_PREDICTOR, TINY_PREDICTOR_POS = 112_672, 256 * 64  # blocks 2*49_984 + LN 128 + 6_208 + 6_240 + tokens 128


def test_memory_model_states_by_zero_stage():
    trained, everything = TINY_ENCODER + TINY_PREDICTOR, TINY_ENCODER + TINY_PREDICTOR + TINY_ENCODER_POS + \
        TINY_PREDICTOR_POS
    world, bucket = 4, 1000
    target = 4 * (TINY_ENCODER + TINY_ENCODER_POS)
    expected = {  # weights, target, grads, AdamW states; the target encoder is partitioned under ZeRO-3 only
        0: (4 * everything, target, 4 * trained, 8 * trained),
        1: (4 * everything, target, 4 * trained, 8 * trained // world),
        2: (4 * everything, target, 4 * trained // world, 8 * trained // world),
        3: (4 * everything // world, target // world, 4 * trained // world, 8 * trained // world),
    }
    states = []
    for stage, (weights, target, grads, optimizer) in expected.items():
        r = dry_run_report(_config("tiny_synthetic.json", f"--deepspeed.zero_optimization.stage={stage}",
                                   f"--deepspeed.zero_optimization.reduce_bucket_size={bucket}"), world_size=world)
        assert r.zero_stage == stage
        mem = r.memory
        assert (mem.weights, mem.target, mem.grads, mem.optimizer) == (weights, target, grads, optimizer)
        # DeepSpeed's ZeRO optimizers clone their fp32 partition and stage gradients in one reduce bucket; ZeRO-3
        # also holds its prefetched parameters (default bucket 5e7 elements)
        assert mem.zero_buffers == {0: 0, 1: 4 * trained // world + 4 * bucket, 2: 4 * trained // world + 4 * bucket,
                                    3: 4 * trained // world + 4 * bucket + 4 * int(5e7)}[stage]
        assert mem.weight_casts == 2 * trained
        states.append(mem.model_states)
    assert states[0] > states[1] > states[2] > states[3]
    assert states[0] - states[1] == 8 * trained - 8 * trained // world

    # the torch backend ignores the deepspeed section: no ZeRO
    torch_backend = _config("tiny_synthetic.json", "--deepspeed.zero_optimization.stage=2", "--meta.backend=torch")
    assert dry_run.zero_stage(torch_backend) == 0 and dry_run.zero_stage(_config("tiny_synthetic.json")) == 0


def test_activation_arithmetic():
    cfg = _config("tiny_synthetic.json")
    model = dry_run.model_shape(cfg)
    per_enc, per_pred = 20 * 96 + 4 * 384 + 4 * 3 + 16, 20 * 64 + 4 * 256 + 4 * 2 + 16  # 3484, 2328
    mem = memory_estimate(cfg, model, world=1, stage=0, tokens=(100, 300, 200))
    assert mem.blocks == 4 * 100 * per_enc + 2 * 300 * per_pred
    # checkpointed: bf16 encoder block inputs, fp32 predictor block inputs, one block recomputed at a time
    assert mem.blocks_checkpointed == 4 * 100 * 2 * 96 + 2 * 300 * 4 * 64 + max(100 * per_enc, 300 * per_pred)
    assert mem.total() == mem.model_states + mem.zero_buffers + mem.weight_casts + mem.other + mem.blocks
    assert mem.total(checkpointed=True) < mem.total()


class _FlashLike(torch.autograd.Function):
    """What a flash/varlen attention keeps for backward: q, k, v, the output and an fp32 logsumexp per head."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, torch.empty(q.shape[:2], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, grad, grad


@pytest.mark.parametrize("residual", [torch.bfloat16, torch.float32])  # the encoder's and the predictor's stream
def test_block_activation_formula_matches_saved_tensors(monkeypatch, residual):
    # CUDA autocast runs LayerNorm in fp32; CPU autocast does not, so emulate CUDA's policy
    monkeypatch.setattr(torch.nn.LayerNorm, "forward", lambda self, x: F.layer_norm(
        x.float(), self.normalized_shape, self.weight, self.bias, self.eps))
    monkeypatch.setattr(models.blocks, "packed_attention", lambda q, k, v, packing: _FlashLike.apply(q, k, v))
    dim, hidden, heads, tokens = 96, 384, 3, 50
    block = models.blocks.Block(dim, heads, hidden)
    saved = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dim() and t.shape[0] == tokens:  # activations (weights and their bf16 casts are not per token)
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()  # views share their storage
        return t

    x = torch.randn(tokens, dim, dtype=residual, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, None)
    assert sum(saved.values()) == tokens * block_activation_bytes(dim, hidden, heads)


def test_global_batch_warning_names_the_lr_scaling(reports, monkeypatch):
    assert reports["vith16_384"].warnings == () and reports["vith16_384"].global_batch == 2400
    assert reports["vitl16"].warnings == () and reports["vitl16"].global_batch == 3072
    cfg = _config("vith16_384.json")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert launch_world_size(cfg) == 8
    r = dry_run_report(cfg)
    assert (r.world_size, r.recipe_batch, r.global_batch, r.accumulation) == (8, 2400, 80, 1)
    (warning,) = r.warnings
    scale = 80 / 2400
    for text in ("global batch 80", "2400", f"--optimization.lr={6.25e-4 * scale:.4g}",
                 f"--optimization.start_lr={2e-4 * scale:.4g}", f"--optimization.final_lr={1e-6 * scale:.4g}",
                 "does not rescale"):
        assert text in warning
    assert "warning: global batch 80" in format_report(r)
    # one process with the torch backend (WORLD_SIZE ignored): the recipe's batch through accumulation
    one_gpu = _config("vitl16.json", "--meta.backend=torch", "--deepspeed.gradient_accumulation_steps=128")
    r = dry_run_report(one_gpu)
    assert (r.world_size, r.accumulation, r.global_batch, r.warnings) == (1, 128, 3072, ())
    monkeypatch.delenv("WORLD_SIZE")
    assert launch_world_size(cfg) == 240


def test_only_rank_zero_prints(monkeypatch, capsys):
    cfg = _config("tiny_synthetic.json")
    monkeypatch.setenv("RANK", "1")
    assert dry_run.main(cfg) == 0 and capsys.readouterr().out == ""


def test_train_dry_run_subprocess():
    assert not Path("/your/path").exists()  # the recipe's dataset paths: the dry run must not need them
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "engine/train.py", "--config", "configs/vith16_384.json", "--dry-run"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - start
    assert out.returncode == 0, out.stderr
    for section in ("Model\n", "Parameters", "Model FLOPs per clip", "Memory per GPU, world 240, ZeRO stage 2",
                    "Global batch", "631.65 M", "packed (ours)", "truncated (ref)", "80 GB H100"):
        assert section in out.stdout
    assert "warning" not in out.stdout
    assert elapsed < 60, elapsed


def test_memory_as_configured_follows_activation_checkpointing():
    from engine.config import load_config
    from engine.dry_run import dry_run_report

    totals = {}
    for k in (0, 1, 4):
        cfg = load_config(ROOT / "configs" / "vitl16.json", ["--meta.backend=torch",
                                                             f"--model.activation_checkpointing={k}"])
        totals[k] = dry_run_report(cfg, world_size=1).memory
    assert totals[0].total(None) == totals[0].total(False)  # off: nothing checkpointed
    assert totals[1].total(None) == totals[1].total(True)  # every block
    assert totals[1].total(True) < totals[4].total(None) < totals[0].total(False)  # every 4th: in between
