"""Pretraining video dataset and the step-indexed loader around it (reference spec §5.1, §5.2, §5.4).

Everything random is a pure function of `(seed, global sample index)`, so any step of any rank can be rebuilt
without replaying the ones before it (resume skips batches without decoding them):

* global index `g` -> video: `perm_e[g % N]`, with `perm_e` a permutation of the N videos seeded by
  `(seed, e = g // N)` (one "data epoch" per pass over the index);
* clip position, crop box and flip: generators seeded by `(seed, g, purpose)`;
* step `s` on rank `r` of `W` with global batch `GB` (local `B = GB / W`) takes `g = s*GB + r*B + b`, b < B.

How step and first index reach the collate function: `build_loader` wraps the dataset so each item is
`(g, clip, label)` and the collate function reads `g` of the first item (`step = g // GB`); the batch sampler alone
decides which indices a batch holds, and the dataset's own `__getitem__` stays `(clip, label)`.
"""

import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from engine.data.decode import VideoDecodeError, count_frames, decode_frames
from engine.data.sampling import clip_frame_indices
from engine.data.transforms import pretrain_transform

logger = logging.getLogger(__name__)

# Purpose tags keep the random streams of one sample (and the epoch order) independent of each other.
_TAG_ORDER, _TAG_CLIP, _TAG_AUGMENT, _TAG_RETRY = 0, 1, 2, 3

# Greedy path: a path may contain spaces, the label is whatever follows the last one.
_INDEX_LINE = re.compile(r"(.+) (-?[0-9]+)")


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(entropy)))


def read_index(paths: Sequence[str]) -> tuple[list[str], list[int]]:
    """Video paths and integer labels from index files in the reference format, concatenated in order.

    Each non-blank line is `<video path> <integer label>`, separated by a single space, with no header (the label
    is ignored by pretraining).
    """
    videos: list[str] = []
    labels: list[int] = []
    for index_path in paths:
        try:
            with open(index_path) as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            raise FileNotFoundError(f"index file not found: {index_path}") from None
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            match = _INDEX_LINE.fullmatch(line)
            if match is None:
                raise ValueError(f"{index_path}:{line_number}: expected '<video path> <integer label>', got {line!r}")
            videos.append(match[1])
            labels.append(int(match[2]))
    if not videos:
        raise ValueError(f"the index files {list(paths)} list no videos")
    return videos, labels


class PretrainDataset(torch.utils.data.Dataset):
    """Map-style dataset keyed by the global sample index `g` (any `g >= 0`, not only `g < len(self)`).

    Item `g` is `(clip, label)`: the clip is float32 (3, F, crop, crop), or (num_clips, 3, F, crop, crop) when
    `num_clips > 1`, each clip cropped and flipped independently. A video that fails to decode is replaced by
    another one drawn from the sample's own generator (deterministic, as the reference's retry but seeded); after
    `max_retries` replacements the error is raised.
    """

    def __init__(self, index_files: Sequence[str], *, frames_per_clip: int, frame_step: int, num_clips: int,
                 crop_size: int, random_resize_scale: tuple[float, float],
                 random_resize_aspect_ratio: tuple[float, float], seed: int, max_retries: int = 10):
        self.videos, self.labels = read_index(index_files)
        self.frames_per_clip = frames_per_clip
        self.frame_step = frame_step
        self.num_clips = num_clips
        self.crop_size = crop_size
        self.scale = tuple(random_resize_scale)
        self.ratio = tuple(random_resize_aspect_ratio)
        self.seed = seed
        self.max_retries = max_retries
        self._order_epoch = -1  # the data epoch whose permutation is cached in _order
        self._order = np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        """Number of videos in the index."""
        return len(self.videos)

    def video_of(self, global_index: int) -> int:
        """Position in the index of the video that global sample `global_index` reads (before any retry)."""
        epoch, offset = divmod(global_index, len(self))
        if epoch != self._order_epoch:
            self._order = _rng(self.seed, epoch, _TAG_ORDER).permutation(len(self))
            self._order_epoch = epoch
        return int(self._order[offset])

    def __getitem__(self, global_index: int) -> tuple[torch.Tensor, int]:
        """Clip(s) and label of global sample `global_index`; the same index always gives the same tensor."""
        if global_index < 0:
            raise IndexError(f"global sample index must be >= 0, got {global_index}")
        video = self.video_of(global_index)
        clip_rng = _rng(self.seed, global_index, _TAG_CLIP)
        augment_rng = _rng(self.seed, global_index, _TAG_AUGMENT)
        retry_rng = _rng(self.seed, global_index, _TAG_RETRY)
        for attempt in range(self.max_retries + 1):
            try:
                frames = self._decode_clips(self.videos[video], clip_rng)
                break
            except VideoDecodeError as e:
                if attempt == self.max_retries:
                    raise
                logger.warning("%s; sample %d uses another video", e, global_index)
                video = int(retry_rng.integers(len(self)))

        clips = [pretrain_transform(frames[i * self.frames_per_clip:(i + 1) * self.frames_per_clip], self.crop_size,
                                    self.scale, self.ratio, augment_rng) for i in range(self.num_clips)]
        clip = clips[0] if self.num_clips == 1 else torch.stack(clips)
        return clip, self.labels[video]

    def _decode_clips(self, path: str, rng: np.random.Generator) -> np.ndarray:
        """uint8 frames (num_clips * F, H, W, 3) of all clips of one video, clip after clip."""
        num_frames = count_frames(path)
        if num_frames < self.num_clips:
            raise VideoDecodeError(path, f"{num_frames} frames cannot be split into {self.num_clips} clips")
        indices = clip_frame_indices(num_frames, self.frames_per_clip, self.frame_step, self.num_clips, rng)
        return decode_frames(path, np.concatenate(indices))


class StepBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Global sample indices of this rank's part of each step: `[s*GB + r*B + b for b in range(B)]`, B = GB / W.

    Runs from `start_step` for `num_steps` steps, or forever when `num_steps` is None.
    """

    def __init__(self, global_batch_size: int, rank: int, world_size: int, start_step: int = 0,
                 num_steps: int | None = None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if global_batch_size < 1 or global_batch_size % world_size:
            raise ValueError(f"global batch size {global_batch_size} is not a positive multiple of world size "
                             f"{world_size}")
        if start_step < 0 or (num_steps is not None and num_steps < 0):
            raise ValueError(f"need start_step >= 0 and num_steps >= 0, got {start_step}, {num_steps}")
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // world_size
        self.rank = rank
        self.start_step = start_step
        self.num_steps = num_steps

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while self.num_steps is None or step < self.start_step + self.num_steps:
            first = step * self.global_batch_size + self.rank * self.local_batch_size
            yield list(range(first, first + self.local_batch_size))
            step += 1

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("an endless StepBatchSampler (num_steps=None) has no length")
        return self.num_steps


@dataclass
class Batch:
    """One rank's batch of one step. `video` is (B, 3, F, H, W) float32, or (B, num_clips, 3, F, H, W)."""

    video: torch.Tensor
    labels: torch.Tensor  # (B,) int64
    step: int
    first_sample_index: int  # global index of the batch's first sample; the batch holds B consecutive indices
    masks: Any  # whatever make_masks returned

    def pin_memory(self) -> "Batch":
        """Pinned copy, called by DataLoader(pin_memory=True). Masks are pinned only if they have `pin_memory`."""
        masks = self.masks.pin_memory() if hasattr(self.masks, "pin_memory") else self.masks
        return replace(self, video=self.video.pin_memory(), labels=self.labels.pin_memory(), masks=masks)


class _WithGlobalIndex(torch.utils.data.Dataset):
    """Item `g` of the wrapped dataset as `(g, clip, label)`, so collate knows which samples it batches."""

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __getitem__(self, global_index: int) -> tuple[int, torch.Tensor, int]:
        clip, label = self.dataset[global_index]
        return global_index, clip, label


class _Collate:
    """Stacks `(g, clip, label)` items into a `Batch` and builds its masks (a class, so workers can pickle it)."""

    def __init__(self, make_masks: Callable[[int, int, int], Any], global_batch_size: int):
        self.make_masks = make_masks
        self.global_batch_size = global_batch_size

    def __call__(self, items: list[tuple[int, torch.Tensor, int]]) -> Batch:
        indices = [item[0] for item in items]
        first = indices[0]
        if indices != list(range(first, first + len(items))):
            raise ValueError(f"a batch must hold consecutive global indices, got {indices}")
        step = first // self.global_batch_size
        return Batch(video=torch.stack([item[1] for item in items]),
                     labels=torch.tensor([item[2] for item in items], dtype=torch.int64),
                     step=step, first_sample_index=first, masks=self.make_masks(step, first, len(items)))


def make_collate(make_masks: Callable[[int, int, int], Any], global_batch_size: int) -> Callable[[list], Batch]:
    """Collate function for `build_loader`'s items `(g, clip, label)`; calls `make_masks(step, first_index, B)`.

    `make_masks` runs in the loader workers, so it must be picklable (a module-level function or such an object).
    """
    return _Collate(make_masks, global_batch_size)


def _init_worker(worker_id: int) -> None:
    # Each worker is one of many processes on the host; intra-op threads per worker would oversubscribe the cores.
    torch.set_num_threads(1)


def build_loader(dataset: torch.utils.data.Dataset, *, global_batch_size: int, rank: int, world_size: int,
                 make_masks: Callable[[int, int, int], Any], num_workers: int, start_step: int = 0,
                 num_steps: int | None = None, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """DataLoader yielding this rank's `Batch` for steps `start_step, start_step + 1, ...` (endless if num_steps is
    None). `dataset[g]` must return `(clip, label)` for a global sample index `g`; `num_workers=0` loads in-process.
    """
    sampler = StepBatchSampler(global_batch_size, rank, world_size, start_step, num_steps)
    workers = num_workers > 0
    return torch.utils.data.DataLoader(
        _WithGlobalIndex(dataset), batch_sampler=sampler, collate_fn=make_collate(make_masks, global_batch_size),
        num_workers=num_workers, pin_memory=pin_memory, persistent_workers=workers,
        # Two batches in flight per worker keep the queue full without holding many decoded batches in memory.
        prefetch_factor=2 if workers else None, worker_init_fn=_init_worker if workers else None)
