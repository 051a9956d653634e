"""A step's masks in the layouts the models consume, built on the host by the loader (no host sync in the step)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from models import Packing, PredictorLayout

from .masks import MaskSet, sample_masks


@dataclass(frozen=True)
class StepMasks:
    context_index: torch.Tensor  # (Tc,) int64 global ids, sequence s = g*B + b
    context_packing: Packing
    target_index: torch.Tensor  # (Tt,) int64 global ids, same sequence order
    target_packing: Packing
    predictor: PredictorLayout
    targets_per_generator: tuple[int, ...]  # target rows of each generator (host ints): the loss is a mean per generator

    @classmethod
    def from_mask_set(cls, masks: MaskSet) -> StepMasks:
        b = masks.batch_size
        per_gen = tuple(sum(masks.target_seqlens[g * b:(g + 1) * b]) for g in range(masks.num_generators))
        return cls(masks.context_index, Packing.from_seqlens(masks.context_seqlens), masks.target_index,
                   Packing.from_seqlens(masks.target_seqlens),
                   PredictorLayout.build(masks.context_seqlens, masks.target_seqlens, b), per_gen)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> StepMasks:
        return StepMasks(self.context_index.to(device, non_blocking=non_blocking),
                         self.context_packing.to(device, non_blocking),
                         self.target_index.to(device, non_blocking=non_blocking),
                         self.target_packing.to(device, non_blocking),
                         self.predictor.to(device, non_blocking), self.targets_per_generator)

    def pin_memory(self) -> StepMasks:
        return StepMasks(self.context_index.pin_memory(), self.context_packing.pin_memory(),
                         self.target_index.pin_memory(), self.target_packing.pin_memory(),
                         self.predictor.pin_memory(), self.targets_per_generator)


class MaskMaker:
    """`make_masks(step, first_sample_index, batch_size)` for the loader; picklable for worker processes."""

    def __init__(self, generators: Sequence[Any], grid: tuple[int, int, int], seed: int, mask_type: str) -> None:
        self.generators, self.grid, self.seed, self.mask_type = list(generators), grid, seed, mask_type

    def __call__(self, step: int, first_sample_index: int, batch_size: int) -> StepMasks:
        return StepMasks.from_mask_set(sample_masks(self.generators, self.grid, batch_size, step=step, seed=self.seed,
                                                    first_sample_index=first_sample_index, mask_type=self.mask_type))
