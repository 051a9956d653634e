"""ema_ over the encoder's real parameter list: Triton vs the reference vs foreach lerp vs copy bandwidth.

Providers: "triton" (one multi-tensor launch), "torch" (the reference: `_foreach_mul_` then `_foreach_add_`, which
reads and writes the target twice), "torch_compile" (`torch.compile` of the reference: inductor, dynamic=False, which
may fuse the two passes; without CUDA only the smallest case), "foreach_lerp" (`torch._foreach_lerp_`, PyTorch's
one-pass alternative) and "copy" (a device-to-device copy moving the same bytes; target: the fused op at >= 80% of its
GB/s).
"""

from __future__ import annotations

import functools

import pytest
import torch

from benchmarks.conftest import COMPILED, compile_reference
from benchmarks.shapes import DEVICE, PARAM_DTYPE, Case, model_cases
from kernels import ema_
from kernels.ema import ema_ref_

PROVIDERS = ("triton", "torch", COMPILED, "foreach_lerp", "copy")
MOMENTUM = 0.998  # the recipes' starting EMA momentum; the speed does not depend on it


@functools.cache
def _smallest_case() -> str:
    return min(model_cases(), key=lambda c: sum(s.numel() for s in c.param_shapes())).name


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", model_cases(), ids=lambda c: c.name)
def test_ema(bench, copy_baseline, case: Case, provider: str) -> None:
    shapes = case.param_shapes()
    numel = sum(s.numel() for s in shapes)
    # Minimum traffic: read target and online, write target, once each: 3 * 4 B per fp32 parameter.
    bytes_moved = 3 * torch.finfo(PARAM_DTYPE).bits // 8 * numel

    if provider == "copy":
        fn = copy_baseline(bytes_moved)
    else:
        target = [torch.randn(s, device=DEVICE, dtype=PARAM_DTYPE) for s in shapes]
        online = [torch.randn(s, device=DEVICE, dtype=PARAM_DTYPE) for s in shapes]
        if provider == "foreach_lerp":
            def fn():  # t + (1 - m) * (o - t) = m * t + (1 - m) * o
                torch._foreach_lerp_(target, online, 1.0 - MOMENTUM)
        elif provider == COMPILED:
            ema_compiled = compile_reference(ema_ref_, cpu_case=case.name == _smallest_case())

            def fn():
                ema_compiled(target, online, MOMENTUM)
        else:
            def fn():
                ema_(target, online, MOMENTUM, impl=provider)

    bench(fn, op="ema", provider=provider, case=case.name, direction="update",
          shape={"tensors": len(shapes), "params": numel}, dtype=PARAM_DTYPE, bytes_moved=bytes_moved)
