"""The step-indexed loader: which global samples each rank reads at each step, and how they become a `Batch`.

An optimizer step `s` of global batch `GB = B * W * A` (local micro-batch `B`, `W` ranks, `A` accumulation steps) is
`A` micro-steps; micro-step `k` on rank `r` reads samples `g = s*GB + k*B*W + r*B + b`, b < B. So each micro-step's
ranks read one contiguous block, the split of a step over ranks and micro-steps never changes which samples (and
masks) it trains on, and starting at step `s` needs no decoding of the steps before it (how a resumed run skips
batches). The collate function reads `g` of the first sample (`step = g // GB`, `micro = g % GB // (B*W)`) and builds
the batch's masks in the loader workers, so the training step never waits on host work.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from engine.data.dataset import PretrainDataset, Sample
from engine.data.probe import Probe

STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class StepBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Global sample indices of this rank's micro-batches, `A` per step: `[s*GB + k*B*W + r*B + b for b in range(B)]`
    for k < A, with B = GB / (W * A).

    Runs from `start_step` for `num_steps` steps, or forever when `num_steps` is None.
    """

    def __init__(self, global_batch_size: int, rank: int, world_size: int, start_step: int = 0,
                 num_steps: int | None = None, accumulation_steps: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if accumulation_steps < 1:
            raise ValueError(f"need accumulation_steps >= 1, got {accumulation_steps}")
        if global_batch_size < 1 or global_batch_size % (world_size * accumulation_steps):
            raise ValueError(f"global batch size {global_batch_size} is not a positive multiple of world size "
                             f"{world_size} x accumulation steps {accumulation_steps}")
        if start_step < 0 or (num_steps is not None and num_steps < 0):
            raise ValueError(f"need start_step >= 0 and num_steps >= 0, got {start_step}, {num_steps}")
        self.global_batch_size = global_batch_size
        self.accumulation_steps = accumulation_steps
        self.local_batch_size = global_batch_size // (world_size * accumulation_steps)
        self.micro_stride = self.local_batch_size * world_size  # samples of one micro-step over all ranks
        self.rank = rank
        self.start_step = start_step
        self.num_steps = num_steps

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while self.num_steps is None or step < self.start_step + self.num_steps:
            for micro in range(self.accumulation_steps):
                first = step * self.global_batch_size + micro * self.micro_stride + self.rank * self.local_batch_size
                yield list(range(first, first + self.local_batch_size))
            step += 1

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("an endless StepBatchSampler (num_steps=None) has no length")
        return self.num_steps * self.accumulation_steps


@dataclass
class ClipParts:
    """A batch's clips before their last stage, which runs on the training device (`engine.data.finish`).

    The batch's `B * num_clips` clips are numbered sample-major ("slots"). Each slot is either a uint8 crop, all
    crops concatenated into one flat tensor (one pinned host-to-device copy, no padding to a common size), or an
    encoded item for DALI: the file's bytes, frame indices, crop box and flip.
    """

    num_samples: int
    num_clips: int
    crops: torch.Tensor  # uint8, flat
    crop_shapes: list[tuple[int, int, int]]  # (F, h, w) of each crop, in the order of `crops`
    crop_slots: list[int]
    crop_flips: list[bool]
    encoded: list[np.ndarray] = field(default_factory=list)  # one per encoded slot (a sample's bytes repeat)
    encoded_indices: list[np.ndarray] = field(default_factory=list)
    encoded_boxes: list[tuple[int, int, int, int]] = field(default_factory=list)
    encoded_flips: list[bool] = field(default_factory=list)
    encoded_slots: list[int] = field(default_factory=list)

    @classmethod
    def from_samples(cls, samples: list[Sample], num_clips: int) -> "ClipParts":
        parts = cls(len(samples), num_clips, torch.empty(0, dtype=torch.uint8), [], [], [])
        flat = []
        for b, sample in enumerate(samples):
            for k in range(num_clips):
                slot = b * num_clips + k
                if sample.encoded is not None:
                    parts.encoded.append(sample.encoded)
                    parts.encoded_indices.append(sample.frame_indices[k])
                    parts.encoded_boxes.append(sample.boxes[k])
                    parts.encoded_flips.append(sample.flips[k])
                    parts.encoded_slots.append(slot)
                else:
                    crop = sample.clips[k]
                    flat.append(crop.reshape(-1))
                    parts.crop_shapes.append(tuple(crop.shape[:3]))
                    parts.crop_slots.append(slot)
                    parts.crop_flips.append(sample.flips[k])
        if flat:
            parts.crops = torch.cat(flat)
        return parts

    def pin_memory(self) -> "ClipParts":
        return replace(self, crops=self.crops.pin_memory())


@dataclass
class Batch:
    """One rank's micro-batch `micro` of one step. `video` is finished, (B, 3, F, H, W) float32 or (B, num_clips, 3, F, H, W), or
    `ClipParts` to finish on the device; `engine.data.finish.ClipFinisher` turns either into the step's input."""

    video: torch.Tensor | ClipParts
    labels: torch.Tensor  # (B,) int64
    step: int
    first_sample_index: int  # global index of the batch's first sample; the batch holds B consecutive indices
    masks: Any  # whatever make_masks returned
    micro: int = 0  # micro-step within the step (gradient accumulation), 0 .. accumulation_steps - 1
    paths: list[str] = field(default_factory=list)  # the file each sample read
    sample_failures: list[list[tuple[str, str]]] = field(default_factory=list)  # per sample: (path, reason) replaced
    probes: list[tuple[int, Probe]] = field(default_factory=list)  # probes the workers made (for the cache)

    @property
    def failures(self) -> list[tuple[str, str]]:
        """(path, reason) of every entry replaced while loading the batch."""
        return [failure for failures in self.sample_failures for failure in failures]

    def pin_memory(self) -> "Batch":
        """Pinned copy, called by DataLoader(pin_memory=True). Masks are pinned only if they have `pin_memory`."""
        masks = self.masks.pin_memory() if hasattr(self.masks, "pin_memory") else self.masks
        return replace(self, video=self.video.pin_memory(), labels=self.labels.pin_memory(), masks=masks)


class _Collate:
    """Stacks samples into a `Batch` and builds its masks (a class, so workers can pickle it)."""

    def __init__(self, make_masks: Callable[[int, int, int], Any], global_batch_size: int, num_clips: int,
                 micro_stride: int):
        self.make_masks = make_masks
        self.global_batch_size = global_batch_size
        self.num_clips = num_clips
        self.micro_stride = micro_stride

    def __call__(self, samples: list[Sample]) -> Batch:
        indices = [s.global_index for s in samples]
        first = indices[0]
        if indices != list(range(first, first + len(samples))):
            raise ValueError(f"a batch must hold consecutive global indices, got {indices}")
        step = first // self.global_batch_size
        finished = all(s.encoded is None and s.clips and s.clips[0].dtype == torch.float32 for s in samples)
        if finished:
            clips = [s.clips[0] if self.num_clips == 1 else torch.stack(s.clips) for s in samples]
            video: torch.Tensor | ClipParts = torch.stack(clips)
        else:
            video = ClipParts.from_samples(samples, self.num_clips)
        return Batch(video=video, labels=torch.tensor([s.label for s in samples], dtype=torch.int64), step=step,
                     first_sample_index=first, masks=self.make_masks(step, first, len(samples)),
                     micro=first % self.global_batch_size // self.micro_stride,
                     paths=[s.path for s in samples], sample_failures=[s.failures for s in samples],
                     probes=[p for s in samples for p in s.probes])


def make_collate(make_masks: Callable[[int, int, int], Any], global_batch_size: int, num_clips: int = 1,
                 micro_stride: int | None = None) -> Callable[[list[Sample]], Batch]:
    """Collate function for `PretrainDataset` samples; calls `make_masks(step, first_index, B)`. `micro_stride` is
    the samples of one micro-step over all ranks (the global batch without accumulation, the default).

    `make_masks` runs in the loader workers, so it must be picklable (a module-level function or such an object).
    """
    return _Collate(make_masks, global_batch_size, num_clips, micro_stride or global_batch_size)


def init_worker(worker_id: int) -> None:
    """A loader worker's set-up (training's, and evaluation's: engine/evaluation/runner.py)."""
    # Each worker is one of many processes on the host; intra-op threads per worker would oversubscribe the cores.
    torch.set_num_threads(1)
    # The deepspeed launcher sends SIGTERM to the whole process tree, workers included; the training process stops
    # at a step boundary (engine.faults) and still needs batches until then. Workers die with it, and the loop stops
    # them itself however it ends (TrainingData.stop_workers): exit's terminate-then-join would wait for them forever.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # forked with both held (`start_workers`); one that came meanwhile is dropped now: the main process has it too
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def start_workers() -> Iterator[None]:
    """Hold SIGTERM and SIGINT in this thread while loader workers are forked (around `iter(loader)`): a worker that
    got the launcher's SIGTERM before `init_worker` ran would die of it, and the loader with it. A held signal
    reaches this process's handler when the block ends; the workers inherit the block and drop theirs."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def build_loader(dataset: PretrainDataset, *, global_batch_size: int, rank: int, world_size: int,
                 make_masks: Callable[[int, int, int], Any], num_workers: int, start_step: int = 0,
                 num_steps: int | None = None, pin_memory: bool = False,
                 accumulation_steps: int = 1) -> torch.utils.data.DataLoader:
    """DataLoader yielding this rank's `Batch`es for steps `start_step, start_step + 1, ...` (endless if num_steps is
    None), `accumulation_steps` micro-batches per step; `num_workers=0` loads in-process."""
    sampler = StepBatchSampler(global_batch_size, rank, world_size, start_step, num_steps, accumulation_steps)
    workers = num_workers > 0
    collate = make_collate(make_masks, global_batch_size, dataset.num_clips, sampler.micro_stride)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate,
        num_workers=num_workers, pin_memory=pin_memory, persistent_workers=workers,
        # Its own generator: otherwise creating the iterator draws from the global torch RNG, which a resumed run
        # restores from the checkpoint, so the RNG state would depend on where the run was resumed.
        generator=torch.Generator().manual_seed(0),
        # Two batches in flight per worker keep the queue full without holding many decoded batches in memory.
        prefetch_factor=2 if workers else None, worker_init_fn=init_worker if workers else None)


def own_message(e: Exception) -> str:
    """The exception's message without the frame that a loader worker's re-raise puts before it ("Caught X in
    DataLoader worker process 0. Original Traceback ... X: message")."""
    text, marker = str(e), f"{type(e).__name__}: "
    start = text.find("Original Traceback")
    at = text.find(marker, start) if start >= 0 else -1
    return text[at + len(marker):] if at >= 0 else text
