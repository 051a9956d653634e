"""The whole training step end to end, the frozen encoder's inference, and the bare GEMM peak they are measured against.

What one measured step is: benchmarks/step_case.py (`engine.step.train_step` as the loop calls it, on a synthetic clip
batch already on the device and the config's own masks, clipping on; no loader), on models and a backend built as the
loop builds them (`engine.loop.build_models`, `TorchBackend`: AdamW, fused on CUDA). One step per round, synchronised
at its end.

Cases, with CUDA (bf16 autocast, the configs' batch sizes): ViT-L/16 at 224 px (configs/vitl16.json, batch 24) and
ViT-H/16 at 384 px (configs/vith16_384.json, batch 10), each with packed masks (provider "ours-packed", the default)
and with the reference's batch-minimum truncation ("ours-truncated": `mask.truncate_to_batch_min=true`, the like-for-
like comparison with the reference); then the DeepSpeed backend (ZeRO-2 on the one device) in its two precision
modes, packed masks: "ours-packed-zero2" (fp32 weights under the step's autocast: the faithful default of the
recipes) and "ours-packed-zero2-bf16w" (the bf16-weights opt-in, `deepspeed.bf16.enabled`); last, packed with
compiled blocks ("ours-packed-compiled": `model.compile=true`, models/blocks.py; its first calls compile, inside the
warm-up steps, for minutes). A case that runs out of GPU memory is skipped with the allocator's figures in the
reason (pytest -rs, gpu_session.sh's log), and the next case starts on a freed GPU. Without CUDA: the tiny config
(configs/tiny_synthetic.json) at batch 2, fp32, PyTorch kernels: it proves that the file runs, not how fast anything is.

extra_info (besides op, provider, case, direction, shape, dtype, device, interpreted, as the `bench` fixture writes):
  * samples_per_s = B / median; tokens_per_s = tokens the three networks ran per step (target B*N, context kept
    tokens, predictor context + targets: engine/throughput.py `step_tokens`) / median; context_tokens_per_clip and
    target_tokens_per_clip per mask generator;
  * flops (engine/flops.py `step_flops`, the loop's own count: matmuls, backward = 2x forward) and
    model_tflops = flops / median;
  * gemm_tflops: a bare square GEMM measured in the same process (bf16 8192^3 on CUDA, fp32 512^3 on the CPU; the
    best of 5 timed batches), and mfu_measured_peak = model_tflops / gemm_tflops; mfu_datasheet = model_tflops / the
    GPU's dense bf16 data-sheet peak (engine/throughput.py `peak_tflops`: 989 TFLOP/s for H100/H200; None on a CPU);
  * peak_memory_gb: the CUDA allocator's high-water mark over the case (weights, AdamW state, EMA target,
    activations), on a CPU the process's peak RSS (monotone over the session: meaningless per case);
  * kernels (triton | torch), attention (the backends auto picked), versions (conftest's `versions`: python, torch,
    CUDA, triton, deepspeed, git commit).
The GEMM itself is a result too (op "gemm"), and so is the frozen-evaluation forward (op "eval_forward", provider
"ours-dense"): the target encoder over all N tokens of 32 clips (engine/evaluation's default clips_per_forward; 4 on
the CPU), no grad, bf16 autocast, with clips_per_s, tokens_per_s, model_tflops (engine/flops.py `encoder_flops`), the
same MFU figures and peak memory (the encoder's weights and one forward's activations). One more eval_forward case is
the long clip of facebookresearch/vjepa2#71 (ViT-L/16 on one 64 x 256^2 clip, 8192 tokens, for which ~40 GB were
reported with the public code): "ours-dense" as above, and "fp32-grad", that issue's own call (`model(data)`: fp32,
trainable weights, grad mode on, so autograd keeps every block's activations), the memory the frozen path saves.
"""

from __future__ import annotations

import functools
import gc
import os
import platform
import time
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch

import kernels
from benchmarks.conftest import versions as _versions
from benchmarks.shapes import ACT_DTYPE, CUDA, DEVICE, ROOT
from benchmarks.step_case import make_step, step_case
from engine.backends import Backend, DeepSpeedBackend, TorchBackend
from engine.build import build_encoder
from engine.config import Config, load_config
from engine.flops import encoder_flops
from engine.loop import attention_line, build_models, flop_dims, init_distributed
from engine.step import Models, autocast_context
from engine.throughput import peak_memory_gb, peak_tflops
from models import attention

# model case -> (config, overrides)
MODELS = {"vitl16_224": ("vitl16.json", ()), "vith16_384": ("vith16_384.json", ())} if CUDA else \
    {"tiny": ("tiny_synthetic.json", ("--data.batch_size=2",))}
MODES = {"packed": (), "truncated": ("--mask.truncate_to_batch_min=true",),
         "packed-compiled": ("--model.compile=true",)}
# the two precision modes of the DeepSpeed backend, ZeRO-2 on this one device: the faithful default (fp32 weights under
# the step's autocast) and the bf16-weights opt-in (engine/backends.py DeepSpeedBackend's doc)
_ZERO2 = ("--meta.backend=deepspeed", "--deepspeed.zero_optimization.stage=2")
DS_MODES = {"packed-zero2": (*_ZERO2, "--deepspeed.bf16.enabled=false"),
            "packed-zero2-bf16w": (*_ZERO2, "--deepspeed.bf16.enabled=true")}
SHARED = ("packed", "truncated")  # modes that run the same modules (the masks change nothing in the models)
WARMUP_STEPS = 3 if CUDA else 1  # Triton autotuning and compilation, cuBLAS handles, the allocator's first blocks
ROUNDS = 10 if CUDA else 3
EVAL_CLIPS = 32 if CUDA else 4  # engine/evaluation/config.py clips_per_forward (its default)
# (config, frames, crop) of the one-clip inference case of facebookresearch/vjepa2#71; the CPU shrinks it
LONG_CLIP = ("vitl16.json", 64, 256) if CUDA else ("tiny_synthetic.json", 16, 64)
GEMM_N, GEMM_DTYPE = (8192, torch.bfloat16) if CUDA else (512, torch.float32)
DEVICE_NAME = torch.cuda.get_device_name(DEVICE) if CUDA else (platform.processor() or platform.machine() or "cpu")
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")  # conftest's flag: set on every CPU run


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


@functools.lru_cache(maxsize=None)
def gemm_peak_tflops() -> float:
    """TFLOP/s of a bare GEMM in the step's matmul dtype: the best of 5 timed batches of back-to-back calls."""
    a, b = (torch.randn(GEMM_N, GEMM_N, device=DEVICE, dtype=GEMM_DTYPE) for _ in range(2))
    out = torch.empty_like(a)
    calls = 20 if CUDA else 2
    for _ in range(3):
        torch.mm(a, b, out=out)
    _sync()
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            torch.mm(a, b, out=out)
        _sync()
        best = max(best, 2 * GEMM_N ** 3 * calls / (time.perf_counter() - start) / 1e12)
    return best


def _config(model: str, mode: str = "packed") -> Config:
    file, overrides = MODELS[model]
    return load_config(ROOT / "configs" / file, [*overrides, *{**MODES, **DS_MODES}[mode]])


def _backend(models: Models, cfg: Config) -> Backend:
    """The loop's backend for `cfg`: DeepSpeed (a 1-rank process group, made once) or PyTorch."""
    if cfg.meta.backend != "deepspeed":
        return TorchBackend(models.encoder, models.predictor, cfg)
    pytest.importorskip("deepspeed", reason="the DeepSpeed backend's cases need deepspeed (pip install -e "
                        "'.[deepspeed]'; on the device machine, the wheels of ../shared/tools/gpu_wheels.sh)")
    if not CUDA:  # DeepSpeed JIT-builds a CPU shared-memory all-reduce op (~50 s) at init; one rank never uses it
        from tests.deepspeed_cpu import skip_shm_op

        skip_shm_op()
    init_distributed(True, DEVICE)
    return DeepSpeedBackend(models.encoder, models.predictor, cfg, models.target_encoder)


def _case_name(model: str) -> str:
    return f"{model}-b{_config(model).data.batch_size}"


@dataclass
class _Built:
    model: str
    encoder: torch.nn.Module  # the (frozen) target encoder
    models: Models | None = None  # the training modules; None once only the target encoder is kept
    backend: Backend | None = None


class _Cache:
    """One model's modules at a time: both mask modes share them (the masks change nothing in the models), then the
    eval forward keeps only the target encoder. Dropping them returns the GPU memory before the next model."""

    def __init__(self) -> None:
        self.built: _Built | None = None

    def drop(self) -> None:
        self.built = None
        self._release()

    def train(self, model: str, cfg: Config) -> tuple[Models, Backend]:
        if self.built is None or self.built.model != model or self.built.models is None:
            self.drop()
            torch.manual_seed(cfg.meta.seed)
            models = build_models(cfg, DEVICE)
            self.built = _Built(model, models.target_encoder, models, _backend(models, cfg))
        return self.built.models, self.built.backend

    def encoder(self, model: str, cfg: Config) -> torch.nn.Module:
        """The model's target encoder alone: the built one when this model's modules are here, else a new one."""
        if self.built is not None and self.built.model == model:
            encoder = self.built.encoder
        else:
            self.drop()
            torch.manual_seed(cfg.meta.seed)
            encoder = build_encoder(cfg).to(DEVICE).requires_grad_(False)
        self.built = _Built(model, encoder)
        self._release()  # the online modules and the optimizer state, when they were here
        return encoder

    @staticmethod
    def _release() -> None:
        gc.collect()
        if CUDA:
            torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def cache():
    c = _Cache()
    yield c
    c.drop()


def _configure(cfg: Config) -> None:
    """What the loop sets once before any model runs (both are "auto" in these configs, as the module defaults)."""
    kernels.set_default_impl(cfg.model.kernels)
    attention.set_backend(cfg.model.attention)


def _measure(benchmark, fn: Callable[[], Any], info: dict[str, Any]) -> float | None:
    """Warm-up, then ROUNDS rounds of one synchronised call; the median seconds (None under --benchmark-disable)."""
    if CUDA:
        torch.cuda.reset_peak_memory_stats(DEVICE)
    if benchmark.disabled:  # --benchmark-disable: one plain call, a smoke test
        benchmark.pedantic(fn)
        return None
    for _ in range(WARMUP_STEPS):
        fn()
    _sync()

    def call() -> None:
        fn()
        _sync()

    benchmark.pedantic(call, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    info["peak_memory_gb"] = peak_memory_gb(DEVICE)
    return benchmark.stats.stats.median


def _run_or_skip(cache: _Cache, what: str, run: Callable[[], float | None]) -> float | None:
    """`run()`'s median; a case that runs out of GPU memory frees the GPU for the next one and is skipped, with the
    allocator's peak and message in the reason (pytest -rs; gpu_session.sh's log)."""
    try:
        return run()
    except torch.cuda.OutOfMemoryError as e:
        reason = f"out of GPU memory: {what}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    peak = torch.cuda.max_memory_allocated(DEVICE) / 1e9 if CUDA else 0.0
    cache.drop()  # after the handler: the exception's traceback, which held the case's tensors, is gone
    pytest.skip(f"{reason} (peak {peak:.1f} GB allocated)")


def _rates(info: dict[str, Any], flops: int, median: float) -> None:
    info["model_tflops"] = flops / median / 1e12
    gemm = gemm_peak_tflops()
    sheet = peak_tflops(DEVICE)
    info.update(gemm_tflops=gemm, mfu_measured_peak=info["model_tflops"] / gemm,
                datasheet_tflops=sheet, mfu_datasheet=info["model_tflops"] / sheet if sheet else None)


def _base_info(benchmark, *, op: str, provider: str, case: str, direction: str, shape: dict[str, Any],
               dtype: torch.dtype, flops: int, cfg: Config) -> dict[str, Any]:
    benchmark.group = f"{op} {case} {direction}"
    info = benchmark.extra_info
    info.update(op=op, provider=provider, case=case, direction=direction, shape=shape,
                dtype=str(dtype).removeprefix("torch."), bytes_moved=None, flops=flops, device=DEVICE_NAME,
                interpreted=INTERPRETED, kernels=kernels.dispatch.resolve(None, DEVICE),
                attention=attention_line(cfg, DEVICE), versions=_versions())
    return info


def test_gemm_peak(bench) -> None:
    """The bare GEMM the MFU figures are measured against, as a result of its own."""
    a, b = (torch.randn(GEMM_N, GEMM_N, device=DEVICE, dtype=GEMM_DTYPE) for _ in range(2))
    out = torch.empty_like(a)
    itemsize = torch.finfo(GEMM_DTYPE).bits // 8
    bench(lambda: torch.mm(a, b, out=out), op="gemm", provider="torch_mm", case=f"{GEMM_N}^3", direction="fwd",
          shape={"m": GEMM_N, "n": GEMM_N, "k": GEMM_N}, dtype=GEMM_DTYPE, bytes_moved=3 * GEMM_N ** 2 * itemsize,
          flops=2 * GEMM_N ** 3, extra_info={"versions": _versions()})


# Eager PyTorch cases first, then DeepSpeed's (the recipes' two precision modes: an engine may keep device memory
# after it is dropped, which must not starve the eager ones), then the frozen-evaluation forwards; the compiled blocks
# last, at the end of the file: their cold compiles take minutes and a session's time limit may cut them, never the
# numbers the others give
_EAGER = {mode: MODES[mode] for mode in SHARED}
_COMPILED = {mode: args for mode, args in MODES.items() if mode not in SHARED}
TRAIN_CASES = [(model, mode) for modes in (_EAGER, DS_MODES) for model in MODELS for mode in modes]
COMPILED_CASES = [(model, mode) for model in MODELS for mode in _COMPILED]


def _train_step(benchmark, cache: _Cache, model: str, mode: str) -> None:
    if not benchmark.disabled:
        gemm_peak_tflops()  # measured once, first, on an empty GPU
    cfg = _config(model, mode)
    _configure(cfg)
    d, b = cfg.data, cfg.data.batch_size
    case = step_case(cfg)
    shape = {"batch": b, "frames": d.num_frames, "crop": d.crop_size, "tokens_per_clip": cfg.num_tokens}
    info = _base_info(benchmark, op="train_step", provider=f"ours-{mode}", case=_case_name(model), direction="step",
                      shape=shape, dtype=ACT_DTYPE, flops=case.flops, cfg=cfg)
    per_clip = case.tokens_per_clip()
    info.update(tokens_per_step=case.tokens, autocast=cfg.meta.dtype if CUDA else "float32",
                context_tokens_per_clip=per_clip["context"], target_tokens_per_clip=per_clip["target"])

    def run() -> float | None:  # its locals (models, activations) are gone once it returns or raises
        models, backend = cache.train(model if mode in SHARED else f"{model}-{mode}", cfg)
        return _measure(benchmark, make_step(case, models, backend, DEVICE), info)

    median = _run_or_skip(cache, f"{model} batch {b} {mode}", run)
    if median is not None:
        info.update(samples_per_s=b / median, tokens_per_s=case.tokens / median)
        _rates(info, case.flops, median)


@pytest.mark.parametrize("model,mode", TRAIN_CASES, ids=[f"{m}-{mode}" for m, mode in TRAIN_CASES])
def test_train_step(benchmark, cache, model: str, mode: str) -> None:
    _train_step(benchmark, cache, model, mode)


@pytest.mark.parametrize("model", list(MODELS)[::-1])  # the last trained model's target encoder is still built
def test_eval_forward(benchmark, cache, model: str) -> None:
    if not benchmark.disabled:
        gemm_peak_tflops()
    cfg = _config(model)
    _configure(cfg)
    d, n = cfg.data, cfg.num_tokens
    enc_dims, _, patch_features = flop_dims(cfg)
    flops = encoder_flops([n] * EVAL_CLIPS, enc_dims, patch_features)
    info = _base_info(benchmark, op="eval_forward", provider="ours-dense", case=f"{model}-b{EVAL_CLIPS}",
                      direction="fwd", shape={"batch": EVAL_CLIPS, "frames": d.num_frames, "crop": d.crop_size,
                                              "tokens_per_clip": n},
                      dtype=ACT_DTYPE, flops=flops, cfg=cfg)

    def run() -> float | None:
        encoder = cache.encoder(model, cfg)
        video = torch.randn(EVAL_CLIPS, 3, d.num_frames, d.crop_size, d.crop_size, device=DEVICE, dtype=ACT_DTYPE)
        autocast = autocast_context(DEVICE, cfg.meta.dtype)

        @torch.no_grad()
        def forward() -> torch.Tensor:
            with autocast:
                return encoder(video)

        return _measure(benchmark, forward, info)

    median = _run_or_skip(cache, f"{model} eval forward of {EVAL_CLIPS} clips", run)
    if median is not None:
        info.update(samples_per_s=EVAL_CLIPS / median, tokens_per_s=EVAL_CLIPS * n / median)
        _rates(info, flops, median)


@pytest.mark.parametrize("provider", ["ours-dense", "fp32-grad"])
def test_eval_forward_long_clip(benchmark, cache, provider: str) -> None:
    """One long clip through the frozen encoder (facebookresearch/vjepa2#71's case): ours (no grad, the config's
    autocast) against the same forward with fp32 trainable weights in grad mode, as that issue's snippet runs it."""
    if not benchmark.disabled:
        gemm_peak_tflops()
    file, frames, crop = LONG_CLIP
    cfg = load_config(ROOT / "configs" / file, [f"--data.num_frames={frames}", f"--data.crop_size={crop}",
                                                 "--data.batch_size=1"])
    _configure(cfg)
    n, ours = cfg.num_tokens, provider == "ours-dense"
    dtype = ACT_DTYPE if ours else torch.float32
    enc_dims, _, patch_features = flop_dims(cfg)
    flops = encoder_flops([n], enc_dims, patch_features)
    model = f"{file.removesuffix('.json')}_{frames}x{crop}"
    info = _base_info(benchmark, op="eval_forward", provider=provider, case=f"{model}-b1", direction="fwd",
                      shape={"batch": 1, "frames": frames, "crop": crop, "tokens_per_clip": n}, dtype=dtype,
                      flops=flops, cfg=cfg)

    def run() -> float | None:
        encoder = cache.encoder(model, cfg)
        video = torch.randn(1, 3, frames, crop, crop, device=DEVICE, dtype=dtype)
        if ours:
            autocast = autocast_context(DEVICE, cfg.meta.dtype)

            @torch.no_grad()
            def forward() -> torch.Tensor:
                with autocast:
                    return encoder(video)
        else:
            encoder.requires_grad_(True)  # the graph of each call is freed when its output is dropped

            def forward() -> torch.Tensor:
                return encoder(video)
        try:
            return _measure(benchmark, forward, info)
        finally:
            encoder.requires_grad_(False)

    median = _run_or_skip(cache, f"{model} eval forward of one clip ({provider})", run)
    if median is not None:
        info.update(samples_per_s=1 / median, tokens_per_s=n / median)
        _rates(info, flops, median)


@pytest.mark.parametrize("model,mode", COMPILED_CASES, ids=[f"{m}-{mode}" for m, mode in COMPILED_CASES])
def test_train_step_compiled(benchmark, cache, model: str, mode: str) -> None:
    _train_step(benchmark, cache, model, mode)
