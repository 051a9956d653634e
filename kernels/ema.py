"""ema_: in-place target = m * target + (1 - m) * online over every parameter, in one multi-tensor launch.

Semantics (the reference, `ema_ref_`): `torch._foreach_mul_(target, m)` then `torch._foreach_add_(target, online,
alpha=1 - m)`, as dinov2 and our PyTorch step do.

Why the kernel pays: the EMA is pure bandwidth (read target and online, write target: 12 bytes per fp32 parameter),
but done per tensor it costs two launches for each of a ViT's ~400 parameter tensors, and the foreach pair still
reads and writes the target twice. One launch walks a table of (target pointer, online pointer, numel) entries in
place: the parameters stay where they are, with no flat copy in a second layout (DeepSpeed owns the optimizer's
layouts). With fp32 weights and ZeRO 1/2 every rank holds the full fp32 parameters after the step, so this is
exact; ZeRO-3 shards need a shard-wise variant (the engine's business).
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from . import dispatch

NUM_WARPS = 4
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@torch.no_grad()
def ema_ref_(target_params: Sequence[torch.Tensor], online_params: Sequence[torch.Tensor], momentum: float) -> None:
    """The specification: two foreach ops."""
    torch._foreach_mul_(list(target_params), momentum)
    torch._foreach_add_(list(target_params), list(online_params), alpha=1.0 - momentum)


# ----------------------------------------------------------------------------------------------------------------------
# kernel


@triton.jit
def _ema_kernel(
    TABLE, CHUNK_TENSOR, CHUNK_START, momentum, one_minus_momentum,
    # Meta-parameters
    TARGET_DTYPE: tl.constexpr, ONLINE_DTYPE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program per chunk of CHUNK elements of one tensor; TABLE rows are (target ptr, online ptr, numel)."""
    pid = tl.program_id(0)
    entry = TABLE + 3 * tl.load(CHUNK_TENSOR + pid).to(tl.int64)
    target = tl.load(entry).to(tl.pointer_type(TARGET_DTYPE))
    online = tl.load(entry + 1).to(tl.pointer_type(ONLINE_DTYPE))
    numel = tl.load(entry + 2)
    start = tl.load(CHUNK_START + pid)
    for i in range(0, tl.minimum(CHUNK, numel - start), BLOCK):  # a tensor's last chunk stops at its end
        offs = start + i + tl.arange(0, BLOCK)
        mask = offs < numel
        t = tl.load(target + offs, mask=mask).to(tl.float32)
        o = tl.load(online + offs, mask=mask).to(tl.float32)
        tl.store(target + offs, (t * momentum + one_minus_momentum * o).to(TARGET_DTYPE), mask=mask)


# (CHUNK, BLOCK): 64 Ki elements per program keeps launch tables short; 4 Ki per step keeps loads wide. The
# interpreter's are small so that tests with small tensors still cross chunk and block boundaries.
GPU_CHUNK = (65536, 4096)
INTERPRET_CHUNK = (256, 64)


def _chunk_size() -> tuple[int, int]:
    return INTERPRET_CHUNK if dispatch.interpreted() else GPU_CHUNK


class _Plan:
    """Pointer table and chunk map of one (target, online) list pair, built once and reused while the tensors'
    addresses and sizes stay the same (parameters are updated in place, so this holds for a whole run)."""

    def __init__(self, target: Sequence[torch.Tensor], online: Sequence[torch.Tensor], device: torch.device) -> None:
        chunk, _ = _chunk_size()
        table, chunk_tensor, chunk_start = [], [], []
        for i, (t, o) in enumerate(zip(target, online)):
            table += [t.data_ptr(), o.data_ptr(), t.numel()]
            starts = range(0, t.numel(), chunk)
            chunk_tensor += [i] * len(starts)
            chunk_start += list(starts)
        self.table = torch.tensor(table, dtype=torch.int64).to(device)
        self.chunk_tensor = torch.tensor(chunk_tensor, dtype=torch.int32).to(device)
        self.chunk_start = torch.tensor(chunk_start, dtype=torch.int64).to(device)
        self.num_chunks = len(chunk_start)


_plans: dict[tuple, _Plan] = {}


def _plan(target: Sequence[torch.Tensor], online: Sequence[torch.Tensor]) -> _Plan:
    key = tuple((t.data_ptr(), o.data_ptr(), t.numel()) for t, o in zip(target, online))
    if key not in _plans:
        if len(_plans) > 8:  # a few live parameter sets at most (a test suite builds many models)
            _plans.clear()
        _plans[key] = _Plan(target, online, target[0].device)
    return _plans[key]


def _check(target: Sequence[torch.Tensor], online: Sequence[torch.Tensor]) -> None:
    if len(target) != len(online):
        raise ValueError(f"ema_ got {len(target)} target tensors and {len(online)} online tensors")
    for i, (t, o) in enumerate(zip(target, online)):
        if t.shape != o.shape or t.device != o.device:
            raise ValueError(f"ema_ pair {i}: target {tuple(t.shape)} on {t.device} vs online {tuple(o.shape)} on "
                             f"{o.device}")
        if not (t.is_contiguous() and o.is_contiguous()):
            raise ValueError(f"ema_ pair {i}: the kernel walks flat memory, so both tensors must be contiguous")
        if t.dtype not in _TL_DTYPES or o.dtype not in _TL_DTYPES:
            raise ValueError(f"ema_ pair {i}: dtypes {t.dtype}/{o.dtype} not supported ({list(_TL_DTYPES)})")


@torch.no_grad()
def ema_(target_params: Sequence[torch.Tensor], online_params: Sequence[torch.Tensor], momentum: float, *,
         impl: str | None = None) -> None:
    """In place target = momentum * target + (1 - momentum) * online for each pair of tensors."""
    target, online = list(target_params), list(online_params)
    if not target:
        return
    if dispatch.resolve(impl, target[0].device) == "torch":
        return ema_ref_(target, online, momentum)
    _check(target, online)
    chunk, block = _chunk_size()
    # one launch per (target dtype, online dtype) pair: the element type of a pointer is a compile-time constant
    groups: dict[tuple[torch.dtype, torch.dtype], list[int]] = {}
    for i, (t, o) in enumerate(zip(target, online)):
        if t.numel():
            groups.setdefault((t.dtype, o.dtype), []).append(i)
    for (t_dtype, o_dtype), members in groups.items():
        plan = _plan([target[i] for i in members], [online[i] for i in members])
        dispatch.count("ema_")
        _ema_kernel[(plan.num_chunks,)](
            plan.table, plan.chunk_tensor, plan.chunk_start, float(momentum), 1.0 - float(momentum),
            TARGET_DTYPE=_TL_DTYPES[t_dtype], ONLINE_DTYPE=_TL_DTYPES[o_dtype], CHUNK=chunk, BLOCK=block,
            num_warps=NUM_WARPS, num_stages=1)
