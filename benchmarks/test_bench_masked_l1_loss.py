"""masked_l1_loss forward + backward on a step's target tokens: Triton vs the reference vs copy bandwidth.

Providers: "triton" (one pass: read pred and the target rows, write pred's gradient), "torch" (the reference;
target: the fused op >= 3x faster), "torch_compile" (`torch.compile` of the reference: inductor, dynamic=False, its
backward compiled by AOTAutograd; without CUDA only the smallest case) and "copy" (a device-to-device copy moving the
same bytes; target: the fused op at >= 70% of its GB/s). The loss is always differentiated: training never runs it
without backward.
"""

from __future__ import annotations

import functools

import pytest
import torch

from benchmarks.conftest import COMPILED, compile_reference
from benchmarks.shapes import ACT_DTYPE, DEVICE, Case, token_cases
from kernels import masked_l1_loss
from kernels.l1_loss import masked_l1_loss_ref

PROVIDERS = ("triton", "torch", COMPILED, "copy")


@functools.cache
def _smallest_case() -> str:
    return min(token_cases(), key=lambda c: c.masks().target_index.numel()).name


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", token_cases(), ids=lambda c: c.name)
def test_masked_l1_loss(bench, copy_baseline, case: Case, provider: str) -> None:
    masks = case.masks()
    token_index, segments = masks.target_index.to(DEVICE), masks.targets_per_generator
    t, d, rows = token_index.numel(), case.dim, case.batch * case.cfg.num_tokens
    e = torch.finfo(ACT_DTYPE).bits // 8
    # Minimum traffic: pred (T*D) and the gathered target rows (T*D) read once, pred's gradient (T*D) written once,
    # the index (8 B per row); the scalar loss is nothing. The full (B*N, D) target is never read in whole.
    bytes_moved = 3 * e * t * d + 8 * t

    if provider == "copy":
        fn = copy_baseline(bytes_moved)
    else:
        if provider == COMPILED:
            loss_fn = compile_reference(masked_l1_loss_ref, cpu_case=case.name == _smallest_case())
        else:
            loss_fn = functools.partial(masked_l1_loss, impl=provider)
        pred = torch.randn(t, d, device=DEVICE, dtype=ACT_DTYPE, requires_grad=True)
        target = torch.randn(rows, d, device=DEVICE, dtype=ACT_DTYPE)  # the EMA encoder's output, all N tokens

        def fn():  # autograd.grad, not backward(): pred is a leaf here, not in training, so no .grad to accumulate
            loss = loss_fn(pred, target, token_index, segments=segments)
            return torch.autograd.grad(loss, pred)

    bench(fn, op="masked_l1_loss", provider=provider, case=case.name, direction="fwd+bwd",
          shape={"T": t, "D": d, "target_rows": rows, "segments": list(segments)}, dtype=ACT_DTYPE,
          bytes_moved=bytes_moved)
