"""Where one training step's time goes, as numbers a GPU session brings back (a Chrome trace of a ViT-H step is tens
of MB; this summary is a few KB and is read without the GPU).

    python benchmarks/profile_step.py --config configs/vitl16.json [--config configs/vith16_384.json ...]
        [--truncate] [--steps 3] [--warmup 3] [--json OUT] [--trace-dir DIR] [--section.key=value ...]

Each config's step (benchmarks/step_case.py: `train_step` on synthetic clips and the config's masks, PyTorch backend,
models built as the loop builds them) runs `--warmup` steps, then `--steps` synchronised steps timed without the
profiler (step_ms, clips/s, model TFLOP/s, MFU against the data sheet), then the same number under torch.profiler
(CPU, plus CUDA kernels on a GPU). From the profiler's trace:
  * gpu: the span from the first to the last device activity (kernels, copies, memsets) per step, the time the device
    was busy (the union of those intervals: concurrent kernels count once), the busy fraction, and the idle gaps
    between activities (their total, and how many exceed 20 us: launch gaps, host syncs, a host-bound step);
  * phases: per named range of the step (engine/profiling.py: vjepa/target_forward, vjepa/backward, ...) the host
    time of the range and, on a GPU, the device-busy time inside the range's GPU-side interval;
  * top_kernels: the kernels by device time per step, with their share of the busy time.
Overrides after the options apply to every config (e.g. `--data.batch_size=2` for a small CPU run). `--trace-dir`
also writes each Chrome trace (https://ui.perfetto.dev). `benchmarks/gpu_session.sh` runs this as its `profile` step.
A config that raises (out of memory, an error) is recorded with its error and the next one still runs (exit code 1);
--json is rewritten after every config (`complete` false until the last), so a run cut short keeps what finished.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # as the benchmarks: the CPU run only proves the script works

import kernels  # noqa: E402
from benchmarks.conftest import versions  # noqa: E402
from benchmarks.failed_run import Failed, attempt  # noqa: E402
from benchmarks.step_case import make_step, step_case  # noqa: E402
from engine.backends import TorchBackend  # noqa: E402
from engine.config import Config, load_config  # noqa: E402
from engine.durable import write_text_atomic  # noqa: E402
from engine.loop import attention_line, build_models  # noqa: E402
from engine.profiling import PREFIX  # noqa: E402
from engine.throughput import peak_tflops  # noqa: E402
from models import attention  # noqa: E402

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")  # device activity in a Kineto Chrome trace
GAP_US = 20.0  # an idle gap longer than this is a launch gap or a host wait, not a kernel boundary
TOP_KERNELS = 25
NAME_CHARS = 160  # templated CUTLASS / Triton names can run to a thousand characters


def _merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _overlap(busy: list[tuple[float, float]], ranges: list[tuple[float, float]]) -> float:
    """Microseconds of the merged `busy` intervals inside the merged `ranges`."""
    total, i = 0.0, 0
    for start, end in ranges:
        while i < len(busy) and busy[i][1] <= start:
            i += 1
        j = i
        while j < len(busy) and busy[j][0] < end:
            total += min(end, busy[j][1]) - max(start, busy[j][0])
            j += 1
    return total


def summarize(events: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    """The summary of a trace's events (Chrome trace "X" events: ts and dur in microseconds) over `steps` steps."""
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    device = [e for e in complete if e.get("cat") in DEVICE_CATEGORIES]
    busy = _merge([(e["ts"], e["ts"] + e["dur"]) for e in device])
    per_step = 1e-3 / steps  # microseconds in the trace -> milliseconds per step
    gpu = None
    if busy:
        gaps = [b[0] - a[1] for a, b in zip(busy, busy[1:])]
        span = busy[-1][1] - busy[0][0]
        busy_us = sum(end - start for start, end in busy)
        gpu = {"span_ms_per_step": span * per_step, "busy_ms_per_step": busy_us * per_step,
               "busy_fraction": busy_us / span if span else 1.0,
               "idle_gap_ms_per_step": sum(gaps) * per_step,
               "gaps_over_20us_per_step": sum(g > GAP_US for g in gaps) / steps}

    ranges: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: {"cpu": [], "gpu": []})
    for e in complete:
        name = e.get("name", "")
        if name.startswith(PREFIX) and e.get("cat") in ("user_annotation", "gpu_user_annotation"):
            side = "gpu" if e["cat"] == "gpu_user_annotation" else "cpu"
            ranges[name.removeprefix(PREFIX)][side].append((e["ts"], e["ts"] + e["dur"]))
    phases = {}
    for name, sides in ranges.items():
        phases[name] = {"cpu_ms_per_step": sum(end - start for start, end in sides["cpu"]) * per_step,
                        "gpu_busy_ms_per_step": (_overlap(busy, _merge(sides["gpu"])) * per_step
                                                 if busy and sides["gpu"] else None)}

    by_name: dict[str, list[float]] = defaultdict(list)
    for e in device:
        if e.get("cat") == "kernel":
            by_name[e.get("name", "?")].append(e["dur"])
    busy_total = sum(end - start for start, end in busy) or 1.0
    top = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:TOP_KERNELS]
    top_kernels = [{"name": name[:NAME_CHARS], "calls_per_step": len(durs) / steps,
                    "ms_per_step": sum(durs) * per_step, "share_of_busy": sum(durs) / busy_total}
                   for name, durs in top]
    return {"steps": steps, "gpu": gpu, "phases": phases, "top_kernels": top_kernels}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_config(cfg: Config, name: str, *, steps: int, warmup: int, device: torch.device,
                   trace_dir: Path | None) -> dict[str, Any]:
    kernels.set_default_impl(cfg.model.kernels)
    attention.set_backend(cfg.model.attention)
    case = step_case(cfg)
    torch.manual_seed(cfg.meta.seed)
    models = build_models(cfg, device)
    step = make_step(case, models, TorchBackend(models.encoder, models.predictor, cfg), device)
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = (time.perf_counter() - start) / steps

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(trace_dir or tmp) / f"trace_{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]

    b, peak = cfg.data.batch_size, peak_tflops(device)
    tflops = case.flops / seconds / 1e12
    result = {"name": name, "batch": b, "tokens_per_clip": cfg.num_tokens, "step_ms": seconds * 1e3,
              "samples_per_s": b / seconds, "model_tflops": tflops, "mfu_datasheet": tflops / peak if peak else None,
              "context_tokens_per_clip": case.tokens_per_clip()["context"],
              "attention": attention_line(cfg, device), "kernels": kernels.dispatch.resolve(None, device),
              **summarize(events, steps)}
    del models, step, prof
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def format_result(r: dict[str, Any]) -> str:
    mfu = f", MFU {r['mfu_datasheet']:.1%}" if r["mfu_datasheet"] is not None else ""
    lines = [f"{r['name']}: batch {r['batch']}, {r['step_ms']:.1f} ms/step, {r['samples_per_s']:.1f} clips/s, "
             f"{r['model_tflops']:.1f} TFLOP/s{mfu}; attention {r['attention']}; kernels {r['kernels']}"]
    if r["gpu"]:
        g = r["gpu"]
        lines.append(f"  device busy {g['busy_ms_per_step']:.1f} of {g['span_ms_per_step']:.1f} ms "
                     f"({g['busy_fraction']:.0%}); idle gaps {g['idle_gap_ms_per_step']:.2f} ms, "
                     f"{g['gaps_over_20us_per_step']:.0f} over 20 us per step")
    lines.append(f"  {'phase':<28}{'host ms':>9}{'device ms':>11}")
    for name, p in sorted(r["phases"].items(), key=lambda item: -item[1]["cpu_ms_per_step"]):
        dev = f"{p['gpu_busy_ms_per_step']:11.2f}" if p["gpu_busy_ms_per_step"] is not None else f"{'-':>11}"
        lines.append(f"  {name:<28}{p['cpu_ms_per_step']:9.2f}{dev}")
    for k in r["top_kernels"][:10]:
        lines.append(f"  {k['ms_per_step']:8.2f} ms {k['share_of_busy']:6.1%} x{k['calls_per_step']:<5.0f} "
                     f"{k['name'][:90]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True, help="a training config (repeatable)")
    parser.add_argument("--truncate", action="store_true", help="the reference's batch-minimum truncation")
    parser.add_argument("--steps", type=int, default=3, help="steps timed, then as many profiled")
    parser.add_argument("--warmup", type=int, default=3, help="steps before any timing (compilation, autotuning)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--trace-dir", type=Path, help="also keep each Chrome trace here")
    args, overrides = parser.parse_known_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.truncate:
        overrides = [*overrides, "--mask.truncate_to_batch_min=true"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    configs = [(path, load_config(path, overrides)) for path in args.config]  # every config's errors before any run
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    header, results = {"device": device_name, "versions": versions()}, []
    for path, cfg in configs:
        name = f"{Path(path).stem}-{'truncated' if args.truncate else 'packed'}"
        result = attempt(name, lambda: profile_config(cfg, name, steps=args.steps, warmup=args.warmup,  # noqa: B023
                                                      device=device, trace_dir=args.trace_dir), device)
        if isinstance(result, Failed):
            result = {"name": name, "error": result.error, "out_of_memory": result.out_of_memory}
        else:
            print(format_result(result), flush=True)
        results.append(result)
        if args.json:  # after every config: a command cut short by the device's limit keeps the configs it finished
            complete = len(results) == len(configs)
            write_text_atomic(args.json, json.dumps({**header, "complete": complete, "results": results},
                                                    indent=1) + "\n")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
