"""pytest-benchmark plumbing: interpreter switch, synchronised timing, what every result records (its device, the
versions it ran with, its figures), and the `torch.compile(reference)` provider of the op benchmarks.

Triton decides interpreted-or-compiled when `@triton.jit` runs, i.e. when `kernels` is imported, so without CUDA
TRITON_INTERPRET=1 is set here, before any benchmark module (or `shapes`, whose engine imports reach the models)
is imported.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import itertools
import math
import os
import platform
import subprocess
import time
from typing import Any, Callable

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from benchmarks.shapes import CUDA, DEVICE, ROOT  # noqa: E402  (after the interpreter switch)

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
COMPILED = "torch_compile"  # provider name of torch.compile(reference): report.py's "torch.compile" column


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _installed(dist: str) -> str | None:
    """The installed version of a distribution whose module can be found, without importing it."""
    if importlib.util.find_spec(dist) is None:
        return None
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=None)
def versions() -> dict[str, Any]:
    """What every result ran with (extra_info["versions"]): python, torch, CUDA (None on a CPU build), triton,
    deepspeed (None when not installed), the git commit (the env GIT_COMMIT where the checkout has no .git, as on the
    device machine; else None) and whether tracked files differed from it (git_dirty; None without git)."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton_version, "deepspeed": _installed("deepspeed"),
            "git_commit": commit or os.environ.get("GIT_COMMIT") or None,
            "git_dirty": None if status is None else bool(status)}


def compile_reference(reference: Callable[..., Any], *, cpu_case: bool) -> Callable[..., Any]:
    """The `torch_compile` provider: `torch.compile(reference)` with the default inductor backend and dynamic=False
    (every case has fixed shapes). The `bench` fixture calls it once before timing, so compilation is never timed.

    Without CUDA, compiling costs seconds per function (the process's first one ~25 s: inductor's C++ toolchain), so
    the smoke run compiles one case per op file: the caller passes `cpu_case=True` for that one and the others skip.
    Inductor builds CPU kernels with a C++ compiler: without one the provider skips, naming what was searched."""
    if not CUDA:
        if not cpu_case:
            pytest.skip("torch.compile without CUDA: one case per op file (compiling costs seconds on a CPU)")
        from torch._inductor import config as inductor_config
        from torch._inductor.cpp_builder import get_cpp_compiler
        from torch._inductor.exc import InvalidCxxCompiler
        try:
            get_cpp_compiler()
        except InvalidCxxCompiler:
            pytest.skip(f"torch.compile on the CPU needs a C++ compiler for inductor: none of "
                        f"torch._inductor.config.cpp.cxx = {inductor_config.cpp.cxx} runs (install g++, or set CXX)")
    return torch.compile(reference, dynamic=False)


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


def pytest_configure(config: pytest.Config) -> None:
    # raised by a module that inductor imports on its first compile (not our code)
    config.addinivalue_line("filterwarnings",
                            "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


SAVE_AFTER_S = 5.0  # a test at least this long is followed by a write of --benchmark-json so far


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """After a long test, write the results so far to --benchmark-json (pytest-benchmark writes it only when the
    session ends): a GPU session's step killed at its time limit then keeps every case it finished."""
    start = time.monotonic()
    yield
    session = getattr(item.config, "_benchmarksession", None)  # pytest-benchmark's session object
    if (session is not None and session.json and not (session.save or session.autosave) and session.benchmarks
            and time.monotonic() - start >= SAVE_AFTER_S):
        session.handle_saving()


@pytest.fixture(autouse=True)
def _deadline() -> None:
    if time.time() > DEADLINE:
        pytest.skip("time budget of the session spent (VJEPA_BENCH_DEADLINE)")


@pytest.fixture
def bench(benchmark) -> Callable[..., None]:
    """`bench(fn, op=, provider=, case=, direction=, shape=, dtype=, bytes_moved=, flops=None, extra_info=None)`
    times `fn` and fills `benchmark.extra_info` (plus the op's own `extra_info` fields, and `versions()`).
    `bytes_moved` and `flops` are the op's minimum (each input read once, each output written once), the same for
    every provider of a group, so GB/s and TFLOP/s compare providers directly. The `torch_compile` provider's `fn`
    is called once first, also with --benchmark-disable and on a CPU (no warm-up there): it compiles untimed."""

    def run(fn: Callable[[], Any], *, op: str, provider: str, case: str, direction: str, shape: dict[str, Any],
            dtype: torch.dtype, bytes_moved: int, flops: int | None = None,
            extra_info: dict[str, Any] | None = None) -> None:
        benchmark.group = f"{op} {case} {direction}"
        info = benchmark.extra_info
        info.update(op=op, provider=provider, case=case, direction=direction, shape=shape,
                    dtype=str(dtype).removeprefix("torch."), bytes_moved=int(bytes_moved), flops=flops,
                    device=DEVICE_NAME, interpreted=INTERPRETED, versions=versions())
        info.update(extra_info or {})
        if provider == COMPILED:  # compile (and autotune, on CUDA) here, outside every timed round
            fn()
            _sync()
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
