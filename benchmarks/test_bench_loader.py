"""The training loader's throughput per decoder, next to what the step consumes.

What one measured batch is: the training loop's own data path, built by `engine.data.pipeline.build_training_data`
from the recipe's config (configs/vitl16.json: batch 24 at 224 px; configs/vith16_384.json: batch 10 at 384 px; 16
frames at frame step 4, `data.num_workers` worker processes, pinned memory on CUDA), then per batch what
`engine.loop.train` does before the step: `next(loader)`, `finish(batch)` (the device-side last stage), `account`
and the masks' copy to the device. The masks are the real `MaskMaker` of the config (its two generators and grid),
built in the workers as in training. Input: `benchmarks.video_inputs` (on CUDA 32 files of 568x320, 10 s at 25 fps,
one keyframe each, ~650 kbit/s; on the CPU 6 tiny 96x64 files of 40 frames).

Providers (`data.decoder`):
  * "pyav": PyAV decodes in the workers. On CUDA the workers return uint8 crops that `ClipFinisher` resizes and
    normalises on the GPU ("crop"); on the CPU the workers finish float32 clips ("clip"). H.264.
  * "dali": the workers read the files' bytes ("encoded") and DALI decodes them in the training process: NVDEC on
    CUDA (H.264), DALI's CPU operators without CUDA (VP9: the CPU decoder reads only VP8/VP9/MJPEG). A DALI batch
    that fails is decoded again with PyAV by `ClipFinisher`; that would measure the fallback, so any such failure
    fails the benchmark.

Timing (not the `bench` fixture: a loader needs a steady state that 25 short rounds cannot give). The loader is
built once per case and its workers persist. Each worker loads whole batches, 2 in flight per worker, so batches
arrive in bursts of up to `num_workers` and the first 2 * num_workers come out of a queue filled before the timing.
So a warm-up first takes 2 * num_workers + 1 batches (at most WARMUP_S seconds; a loader slower than that is bound by
the training process, where the queue does not matter), then each timed round takes K batches back to back with one
synchronize at the end, K chosen from the warm-up's pace for a round of about ROUND_S seconds and, for "pyav", a
multiple of num_workers (whole bursts). pytest-benchmark divides a round by K: `median` is seconds per batch.

extra_info, besides the `bench` fixture's fields (op "loader", direction "load", bytes_moved = the finished batch
written once: B * 3 * F * crop^2 * itemsize, flops None):
  * clips_per_s = B / median, frames_per_s = clips_per_s * F (frames the step receives);
  * decoded_frames_per_clip: the mean number of frames decoded per clip. Both decoders decode from the keyframe at or
    before the clip's first frame up to its last (PyAV: from frame 0, `engine.data.decode`); with one keyframe per
    file that is frame 0 to the clip's end: ~157 of 250 frames for 16 kept (~10x), computed from the dataset's
    clip sampling (`engine.data.sampling`), not counted; decoded_frames_per_s = clips_per_s * that;
  * step_needs_clips_per_s: what the step consumes per GPU (FLOP model at 50% MFU, packed masks): ViT-L/16 at 224
    ~110 clips/s, ViT-H/16 at 384 ~16 clips/s. On the CPU the tiny cases keep their GPU case's figure, for the
    report's layout only: CPU results prove that the file runs, not how fast anything is.
  * workers, batches_per_round, rounds, codec and source (the video spec).

CPU figures (2-core dev machine, AMD EPYC, 2 workers): the whole file with --benchmark-disable (the CI smoke run, one
batch per case) takes ~2 s in pytest (~7 s with interpreter start-up), with --benchmark-only ~7 s. Tiny shapes:
~145-180 clips/s pyav, ~200 clips/s dali (VP9): they prove that the file runs. Measured once by hand on the realistic
set, same machine, 2 workers, recipe batches: pyav (H.264, whole transform in the workers) 12.0 clips/s at 224 and
6.8 at 384, DALI CPU (VP9, 2 threads) 9.3 clips/s at 224, ~1,900 decoded frames/s for 192 kept at 224: ~6 clips/s per
core, so 12 workers of such cores would feed ViT-L/224 about 70 of its 110 clips/s.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import platform
import time
from functools import lru_cache

import numpy as np
import pytest
import torch

from benchmarks.shapes import CUDA, ROOT
from benchmarks.video_inputs import ensure_videos, video_spec
from engine.config import Config, load_config
from engine.data.index import read_index
from engine.data.pipeline import TrainingData, build_training_data
from engine.data.sampling import clip_frame_indices, frame_step_for
from engine.packed_masks import MaskMaker

PROVIDERS = ("pyav", "dali")
# case -> (recipe, overrides, the step's consumption in clips/s per GPU at 50% MFU, packed)
_TINY = ("--data.patch_size=8", "--data.num_frames=8", "--data.batch_size=4")
CASES = {"vitl16_224": ("vitl16.json", (), 110), "vith16_384": ("vith16_384.json", (), 16)} if CUDA else \
    {"tiny_32": ("vitl16.json", ("--data.crop_size=32", *_TINY), 110),
     "tiny_48": ("vith16_384.json", ("--data.crop_size=48", *_TINY), 16)}
ROUNDS = 3 if CUDA else 1
ROUND_S = 2.0 if CUDA else 1.0  # seconds a timed round aims at
WARMUP_S = 10.0 if CUDA else 2.0  # at most this long draining the prefetched batches
DEVICE = torch.device("cuda", torch.cuda.current_device()) if CUDA else torch.device("cpu")
DEVICE_NAME = torch.cuda.get_device_name(DEVICE) if CUDA else (platform.processor() or platform.machine() or "cpu")
# conftest marks CPU runs as interpreted (a dry run: "not committed", results/README.md); the loader runs no Triton,
# but a CPU result of it is as much a dry run.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# The recipes' 12 workers per GPU on a 16-core host, leaving cores to the training process; 2 on a 2-core machine.
NUM_WORKERS = min(12, max(2, _cores() - 4))


def _codec(provider: str) -> str:
    return "vp9" if provider == "dali" and not CUDA else "h264"


@lru_cache(maxsize=None)
def _index(codec: str) -> str:
    return str(ensure_videos(video_spec(codec, CUDA)))


def _config(case: str, provider: str, index: str) -> Config:
    recipe, overrides, _ = CASES[case]
    return load_config(ROOT / "configs" / recipe, [*overrides, f"--data.datasets={json.dumps([index])}",
                                                   f"--data.decoder={provider}", f"--data.num_workers={NUM_WORKERS}"])


def decoded_frames_per_clip(cfg: Config, frames: int, fps: float, draws: int = 2000) -> float:
    """Mean frames decoded per clip of a `frames`-frame video with one keyframe (frame 0): up to the clip's last."""
    d = cfg.data
    timed = d.clip_duration is not None or d.fps is not None
    step = frame_step_for(fps, d.num_frames, frame_step=None if timed else d.sampling_rate,
                          clip_duration=d.clip_duration, fps=d.fps)
    rng = np.random.default_rng(0)
    ends = [max(int(c.max()) for c in clip_frame_indices(frames, d.num_frames, step, d.num_clips, rng)) + 1
            for _ in range(draws)]
    return float(np.mean(ends))


class _Load:
    """One call = one batch through the training loop's data path; synchronises every `every`-th call."""

    def __init__(self, data: TrainingData) -> None:
        self.data = data
        self.batches = iter(data.loader)
        self.every = 1
        self.calls = itertools.count(1)

    def __call__(self) -> torch.Tensor:
        batch = next(self.batches)
        video = self.data.finish(batch)
        self.data.account(batch)
        batch.masks.to(DEVICE, non_blocking=True)
        if CUDA and next(self.calls) % self.every == 0:
            torch.cuda.synchronize()
        return video


def _warm_up(load: _Load, workers: int) -> float:
    """Drain the prefetched batches (see the module docstring); returns the steady seconds per batch."""
    start = time.perf_counter()
    stamps = [start]
    for _ in range(2 * workers + 1):
        load()
        stamps.append(time.perf_counter())
        if stamps[-1] - start > WARMUP_S and len(stamps) > 2:
            break
    if CUDA:
        torch.cuda.synchronize()
        stamps[-1] = time.perf_counter()
    span = max(1, min(workers, (len(stamps) - 1) // 2))  # the last `span` batches: past the first burst
    return (stamps[-1] - stamps[-1 - span]) / span


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_loader(benchmark, caplog, tmp_path, case: str, provider: str) -> None:
    if provider == "dali":
        from engine.data.dali_decode import dali_available

        if not dali_available():
            pytest.skip("NVIDIA DALI is not installed (pip install nvidia-dali-cuda130, the package's 'dali' extra)")
    codec = _codec(provider)
    spec = video_spec(codec, CUDA)
    index = _index(codec)
    cfg = _config(case, provider, index)
    d = cfg.data
    make_masks = MaskMaker(cfg.mask, cfg.grid, cfg.meta.seed, d.mask_type)
    data = build_training_data(cfg, read_index([index]), rank=0, world=1, device=DEVICE, folder=tmp_path,
                               start_step=0, num_steps=10**9, make_masks=make_masks)
    assert data.decoder == provider
    load = _Load(data)
    caplog.set_level(logging.WARNING, logger="engine.data.finish")
    try:
        first = next(load.batches)  # checks what the workers hand over, then finished like the others
        parts = first.video
        if provider == "dali":
            assert not isinstance(parts, torch.Tensor) and parts.encoded and not parts.crop_slots, \
                f"{codec} files are not decoded by DALI on this device: the benchmark would measure PyAV"
        data.finish(first)
        data.account(first)

        dtype = getattr(torch, cfg.meta.dtype) if CUDA else torch.float32
        clip_bytes = 3 * d.num_frames * d.crop_size ** 2 * torch.finfo(dtype).bits // 8
        per_clip = decoded_frames_per_clip(cfg, spec.frames, spec.fps)
        benchmark.group = f"loader {case} load"
        info = benchmark.extra_info
        info.update(op="loader", provider=provider, case=case, direction="load",
                    shape={"batch": d.batch_size, "frames": d.num_frames, "crop": d.crop_size},
                    dtype=str(dtype).removeprefix("torch."), bytes_moved=d.batch_size * clip_bytes, flops=None,
                    device=DEVICE_NAME, interpreted=INTERPRETED, codec=codec, source=spec.describe(),
                    workers=NUM_WORKERS, decoded_frames_per_clip=per_clip,
                    step_needs_clips_per_s=CASES[case][2])
        if benchmark.disabled:  # --benchmark-disable: one batch, a smoke test
            benchmark.pedantic(load)
        else:
            per_batch = _warm_up(load, NUM_WORKERS)
            k = max(1, math.ceil(ROUND_S / per_batch))
            if provider == "pyav":  # whole bursts of the workers
                k = NUM_WORKERS * max(1, round(k / NUM_WORKERS))
            load.every, load.calls = k, itertools.count(1)  # each round ends on a synchronize
            info.update(batches_per_round=k, rounds=ROUNDS)
            benchmark.pedantic(load, rounds=ROUNDS, iterations=k, warmup_rounds=0)
            median = benchmark.stats.stats.median
            clips_per_s = d.batch_size / median
            info.update(gbps=d.batch_size * clip_bytes / median / 1e9, clips_per_s=clips_per_s,
                        frames_per_s=clips_per_s * d.num_frames, decoded_frames_per_s=clips_per_s * per_clip)
        fallbacks = [r.getMessage() for r in caplog.records if "DALI failed" in r.getMessage()]
        assert not fallbacks, f"DALI batches fell back to PyAV: {fallbacks[:3]}"
    finally:
        _shut_down(load, data)


def _shut_down(load: _Load, data: TrainingData) -> None:
    """Stop the persistent workers and drop DALI's pipeline (its threads) before the next case forks workers."""
    data.stop_workers(load.batches)
    if data.finish.dali is not None:
        data.finish.dali._pipe = None
    del load.batches
