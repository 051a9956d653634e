"""Named phases of the training step, and the torch.profiler run behind `train.py --profile N` (meta.profile_steps).

`phase(name)` marks one phase of the step (engine/step.py, engine/loop.py) as a `torch.profiler.record_function`
range while any torch profiler records (ours, a caller's own `torch.profiler.profile`, `emit_nvtx` under nsys), and is
a shared no-op context otherwise: a bare `record_function` costs ~8-9 us per range even with no profiler (it builds
its RecordFunction op), `with phase(...)` without one ~0.5 us (2-core CPU machine under load; a step has ~10 ranges).

`StepProfiler(steps, folder)` profiles `steps` training steps after a warm-up: the run's first step is skipped (Triton
autotuning, cuBLAS handles, the allocator's first blocks), the second is the profiler's own warm-up (its first
recorded step carries its start-up cost), then `steps` steps are recorded, CPU activity plus CUDA kernels when a GPU
runs, and written as a Chrome trace (chrome://tracing, https://ui.perfetto.dev) to `folder/trace.json`
(`trace_rank{r}.json` on the other ranks of a multi-rank run). A run shorter than that gives up the skipped step,
then the warm-up, then records what is left.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

# the phases of every training step, in order; each is a named range in the trace (plus "checkpoint" on saving steps)
PHASES = ("data", "masks", "target_forward", "context_predictor_forward", "loss", "backward", "clip_optimizer",
          "ema", "logging")
PREFIX = "vjepa/"  # range names: vjepa/data, vjepa/masks, ...
_NULL = contextlib.nullcontext()


def phase(name: str) -> contextlib.AbstractContextManager:
    """A `record_function` range `vjepa/<name>` while a profiler records, else a no-op."""
    if torch.autograd._profiler_enabled():
        return torch.profiler.record_function(PREFIX + name)
    return _NULL


def trace_path(folder: str | Path, rank: int = 0) -> Path:
    return Path(folder) / ("trace.json" if rank == 0 else f"trace_rank{rank}.json")


class StepProfiler:
    """`steps(range)` around the step loop (or `start()` before the first step, `step()` after each, `stop()` at the
    end); all no-ops when `steps` is 0.

    `available`: the steps this run will take (the profile window shrinks to fit)."""

    def __init__(self, steps: int, folder: str | Path, *, available: int, device: torch.device, rank: int = 0,
                 say: Callable[..., Any] = print) -> None:
        self.path = trace_path(folder, rank)
        self.say = say
        self.active = min(steps, available)
        lead = min(2, max(0, available - steps))  # skipped first step, then the profiler's warm-up step
        self.skip, self.warmup = lead // 2, lead - lead // 2
        self.written = False
        self._prof = None
        if self.active <= 0:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with warnings.catch_warnings():  # a short run has no warm-up step left: describe() says so
            warnings.filterwarnings("ignore", "Profiler won't be using warmup")
            schedule = torch.profiler.schedule(skip_first=self.skip, wait=0, warmup=self.warmup, active=self.active,
                                               repeat=1)
        self._prof = torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=self._write)

    @property
    def enabled(self) -> bool:
        return self._prof is not None

    def describe(self) -> str:
        return (f"profiling {self.active} steps after {self.skip + self.warmup} warm-up step(s) "
                f"(torch.profiler) -> {self.path}")

    def _write(self, prof: torch.profiler.profile) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.path))
        self.written = True
        self.say(f"profiler: wrote the Chrome trace of {self.active} steps to {self.path} "
                 "(open in https://ui.perfetto.dev or chrome://tracing)", flush=True)

    def steps(self, steps: Iterable[int]) -> Iterator[int]:
        """`for step in profiler.steps(range(a, b))`: starts the profiler, advances it after each step and stops it
        when the loop ends, breaks or raises (the generator is closed as the loop lets go of it)."""
        self.start()
        try:
            for step in steps:
                yield step
                self.step()
        finally:
            self.stop()

    def start(self) -> None:
        if self._prof is not None:
            self._prof.start()

    def step(self) -> None:
        if self._prof is not None:
            self._prof.step()

    def stop(self) -> None:
        if self._prof is not None:
            prof, self._prof = self._prof, None
            prof.stop()
