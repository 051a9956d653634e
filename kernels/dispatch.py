"""Which implementation an op runs (`impl=None|"triton"|"torch"`), decided in one place.

`impl=None` means the configured default: `set_default_impl()` (the engine calls it with config `model.kernels`),
overridden by the env `VJEPA_KERNELS`; both take `auto|triton|torch`. `auto` runs Triton on CUDA tensors and the
PyTorch reference elsewhere: on a CPU the kernels only run under `TRITON_INTERPRET=1`, a numpy simulation meant for
tests, not for training. Asking for "triton" where it cannot run is an error, never a silent fallback, and every
launch is counted so tests can prove the kernel really ran.
"""

from __future__ import annotations

import collections
import os

import torch

IMPLS = ("auto", "triton", "torch")
ENV_VAR = "VJEPA_KERNELS"

_default = "auto"
launches: collections.Counter[str] = collections.Counter()  # kernel name -> number of launches


def interpreted() -> bool:
    """True when Triton simulates kernels on the CPU (read by triton at import time, so we read it the same way)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def set_default_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"kernels implementation must be one of {IMPLS}, got {impl!r}")
    global _default
    _default = impl


def default_impl() -> str:
    env = os.environ.get(ENV_VAR)
    if env is not None and env not in IMPLS:
        raise ValueError(f"{ENV_VAR}={env!r}: expected one of {IMPLS}")
    return env or _default


def resolve(impl: str | None, device: torch.device) -> str:
    """'triton' or 'torch' for tensors on `device`."""
    choice = default_impl() if impl is None else impl
    if choice not in IMPLS:
        raise ValueError(f"impl must be None or one of {IMPLS}, got {impl!r}")
    if choice == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if choice == "triton" and device.type != "cuda" and not interpreted():
        raise RuntimeError(f"the Triton kernels need CUDA tensors (got {device.type}); on a CPU set TRITON_INTERPRET=1 "
                           "before importing kernels (tests only), or use impl='torch' / model.kernels=torch")
    return choice


def count(name: str) -> None:
    launches[name] += 1


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands get exact fp32 products ("ieee"): on a GPU tl.dot would otherwise use TF32, 10 mantissa bits."""
    return "ieee" if dtype == torch.float32 else "tf32"
