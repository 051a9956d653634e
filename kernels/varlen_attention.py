"""varlen_attention: softmax(q k^T * scale) v within each packed sequence, flash style, forward and backward.

Semantics (the reference, `varlen_attention_ref`): sequence s owns rows cu_seqlens[s]:cu_seqlens[s+1] of the packed
(T, H, Dh) q, k, v; attention never crosses sequences. Nothing is padded: a program owns BLOCK_M query rows of one
(sequence, head) and walks that sequence's keys in BLOCK_N tiles with an online softmax, so the T x T (or L x L)
score matrix is never stored. Forward saves only the output and the per-row log-sum-exp; backward recomputes the
probabilities tile by tile (one kernel for dK/dV over key tiles, one for dQ over query tiles: no atomics, so the
gradients are deterministic).

Head dims that are not powers of two (V-JEPA's 24 in the V1 predictor, ViT-H's 80, 88) are split into two
power-of-two parts instead of padded to the next power: 80 = 64 + 16 and 88 = 64 + 32 cost 80 and 96 lanes per
row where one tile would cost 128 (24 = 16 + 16 costs the same as 32). Every product over the head dim is the sum of
the two parts' products, and every tensor over it is kept as two tiles.

Equal lengths (target encoder, predictor without truncation) are the dense special case: the grid then has no idle
programs. Tile sizes are per head dim and per dtype, compiled for sm_90 by `kernels.aot`; they are first choices
until measured on a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import dispatch

LOG2E = math.log2(math.e)


def varlen_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                         max_seqlen: int, *, scale: float | None = None) -> torch.Tensor:
    """The specification: one sequence at a time, fp32 softmax. q, k, v (T, H, Dh) -> (T, H, Dh) in q's dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs = []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (x[start:end].transpose(0, 1).float() for x in (q, k, v))  # (H, L, Dh)
        p = torch.softmax(qs @ ks.transpose(1, 2) * scale, dim=-1)
        outs.append((p @ vs).transpose(0, 1).to(q.dtype))
    return torch.cat(outs) if outs else q.new_empty(q.shape)


# ----------------------------------------------------------------------------------------------------------------------
# kernels. Pointers to (T, H, Dh) tensors take a token stride and a head stride; the head dim is contiguous.


@triton.jit
def _load_rows(PTR, tokens, token_mask, s_t, dims, HEAD_DIM: tl.constexpr):
    """(rows, dims) tile of one head: rows are tokens, columns head-dim lanes (lanes >= HEAD_DIM read as 0)."""
    return tl.load(PTR + tokens[:, None] * s_t + dims[None, :], mask=token_mask[:, None] & (dims < HEAD_DIM)[None, :],
                   other=0.0)


@triton.jit
def _store_rows(PTR, tile, tokens, token_mask, s_t, dims, HEAD_DIM: tl.constexpr):
    tl.store(PTR + tokens[:, None] * s_t + dims[None, :], tile.to(PTR.dtype.element_ty),
             mask=token_mask[:, None] & (dims < HEAD_DIM)[None, :])


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, CU_SEQLENS,
    scale_log2,
    # strides
    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_ot, s_oh, s_lt,
    # Meta-parameters
    HEAD_DIM: tl.constexpr, D_A: tl.constexpr, D_B: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_ALIGN: tl.constexpr,
):
    pid_m = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    start = tl.load(CU_SEQLENS + seq)
    seqlen = tl.load(CU_SEQLENS + seq + 1) - start
    if pid_m * BLOCK_M >= seqlen:  # the grid covers the longest sequence; shorter ones leave programs idle
        return
    Q += start.to(tl.int64) * s_qt + tl.multiple_of(head * s_qh, HEAD_ALIGN)
    K += start.to(tl.int64) * s_kt + tl.multiple_of(head * s_kh, HEAD_ALIGN)
    V += start.to(tl.int64) * s_vt + tl.multiple_of(head * s_vh, HEAD_ALIGN)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < seqlen
    dims_a = tl.arange(0, D_A)
    q_a = _load_rows(Q, rows, row_mask, s_qt, dims_a, HEAD_DIM)
    acc_a = tl.zeros((BLOCK_M, D_A), dtype=tl.float32)
    if D_B > 0:
        dims_b = D_A + tl.arange(0, D_B)
        q_b = _load_rows(Q, rows, row_mask, s_qt, dims_b, HEAD_DIM)
        acc_b = tl.zeros((BLOCK_M, D_B), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)

    for n0 in range(0, seqlen, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < seqlen
        # scores in log2 units: exp2 is the hardware's native exponential
        s = tl.dot(q_a, tl.trans(_load_rows(K, cols, col_mask, s_kt, dims_a, HEAD_DIM)),
                   input_precision=DOT_PRECISION)
        if D_B > 0:
            s += tl.dot(q_b, tl.trans(_load_rows(K, cols, col_mask, s_kt, dims_b, HEAD_DIM)),
                        input_precision=DOT_PRECISION)
        s = tl.where(col_mask[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_a = _load_rows(V, cols, col_mask, s_vt, dims_a, HEAD_DIM)
        acc_a = acc_a * alpha[:, None] + tl.dot(p.to(v_a.dtype), v_a, input_precision=DOT_PRECISION)
        if D_B > 0:
            v_b = _load_rows(V, cols, col_mask, s_vt, dims_b, HEAD_DIM)
            acc_b = acc_b * alpha[:, None] + tl.dot(p.to(v_b.dtype), v_b, input_precision=DOT_PRECISION)
        m_i = m_new

    O += start.to(tl.int64) * s_ot + tl.multiple_of(head * s_oh, HEAD_ALIGN)
    _store_rows(O, acc_a / l_i[:, None], rows, row_mask, s_ot, dims_a, HEAD_DIM)
    if D_B > 0:
        _store_rows(O, acc_b / l_i[:, None], rows, row_mask, s_ot, dims_b, HEAD_DIM)
    tl.store(LSE + (start + rows).to(tl.int64) * s_lt + head, m_i + tl.math.log2(l_i), mask=row_mask)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_SEQLENS,
    scale, scale_log2,
    # strides (DO, DK, DV are contiguous (T, H, Dh) like the output; LSE and DELTA are (T, H))
    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_gt, s_gh, s_lt,
    # Meta-parameters
    HEAD_DIM: tl.constexpr, D_A: tl.constexpr, D_B: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_ALIGN: tl.constexpr,
):
    """One program per BLOCK_N keys of one (sequence, head), walking the sequence's queries.

    With P = softmax(S) row-wise and dO the output gradient: dV = P^T dO, dP = dO V^T,
    dS = P * (dP - delta) with delta_i = sum_j P_ij dP_ij = dO_i . O_i, and dK = scale * dS^T Q.
    Computed transposed (keys as rows) so every product accumulates into this program's tiles.
    """
    pid_n = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    start = tl.load(CU_SEQLENS + seq)
    seqlen = tl.load(CU_SEQLENS + seq + 1) - start
    if pid_n * BLOCK_N >= seqlen:
        return
    Q += start.to(tl.int64) * s_qt + tl.multiple_of(head * s_qh, HEAD_ALIGN)
    K += start.to(tl.int64) * s_kt + tl.multiple_of(head * s_kh, HEAD_ALIGN)
    V += start.to(tl.int64) * s_vt + tl.multiple_of(head * s_vh, HEAD_ALIGN)
    DO += start.to(tl.int64) * s_gt + tl.multiple_of(head * s_gh, HEAD_ALIGN)
    LSE += start.to(tl.int64) * s_lt + head
    DELTA += start.to(tl.int64) * s_lt + head
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < seqlen
    dims_a = tl.arange(0, D_A)
    k_a = _load_rows(K, cols, col_mask, s_kt, dims_a, HEAD_DIM)
    v_a = _load_rows(V, cols, col_mask, s_vt, dims_a, HEAD_DIM)
    dk_a = tl.zeros((BLOCK_N, D_A), dtype=tl.float32)
    dv_a = tl.zeros((BLOCK_N, D_A), dtype=tl.float32)
    if D_B > 0:
        dims_b = D_A + tl.arange(0, D_B)
        k_b = _load_rows(K, cols, col_mask, s_kt, dims_b, HEAD_DIM)
        v_b = _load_rows(V, cols, col_mask, s_vt, dims_b, HEAD_DIM)
        dk_b = tl.zeros((BLOCK_N, D_B), dtype=tl.float32)
        dv_b = tl.zeros((BLOCK_N, D_B), dtype=tl.float32)

    for m0 in range(0, seqlen, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < seqlen
        q_a = _load_rows(Q, rows, row_mask, s_qt, dims_a, HEAD_DIM)
        do_a = _load_rows(DO, rows, row_mask, s_gt, dims_a, HEAD_DIM)
        s_t = tl.dot(k_a, tl.trans(q_a), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        if D_B > 0:
            q_b = _load_rows(Q, rows, row_mask, s_qt, dims_b, HEAD_DIM)
            do_b = _load_rows(DO, rows, row_mask, s_gt, dims_b, HEAD_DIM)
            s_t += tl.dot(k_b, tl.trans(q_b), input_precision=DOT_PRECISION)
        lse = tl.load(LSE + rows.to(tl.int64) * s_lt, mask=row_mask, other=0.0)
        delta = tl.load(DELTA + rows.to(tl.int64) * s_lt, mask=row_mask, other=0.0)
        p_t = tl.where(row_mask[None, :], tl.math.exp2(s_t * scale_log2 - lse[None, :]), 0.0)
        dp_t = tl.dot(v_a, tl.trans(do_a), input_precision=DOT_PRECISION)
        dv_a += tl.dot(p_t.to(do_a.dtype), do_a, input_precision=DOT_PRECISION)
        if D_B > 0:
            dp_t += tl.dot(v_b, tl.trans(do_b), input_precision=DOT_PRECISION)
            dv_b += tl.dot(p_t.to(do_b.dtype), do_b, input_precision=DOT_PRECISION)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q_a.dtype)
        dk_a += tl.dot(ds_t, q_a, input_precision=DOT_PRECISION)
        if D_B > 0:
            dk_b += tl.dot(ds_t, q_b, input_precision=DOT_PRECISION)

    DK += start.to(tl.int64) * s_gt + tl.multiple_of(head * s_gh, HEAD_ALIGN)
    DV += start.to(tl.int64) * s_gt + tl.multiple_of(head * s_gh, HEAD_ALIGN)
    _store_rows(DK, dk_a * scale, cols, col_mask, s_gt, dims_a, HEAD_DIM)
    _store_rows(DV, dv_a, cols, col_mask, s_gt, dims_a, HEAD_DIM)
    if D_B > 0:
        _store_rows(DK, dk_b * scale, cols, col_mask, s_gt, dims_b, HEAD_DIM)
        _store_rows(DV, dv_b, cols, col_mask, s_gt, dims_b, HEAD_DIM)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_SEQLENS,
    scale, scale_log2,
    # strides
    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_gt, s_gh, s_lt,
    # Meta-parameters
    HEAD_DIM: tl.constexpr, D_A: tl.constexpr, D_B: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_ALIGN: tl.constexpr,
):
    """One program per BLOCK_M queries of one (sequence, head): dQ = scale * dS K, dS recomputed as in dK/dV."""
    pid_m = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    start = tl.load(CU_SEQLENS + seq)
    seqlen = tl.load(CU_SEQLENS + seq + 1) - start
    if pid_m * BLOCK_M >= seqlen:
        return
    Q += start.to(tl.int64) * s_qt + tl.multiple_of(head * s_qh, HEAD_ALIGN)
    K += start.to(tl.int64) * s_kt + tl.multiple_of(head * s_kh, HEAD_ALIGN)
    V += start.to(tl.int64) * s_vt + tl.multiple_of(head * s_vh, HEAD_ALIGN)
    DO += start.to(tl.int64) * s_gt + tl.multiple_of(head * s_gh, HEAD_ALIGN)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < seqlen
    dims_a = tl.arange(0, D_A)
    q_a = _load_rows(Q, rows, row_mask, s_qt, dims_a, HEAD_DIM)
    do_a = _load_rows(DO, rows, row_mask, s_gt, dims_a, HEAD_DIM)
    dq_a = tl.zeros((BLOCK_M, D_A), dtype=tl.float32)
    if D_B > 0:
        dims_b = D_A + tl.arange(0, D_B)
        q_b = _load_rows(Q, rows, row_mask, s_qt, dims_b, HEAD_DIM)
        do_b = _load_rows(DO, rows, row_mask, s_gt, dims_b, HEAD_DIM)
        dq_b = tl.zeros((BLOCK_M, D_B), dtype=tl.float32)
    lse = tl.load(LSE + (start + rows).to(tl.int64) * s_lt + head, mask=row_mask, other=0.0)
    delta = tl.load(DELTA + (start + rows).to(tl.int64) * s_lt + head, mask=row_mask, other=0.0)

    for n0 in range(0, seqlen, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < seqlen
        k_a = _load_rows(K, cols, col_mask, s_kt, dims_a, HEAD_DIM)
        v_a = _load_rows(V, cols, col_mask, s_vt, dims_a, HEAD_DIM)
        s = tl.dot(q_a, tl.trans(k_a), input_precision=DOT_PRECISION)
        dp = tl.dot(do_a, tl.trans(v_a), input_precision=DOT_PRECISION)
        if D_B > 0:
            k_b = _load_rows(K, cols, col_mask, s_kt, dims_b, HEAD_DIM)
            v_b = _load_rows(V, cols, col_mask, s_vt, dims_b, HEAD_DIM)
            s += tl.dot(q_b, tl.trans(k_b), input_precision=DOT_PRECISION)
            dp += tl.dot(do_b, tl.trans(v_b), input_precision=DOT_PRECISION)
        p = tl.where(col_mask[None, :], tl.math.exp2(s * scale_log2 - lse[:, None]), 0.0)
        ds = (p * (dp - delta[:, None])).to(k_a.dtype)
        dq_a += tl.dot(ds, k_a, input_precision=DOT_PRECISION)
        if D_B > 0:
            dq_b += tl.dot(ds, k_b, input_precision=DOT_PRECISION)

    DQ += start.to(tl.int64) * s_gt + tl.multiple_of(head * s_gh, HEAD_ALIGN)
    _store_rows(DQ, dq_a * scale, rows, row_mask, s_gt, dims_a, HEAD_DIM)
    if D_B > 0:
        _store_rows(DQ, dq_b * scale, rows, row_mask, s_gt, dims_b, HEAD_DIM)


# ----------------------------------------------------------------------------------------------------------------------
# launch configurations (what kernels.aot compiles for sm_90)


def head_dim_split(head_dim: int) -> tuple[int, int]:
    """(D_A, D_B): the largest power of two <= head_dim (at least 16, tl.dot's minimum), then the remainder rounded
    up to a power of two (0 when none): 24 -> (16, 16), 80 -> (64, 16), 88 -> (64, 32), 64 -> (64, 0)."""
    d_a = max(16, 1 << (head_dim.bit_length() - 1))
    rest = head_dim - d_a
    return d_a, (max(16, triton.next_power_of_2(rest)) if rest > 0 else 0)


@dataclass(frozen=True)
class AttnConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def fwd_config(head_dim: int) -> AttnConfig:
    """128 query rows keep a warpgroup's MMA busy; wider heads halve the key tile to stay in registers."""
    if dispatch.interpreted():
        return INTERPRET_CONFIG
    return AttnConfig(128, 64, 4, 3) if sum(head_dim_split(head_dim)) <= 64 else AttnConfig(128, 64, 8, 3)


def bwd_config(head_dim: int) -> AttnConfig:
    """Backward holds twice the accumulators (dK and dV, or dQ and the loaded K/V): 64 x 64 tiles."""
    if dispatch.interpreted():
        return INTERPRET_CONFIG
    return AttnConfig(64, 64, 4, 2) if sum(head_dim_split(head_dim)) <= 64 else AttnConfig(64, 64, 8, 2)


def head_align(*tensors: torch.Tensor) -> int:
    """The largest power of two, at most 16, that divides every head stride: the kernels' `tl.multiple_of` hint on a
    head's offset. Triton marks an integer argument only when it is a multiple of 16, so the head strides of head dims
    24 and 88 (the V1 predictor's, ViT-g's) arrive unmarked: their rows would then count as unaligned, loaded lane by
    lane without the asynchronous copies that pipeline the key/value tiles. 8 elements of a 16-bit type are 16 bytes:
    the full vector width."""
    strides = math.gcd(*(t.stride(1) for t in tensors))
    return min(16, strides & -strides) if strides else 16


INTERPRET_CONFIG = AttnConfig(16, 16, 1, 1)  # small tiles so that tests' short sequences still span several


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must all be (T, H, Dh); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if any(x.stride(-1) != 1 for x in (q, k, v)):
        raise ValueError("q, k, v need a contiguous head dim (stride 1); token and head strides may be anything")
    if q.is_cuda and q.dtype == torch.float32:
        raise ValueError("the Triton attention kernel runs 16-bit inputs on a GPU (fp32 tiles spill registers): train "
                         "under bf16 autocast (meta.dtype), or pick an SDPA backend (model.attention) for fp32")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor on {q.device}, got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)} on {cu_seqlens.device}")


def _forward(q, k, v, cu_seqlens, max_seqlen, scale):
    t, h, d = q.shape
    out = torch.empty(t, h, d, device=q.device, dtype=q.dtype)
    lse = torch.empty(t, h, device=q.device, dtype=torch.float32)  # log2 units
    d_a, d_b = head_dim_split(d)
    cfg = fwd_config(d)
    grid = (triton.cdiv(max_seqlen, cfg.block_m), cu_seqlens.numel() - 1, h)
    dispatch.count("varlen_attention_fwd")
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens, scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        lse.stride(0),
        HEAD_DIM=d, D_A=d_a, D_B=d_b, DOT_PRECISION=dispatch.dot_precision(q.dtype), BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, HEAD_ALIGN=head_align(q, k, v, out), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse


def _backward(do, q, k, v, out, lse, cu_seqlens, max_seqlen, scale):
    t, h, d = q.shape
    do = do.contiguous()
    # delta_i = dO_i . O_i (one fused multiply-reduce over (T, H, Dh) in fp32)
    delta = torch.linalg.vecdot(do.float(), out.float())
    dq, dk, dv = (torch.empty(t, h, d, device=q.device, dtype=q.dtype) for _ in range(3))
    d_a, d_b = head_dim_split(d)
    cfg = bwd_config(d)
    num_seqs = cu_seqlens.numel() - 1
    common = dict(HEAD_DIM=d, D_A=d_a, D_B=d_b, DOT_PRECISION=dispatch.dot_precision(q.dtype),
                  BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_ALIGN=head_align(q, k, v, do, dq, dk, dv),
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0),
               do.stride(1), lse.stride(0))
    dispatch.count("varlen_attention_bwd_dkdv")
    _attn_bwd_dkdv_kernel[(triton.cdiv(max_seqlen, cfg.block_n), num_seqs, h)](
        q, k, v, do, lse, delta, dk, dv, cu_seqlens, scale, scale * LOG2E, *strides, **common)
    dispatch.count("varlen_attention_bwd_dq")
    _attn_bwd_dq_kernel[(triton.cdiv(max_seqlen, cfg.block_m), num_seqs, h)](
        q, k, v, do, lse, delta, dq, cu_seqlens, scale, scale * LOG2E, *strides, **common)
    return dq, dk, dv


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, scale):
        out, lse = _forward(q, k, v, cu_seqlens, max_seqlen, scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.max_seqlen, ctx.scale = max_seqlen, scale
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.scale)
        return dq, dk, dv, None, None, None


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                     *, scale: float | None = None, impl: str | None = None) -> torch.Tensor:
    """q, k, v (T, H, Dh), any token/head strides (views of a qkv projection are read in place); cu_seqlens (S+1,)
    int32 sequence starts; max_seqlen the longest sequence (a host int: the grid size) -> (T, H, Dh) contiguous."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if dispatch.resolve(impl, q.device) == "torch":
        return varlen_attention_ref(q, k, v, cu_seqlens, max_seqlen, scale=scale)
    _check(q, k, v, cu_seqlens)
    if q.shape[0] == 0:
        return q.new_empty(q.shape)
    return _VarlenAttention.apply(q, k, v, cu_seqlens, int(max_seqlen), scale)
