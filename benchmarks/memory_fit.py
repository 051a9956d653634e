"""Does a config train on a smaller GPU? The peak memory of real training steps under an emulated memory cap, beside
the dry run's estimate, per per-GPU batch and activation-checkpointing setting (README, "On one small GPU").

    python benchmarks/memory_fit.py --config configs/vitl16.json --cap-gib 24 --batch 8,12,16,24 \
        [--checkpointing 0,1] [--steps 3] [--json OUT [--append]] [--section.key=value ...]

On CUDA, `torch.cuda.set_per_process_memory_fraction(cap / the device's memory)` makes PyTorch's allocator refuse
what a card of `--cap-gib` could not hold, so an 80 or 141 GB GPU answers for a 24 GB one. The emulation caps the
allocator only: the CUDA context, cuBLAS workspaces and the Triton and NCCL modules live outside it (about 0.5-1 GiB
on a real card), so a case that fits with less margin than that may not fit the real card. Each case is one
(batch, checkpointing) pair on the PyTorch backend (one GPU): the loop's models and optimizer (engine.loop
.build_models, TorchBackend), then `--steps` training steps of benchmarks/step_case.py with the masks of the
largest of the dry run's sampled steps (the box sizes change with the step, so this is the sampler's worst case
that the estimate also takes); the first step allocates AdamW's state. Recorded: status (ok, or oom with the
allocator's message), the allocator's peak allocated and reserved GiB, ms per step after the first, and the dry
run's estimate (engine/dry_run.py `Memory.total`, as configured). Everything is freed before the next case.
Without CUDA nothing can be capped or measured: the cases run (use a tiny config) and the peaks are None.
Overrides after the options apply to every case. `benchmarks/gpu_session.sh` runs this as its `memory_fit` step.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # as the benchmarks: the CPU run only proves the script works

import kernels  # noqa: E402
from benchmarks.conftest import versions  # noqa: E402
from benchmarks.step_case import make_step, step_case  # noqa: E402
from engine.backends import TorchBackend  # noqa: E402
from engine.config import Config, load_config  # noqa: E402
from engine.dry_run import GIB, MASK_STEPS, dry_run_report  # noqa: E402
from engine.durable import write_text_atomic  # noqa: E402
from engine.loop import build_models  # noqa: E402
from engine.packed_masks import MaskMaker  # noqa: E402
from models import attention  # noqa: E402


def largest_mask_step(cfg: Config) -> int:
    """The step among the dry run's MASK_STEPS whose masks keep the most (context, predictor) tokens."""
    make = MaskMaker(cfg.mask, cfg.grid, cfg.meta.seed, cfg.data.mask_type)
    b = cfg.data.batch_size

    def tokens(step: int) -> tuple[int, int]:
        masks = make(step, step * b, b)
        ctx, tgt = sum(masks.context_packing.seqlens), sum(masks.target_packing.seqlens)
        return ctx, ctx + tgt

    return max(range(MASK_STEPS), key=tokens)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _train(cfg: Config, steps: int, device: torch.device) -> float:
    """Seconds per step after the first of `steps` training steps; the modules die with this frame."""
    kernels.set_default_impl(cfg.model.kernels)
    attention.set_backend(cfg.model.attention)
    case = step_case(cfg, largest_mask_step(cfg))
    torch.manual_seed(cfg.meta.seed)
    models = build_models(cfg, device)
    step = make_step(case, models, TorchBackend(models.encoder, models.predictor, cfg), device)
    step()  # allocates AdamW's state: the steady peak needs a second step
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps - 1):
        step()
    _sync(device)
    return (time.perf_counter() - start) / (steps - 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fit_case(cfg: Config, steps: int, device: torch.device) -> dict[str, Any]:
    """One (batch, checkpointing) case: its status, measured peaks (None on the CPU) and the dry run's estimate."""
    estimate = dry_run_report(cfg, world_size=1).memory.total(None) / GIB
    row: dict[str, Any] = {"batch": cfg.data.batch_size, "checkpointing": cfg.model.activation_checkpointing,
                           "status": "ok", "error": None, "ms_per_step": None, "estimate_gib": estimate}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        row["ms_per_step"] = _train(cfg, steps, device) * 1e3
    except torch.cuda.OutOfMemoryError as e:  # the cap (or the card) refused an allocation: the case does not fit
        row["status"], row["error"] = "oom", str(e).split("\n")[0][:300]
    _release(device)  # the failed step's tensors die with the exception, the case's modules with _train's frame
    cuda = device.type == "cuda"
    row["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB if cuda else None
    row["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB if cuda else None
    return row


def apply_cap(cap_gib: float | None, device: torch.device) -> float | None:
    """Cap the CUDA allocator at `cap_gib`; the device's own memory in GiB (None on the CPU, which has no cap)."""
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory / GIB
    if cap_gib is not None:
        if cap_gib > total:
            raise SystemExit(f"memory_fit.py: --cap-gib {cap_gib} exceeds this GPU's {total:.1f} GiB")
        torch.cuda.set_per_process_memory_fraction(cap_gib / total, device)
    return total


def format_run(run: dict[str, Any]) -> str:
    cap = f"allocator capped at {run['cap_gib']} GiB" if run["cap_gib"] and run["device_gib"] else "no cap"
    lines = [f"{run['config']} on {run['device']} ({cap}){' ' + ' '.join(run['overrides']) if run['overrides'] else ''}",
             f"  {'batch':>5} {'ckpt':>4}  {'status':<6} {'peak alloc':>10} {'reserved':>9} {'estimate':>9} "
             f"{'ms/step':>8}   (GiB)"]

    def num(x: float | None, width: int, fmt: str = ".2f") -> str:
        return f"{x:{width}{fmt}}" if x is not None else f"{'-':>{width}}"

    for c in run["cases"]:
        lines.append(f"  {c['batch']:5d} {c['checkpointing']:4d}  {c['status']:<6} {num(c['peak_allocated_gib'], 10)} "
                     f"{num(c['peak_reserved_gib'], 9)} {num(c['estimate_gib'], 9)} {num(c['ms_per_step'], 8, '.0f')}")
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got '{text}'") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers >= 0, got '{text}'")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a training config")
    parser.add_argument("--cap-gib", type=float, help="emulate a GPU of this many GiB (default: the device's own)")
    parser.add_argument("--batch", type=_ints, help="per-GPU batch sizes, comma-separated (default: the config's)")
    parser.add_argument("--checkpointing", type=_ints, default=[0, 1],
                        help="model.activation_checkpointing values, comma-separated (default 0,1: off, every block)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per case (>= 2: the first allocates "
                                                             "the optimizer state)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--append", action="store_true", help="add this run to the runs already in --json")
    args, overrides = parser.parse_known_args(argv)
    if args.steps < 2:
        parser.error("--steps must be >= 2")
    if args.append and not args.json:
        parser.error("--append needs --json")
    if args.cap_gib is not None and args.cap_gib <= 0:
        parser.error("--cap-gib must be > 0")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = load_config(args.config, overrides)  # a wrong key or value fails here, before any case
    device_gib = apply_cap(args.cap_gib, device)
    run = {"config": args.config, "overrides": overrides, "cap_gib": args.cap_gib, "device_gib": device_gib,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "steps": args.steps,
           "cases": []}
    if device_gib is None:
        print("memory_fit.py: no CUDA device: the cases run uncapped and unmeasured (this proves the script only)",
              flush=True)
    earlier = json.loads(args.json.read_text())["runs"] if args.append and args.json.exists() else []
    for k in args.checkpointing:
        for b in args.batch or [base.data.batch_size]:
            cfg = load_config(args.config, [*overrides, "--meta.backend=torch", f"--data.batch_size={b}",
                                            f"--model.activation_checkpointing={k}"])
            run["cases"].append(fit_case(cfg, args.steps, device))
            c = run["cases"][-1]
            print(f"  batch {b}, checkpointing {k}: {c['status']}", flush=True)
            if args.json:  # after every case: a run cut short by a time limit keeps the cases it finished
                write_text_atomic(args.json, json.dumps({"versions": versions(), "runs": [*earlier, run]}, indent=1)
                                  + "\n")  # atomic: a kill mid-write must not leave a file --append cannot read
    print(format_run(run), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
