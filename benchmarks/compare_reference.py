"""This engine against the reference implementation (facebookresearch/jepa, V-JEPA 1) on the same config, batch,
dtype, device and synthetic clips: training-step samples/s, peak memory and their ratios, and the same for the
frozen-eval forward.

    python benchmarks/compare_reference.py --reference PATH_TO_JEPA_CHECKOUT --config CONFIG [--steps N]
        [--warmup W] [--eval-batch B] [--no-clip] [--device cpu|cuda] [--threads T] [--json OUT]
        [--section.key=value ...]

The reference is imported from the checkout at run time (never copied here); its training step lives inside its
`main()`, so benchmarks/reference_step.py rebuilds it around its own model, predictor, mask-collator and optimizer
modules (its docstring lists exactly what is rebuilt and what is left out: data loading, distributed/DDP,
checkpoints, CSV logging). Neither side loads data: both get the same seeded random clip tensor already on the
device, so the step alone is timed.

Training runs, each from the same initial weights (the reference's init, copied into ours) and timed over `--steps`
steps after `--warmup` steps:
    reference              its step without the per-step loggers (loss kept on the device)
    reference + loggers    with train.py's per-iteration grad_logger / adamw_logger / float() reads (host syncs)
    ours truncated         this engine (engine.step.train_step, torch backend) with mask.truncate_to_batch_min on,
                           fed the reference collator's own masks: exactly the reference's tokens (like for like)
    ours packed            the default: our mask generator, every context token kept (no batch-min truncation), so
                           it does more useful work per clip: compare it by tokens/s and MFU beside samples/s
FLOPs are engine.flops' model FLOPs of the sequences each side ran (matmuls, backward = 2x forward); MFU is over
engine.throughput.peak_tflops (data-sheet dense bf16; none on a CPU). The first step's loss of the reference and of
ours truncated (same weights, clip and masks) is printed as a cross-check that both run the same computation.

Frozen-eval forward: the reference's bare encoder under no_grad vs ours through engine.evaluation.features
.encode_views, both dense (all N tokens) on a clip batch.

Peak memory: on a GPU the CUDA allocator's high-water mark during the run minus what was allocated before it (the
shared clip), reset between runs; on a CPU the rise of the process's peak resident set (the kernel's VmHWM, reset
through /proc/self/clear_refs at the start of each run) over the resident set before it (after gc and malloc_trim):
it counts what the allocator keeps cached too, so the table marks it as approximate. "n/a" where it cannot be read.

A run that raises (out of memory: the reference may not fit a batch this engine fits; or an error) is recorded as
not measured and the others go ahead; the exit code is then 1. --json is rewritten (atomically) after every run with
`complete` false until the last one, so a command cut short by a time limit keeps the runs it finished.

Dtype: the config's meta.dtype under autocast on a GPU (bfloat16 in the recipes; the weights stay fp32 on both
sides), float32 on a CPU. Clipping: per network at optimization.clip_grad on both sides, as after the warmup epochs
(most of a run); --no-clip times a warmup-phase step.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import dataclasses
import gc
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.failed_run import Failed, attempt  # noqa: E402
from benchmarks.reference_step import ReferenceError, check_reference_path  # noqa: E402
from engine.config import Config, ConfigError, load_config  # noqa: E402
from engine.durable import write_text_atomic  # noqa: E402

GB = 1e9


# --------------------------------------------------------------------------------------------------------------------
# measurement helpers


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so the next CPU baseline is what is really live."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _proc_status_bytes(key: str) -> int | None:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM) in bytes, or None without procfs."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_rss_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0: `5 > /proc/self/clear_refs`)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of one run over a baseline: `baseline()` (after freeing the previous run), `start()` (from here on
    the peak is tracked), `stop()` -> GB, or None where it cannot be measured. On a GPU: the CUDA allocator's
    high-water mark; on a CPU: the kernel's peak resident set (VmHWM, reset at start), both minus the baseline."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0
        self.tracking = False

    def baseline(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            _malloc_trim()
            self.base = _proc_status_bytes("VmRSS") or 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.tracking = bool(self.base) and _reset_rss_peak()

    def stop(self) -> float | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self.base) / GB
        peak = _proc_status_bytes("VmHWM") if self.tracking else None
        self.tracking = False
        return (peak - self.base) / GB if peak is not None and peak > self.base else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Callable[[int], Any], warmup: int, steps: int, device: torch.device) -> tuple[float, Any]:
    """(seconds of steps warmup .. warmup+steps-1, synchronised at both ends; what step 0 returned, read as a float
    when it is a scalar tensor). Step 0 is a warm-up step, so reading it costs the timing nothing."""
    if warmup < 1:
        raise ValueError("--warmup must be >= 1 (the first step compiles, autotunes and allocates)")
    first = None
    start = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        result = run(i)
        if i == 0:
            first = float(result) if isinstance(result, torch.Tensor) and result.numel() == 1 else result
    _sync(device)
    return time.perf_counter() - start, first


@dataclasses.dataclass
class Run:
    """One measured run."""

    name: str
    batch_size: int
    steps: int
    seconds: float
    tokens: int  # tokens the networks ran over the timed steps (engine.throughput.step_tokens)
    flops: int  # model FLOPs of the timed steps (engine.flops)
    peak_mem_gb: float | None
    peak_tflops: float | None
    first_loss: float | None = None
    context_tokens_per_clip: list[float] | None = None  # mean kept context tokens per clip, per generator
    target_tokens_per_clip: list[float] | None = None

    @property
    def samples_per_s(self) -> float:
        return self.steps * self.batch_size / self.seconds

    @property
    def step_ms(self) -> float:
        return self.seconds / self.steps * 1e3

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def model_tflops_per_s(self) -> float:
        return self.flops / self.seconds / 1e12

    @property
    def mfu(self) -> float | None:
        return self.model_tflops_per_s / self.peak_tflops if self.peak_tflops else None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(samples_per_s=self.samples_per_s, step_ms=self.step_ms, tokens_per_s=self.tokens_per_s,
                   model_tflops_per_s=self.model_tflops_per_s, mfu=self.mfu)
        return out


# --------------------------------------------------------------------------------------------------------------------
# the two sides


@dataclasses.dataclass
class Setup:
    cfg: Config
    device: torch.device
    steps: int
    warmup: int
    clip_grad: float | None
    seed: int
    peak_tflops: float | None

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps


def _accounting(setup: Setup, step_masks: list[Any]) -> dict[str, Any]:
    """Tokens, model FLOPs and mean kept tokens per clip of the timed steps' masks (engine.flops / throughput)."""
    from engine.dry_run import model_shape
    from engine.flops import step_flops
    from engine.throughput import step_tokens

    cfg, b, n = setup.cfg, setup.cfg.data.batch_size, setup.cfg.num_tokens
    shape = model_shape(cfg)
    timed_masks = step_masks[setup.warmup:setup.total_steps]
    flops = tokens = 0
    num_gen = len(cfg.mask)
    ctx, tgt = [0] * num_gen, [0] * num_gen
    for masks in timed_masks:
        c, t = masks.context_packing.seqlens, masks.target_packing.seqlens
        flops += step_flops(n, b, c, t, shape.encoder, shape.predictor, shape.patch_features).total
        tokens += step_tokens(b, n, list(c), list(t))
        for g in range(num_gen):
            ctx[g] += sum(c[g * b:(g + 1) * b])
            tgt[g] += sum(t[g * b:(g + 1) * b])
    clips = len(timed_masks) * b
    return {"flops": flops, "tokens": tokens, "context_tokens_per_clip": [x / clips for x in ctx],
            "target_tokens_per_clip": [x / clips for x in tgt]}


def run_ours_train(setup: Setup, name: str, clips: torch.Tensor, step_masks: list[Any],
                   initial_state: tuple[dict, dict] | None, memory: PeakMemory) -> Run:
    """This engine's step (engine.step.train_step with the torch backend, built as engine.loop builds it) on
    `step_masks` (host StepMasks, one per step, moved to the device inside the step as the loop does)."""
    from engine.backends import TorchBackend
    from engine.build import build_encoder, build_predictor
    from engine.schedules import Schedules
    from engine.step import Models, train_step

    cfg, device = setup.cfg, setup.device
    cfg_torch = dataclasses.replace(cfg, deepspeed=None)  # one process, the torch backend, one micro-batch
    if device.type == "cuda":
        step_masks = [m.pin_memory() for m in step_masks]  # as the loader's pinned batches
    account = _accounting(setup, step_masks)
    memory.baseline()
    memory.start()
    torch.manual_seed(setup.seed)
    encoder, predictor = build_encoder(cfg), build_predictor(cfg)
    if initial_state is not None:
        encoder.load_state_dict(initial_state[0])
        predictor.load_state_dict(initial_state[1])
    encoder, predictor = encoder.to(device), predictor.to(device)
    models = Models(encoder, predictor, copy.deepcopy(encoder).requires_grad_(False))
    backend = TorchBackend(encoder, predictor, cfg_torch)
    schedules = Schedules.from_config(cfg.optimization)

    def step(i: int) -> torch.Tensor:
        lr, wd, momentum = schedules.at(i)
        out = train_step(models, backend, [(clips, step_masks[i].to(device, non_blocking=True))], lr=lr, wd=wd,
                         momentum=momentum, clip_grad=setup.clip_grad, loss_exp=cfg.loss.loss_exp,
                         dtype=cfg.meta.dtype)
        return out.loss

    seconds, first_loss = timed(step, setup.warmup, setup.steps, device)
    peak = memory.stop()
    return Run(name, cfg.data.batch_size, setup.steps, seconds, account["tokens"], account["flops"], peak,
               setup.peak_tflops, first_loss, account["context_tokens_per_clip"], account["target_tokens_per_clip"])


def run_reference_train(setup: Setup, name: str, ref: Any, clips: torch.Tensor, ref_masks: list[tuple[list, list]],
                        step_masks: list[Any], initial_state: tuple[dict, dict] | None, memory: PeakMemory, *,
                        loggers: bool) -> Run:
    """The reference's rebuilt step (benchmarks/reference_step.py) on its collator's masks."""
    from benchmarks.reference_step import ReferenceTrainer

    device = setup.device
    if device.type == "cuda":  # pinned, as its loader's (pin_mem: true in the recipes)
        ref_masks = [([m.pin_memory() for m in enc], [m.pin_memory() for m in pred]) for enc, pred in ref_masks]
    account = _accounting(setup, step_masks)
    memory.baseline()
    memory.start()
    trainer = ReferenceTrainer(ref, setup.cfg, device, seed=setup.seed, initial_state=initial_state)

    def step(i: int) -> Any:
        masks_enc, masks_pred = ref_masks[i]
        return trainer.step(clips, masks_enc, masks_pred, clip_grad=setup.clip_grad, loggers=loggers)

    seconds, first_loss = timed(step, setup.warmup, setup.steps, device)
    peak = memory.stop()
    return Run(name, setup.cfg.data.batch_size, setup.steps, seconds, account["tokens"], account["flops"], peak,
               setup.peak_tflops, first_loss, account["context_tokens_per_clip"], account["target_tokens_per_clip"])


def _eval_flops(setup: Setup, batch: int) -> int:
    from engine.dry_run import model_shape
    from engine.flops import encoder_flops

    shape = model_shape(setup.cfg)
    return encoder_flops([setup.cfg.num_tokens] * batch, shape.encoder, shape.patch_features)


def _first_to_host(i: int, features: torch.Tensor) -> torch.Tensor | None:
    """The first (warm-up) call's features as an fp32 host copy, for the cross-check; nothing kept after it, so no
    output outlives its call on the device."""
    return features.float().cpu() if i == 0 else None


def run_ours_eval(setup: Setup, clips: torch.Tensor, state: dict | None,
                  memory: PeakMemory) -> tuple[Run, torch.Tensor]:
    """Our frozen encoder's dense forward through the evaluation path (encode_views: no_grad, autocast dtype)."""
    from engine.build import build_encoder
    from engine.evaluation.features import encode_views

    cfg, device, b = setup.cfg, setup.device, clips.shape[0]
    memory.baseline()
    torch.manual_seed(setup.seed)
    encoder = build_encoder(cfg)
    if state is not None:
        encoder.load_state_dict(state)
    encoder = encoder.to(device).requires_grad_(False).eval()
    views = clips[:, None, None]  # (B, S=1, V=1, C, F, H, W)
    memory.start()
    seconds, out = timed(lambda i: _first_to_host(i, encode_views(encoder, views, dtype=cfg.meta.dtype,
                                                                  clips_per_forward=b)[:, 0]),
                         setup.warmup, setup.steps, device)
    peak = memory.stop()
    n = setup.steps
    return Run("ours", b, n, seconds, n * b * cfg.num_tokens, n * _eval_flops(setup, b), peak,
               setup.peak_tflops), out


def run_reference_eval(setup: Setup, ref: Any, clips: torch.Tensor, state: dict | None,
                       memory: PeakMemory) -> tuple[Run, torch.Tensor]:
    from benchmarks.reference_step import reference_eval_encoder, reference_eval_forward

    cfg, device, b = setup.cfg, setup.device, clips.shape[0]
    memory.baseline()
    encoder = reference_eval_encoder(ref, cfg, device, seed=setup.seed, state=state)
    gc.collect()  # its predictor, built and dropped
    memory.start()
    seconds, out = timed(lambda i: _first_to_host(i, reference_eval_forward(encoder, clips, cfg)), setup.warmup,
                         setup.steps, device)
    peak = memory.stop()
    n = setup.steps
    return Run("reference", b, n, seconds, n * b * cfg.num_tokens, n * _eval_flops(setup, b), peak,
               setup.peak_tflops), out


# --------------------------------------------------------------------------------------------------------------------
# the report


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _get(run: Run | Failed | None, attr: str) -> float | None:
    """A figure of a run, None for a run that failed or has not run."""
    return getattr(run, attr) if isinstance(run, Run) else None


def _table(title: str, runs: list[Run | Failed], n: int, cpu: bool, with_tokens: bool) -> list[str]:
    mem = "peak RSS rise GB (approx.)" if cpu else "peak mem GB"
    head = f"{title:<30} {'samples/s':>10} {'step ms':>9} {'tokens/s':>11} {'TFLOP/s':>9} {'MFU':>6} {mem:>26}"
    if with_tokens:
        head += f"  {'ctx tokens/clip per generator':<32} {'loss@1':>9}"
    lines = [head]
    for r in runs:
        if isinstance(r, Failed):
            lines.append(f"{r.name:<30} {'out of memory' if r.out_of_memory else 'failed: ' + r.error}")
            continue
        line = (f"{r.name:<30} {r.samples_per_s:>10.2f} {r.step_ms:>9.1f} {r.tokens_per_s:>11.0f} "
                f"{r.model_tflops_per_s:>9.4f} {_fmt(r.mfu, '>6.1%'):>6} {_fmt(r.peak_mem_gb, '.3f'):>26}")
        if with_tokens:
            ctx = " / ".join(f"{c:.0f} ({c / n:.0%})" for c in r.context_tokens_per_clip or [])
            line += f"  {ctx:<32} {_fmt(r.first_loss, '>9.5f'):>9}"
        lines.append(line)
    return lines


# (JSON key, label) of the ratio lines, each ours / the reference unless the label says otherwise
RATIO_LABELS = (
    ("samples_per_s_truncated", "samples/s ours/ref (truncated)"),
    ("peak_memory_truncated", "peak memory ours/ref (truncated)"),
    ("samples_per_s_truncated_vs_ref_loggers", "samples/s ours/ref+loggers (truncated)"),
    ("samples_per_s_ref_loggers_vs_ref", "samples/s ref+loggers/ref"),
    ("samples_per_s_packed", "samples/s ours/ref (packed)"),
    ("tokens_per_s_packed", "tokens/s ours/ref (packed)"),
    ("model_flops_per_s_packed", "model FLOP/s ours/ref (packed)"),
    ("peak_memory_packed", "peak memory ours/ref (packed)"),
    ("samples_per_s_eval", "samples/s ours/ref (eval forward)"),
    ("peak_memory_eval", "peak memory ours/ref (eval forward)"),
)
TRAIN_RUNS = ("reference", "reference_loggers", "ours_truncated", "ours_packed")
EVAL_RUNS = ("reference", "ours")


@dataclasses.dataclass
class Comparison:
    """The runs as they finish (Run, or Failed), and everything derived from them. `write()` after every run keeps
    what finished when a device's time limit ends the command halfway (`complete` false until the last run)."""

    header: dict[str, Any]  # config, device, dtype, batch, steps, versions, ...
    json_path: Path | None = None
    train: dict[str, Run | Failed] = dataclasses.field(default_factory=dict)
    eval: dict[str, Run | Failed] = dataclasses.field(default_factory=dict)
    eval_max_abs_diff: float | None = None

    def add(self, section: str, key: str, run: Run | Failed) -> None:
        getattr(self, section)[key] = run
        self.write(complete=False)

    @property
    def failed(self) -> list[Failed]:
        return [r for r in (*self.train.values(), *self.eval.values()) if isinstance(r, Failed)]

    def ratios(self) -> dict[str, float | None]:
        t, e = self.train.get, self.eval.get
        ref, ref_log, trunc, packed = (t(k) for k in TRAIN_RUNS)
        return {
            "samples_per_s_truncated": _ratio(_get(trunc, "samples_per_s"), _get(ref, "samples_per_s")),
            "peak_memory_truncated": _ratio(_get(trunc, "peak_mem_gb"), _get(ref, "peak_mem_gb")),
            "samples_per_s_truncated_vs_ref_loggers": _ratio(_get(trunc, "samples_per_s"),
                                                             _get(ref_log, "samples_per_s")),
            "samples_per_s_ref_loggers_vs_ref": _ratio(_get(ref_log, "samples_per_s"), _get(ref, "samples_per_s")),
            "samples_per_s_packed": _ratio(_get(packed, "samples_per_s"), _get(ref, "samples_per_s")),
            "tokens_per_s_packed": _ratio(_get(packed, "tokens_per_s"), _get(ref, "tokens_per_s")),
            "model_flops_per_s_packed": _ratio(_get(packed, "model_tflops_per_s"), _get(ref, "model_tflops_per_s")),
            "peak_memory_packed": _ratio(_get(packed, "peak_mem_gb"), _get(ref, "peak_mem_gb")),
            "samples_per_s_eval": _ratio(_get(e("ours"), "samples_per_s"), _get(e("reference"), "samples_per_s")),
            "peak_memory_eval": _ratio(_get(e("ours"), "peak_mem_gb"), _get(e("reference"), "peak_mem_gb")),
        }

    def loss_check(self) -> dict[str, float | None]:
        """The first step's loss on both sides (same weights, clip and masks in truncated mode)."""
        ours = _get(self.train.get("ours_truncated"), "first_loss")
        ref = _get(self.train.get("reference"), "first_loss")
        return {"ours_truncated": ours, "reference": ref,
                "reference_loggers": _get(self.train.get("reference_loggers"), "first_loss"),
                "abs_diff": abs(ours - ref) if ours is not None and ref is not None else None}

    def report(self, n: int, cpu: bool, peak_tflops: float | None) -> list[str]:
        h = self.header
        train = [self.train[k] for k in TRAIN_RUNS if k in self.train]
        evals = [self.eval[k] for k in EVAL_RUNS if k in self.eval]
        lines = [""] + _table(f"training step (batch {h['batch_size']})", train, n, cpu, with_tokens=True)
        lines += [""] + _table(f"frozen-eval forward (batch {h['eval_batch_size']})", evals, n, cpu,
                               with_tokens=False)
        ratios = self.ratios()
        lines += [""] + [f"ratio {label}: {_fmt(ratios[key], '.2f')}" for key, label in RATIO_LABELS] + [""]
        ref, packed = self.train.get("reference"), self.train.get("ours_packed")
        if isinstance(ref, Run) and isinstance(packed, Run):
            lines.append(
                f"MFU over {_fmt(peak_tflops, '.1f')} TFLOP/s (engine.throughput.peak_tflops); packed mode keeps "
                f"every context token: ours {' / '.join(f'{c / n:.0%}' for c in packed.context_tokens_per_clip)} "
                f"of N per clip vs the reference's batch-min "
                f"{' / '.join(f'{c / n:.0%}' for c in ref.context_tokens_per_clip)}")
        check = self.loss_check()
        lines.append(f"cross-check, first step loss (truncated, same weights, clip and masks): ours "
                     f"{_fmt(check['ours_truncated'], '.7f')} ref {_fmt(check['reference'], '.7f')} |diff| "
                     f"{_fmt(check['abs_diff'], '.2e')}; eval forward max |diff| "
                     f"{_fmt(self.eval_max_abs_diff, '.2e')}")
        if cpu:
            lines.append("CPU peak memory: the rise of the process's peak resident set (VmHWM) over its resident "
                         "set before the run, an approximation; on a GPU it is the CUDA allocator's peak")
        for f in self.failed:
            lines.append(f"not measured: {f.name}: {'out of memory' if f.out_of_memory else f.error}")
        return lines

    def to_dict(self, complete: bool) -> dict[str, Any]:
        return {**self.header, "complete": complete,
                "train": {k: r.to_dict() for k, r in self.train.items()},
                "eval": {**{k: r.to_dict() for k, r in self.eval.items()}, "max_abs_diff": self.eval_max_abs_diff},
                "ratios": self.ratios(), "loss_check": self.loss_check(),
                "failed": [f.name for f in self.failed]}

    def write(self, complete: bool) -> None:
        if self.json_path is not None:
            self.json_path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.json_path, json.dumps(self.to_dict(complete), indent=1) + "\n")


def _versions(ref: Any) -> dict[str, Any]:
    from benchmarks.env_report import report

    info = report()
    return {**{k: info[k] for k in ("date", "git_commit", "git_dirty", "host", "platform", "cpu_count", "python",
                                    "torch", "torch_cuda", "triton", "numpy", "devices", "env")},
            "reference_path": str(ref.path), "reference_commit": ref.commit}


# --------------------------------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description="Compare this engine's training step and frozen-eval forward with facebookresearch/jepa's on the "
                    "same config, batch, dtype, device and synthetic clips.",
        epilog="Any --section.key=value overrides the config (e.g. --data.batch_size=8).")
    parser.add_argument("--reference", required=True, help="checkout of facebookresearch/jepa (V-JEPA 1)")
    parser.add_argument("--config", required=True, help="this engine's JSON config (e.g. configs/vitl16.json)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run (default 10)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 on GPU, 2 on CPU)")
    parser.add_argument("--eval-batch", type=int, default=None, help="clips per eval forward (default data.batch_size)")
    parser.add_argument("--no-clip", action="store_true", help="no gradient clipping (a warmup-phase step)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (torch.set_num_threads); 1 gives stable timings on a shared CPU")
    parser.add_argument("--json", type=Path, default=None, help="write every figure, the device and versions here")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    try:
        cfg = load_config(args.config, overrides)
        if args.steps < 1:
            raise ConfigError("--steps must be >= 1")
        if args.warmup is not None and args.warmup < 1:
            raise ConfigError("--warmup must be >= 1 (the first step compiles, autotunes and allocates)")
        if args.threads is not None and args.threads < 1:
            raise ConfigError("--threads must be >= 1")
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is available")
        ref_path = check_reference_path(args.reference)
    except (ReferenceError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.overrides = overrides
    return compare(cfg, ref_path, args)


def compare(cfg: Config, ref_path: Path, args: argparse.Namespace) -> int:
    import kernels
    from benchmarks.reference_step import (build_reference_models, import_reference, reference_masks,
                                           stripped_state, to_step_masks)
    from engine.packed_masks import MaskMaker
    from engine.throughput import peak_tflops
    from models import attention

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True  # as the reference's train.py (its patch embedding is a Conv3d)
    kernels.set_default_impl(cfg.model.kernels)  # as engine.loop: once, before any model runs
    attention.set_backend(cfg.model.attention)
    try:
        ref = import_reference(ref_path)
    except ReferenceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    cpu = device.type == "cpu"
    b, n = cfg.data.batch_size, cfg.num_tokens
    eval_b = args.eval_batch or b
    setup = Setup(cfg, device, args.steps, args.warmup or (2 if cpu else 3),
                  None if args.no_clip else cfg.optimization.clip_grad, cfg.meta.seed, peak_tflops(device))
    dtype = "float32" if cpu else cfg.meta.dtype
    d, m = cfg.data, cfg.model
    where = f"CPU, torch threads {torch.get_num_threads()}" if cpu else torch.cuda.get_device_name(device)
    precision = "float32, no autocast" if dtype == "float32" else f"{dtype} autocast over fp32 weights"
    print(f"device {device} ({where}), torch {torch.__version__}, {precision}, reference {ref.path} @ "
          f"{(ref.commit or 'unknown')[:7]}")
    print(f"config {args.config}: {m.model_name} (embed {m.embed_dim or 'default'}, depth {m.depth or 'default'}), "
          f"{d.num_frames} frames x {d.crop_size} px, N={n} tokens/clip, batch {b}, {len(cfg.mask)} mask generators, "
          f"{setup.warmup} warm-up + {setup.steps} timed steps per run, clipping "
          f"{'off' if setup.clip_grad is None else setup.clip_grad}")
    from engine.build import encoder_variant

    v = encoder_variant(cfg)
    head_dims = {"ragged_context": v.dim // v.heads, "dense_target": v.dim // v.heads,
                 "dense_predictor": m.pred_embed_dim // (m.pred_num_heads or v.heads)}
    ours_backends = (f"kernels {kernels.dispatch.resolve(None, device)}, attention "
                     f"{attention.describe(device, getattr(torch, dtype), head_dims)}")
    print(f"ours: torch backend, {ours_backends}; reference: use_sdpa {cfg.meta.use_sdpa}, AdamW from its init_opt")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if cpu and torch.get_num_threads() > 1 and load > (os.cpu_count() or 1):
        print(f"notice: load average {load:.1f} on {os.cpu_count()} CPUs: {torch.get_num_threads()} torch threads "
              "stall at every op when other processes hold the cores; --threads 1 gives steadier timings")
    if m.activation_checkpointing:
        print(f"notice: model.activation_checkpointing={m.activation_checkpointing} recomputes blocks on our side; "
              "the reference (V1) has no activation checkpointing")

    # the same inputs for both sides: clips, the reference's initial weights, the reference collator's masks
    clip_gen = torch.Generator().manual_seed(setup.seed + 1)
    clips = torch.randn(b, 3, d.num_frames, d.crop_size, d.crop_size, generator=clip_gen).to(device)
    eval_clips = clips if eval_b == b else torch.randn(
        eval_b, 3, d.num_frames, d.crop_size, d.crop_size, generator=clip_gen).to(device)
    torch.manual_seed(setup.seed)
    ref_encoder, ref_predictor = build_reference_models(ref, cfg, torch.device("cpu"))
    initial_state = (stripped_state(ref_encoder), stripped_state(ref_predictor))
    del ref_encoder, ref_predictor
    ref_masks = reference_masks(ref, cfg, b, setup.total_steps, seed=setup.seed + 2)
    truncated_masks = [to_step_masks(enc, pred, n) for enc, pred in ref_masks]
    cfg_truncated = dataclasses.replace(cfg, mask=[dataclasses.replace(g, truncate_to_batch_min=True)
                                                   for g in cfg.mask])
    cfg_packed = dataclasses.replace(cfg, mask=[dataclasses.replace(g, truncate_to_batch_min=False)
                                                for g in cfg.mask])
    make_packed = MaskMaker(cfg_packed.mask, cfg.grid, cfg.meta.seed, cfg.data.mask_type)  # ours: nothing truncated
    packed_masks = [make_packed(step, step * b, b) for step in range(setup.total_steps)]
    memory = PeakMemory(device)
    header = {
        "config": str(args.config), "overrides": list(getattr(args, "overrides", [])), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if not cpu else "cpu", "dtype": dtype,
        "batch_size": b, "eval_batch_size": eval_b, "num_tokens": n, "steps": setup.steps, "warmup": setup.warmup,
        "cpu_threads": torch.get_num_threads(), "load_average": load, "clip_grad": setup.clip_grad,
        "peak_tflops": setup.peak_tflops,
        "peak_memory_method": "vmhwm_rise_over_rss" if cpu else "cuda_max_memory_allocated",
        "ours_backends": ours_backends, "versions": _versions(ref)}
    result = Comparison(header, args.json)

    print("\ntraining step ...", flush=True)
    truncated = dataclasses.replace(setup, cfg=cfg_truncated)
    packed = dataclasses.replace(setup, cfg=cfg_packed)
    train_runs = (  # (JSON key, row name, run)
        ("reference", "reference", lambda name: run_reference_train(
            setup, name, ref, clips, ref_masks, truncated_masks, initial_state, memory, loggers=False)),
        ("reference_loggers", "reference + loggers", lambda name: run_reference_train(
            setup, name, ref, clips, ref_masks, truncated_masks, initial_state, memory, loggers=True)),
        ("ours_truncated", "ours truncated (same tokens)", lambda name: run_ours_train(
            truncated, name, clips, truncated_masks, initial_state, memory)),
        ("ours_packed", "ours packed (default)", lambda name: run_ours_train(
            packed, name, clips, packed_masks, initial_state, memory)),
    )
    for key, name, run in train_runs:
        result.add("train", key, attempt(name, lambda: run(name), device))  # noqa: B023 (called at once)
    print("frozen-eval forward ...", flush=True)
    outs = {}
    for key, run in (("reference", lambda: run_reference_eval(setup, ref, eval_clips, initial_state[0], memory)),
                     ("ours", lambda: run_ours_eval(setup, eval_clips, initial_state[0], memory))):
        measured = attempt(key, run, device)
        if isinstance(measured, tuple):
            measured, outs[key] = measured
        if key == "ours" and len(outs) == 2:
            result.eval_max_abs_diff = (outs["ours"] - outs["reference"]).abs().max().item()
        result.add("eval", key, measured)

    print("\n".join(result.report(n, cpu, setup.peak_tflops)), flush=True)
    result.write(complete=True)
    if args.json is not None:
        print(f"wrote {args.json}")
    return 1 if result.failed else 0

if __name__ == "__main__":
    sys.exit(main())
