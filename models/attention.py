"""The one attention call of encoder, target encoder and predictor: softmax(q k^T / sqrt(Dh)) v per sequence.

`packed_attention(q, k, v, packing)` runs the backend chosen once per process: `set_backend()` (the loop calls it with
config `model.attention`), overridden by env VJEPA_ATTENTION. The backends (`attention_backends`, one function each):
`triton` (this project's varlen kernel), `sdpa` and `sdpa_{cudnn,flash,efficient,math}` (SDPA with PyTorch's choice or
one pinned kernel: one dense call for equal lengths, else one call per distinct length), `sdpa_padded` (the padded
baseline), `torch_varlen`, `flash_attn`, `xformers` and `reference` (the specification).

`auto` (default) decides from what the host already knows, so it never syncs: the device, whether the lengths are
equal (`Packing.is_uniform`, host tuple) and the head dim, which name the case (`attention_case`). Not CUDA: `sdpa`.
CUDA: the entry of `attention_table.json` (device kind -> case -> head dim -> backend, written by
benchmarks/attention_table.py from measured benchmarks), else the first backend of FALLBACK that can run the inputs.
Each decision keeps the rule that made it (`auto_choice(...).rule`, `describe()` for the start-up line).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from . import attention_backends as ab
from .packing import Packing

BACKENDS: dict[str, ab.Backend] = {
    "triton": ab.triton_kernel,
    **{name: ab.sdpa_backend(name) for name in ab.SDPA_KERNELS},
    "sdpa_padded": ab.sdpa_padded,
    "torch_varlen": ab.torch_varlen,
    "flash_attn": ab.flash_attn_varlen,
    "xformers": ab.xformers_block_diagonal,
    "reference": ab.reference,
}
NAMES = ("auto", *BACKENDS)
ENV_VAR = "VJEPA_ATTENTION"
TABLE_PATH = Path(__file__).with_name("attention_table.json")

CASES = ("dense_predictor", "dense_target", "ragged_context")
PREDICTOR_MAX_HEAD_DIM = 32  # the predictor's heads are 24 (V1) or 32 (V2) wide, the encoders' 64 and up
_DENSE = ("sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa")
# what auto runs on CUDA without a table entry: the first that can run the inputs ("sdpa" always can)
FALLBACK: dict[str, tuple[str, ...]] = {"dense_predictor": _DENSE, "dense_target": _DENSE,
                                        "ragged_context": ("triton", "sdpa")}

_configured = "auto"


def _check(name: str, source: str) -> str:
    if name not in NAMES:
        raise ValueError(f"{source}={name!r}: the attention backend must be one of {', '.join(NAMES)}")
    return name


def set_backend(name: str) -> None:
    """The process's backend (config model.attention); env VJEPA_ATTENTION still wins."""
    global _configured
    _configured = _check(name, "model.attention")


def selected_backend() -> str:
    env = os.environ.get(ENV_VAR)
    return _check(env, ENV_VAR) if env else _configured


def attention_case(packing: Packing, head_dim: int) -> str:
    """Which table case a call is: ragged sets are the context encoder's, equal lengths with narrow heads the
    predictor's, other equal lengths the target encoder's (host values only)."""
    if not packing.is_uniform:
        return "ragged_context"
    return "dense_predictor" if head_dim <= PREDICTOR_MAX_HEAD_DIM else "dense_target"


def device_kind(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'H100', 'NVIDIA A100-SXM4-80GB' -> 'A100': the first word with a digit."""
    word = next((w for w in name.split() if any(c.isdigit() for c in w)), name)
    return word.split("-")[0]


@dataclass(frozen=True)
class Choice:
    backend: str
    rule: str  # which rule decided, in words


def auto_choice(case: str, head_dim: int, dtype: torch.dtype, *, kind: str, capability: tuple[int, int],
                table: Mapping[str, Any]) -> Choice:
    """auto's decision for one case on a CUDA device of this kind. Pure: tests pass a fake table and kind."""
    picked = table.get(kind, {}).get(case, {}).get(str(head_dim))
    where = f"{kind}/{case}/head dim {head_dim}"
    if picked is not None:
        why = ab.cannot_run(picked, dtype, head_dim, capability)
        if why is None:
            return Choice(picked, f"{TABLE_PATH.name} entry {where}")
        note = f"{TABLE_PATH.name} picks {picked} for {where}, which {why}"
    else:
        note = f"no {TABLE_PATH.name} entry for {where}"
    order = FALLBACK[case]
    backend = next(name for name in order if ab.cannot_run(name, dtype, head_dim, capability) is None)
    return Choice(backend, f"{note}: first that runs of {' -> '.join(order)}")


@functools.lru_cache(maxsize=None)
def _table() -> dict[str, Any]:
    return json.loads(TABLE_PATH.read_text())["table"]


@functools.lru_cache(maxsize=None)
def _auto(case: str, head_dim: int, dtype: torch.dtype, device: torch.device) -> Choice:
    if device.type != "cuda":
        return Choice("sdpa", "no CUDA device: PyTorch's default SDPA kernel, grouped by length")
    return auto_choice(case, head_dim, dtype, kind=device_kind(torch.cuda.get_device_name(device)),
                       capability=torch.cuda.get_device_capability(device), table=_table())


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing) -> torch.Tensor:
    """q, k, v: (T, H, Dh), possibly strided views of a qkv projection. Returns (T, H, Dh)."""
    name = selected_backend()
    if name == "auto":
        head_dim = q.shape[-1]
        name = _auto(attention_case(packing, head_dim), head_dim, q.dtype, q.device).backend
    return BACKENDS[name](q, k, v, packing)


def describe(device: torch.device, dtype: torch.dtype, head_dims: Mapping[str, int]) -> str:
    """The selected backend in words; for auto, what each case of the model ({case: head dim}) runs and why."""
    name = selected_backend()
    if name != "auto":
        return name
    picks = {case: _auto(case, hd, dtype, device) for case, hd in head_dims.items()}
    if len(set(picks.values())) == 1:
        choice = next(iter(picks.values()))
        return f"auto -> {choice.backend} ({choice.rule})"
    return "auto: " + "; ".join(f"{case} (head dim {head_dims[case]}) -> {c.backend} ({c.rule})"
                                for case, c in picks.items())
