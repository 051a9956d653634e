"""Throughput accounting of the training loop, per logging window: samples/s, tokens/s, model TFLOP/s, MFU, peak
memory and the time the step waited for data.

* tokens/s counts the tokens each network actually ran (no padding exists to count): the target encoder's B*N, the
  context encoder's kept tokens and the predictor's context + target tokens.
* MFU = model FLOP/s per GPU (engine.flops: matmuls only, backward = 2x forward, recomputation not counted) over the
  GPU's dense bf16 tensor-core peak from its data sheet (H100/H200 SXM 989 TFLOP/s; the anchors document also
  quotes 790 measured). Unknown GPUs and CPUs get none.
* data wait is the host time spent getting the next batch and starting its device-side finish (a loader that keeps
  up shows ~0); peak memory is the CUDA allocator's high-water mark, or the process's peak RSS on a CPU.
"""

from __future__ import annotations

import math
import os
import resource
import time
from typing import Any

import torch

# Dense bf16 tensor-core peaks (TFLOP/s) from NVIDIA's data sheets, by a substring of the device name.
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10": 125.0}


def peak_tflops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


class ThroughputWindow:
    """Sums one logging window's steps; `row()` gives its metrics and starts the next window."""

    def __init__(self, device: torch.device, world_size: int, batch_size: int):
        self.device = device
        self.world_size = world_size
        self.batch_size = batch_size
        self.peak = peak_tflops(device)
        self._reset()

    def _reset(self) -> None:
        self.start = time.perf_counter()
        self.steps = 0
        self.flops = 0
        self.tokens = 0
        self.data_wait = 0.0

    def add(self, flops: int, tokens: int, data_wait_s: float) -> None:
        self.steps += 1
        self.flops += flops
        self.tokens += tokens
        self.data_wait += data_wait_s

    def row(self) -> dict[str, Any]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        tflops_per_gpu = self.flops / elapsed / 1e12
        row = {
            "samples_per_s": self.steps * self.batch_size * self.world_size / elapsed,
            "tokens_per_s": self.tokens * self.world_size / elapsed,
            "model_tflops_per_s": tflops_per_gpu * self.world_size,
            "mfu": tflops_per_gpu / self.peak if self.peak else math.nan,
            "peak_mem_gb": peak_memory_gb(self.device),
            "data_wait_s": self.data_wait / max(self.steps, 1),  # per step
            "data_wait_frac": self.data_wait / elapsed,
        }
        self._reset()
        return row


def step_tokens(batch_size: int, num_tokens: int, context_seqlens: list[int], target_seqlens: list[int]) -> int:
    """Tokens the three networks run in one step: target encoder, context encoder, predictor (context + targets)."""
    context, targets = sum(context_seqlens), sum(target_seqlens)
    return batch_size * num_tokens + context + (context + targets)


DATA_BOUND_FRACTION = 0.2  # of a logging window's time spent waiting for batches


class DataBoundHint:
    """Says once per run when the loader sets the pace: a logging window, after the first (which holds the workers'
    start-up), that waited for its batches more than DATA_BOUND_FRACTION of its time. The GPU then idles, and the
    throughput columns measure the loader, not the model."""

    def __init__(self, num_workers: int, decoder: str, on_gpu: bool) -> None:
        self.num_workers, self.decoder, self.on_gpu = num_workers, decoder, on_gpu
        self.windows = 0
        self.said = False

    def check(self, data_wait_frac: float, steps: int) -> str | None:
        self.windows += 1
        if self.said or self.windows == 1 or data_wait_frac <= DATA_BOUND_FRACTION:
            return None
        self.said = True
        dali = ("; data.decoder=dali decodes on the GPU (NVDEC) instead"
                if self.on_gpu and self.decoder != "dali" else "")
        return (f"hint: the last {steps} steps waited for their batches {data_wait_frac:.0%} of the time: the loader "
                f"sets the pace, not the model. More loader workers help while cores are free (data.num_workers="
                f"{self.num_workers} per rank; this machine has {os.cpu_count()} cores){dali}. `pytest "
                "benchmarks/test_bench_loader.py --benchmark-only` measures the loader alone.")
