"""masked_tubelet_embed: tubelet embedding of only the kept tokens, gathered straight from the clip.

Semantics (the reference, `masked_tubelet_embed_ref`): `conv3d(video, weight, bias, stride=kernel)` flattened to
(B*N, D), plus `pos_embed` (N, D), rows `token_index` (int64 ids clip*N + n). The convolution does not overlap, so
every token is a dot product of its K = C*t*p*p pixels with the (D, K) weight: one GEMM over the kept rows only.

Why the kernel pays: the reference first copies the kept tubelets into a (T, K) patch matrix (read clip, write and
read again T*K elements), runs the GEMM, then adds the bias and the gathered position rows in two more passes over
(T, D). Here each program computes the pixel addresses of its rows from `token_index` and loads them straight into
the GEMM tile; bias and position are added to the fp32 accumulator before the single store. In backward the weight
gradient dY^T A gathers the same pixels again instead of keeping the patch matrix alive between forward and backward,
and the bias gradient (column sums of dY) comes from the same dY tiles.

Gradients: weight and bias by the kernels. The clip and the position table (a frozen sin-cos table in V-JEPA) get
gradients from plain torch ops when they require them, which training never does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import dispatch
from .offsets import row_starts


def _patch_coords(token_index: torch.Tensor, grid: tuple[int, int, int]) -> tuple[torch.Tensor, ...]:
    gt, gh, gw = grid
    n_per_clip = gt * gh * gw
    n = token_index % n_per_clip
    return token_index // n_per_clip, n // (gh * gw), (n // gw) % gh, n % gw


def _tubelet_view(video: torch.Tensor, kernel: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, F, H, W) -> (B, T', H', W', C, t, p, p), a view."""
    b, c, f, h, w = video.shape
    t, p, _ = kernel
    return video.view(b, c, f // t, t, h // p, p, w // p, p).permute(0, 2, 4, 6, 1, 3, 5, 7)


def masked_tubelet_embed_ref(video: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             pos_embed: torch.Tensor | None, token_index: torch.Tensor) -> torch.Tensor:
    """The specification: gather the kept tubelets, one Linear on the Conv3d weight, add the position rows."""
    d, kernel = weight.shape[0], tuple(weight.shape[2:])
    grid = tuple(s // k for s, k in zip(video.shape[2:], kernel))
    clip, ti, hi, wi = _patch_coords(token_index, grid)
    patches = _tubelet_view(video, kernel)[clip, ti, hi, wi].reshape(token_index.numel(), -1)
    x = F.linear(patches, weight.reshape(d, -1), bias)
    if pos_embed is not None:
        # as the reference's in-place add: the embedding (bf16 under autocast) keeps its dtype
        x = (x + pos_embed.reshape(-1, d).index_select(0, token_index % (grid[0] * grid[1] * grid[2]))).to(x.dtype)
    return x


# ----------------------------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _row_offsets(INDEX, rows, row_mask, N, GH, GW, s_vb, s_vf, s_vh, s_vw, TUB: tl.constexpr, PATCH: tl.constexpr):
    """Offset of each row's first pixel (c=0, dt=0, dy=0, dx=0) in the clip, and its token id within the clip."""
    tok = tl.load(INDEX + rows, mask=row_mask, other=0).to(tl.int64)
    clip = tok // N
    n = tok % N
    ti = n // (GH * GW)
    hi = (n // GW) % GH
    wi = n % GW
    return clip * s_vb + ti * (TUB * s_vf) + hi * (PATCH * s_vh) + wi * (PATCH * s_vw), n


@triton.jit
def _col_offsets(ks, s_vc, s_vf, s_vh, s_vw, TUB: tl.constexpr, PATCH: tl.constexpr):
    """Offset of pixel k = (c, dt, dy, dx) of a tubelet relative to its first pixel (the Conv3d weight's order)."""
    c = ks // (TUB * PATCH * PATCH)
    r = ks % (TUB * PATCH * PATCH)
    return c * s_vc + (r // (PATCH * PATCH)) * s_vf + ((r // PATCH) % PATCH) * s_vh + (r % PATCH) * s_vw


# the token count T changes every step: not specialised (a multiple of 16 or not would compile a second variant)
@triton.jit(do_not_specialize=["T"])
def _embed_fwd_kernel(
    VIDEO, W, BIAS, POS, INDEX, OUT,
    T, D, K, N, GH, GW,
    # strides
    s_vb, s_vc, s_vf, s_vh, s_vw, s_wd, s_pn, s_out,
    # Meta-parameters
    TUB: tl.constexpr, PATCH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # the N axis varies fastest over program ids: neighbouring programs reuse the same gathered rows from L2
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < T
    col_mask = cols < D
    row_off, n = _row_offsets(INDEX, rows, row_mask, N, GH, GW, s_vb, s_vf, s_vh, s_vw, TUB, PATCH)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        col_off = _col_offsets(ks, s_vc, s_vf, s_vh, s_vw, TUB, PATCH)
        a = tl.load(VIDEO + row_off[:, None] + col_off[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(W + cols[None, :] * s_wd + ks[:, None], mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        # the clip may be fp32 under bf16 autocast: convert in registers, never a full-clip cast pass
        acc += tl.dot(a.to(w.dtype), w, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_POS:
        pos = tl.load(POS + n[:, None] * s_pn + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        acc += pos.to(tl.float32)
    tl.store(OUT + row_starts(rows, s_out)[:, None] + cols[None, :], acc.to(OUT.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit(do_not_specialize=["T"])
def _embed_dw_kernel(
    DY, VIDEO, INDEX, DW, DB,
    T, D, K, N, GH, GW, rows_per_split,
    # strides
    s_dy, s_vb, s_vc, s_vf, s_vh, s_vw,
    # Meta-parameters
    TUB: tl.constexpr, PATCH: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """dW[d, k] = sum_t dY[t, d] * A[t, k] over this split's rows; dB[d] = sum_t dY[t, d] (programs of k-tile 0).

    Splits of the row range write separate fp32 partials (summed on the host side in a fixed order) rather than
    atomics, so the weight gradient is deterministic: bit-exact resume needs that.
    """
    pid_dk = tl.program_id(0)
    split = tl.program_id(1)
    num_k_tiles = tl.cdiv(K, BLOCK_K)
    pid_d = pid_dk // num_k_tiles
    pid_k = pid_dk % num_k_tiles
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    d_mask = ds < D
    k_mask = ks < K
    col_off = _col_offsets(ks, s_vc, s_vf, s_vh, s_vw, TUB, PATCH)

    acc = tl.zeros((BLOCK_D, BLOCK_K), dtype=tl.float32)
    db = tl.zeros((BLOCK_D,), dtype=tl.float32)
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, T)
    for t0 in range(row_start, row_end, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        row_mask = rows < row_end
        row_off, _ = _row_offsets(INDEX, rows, row_mask, N, GH, GW, s_vb, s_vf, s_vh, s_vw, TUB, PATCH)
        dy_t = tl.load(DY + row_starts(rows, s_dy)[None, :] + ds[:, None], mask=d_mask[:, None] & row_mask[None, :],
                       other=0.0)
        a = tl.load(VIDEO + row_off[:, None] + col_off[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        acc += tl.dot(dy_t, a.to(dy_t.dtype), input_precision=DOT_PRECISION)
        if HAS_BIAS:
            if pid_k == 0:
                db += tl.sum(dy_t.to(tl.float32), axis=1)

    tl.store(DW + split * D * K + ds[:, None] * K + ks[None, :], acc, mask=d_mask[:, None] & k_mask[None, :])
    if HAS_BIAS:
        if pid_k == 0:
            tl.store(DB + split * D + ds, db, mask=d_mask)


# ----------------------------------------------------------------------------------------------------------------------
# launch configurations: what the launchers pick is exactly what kernels.aot compiles for sm_90


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # rows (tokens) per tile; for dW: rows of D
    block_n: int  # output columns per tile; for dW: columns of K
    block_k: int  # reduction step; for dW: tokens per step
    num_warps: int
    num_stages: int


# 16-bit operands: 128x128 tiles keep the tensor cores fed; fp32 ("ieee" products) gets half-size tiles so the
# pipelined fp32 operand buffers stay well inside the 227 KiB of shared memory.
FWD_CONFIGS = {16: TileConfig(128, 128, 64, 8, 3), 32: TileConfig(64, 64, 32, 4, 3)}
DW_CONFIGS = {16: TileConfig(128, 128, 64, 8, 3), 32: TileConfig(64, 64, 32, 8, 3)}
INTERPRET_CONFIG = TileConfig(32, 32, 32, 1, 1)  # numpy simulation: tiles small enough that tests cross tile edges


def _config(table: dict[int, TileConfig], dtype: torch.dtype) -> TileConfig:
    return INTERPRET_CONFIG if dispatch.interpreted() else table[16 if dtype.itemsize == 2 else 32]


def _geometry(video: torch.Tensor, weight: torch.Tensor) -> tuple[int, int, int, int]:
    """(N tokens per clip, grid H', grid W', K) with checks that name the mismatch."""
    if video.dim() != 5 or weight.dim() != 5:
        raise ValueError(f"video must be (B, C, F, H, W) and weight (D, C, t, p, p); got {tuple(video.shape)} and "
                         f"{tuple(weight.shape)}")
    _, c, f, h, w = video.shape
    _, wc, t, p, p2 = weight.shape
    if wc != c or p != p2 or f % t or h % p or w % p:
        raise ValueError(f"video {tuple(video.shape)} does not tile into tubelets of weight {tuple(weight.shape)}: "
                         "channels must match and frames/height/width be multiples of the kernel")
    return (f // t) * (h // p) * (w // p), h // p, w // p, c * t * p * p


def _num_splits(t: int, tiles: int, block_t: int, device: torch.device) -> int:
    """Row-range splits of the dW reduction: enough programs to fill the GPU about four times over."""
    row_steps = triton.cdiv(t, block_t)
    if dispatch.interpreted():
        return min(2, row_steps)  # exercises the partial-sum path in tests without slowing them
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(row_steps, triton.cdiv(4 * sms, tiles)))


def _embed_forward(video: torch.Tensor, weight_c: torch.Tensor, bias: torch.Tensor | None,
                   pos: torch.Tensor | None, token_index: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    n, gh, gw, k = _geometry(video, weight_c)
    d, t = weight_c.shape[0], token_index.numel()
    w2 = weight_c.reshape(d, k)
    out = torch.empty(t, d, device=video.device, dtype=out_dtype)
    if t == 0:
        return out
    cfg = _config(FWD_CONFIGS, w2.dtype)
    grid = (triton.cdiv(d, cfg.block_n), triton.cdiv(t, cfg.block_m))
    dispatch.count("masked_tubelet_embed_fwd")
    _embed_fwd_kernel[grid](
        video, w2, bias if bias is not None else w2, pos if pos is not None else w2, token_index, out,
        t, d, k, n, gh, gw,
        *video.stride(), w2.stride(0), pos.stride(0) if pos is not None else 0, out.stride(0),
        TUB=weight_c.shape[2], PATCH=weight_c.shape[3], HAS_BIAS=bias is not None, HAS_POS=pos is not None,
        DOT_PRECISION=dispatch.dot_precision(w2.dtype), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def _embed_weight_grad(dy: torch.Tensor, video: torch.Tensor, weight_c: torch.Tensor, token_index: torch.Tensor,
                       has_bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 (D, K) weight gradient and (D,) bias gradient."""
    n, gh, gw, k = _geometry(video, weight_c)
    d, t = weight_c.shape[0], token_index.numel()
    cfg = _config(DW_CONFIGS, dy.dtype)
    tiles = triton.cdiv(d, cfg.block_m) * triton.cdiv(k, cfg.block_n)
    splits = _num_splits(t, tiles, cfg.block_k, dy.device) if t else 1
    rows_per_split = triton.cdiv(triton.cdiv(max(t, 1), splits), cfg.block_k) * cfg.block_k
    dw = torch.zeros(splits, d, k, device=dy.device, dtype=torch.float32)
    db = torch.zeros(splits, d, device=dy.device, dtype=torch.float32) if has_bias else None
    if t:
        dispatch.count("masked_tubelet_embed_dw")
        _embed_dw_kernel[(tiles, splits)](
            dy, video, token_index, dw, db if db is not None else dw,
            t, d, k, n, gh, gw, rows_per_split,
            dy.stride(0), *video.stride(),
            TUB=weight_c.shape[2], PATCH=weight_c.shape[3], HAS_BIAS=has_bias,
            DOT_PRECISION=dispatch.dot_precision(dy.dtype), BLOCK_D=cfg.block_m, BLOCK_K=cfg.block_n,
            BLOCK_T=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dw.sum(0), (db.sum(0) if db is not None else None)


class _MaskedTubeletEmbed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, video, weight, bias, pos, token_index, compute_dtype):
        weight_c = weight.to(compute_dtype)  # (D, K) is small; the clip is converted tile by tile in the kernel
        video = video.contiguous() if video.stride(-1) != 1 else video
        out = _embed_forward(video, weight_c, bias, pos, token_index, compute_dtype)
        ctx.save_for_backward(video, weight_c, token_index)
        ctx.has_bias, ctx.pos_shape = bias is not None, None if pos is None else pos.shape
        ctx.weight_dtype = weight.dtype
        return out

    @staticmethod
    def backward(ctx, dy):
        video, weight_c, token_index = ctx.saved_tensors
        dy = dy.contiguous()
        d_weight = d_bias = d_pos = d_video = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dw, db = _embed_weight_grad(dy, video, weight_c, token_index, ctx.has_bias)
            d_weight = dw.view(weight_c.shape).to(ctx.weight_dtype)
            d_bias = db.to(ctx.weight_dtype) if db is not None else None
        n, _, _, _ = _geometry(video, weight_c)
        if ctx.needs_input_grad[3]:  # not on the training path: the position table is frozen
            d_pos = torch.zeros(ctx.pos_shape, device=dy.device, dtype=torch.float32)
            d_pos.index_add_(0, token_index % n, dy.float())
        if ctx.needs_input_grad[0]:  # not on the training path: clips are data
            d_patches = dy @ weight_c.reshape(weight_c.shape[0], -1)
            d_video = torch.zeros(video.shape, device=dy.device, dtype=torch.float32)
            grid = tuple(s // k for s, k in zip(video.shape[2:], weight_c.shape[2:]))
            view = _tubelet_view(d_video, tuple(weight_c.shape[2:]))
            view.index_put_(_patch_coords(token_index, grid), d_patches.float().view(-1, *view.shape[4:]),
                            accumulate=True)
            d_video = d_video.to(video.dtype)
        return d_video, d_weight, d_bias, d_pos, None, None


def masked_tubelet_embed(video: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         pos_embed: torch.Tensor | None, token_index: torch.Tensor, *,
                         impl: str | None = None) -> torch.Tensor:
    """video (B, C, F, H, W), weight (D, C, t, p, p), bias (D,) or None, pos_embed (N, D) / (1, N, D) or None,
    token_index (T,) int64 ids clip*N + n -> (T, D) in the compute dtype (the autocast dtype when autocast is on)."""
    if dispatch.resolve(impl, video.device) == "torch":
        return masked_tubelet_embed_ref(video, weight, bias, pos_embed, token_index)
    if token_index.dtype != torch.int64 or token_index.dim() != 1:
        raise ValueError(f"token_index must be a 1-D int64 tensor of ids clip*N + n, got {token_index.dtype} "
                         f"{tuple(token_index.shape)}")
    kind = video.device.type
    compute_dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else video.dtype
    pos = None if pos_embed is None else pos_embed.reshape(-1, weight.shape[0])
    # the kernels read ids at INDEX + row: a strided view (every other id) must be made dense first
    return _MaskedTubeletEmbed.apply(video, weight, bias, pos, token_index.contiguous(), compute_dtype)
