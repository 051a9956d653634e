"""Attention on the step's three token-set shapes: every backend that runs here, forward and forward+backward.

Cases, per model of benchmarks/shapes.py (`attention_case` in extra_info is the key of models/attention_table.json):
- dense_predictor: S = 2B sequences of N tokens (both mask generators' predictor sequences) in V1's head layout
  (16x24: the encoder's 16 heads over the 384-wide predictor) and in V2's (12x32). Both do the same useful FLOPs
  (16 * 24 = 12 * 32), so the two rows of a model read directly as the V2-vs-V1 head-layout comparison.
- dense_target: B sequences of N tokens in the encoder's layout (ViT-L 16x64, ViT-H 16x80).
- ragged_context: the context sets of the real mask sampler (`StepMasks.context_packing`, every generator's sequences
  in one call) in the encoder's layout.
q, k, v are strided views of one (T, 3, H, Dh) projection, as in the model. Providers are the backends of
models/attention.py; "sdpa_padded" pads each mask generator's set to its own longest sequence, as the reference's one
encoder pass per generator would without truncation. A provider that cannot run here is skipped with its reason.
TFLOP/s counts useful FLOPs only: 4 * sum(L_s^2) * H * Dh forward, 2.5x that forward+backward. The triton rows also
record the fraction of the kernel's tile work spent on padding. Without CUDA: the tiny case at batch 1 and 4 frames,
one head (the interpreter simulates one program at a time, ~5 ms per tile pair), and the backends a CPU has.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import pytest
import torch

from benchmarks.shapes import ACT_DTYPE, CUDA, DEVICE, model_cases
from engine.build import encoder_variant
from kernels.varlen_attention import bwd_config, fwd_config, head_dim_split
from models import Packing
from models.attention import BACKENDS
from models.attention_backends import BackendUnavailable

PROVIDERS = ("triton", "torch_varlen", "flash_attn", "xformers", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa",
             "sdpa_padded") if CUDA else ("triton", "sdpa", "sdpa_flash", "sdpa_math", "sdpa_padded", "reference")
DIRECTIONS = ("fwd", "fwd+bwd")
PREDICTOR_LAYOUTS = {"V1": (16, 24), "V2": (12, 32)}  # (heads, head dim) of the 384-wide predictor
# the tiny case shrunk further: the interpreted kernel's time grows with (tokens / 16)^2 per sequence and head
CPU_OVERRIDES = ("--data.batch_size=1", "--data.num_frames=4")


@dataclass(frozen=True)
class AttentionCase:
    name: str
    kind: str  # dense_predictor | dense_target | ragged_context
    heads: int
    head_dim: int
    seqlens: tuple[int, ...]
    generators: int  # mask generators: the sequences split into this many equal-count sets (for sdpa_padded)


def _heads(heads: int) -> int:
    return heads if CUDA else 1


def attention_cases() -> list[AttentionCase]:
    """Most important first (gpu_session.sh may run out of time): predictor, context encoder, target encoder."""
    by_kind: dict[str, list[AttentionCase]] = {"dense_predictor": [], "ragged_context": [], "dense_target": []}
    for case in (model_cases() if CUDA else model_cases(*CPU_OVERRIDES)):
        b, n, gens, v = case.batch, case.cfg.num_tokens, len(case.cfg.mask), encoder_variant(case.cfg)
        enc_heads, enc_dim = _heads(v.heads), v.dim // v.heads
        for version, (heads, dim) in PREDICTOR_LAYOUTS.items():
            by_kind["dense_predictor"].append(AttentionCase(
                f"{case.name}-dense_predictor-{version}-{_heads(heads)}x{dim}", "dense_predictor", _heads(heads), dim,
                (n,) * (gens * b), gens))
        by_kind["ragged_context"].append(AttentionCase(
            f"{case.name}-ragged_context-{enc_heads}x{enc_dim}", "ragged_context", enc_heads, enc_dim,
            case.masks().context_packing.seqlens, gens))
        by_kind["dense_target"].append(AttentionCase(
            f"{case.name}-dense_target-{enc_heads}x{enc_dim}", "dense_target", enc_heads, enc_dim, (n,) * b, 1))
    return [c for cases in by_kind.values() for c in cases]


@functools.cache
def _why_not(provider: str, head_dim: int) -> str | None:
    """Why `provider` cannot run ACT_DTYPE inputs of this head dim here (one tiny call tells), or None."""
    qkv = torch.randn(8, 3, 1, head_dim, device=DEVICE, dtype=ACT_DTYPE)
    try:
        BACKENDS[provider](qkv[:, 0], qkv[:, 1], qkv[:, 2], Packing.uniform(1, 8, DEVICE))
    except (ImportError, BackendUnavailable) as e:
        return str(e)
    except NotImplementedError as e:  # kernels/varlen_attention.py while its Triton kernel is being written
        return f"kernel not landed ({e})"
    return None


def tile_waste(seqlens: tuple[int, ...], head_dim: int, backward: bool) -> dict[str, float]:
    """Fractions of the Triton kernel's tile work spent on padding, from its own head-dim split and launch
    configurations: the head dim, the query x key sequence tiles, and both. Forward+backward weighs the forward's 2
    tile products per tile pair against the backward's 7 (dK/dV: 4, dQ: 3, the probabilities recomputed)."""
    def tiled(block_m: int, block_n: int) -> int:
        return sum(math.ceil(n / block_m) * block_m * math.ceil(n / block_n) * block_n for n in seqlens)

    fwd, bwd = fwd_config(head_dim), bwd_config(head_dim)
    work = tiled(fwd.block_m, fwd.block_n)
    if backward:
        work = (2 * work + 7 * tiled(bwd.block_m, bwd.block_n)) / 9
    useful, padded_dim = sum(n * n for n in seqlens), sum(head_dim_split(head_dim))
    return {"tile_waste_head_dim": 1 - head_dim / padded_dim, "tile_waste_seq": 1 - useful / work,
            "tile_waste": 1 - useful * head_dim / (work * padded_dim)}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("case", attention_cases(), ids=lambda c: c.name)
def test_attention(bench, case: AttentionCase, direction: str, provider: str) -> None:
    why = _why_not(provider, case.head_dim)
    if why is not None:
        pytest.skip(why)
    backward = direction == "fwd+bwd"
    backend, total, (h, d) = BACKENDS[provider], sum(case.seqlens), (case.heads, case.head_dim)
    qkv = torch.randn(total, 3, h, d, device=DEVICE, dtype=ACT_DTYPE, requires_grad=backward)
    q, k, v = qkv.unbind(1)  # strided views, as the model's Attention passes them
    # (rows, packing) per call: one call over everything, except sdpa_padded, which pads each generator's set alone
    parts = case.generators if provider == "sdpa_padded" else 1
    per_part = len(case.seqlens) // parts
    calls, row = [], 0
    for i in range(parts):
        lens = case.seqlens[i * per_part:(i + 1) * per_part]
        calls.append((slice(row, row + sum(lens)), Packing.from_seqlens(lens, DEVICE)))
        row += sum(lens)

    def forward() -> torch.Tensor:
        outs = [backend(q[rows], k[rows], v[rows], packing) for rows, packing in calls]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    if backward:
        grad_out = torch.randn(total, h, d, device=DEVICE, dtype=ACT_DTYPE)

        def fn():
            return torch.autograd.grad(forward(), qkv, grad_out)
    else:
        fn = forward

    # Minimum traffic: forward reads q, k, v and writes the output; backward reads q, k, v, the output and its
    # gradient and writes dq, dk, dv.
    e = torch.finfo(ACT_DTYPE).bits // 8
    flops = 4 * sum(n * n for n in case.seqlens) * h * d
    extra = {"attention_case": case.kind, "heads": h, "head_dim": d, "num_seqs": len(case.seqlens),
             "max_seqlen": max(case.seqlens)}
    if provider == "triton":
        extra.update(tile_waste(case.seqlens, d, backward))
    bench(fn, op="attention", provider=provider, case=case.name, direction=direction,
          shape={"T": total, "S": len(case.seqlens), "H": h, "Dh": d}, dtype=ACT_DTYPE,
          bytes_moved=e * total * h * d * (12 if backward else 4), flops=int(flops * (2.5 if backward else 1)),
          extra_info=extra)
