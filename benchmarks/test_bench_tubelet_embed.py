"""masked_tubelet_embed on the context tokens of a step: Triton vs the reference vs a bare cuBLAS GEMM.

Providers: "triton" (the fused op), "torch" (the reference: gather the kept tubelets into a (T, K) matrix, then
F.linear and the position rows), "torch_compile" (`torch.compile` of that reference: inductor, dynamic=False; the
backward is the one AOTAutograd compiles; without CUDA only the smallest case's fwd+bwd) and "cublas_mm" (torch.mm of
an already gathered (T, K) matrix with the (K, D) weight: the ceiling of the GEMM alone; target: the fused op at >= 60%
of its TFLOP/s). Forward, and forward plus the backward that training runs (weight and bias gradients; the clip and
the frozen position table need none).
"""

from __future__ import annotations

import functools

import pytest
import torch

from benchmarks.conftest import COMPILED, compile_reference
from benchmarks.shapes import ACT_DTYPE, DEVICE, Case, token_cases
from kernels import masked_tubelet_embed
from kernels.tubelet_embed import masked_tubelet_embed_ref

PROVIDERS = ("triton", "torch", COMPILED, "cublas_mm")
DIRECTIONS = ("fwd", "fwd+bwd")
CPU_COMPILED_DIRECTION = "fwd+bwd"  # the one compiled case without CUDA: it compiles the forward and the backward


@functools.cache
def _smallest_case() -> str:
    return min(token_cases(), key=lambda c: c.masks().context_index.numel()).name


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("case", token_cases(), ids=lambda c: c.name)
def test_tubelet_embed(bench, case: Case, direction: str, provider: str) -> None:
    backward = direction == "fwd+bwd"
    token_index = case.masks().context_index.to(DEVICE)
    (b, c, f, h, w), (kt, kp, _), d = case.video_shape, case.kernel, case.dim
    n, t, k = case.cfg.num_tokens, token_index.numel(), c * kt * kp * kp
    e = torch.finfo(ACT_DTYPE).bits // 8

    def randn(*shape: int, scale: float = 1.0, grad: bool = False) -> torch.Tensor:
        x = torch.randn(*shape, device=DEVICE, dtype=torch.float32).mul_(scale).to(ACT_DTYPE)
        return x.requires_grad_(grad)

    grad_out = randn(t, d)
    if provider == "cublas_mm":
        # which pixels fill the (T, K) matrix does not change a GEMM's speed, so random rows stand for the gather
        patches, weight_t = randn(t, k), randn(k, d, scale=k ** -0.5)
        if backward:
            def fn():  # the two GEMMs of the op's forward + backward: Y = A W^T and dW = dY^T A
                return torch.mm(patches, weight_t), torch.mm(grad_out.t(), patches)
        else:
            def fn():
                return torch.mm(patches, weight_t)
    else:
        if provider == COMPILED:
            embed = compile_reference(masked_tubelet_embed_ref, cpu_case=case.name == _smallest_case()
                                      and direction == CPU_COMPILED_DIRECTION)
        else:
            embed = functools.partial(masked_tubelet_embed, impl=provider)
        video, pos_embed = randn(b, c, f, h, w), randn(n, d, scale=0.02)
        weight, bias = randn(d, c, kt, kp, kp, scale=k ** -0.5, grad=backward), randn(d, scale=0.02, grad=backward)
        if backward:
            def fn():
                out = embed(video, weight, bias, pos_embed, token_index)
                return torch.autograd.grad(out, (weight, bias), grad_out)
        else:
            def fn():
                return embed(video, weight, bias, pos_embed, token_index)

    # Minimum traffic. Forward: the kept tubelets' pixels (T*K), weight (K*D), bias, the kept position rows (T*D),
    # the index (8 B per token), the output (T*D). Backward: dY (T*D), the pixels again (the fused op re-gathers
    # them rather than keep a (T, K) copy alive), the index, and dW, db. FLOPs: one (T, K) x (K, D) GEMM each way.
    bytes_moved = e * (t * k + k * d + d + 2 * t * d) + 8 * t
    if backward:
        bytes_moved += e * (t * d + t * k + k * d + d) + 8 * t
    bench(fn, op="tubelet_embed", provider=provider, case=case.name, direction=direction,
          shape={"B": b, "grid": list(case.cfg.grid), "N": n, "T": t, "K": k, "D": d}, dtype=ACT_DTYPE,
          bytes_moved=bytes_moved, flops=2 * t * k * d * (2 if backward else 1))
