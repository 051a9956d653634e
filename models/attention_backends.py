"""Attention backends: one small function each, all with the contract of `models.attention.packed_attention`.

`fn(q, k, v, packing) -> (T, H, Dh)`: q, k, v are (T, H, Dh), possibly strided views of the (T, 3, H, Dh) qkv
projection; sequence s owns rows `cu_seqlens[s]:cu_seqlens[s+1]`. Only `sdpa_padded` pads (it is the baseline a user
without a varlen kernel would write), none truncates, and none falls back to another: a backend that cannot run its
inputs raises, naming itself and an alternative. flash-attn and xformers are imported only when their backend runs.
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels import dispatch
from kernels.varlen_attention import varlen_attention

from .packing import Packing

try:  # gate on the API itself: torch builds without it raise a clear error when the backend is selected
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None

Backend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Packing], torch.Tensor]
SWITCH = "model.attention (or env VJEPA_ATTENTION)"
HALF = (torch.float16, torch.bfloat16)


class BackendUnavailable(RuntimeError):
    """The selected attention backend cannot run these inputs on this machine."""


def _unavailable(name: str, why: str) -> BackendUnavailable:
    return BackendUnavailable(f"attention backend '{name}' {why}. Set {SWITCH} to another backend: 'auto', 'sdpa' "
                              "(PyTorch picks its SDPA kernel) and 'reference' run everywhere")


def _missing(name: str, package: str, install: str) -> ImportError:
    return ImportError(f"attention backend '{name}' needs the {package} package, which is not installed ({install}); "
                       f"install it or set {SWITCH} to another backend, e.g. 'auto'")


def _inputs(q: torch.Tensor) -> str:
    return f"{q.device.type} {str(q.dtype).removeprefix('torch.')} tensors with head dim {q.shape[-1]}"


# --------------------------------------------------------------------------------------------------------------------
# SDPA: dense batched calls, one per distinct length


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_seqs: int, seqlen: int,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    total, heads, head_dim = q.shape
    # (T, H, Dh) -> (S, H, L, Dh): splitting the row axis is a view even on strided q/k/v
    q, k, v = (t.view(num_seqs, seqlen, heads, head_dim).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(total, heads, head_dim)


def _by_length(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing) -> torch.Tensor:
    """Equal lengths: one dense call. Ragged: regrouped by length, one dense call per distinct length."""
    if packing.is_uniform:
        return _dense(q, k, v, packing.num_seqs, packing.max_seqlen)
    groups, order, inverse = packing.length_groups
    order, inverse = order.to(q.device, non_blocking=True), inverse.to(q.device, non_blocking=True)
    # split, not row slices: the backward of a split is one cat, where each slice's backward would fill a zeroed
    # full-size gradient, once per distinct length
    sizes = [seqlen * count for seqlen, count in groups]
    parts = zip(*(t.index_select(0, order).split(sizes) for t in (q, k, v)))
    outs = [_dense(qg, kg, vg, count, seqlen) for (qg, kg, vg), (seqlen, count) in zip(parts, groups)]
    return torch.cat(outs).index_select(0, inverse)


# the SDPA kernel each backend pins (None: PyTorch's own choice per call) and the devices it exists on (None: any);
# a CPU build of torch has the flash and math kernels only
SDPA_KERNELS: dict[str, tuple[SDPBackend | None, tuple[str, ...] | None]] = {
    "sdpa": (None, None),
    "sdpa_cudnn": (SDPBackend.CUDNN_ATTENTION, ("cuda",)),
    "sdpa_flash": (SDPBackend.FLASH_ATTENTION, ("cpu", "cuda")),
    "sdpa_efficient": (SDPBackend.EFFICIENT_ATTENTION, ("cuda",)),
    "sdpa_math": (SDPBackend.MATH, None),
}


def sdpa_backend(name: str) -> Backend:
    """The backend running SDPA with the kernel SDPA_KERNELS[name] pinned, dense or grouped by length."""
    kernel, devices = SDPA_KERNELS[name]

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing) -> torch.Tensor:
        if devices is not None and q.device.type not in devices:
            raise _unavailable(name, f"cannot run {_inputs(q)}: PyTorch has that SDPA kernel on "
                                     f"{' and '.join(devices)} only")
        try:
            with sdpa_kernel(kernel) if kernel is not None else contextlib.nullcontext():
                return _by_length(q, k, v, packing)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:  # SDPA's "no available kernel"; its warnings just above say which check failed
            if kernel is None:
                raise
            raise _unavailable(name, f"cannot run {_inputs(q)} ({e})") from e

    run.__name__ = run.__qualname__ = name
    return run


def sdpa_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing) -> torch.Tensor:
    """Every sequence zero-padded to max_seqlen, padded keys masked out: what a user without varlen attention writes.
    A baseline for benchmarks and comparisons: it computes (and moves) the padding, so it is never auto's choice."""
    num_seqs, length, (_, heads, head_dim) = packing.num_seqs, packing.max_seqlen, q.shape
    rows = packing.padded_rows.to(q.device, non_blocking=True)

    def pad(t: torch.Tensor) -> torch.Tensor:  # (T, H, Dh) -> (S * L, H, Dh), zeros after each sequence's end
        return t.new_zeros(num_seqs * length, heads, head_dim).index_copy(0, rows, t)

    keep = torch.arange(length) < torch.tensor(packing.seqlens)[:, None]  # (S, L) on the host: no sync
    mask = keep.to(q.device, non_blocking=True)[:, None, None, :]  # (S, 1, 1, L), True = attend; queries see keys only
    return _dense(pad(q), pad(k), pad(v), num_seqs, length, mask).index_select(0, rows)


# --------------------------------------------------------------------------------------------------------------------
# varlen kernels: the packed layout as it is


def triton_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing) -> torch.Tensor:
    """This project's Triton kernel (kernels/varlen_attention.py), ragged and dense alike."""
    if q.device.type != "cuda" and not dispatch.interpreted():
        raise _unavailable("triton", f"needs CUDA tensors, got {q.device.type} ones (a CPU runs the kernel only "
                                     "under TRITON_INTERPRET=1, a simulation for tests)")
    return varlen_attention(q, k, v, packing.cu_seqlens, packing.max_seqlen, impl="triton")


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing) -> torch.Tensor:
    """The specification: one sequence at a time, fp32 softmax (reads cu_seqlens on the host: a sync on GPU)."""
    return varlen_attention(q, k, v, packing.cu_seqlens, packing.max_seqlen, impl="torch")


def torch_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing) -> torch.Tensor:
    """torch.nn.attention.varlen.varlen_attn (PyTorch's flash / cuDNN varlen kernels)."""
    if varlen_attn is None:
        raise _unavailable("torch_varlen", f"needs torch.nn.attention.varlen.varlen_attn, which torch "
                                           f"{torch.__version__} does not have")
    if q.device.type != "cuda":
        raise _unavailable("torch_varlen", f"cannot run {_inputs(q)}: varlen_attn calls the CUDA flash / cuDNN "
                                           "kernels only, it has no CPU implementation")
    cu, longest = packing.cu_seqlens, packing.max_seqlen
    return varlen_attn(q, k, v, cu, cu, longest, longest)  # scale: the default 1/sqrt(Dh)


def flash_attn_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing) -> torch.Tensor:
    """flash_attn.flash_attn_varlen_func (Dao-AILab flash-attention)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as e:
        raise _missing("flash_attn", "flash-attn", "it has no binary wheel: pip install flash-attn "
                                                   "--no-build-isolation builds it from source") from e
    cu, longest = packing.cu_seqlens, packing.max_seqlen
    return flash_attn_varlen_func(q, k, v, cu, cu, longest, longest)


def xformers_block_diagonal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing) -> torch.Tensor:
    """xformers.ops.memory_efficient_attention over the packed rows as one batch with a block-diagonal mask."""
    try:
        from xformers.ops import fmha
    except ImportError as e:
        raise _missing("xformers", "xformers", "pip install xformers, built for the installed torch") from e
    bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(list(packing.seqlens))
    return fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0]  # batch of one: (1, T, H, Dh)


# --------------------------------------------------------------------------------------------------------------------
# what auto may pick


# cuDNN's fused attention computes wrong results for sequence lengths that are not multiples of 128 before 9.15.1
# (pytorch/pytorch#169849); PyTorch's own default order prefers cuDNN only above it (sdp_utils.cpp,
# check_prefer_cudnn_attention). Packed sets have any length, so auto holds to the same line.
CUDNN_MIN_VERSION = 91501


def cudnn_version() -> int | None:
    return torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None


def cannot_run(name: str, dtype: torch.dtype, head_dim: int, capability: tuple[int, int]) -> str | None:
    """Why backend `name` cannot run such inputs on a CUDA device of this compute capability, or None when it can.

    auto's conservative pre-check from what the host knows (auto must never pick a backend that then fails). An
    explicitly selected backend skips it: its library decides, and the error carries the library's reason.
    """
    if name in ("sdpa", "sdpa_math", "sdpa_padded", "reference"):
        return None
    if name == "torch_varlen" and varlen_attn is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    if name in ("flash_attn", "xformers") and importlib.util.find_spec(name) is None:
        return f"the {name} package is not installed"
    if name in ("sdpa_cudnn", "sdpa_flash", "torch_varlen", "flash_attn", "triton") and dtype not in HALF:
        return f"needs float16 or bfloat16 on a GPU, not {str(dtype).removeprefix('torch.')}"
    if name == "triton":  # any head dim: the kernel splits it into power-of-two tiles
        return None
    if head_dim % 8:
        return f"needs a head dim divisible by 8, not {head_dim}"
    if name in ("sdpa_cudnn", "sdpa_flash", "torch_varlen", "flash_attn") and capability < (8, 0):
        return f"needs compute capability 8.0 or newer, not {capability[0]}.{capability[1]}"
    if name == "sdpa_cudnn" and (cudnn_version() or 0) < CUDNN_MIN_VERSION:
        return (f"needs cuDNN 9.15.1 or newer for lengths that are not multiples of 128 (pytorch/pytorch#169849), "
                f"not {cudnn_version()}")
    return None
