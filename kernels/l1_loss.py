"""masked_l1_loss: parameter-free layer norm of the target rows, gather, L1 (or |d|^p) loss and pred's gradient.

Semantics (the reference, `masked_l1_loss_ref`): `mean(|pred - layer_norm(target)[token_index]|^p) / p` (layer norm
without affine, eps 1e-5, in fp32), computed per segment of rows and then averaged over segments: V-JEPA takes one
mean per mask generator and averages the generators, whatever their number of target tokens.

Why the kernel pays: the reference reads the (T, D) target rows to gather them, writes them, reads them to normalise,
writes the normalised copy, reads it and pred to subtract, writes the difference, reads it to reduce, and in
backward reads it again to write pred's gradient: about 9 passes over (T, D). The kernel reads each target row and
pred once and writes the derivative once (3 passes): d/dpred |d|^p = p |d|^(p-1) sign(d) is known in the forward
pass, so backward is one pass that scales each row by its segment's weight times the incoming gradient.
That product is formed in fp32 in backward, not folded into the stored derivative: a row's weight
1 / (segments * rows * D * p) is ~1e-8 at paper scale (ViT-H/384, batch 10: ~3e4 target rows per generator x 1280),
which fp16 rounds to 0 and which a loss scale (GradScaler's 65536, itself inf in fp16) only rescues if it multiplies
before the rounding. The stored derivative is sign(d) for p = 1, exact in pred's dtype; other exponents store it in
fp32 (a 16-bit copy would round it, then the scaled product again), so pred's gradient is rounded once either way.
The target gets no gradient: in V-JEPA it is the EMA encoder's output, computed without autograd.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import dispatch
from .offsets import row_starts

LN_EPS = 1e-5


def _segments(segments: Sequence[int] | None, rows: int) -> tuple[int, ...]:
    segs = (rows,) if segments is None else tuple(int(s) for s in segments)
    if sum(segs) != rows or any(s <= 0 for s in segs):
        raise ValueError(f"segments {segs} must be positive row counts summing to the {rows} rows of pred")
    return segs


def masked_l1_loss_ref(pred: torch.Tensor, target: torch.Tensor, token_index: torch.Tensor, *,
                       loss_exp: float = 1.0, segments: Sequence[int] | None = None) -> torch.Tensor:
    """The specification: layer norm, gather, |difference|^p, one mean per segment, average over segments, / p."""
    d = target.shape[-1]
    h = F.layer_norm(target.reshape(-1, d).float(), (d,), eps=LN_EPS).index_select(0, token_index)
    err = (pred.float() - h).abs()
    if loss_exp != 1.0:
        err = err.pow(loss_exp)
    per_segment = torch.stack([part.mean() for part in torch.split(err, list(_segments(segments, pred.shape[0])))])
    return per_segment.mean() / loss_exp


# ----------------------------------------------------------------------------------------------------------------------
# kernel


@triton.jit
def _row_weight(rows, SEG_END, SEG_SCALE, NUM_SEGMENTS: tl.constexpr, BLOCK_R: tl.constexpr):
    """Each row's weight (fp32): its segment's share of the loss, SEG_SCALE[g] for the rows of segment g."""
    weight = tl.zeros((BLOCK_R,), dtype=tl.float32)
    seg_start = 0
    for g in tl.static_range(NUM_SEGMENTS):
        seg_end = tl.load(SEG_END + g)
        weight = tl.where((rows >= seg_start) & (rows < seg_end), tl.load(SEG_SCALE + g), weight)
        seg_start = seg_end
    return weight


# the token count T changes every step: not specialised (a multiple of 16 or not would compile a second variant)
@triton.jit(do_not_specialize=["T"])
def _l1_loss_kernel(
    PRED, TARGET, INDEX, GRAD, PARTIAL, SEG_END, SEG_SCALE,
    T, D, loss_exp, eps,
    # strides
    s_pred, s_target, s_grad,
    # Meta-parameters
    NUM_SEGMENTS: tl.constexpr, EXP_IS_ONE: tl.constexpr, WRITE_GRAD: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """BLOCK_R rows per program. PARTIAL[pid] = sum_rows w_row * sum_d |d|^p; GRAD = p |d|^(p-1) sign(d), unweighted
    (`_scale_rows_kernel` applies w_row in backward).

    w_row = 1 / (segments * rows_of_its_segment * D * p), so the loss is the sum of the partials.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < T
    mask = row_mask[:, None] & (cols < D)[None, :]

    # layer norm of the gathered target rows, in fp32
    src = tl.load(INDEX + rows, mask=row_mask, other=0).to(tl.int64)
    x = tl.load(TARGET + src[:, None] * s_target + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
    diff = tl.load(PRED + row_starts(rows, s_pred)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32) \
        - xc * rstd[:, None]

    weight = _row_weight(rows, SEG_END, SEG_SCALE, NUM_SEGMENTS, BLOCK_R)
    mag = tl.abs(diff)
    sign = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))  # torch's abs'(0) = 0
    if EXP_IS_ONE:
        err = mag
        grad = sign
    else:
        safe = tl.where(mag > 0, mag, 1.0)
        err = tl.where(mag > 0, tl.exp2(loss_exp * tl.log2(safe)), 0.0)
        grad = tl.where(mag > 0, loss_exp * tl.exp2((loss_exp - 1.0) * tl.log2(safe)), 0.0) * sign
    tl.store(PARTIAL + pid, tl.sum(tl.sum(tl.where(mask, err, 0.0), axis=1) * weight, axis=0))
    if WRITE_GRAD:
        tl.store(GRAD + row_starts(rows, s_grad)[:, None] + cols[None, :], grad.to(GRAD.dtype.element_ty),
                 mask=mask)


@triton.jit(do_not_specialize=["T"])
def _scale_rows_kernel(
    GRAD, OUT, SEG_END, SEG_SCALE, GRAD_LOSS,
    T, D,
    s_grad, s_out,
    NUM_SEGMENTS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """OUT = GRAD * (w_row * GRAD_LOSS), the product in fp32 and one rounding to OUT's dtype (the reference path's
    rounding: its fp32 gradient is cast to pred's dtype once). GRAD_LOSS is read on the device: no host sync."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < T)[:, None] & (cols < D)[None, :]
    scale = _row_weight(rows, SEG_END, SEG_SCALE, NUM_SEGMENTS, BLOCK_R) * tl.load(GRAD_LOSS).to(tl.float32)
    g = tl.load(GRAD + row_starts(rows, s_grad)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row_starts(rows, s_out)[:, None] + cols[None, :], (g * scale[:, None]).to(OUT.dtype.element_ty),
             mask=mask)


INTERPRET_ROWS = 4  # rows per program under the interpreter: small tests still span several programs


def _block_rows(block_d: int) -> int:
    """About 4096 fp32 values per operand tile: enough bytes in flight per program without register spills."""
    if dispatch.interpreted():
        return INTERPRET_ROWS
    return max(1, min(64, 4096 // block_d))


def _num_warps(block_d: int) -> int:
    return 4 if block_d <= 1024 else 8


def _segment_tables(segments: tuple[int, ...], d: int, loss_exp: float,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(end row, weight) per segment on the device. Host-side constants travel with the launch: no device sync."""
    seg_end = torch.tensor(list(itertools.accumulate(segments)), dtype=torch.int32).to(device, non_blocking=True)
    seg_scale = torch.tensor([1.0 / (len(segments) * s * d * loss_exp) for s in segments],
                             dtype=torch.float32).to(device, non_blocking=True)
    return seg_end, seg_scale


def _loss_forward(pred: torch.Tensor, target: torch.Tensor, token_index: torch.Tensor, loss_exp: float,
                  seg_end: torch.Tensor, seg_scale: torch.Tensor,
                  write_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    t, d = pred.shape
    block_d = triton.next_power_of_2(d)
    block_r = _block_rows(block_d)
    programs = triton.cdiv(t, block_r)
    partial = torch.empty(programs, device=pred.device, dtype=torch.float32)
    # |d|^(p-1) p sign(d) is exactly +-1 or 0 for p = 1 (pred's dtype holds it); other exponents keep it in fp32 until
    # the backward's row scale rounds once to pred's dtype
    grad = torch.empty_like(pred, dtype=pred.dtype if loss_exp == 1.0 else torch.float32) if write_grad else None
    dispatch.count("masked_l1_loss")
    _l1_loss_kernel[(programs,)](
        pred, target, token_index, grad if grad is not None else pred, partial, seg_end, seg_scale,
        t, d, float(loss_exp), LN_EPS,
        pred.stride(0), target.stride(0), grad.stride(0) if grad is not None else 0,
        NUM_SEGMENTS=seg_end.numel(), EXP_IS_ONE=loss_exp == 1.0, WRITE_GRAD=write_grad,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=_num_warps(block_d), num_stages=1)
    return partial.sum(), grad


def _scale_rows(grad: torch.Tensor, seg_end: torch.Tensor, seg_scale: torch.Tensor, grad_loss: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    t, d = grad.shape
    out = torch.empty_like(grad, dtype=dtype)
    block_d = triton.next_power_of_2(d)
    block_r = _block_rows(block_d)
    _scale_rows_kernel[(triton.cdiv(t, block_r),)](
        grad, out, seg_end, seg_scale, grad_loss.float(), t, d, grad.stride(0), out.stride(0),
        NUM_SEGMENTS=seg_end.numel(), BLOCK_R=block_r, BLOCK_D=block_d, num_warps=_num_warps(block_d), num_stages=1)
    return out


class _MaskedL1Loss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, target, token_index, loss_exp, segments):
        seg_end, seg_scale = _segment_tables(segments, pred.shape[1], loss_exp, pred.device)
        loss, grad = _loss_forward(pred, target, token_index, loss_exp, seg_end, seg_scale, ctx.needs_input_grad[0])
        ctx.save_for_backward(grad, seg_end, seg_scale)
        ctx.pred_dtype = pred.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad, seg_end, seg_scale = ctx.saved_tensors
        return _scale_rows(grad, seg_end, seg_scale, grad_loss, ctx.pred_dtype), None, None, None, None


def masked_l1_loss(pred: torch.Tensor, target: torch.Tensor, token_index: torch.Tensor, *, loss_exp: float = 1.0,
                   segments: Sequence[int] | None = None, impl: str | None = None) -> torch.Tensor:
    """pred (T, D); target (B*N, D) or (B, N, D), a constant; token_index (T,) int64 rows of target; segments: row
    counts of pred's consecutive segments (None: one) -> fp32 scalar."""
    if dispatch.resolve(impl, pred.device) == "torch":
        return masked_l1_loss_ref(pred, target, token_index, loss_exp=loss_exp, segments=segments)
    d = target.shape[-1]
    if pred.dim() != 2 or pred.shape[1] != d or token_index.shape != pred.shape[:1]:
        raise ValueError(f"pred must be (T, D) with one token_index per row and D = target's last dim; got pred "
                         f"{tuple(pred.shape)}, target {tuple(target.shape)}, token_index {tuple(token_index.shape)}")
    if target.requires_grad:
        raise ValueError("masked_l1_loss treats target as a constant (V-JEPA's EMA target); detach it, or use "
                         "impl='torch' to differentiate through the layer norm")
    if loss_exp <= 0:
        raise ValueError(f"loss_exp must be positive, got {loss_exp}")
    target = target.reshape(-1, d)
    pred, target = (x if x.stride(-1) == 1 else x.contiguous() for x in (pred, target))
    return _MaskedL1Loss.apply(pred, target, token_index.contiguous(),  # the kernel reads ids at INDEX + row
                               float(loss_exp), _segments(segments, pred.shape[0]))
