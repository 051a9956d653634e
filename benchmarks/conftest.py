"""pytest-benchmark plumbing: interpreter switch, synchronised timing, and what every result records.

Triton decides interpreted-or-compiled when `@triton.jit` runs, i.e. when `kernels` is imported, so without CUDA
TRITON_INTERPRET=1 is set here, before any benchmark module (or `shapes`, whose engine imports reach the models)
is imported.
"""

from __future__ import annotations

import itertools
import math
import os
import platform
import time
from typing import Any, Callable

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from benchmarks.shapes import CUDA, DEVICE  # noqa: E402  (after the interpreter switch)

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE_NAME = torch.cuda.get_device_name(DEVICE) if CUDA else (platform.processor() or platform.machine() or "cpu")
# CUDA: warm-up calls, then 25 rounds of calls back to back with one synchronize at the end of each. The interpreter
# simulates every program in numpy (seconds per call) and compiles nothing, so on a CPU one call is the measurement.
ROUNDS = 25 if CUDA else 1
WARMUP_CALLS = 3  # Triton JIT compilation and autotuning, cuBLAS handles, the caching allocator's first blocks
MIN_ROUND_S = 2e-3  # a CUDA round lasts at least this long, so its one synchronize (~10 us) is noise
# Epoch seconds after which the remaining benchmarks skip (set by gpu_session.sh): pytest then ends normally and writes
# its JSON, which a kill at the step's time limit would lose.
DEADLINE = float(os.environ.get("VJEPA_BENCH_DEADLINE", "inf"))


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _calibrate(fn: Callable[[], Any]) -> int:
    """Warm up, then the number of back-to-back calls per timed round."""
    if not CUDA:
        return 1
    for _ in range(WARMUP_CALLS):
        fn()
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return max(1, min(1000, math.ceil(MIN_ROUND_S / (time.perf_counter() - start))))


def _synchronised(fn: Callable[[], Any], iterations: int) -> Callable[[], None]:
    """`fn` that synchronises after every `iterations`-th call: pytest-benchmark times a round of `iterations`
    calls as one interval and divides, so each round covers exactly its own kernels and nothing queued before."""
    calls = itertools.count(1)

    def run() -> None:
        fn()
        if next(calls) % iterations == 0:
            _sync()

    return run


@pytest.fixture(autouse=True)
def _deadline() -> None:
    if time.time() > DEADLINE:
        pytest.skip("time budget of the session spent (VJEPA_BENCH_DEADLINE)")


@pytest.fixture
def bench(benchmark) -> Callable[..., None]:
    """`bench(fn, op=, provider=, case=, direction=, shape=, dtype=, bytes_moved=, flops=None, extra_info=None)`
    times `fn` and fills `benchmark.extra_info` (plus the op's own `extra_info` fields). `bytes_moved` and `flops`
    are the op's minimum (each input read once, each output written once), the same for every provider of a group,
    so GB/s and TFLOP/s compare providers directly."""

    def run(fn: Callable[[], Any], *, op: str, provider: str, case: str, direction: str, shape: dict[str, Any],
            dtype: torch.dtype, bytes_moved: int, flops: int | None = None,
            extra_info: dict[str, Any] | None = None) -> None:
        benchmark.group = f"{op} {case} {direction}"
        info = benchmark.extra_info
        info.update(op=op, provider=provider, case=case, direction=direction, shape=shape,
                    dtype=str(dtype).removeprefix("torch."), bytes_moved=int(bytes_moved), flops=flops,
                    device=DEVICE_NAME, interpreted=INTERPRETED, **(extra_info or {}))
        if benchmark.disabled:  # --benchmark-disable: one plain call, a smoke test
            benchmark.pedantic(fn)
            return
        iterations = _calibrate(fn)
        benchmark.pedantic(_synchronised(fn, iterations), rounds=ROUNDS,
                           warmup_rounds=1 if CUDA else 0, iterations=iterations)
        median = benchmark.stats.stats.median
        info["gbps"] = bytes_moved / median / 1e9
        if flops is not None:
            info["tflops"] = flops / median / 1e12

    return run


@pytest.fixture
def copy_baseline() -> Callable[[int], Callable[[], None]]:
    """`copy_baseline(bytes_moved)`: a device-to-device copy of bytes_moved / 2 bytes, which reads and writes
    bytes_moved in total: the bandwidth ceiling for a memory-bound op that moves as much."""

    def make(bytes_moved: int) -> Callable[[], None]:
        src = torch.randint(0, 256, (bytes_moved // 2,), dtype=torch.uint8, device=DEVICE)
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)

    return make
