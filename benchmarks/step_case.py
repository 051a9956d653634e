"""One training step as the benchmarks time it and the profiler records it (benchmarks/test_bench_train_step.py,
benchmarks/profile_step.py): `engine.step.train_step` exactly as the loop calls it, on one micro-batch of a synthetic
clip batch already on the device (the dtype `ClipFinisher` hands over: bf16 on CUDA, fp32 on the CPU) and the masks
of the config's own `MaskMaker` at a fixed step (benchmarks/shapes.py MASK_STEP: the same token sets, hence the same
FLOPs, in every run), copied to the device once. The schedule values are the first step's after warm-up (clipping
on, as in most of a run). No loader: the step alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from benchmarks.shapes import ACT_DTYPE, MASK_STEP
from engine.backends import Backend
from engine.config import Config
from engine.loop import flop_dims, micro_batch_cost, token_counts
from engine.packed_masks import MaskMaker, StepMasks
from engine.schedules import Schedules
from engine.step import Models, train_step


@dataclass(frozen=True)
class StepCase:
    cfg: Config
    masks: StepMasks  # on the host
    flops: int  # model FLOPs of the step (engine/flops.py, the loop's count)
    tokens: int  # tokens the three networks run (engine/throughput.py step_tokens)
    schedule: tuple[float, float, float]  # lr, wd, EMA momentum of the first step after warm-up

    def tokens_per_clip(self) -> dict[str, list[float]]:
        """Context and target tokens per clip, one figure per mask generator."""
        b, num_gen = self.cfg.data.batch_size, len(self.cfg.mask)
        counts = token_counts([self.masks], b, num_gen)
        return {kind: [counts[f"{kind}_tokens_{g}"] for g in range(num_gen)] for kind in ("context", "target")}


def step_case(cfg: Config, mask_step: int = MASK_STEP) -> StepCase:
    """The step with the masks the loop would draw at `mask_step` (its clips' sample indices start at step x batch)."""
    d, opt = cfg.data, cfg.optimization
    masks = MaskMaker(cfg.mask, cfg.grid, cfg.meta.seed, d.mask_type)(mask_step, mask_step * d.batch_size,
                                                                      d.batch_size)
    flops, tokens = micro_batch_cost(cfg, masks, flop_dims(cfg))
    steady = (opt.warmup + 1) * opt.ipe  # the first step after warm-up: clipping on (engine/loop.py)
    return StepCase(cfg, masks, flops, tokens, Schedules.from_config(opt).at(steady))


def make_step(case: StepCase, models: Models, backend: Backend, device: torch.device) -> Callable[[], None]:
    """A closure running one training step on the case's clips and masks, placed on `device` once."""
    cfg, d = case.cfg, case.cfg.data
    video = torch.randn(d.batch_size, 3, d.num_frames, d.crop_size, d.crop_size, device=device, dtype=ACT_DTYPE)
    device_masks = case.masks.to(device)
    lr, wd, momentum = case.schedule

    def step() -> None:
        train_step(models, backend, [(video, device_masks)], lr=lr, wd=wd, momentum=momentum,
                   clip_grad=cfg.optimization.clip_grad, loss_exp=cfg.loss.loss_exp, dtype=cfg.meta.dtype)

    return step
