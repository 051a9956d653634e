"""Evaluation data: an index entry -> its S segments x V views (spec 6.2), and class-balanced label-efficiency splits.

Segments are `clip_frame_indices` over S equal partitions with overlap allowed (the reference's eval mode). Training
draws segment positions and augmentations (`views.train_view` for videos, `augment.image_train_clip` for images)
from a generator seeded by (seed, epoch, entry); validation is deterministic (the first span of each partition: V1
draws them at random there too, spec 6.3, which makes its accuracy noisy for long videos) and reads every entry
exactly once. With `data_aug.enabled=false` training is deterministic as well, one view per segment through the
one-view evaluation transform, which is what lets features be cached. A bad entry (missing, corrupt) is replaced by
another, always the same one (`EvalClips.__getitem__`), and reported by the runner.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from engine.data.dataset import SampleError
from engine.data.decode import VideoDecodeError, decode_frames
from engine.data.index import is_image
from engine.data.probe import probe_file
from engine.data.sampling import clip_frame_indices

from .augment import image_train_clip
from .config import EvalAugConfig, EvalDataConfig
from .views import eval_views, train_view

MAX_RETRIES = 10  # replacements tried for a bad entry before the sample fails (the pretraining dataset's count)
_RETRY = 7  # tags the replacement draws' generator apart from the clip's


class EvalClips(torch.utils.data.Dataset):
    """Entry i -> (clips (S, V, 3, F, crop, crop) float32, label, i, failures)."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], data: EvalDataConfig, aug: EvalAugConfig, *,
                 training: bool, seed: int) -> None:
        self.paths, self.labels = list(paths), list(labels)
        self.data, self.aug, self.training, self.seed = data, aug, training, seed
        self.epoch = 0
        self._frames: dict[int, int] = {}  # frame counts, probed once per worker

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _num_frames(self, i: int) -> int:
        if i not in self._frames:
            probe = probe_file(self.paths[i])
            if not probe.ok:
                raise VideoDecodeError(self.paths[i], probe.reason + " (check the index with python -m "
                                                                     "engine.data.inspect INDEX)")
            self._frames[i] = probe.frames
        return self._frames[i]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int, str]:
        """(clips, label, i, failures): a bad entry (missing, corrupt, ...) is replaced by another one drawn from a
        generator seeded by (seed, i), with that entry's own clips and label, as V1 replaces it by a random one (ours
        is the same one every epoch, so cached features stay what encoding again would give); `failures` lists the
        entries that failed as "path<TAB>reason" lines, for the report (engine/data/bad_videos.py)."""
        retry = np.random.default_rng([self.seed, i, _RETRY])
        failures, entry = [], i
        for _ in range(MAX_RETRIES + 1):
            try:
                return self._clips(entry), self.labels[entry], i, "\n".join(failures)
            except VideoDecodeError as e:
                failures.append(f"{e.path}\t{e.reason}")
                entry = int(retry.integers(len(self)))
        listed = "\n".join(f"  {line.replace(chr(9), ': ')}" for line in dict.fromkeys(failures))
        raise SampleError(f"entry {i}: {len(failures)} index entries in a row failed (is the dataset mounted? check "
                          f"it with `python -m engine.data.inspect INDEX`):\n{listed}")

    def _clips(self, i: int) -> torch.Tensor:
        """Entry i's (S, V, 3, F, crop, crop) clips; raises VideoDecodeError for a bad file."""
        d = self.data
        augment = self.training and self.aug.enabled
        rng = np.random.default_rng([self.seed, self.epoch, i])
        if is_image(self.paths[i]):  # spec 6.5: the image repeated along time
            indices = [np.zeros(d.frames_per_clip, np.int64)] * d.num_segments
        else:
            indices = clip_frame_indices(self._num_frames(i), d.frames_per_clip, d.frame_step, d.num_segments, rng,
                                         random_clip_sampling=augment, allow_clip_overlap=True)
        frames = torch.from_numpy(decode_frames(self.paths[i], np.concatenate(indices)))
        f, a = d.frames_per_clip, self.aug
        scale, ratio = tuple(a.random_resize_scale), tuple(a.random_resize_aspect_ratio)
        segments = []
        for s in range(d.num_segments):
            clip = frames[s * f:(s + 1) * f]
            if augment and is_image(self.paths[i]):  # timm's ImageNet training transform, then F copies (spec 6.5)
                segments.append(image_train_clip(clip[0], d.crop_size, f, scale, ratio, rng,
                                                 auto_augment=a.auto_augment, reprob=a.reprob,
                                                 hflip_prob=a.image_hflip_prob)[None])
            elif augment:
                segments.append(train_view(clip, d.crop_size, scale, ratio, rng, rand_augment=a.rand_augment,
                                           reprob=a.reprob))
            else:  # training without augmentation: one view, as V1 trains
                segments.append(eval_views(clip, d.crop_size, 1 if self.training else d.num_views))
        return torch.stack(segments)


def image_folder(root: str | Path) -> tuple[list[str], list[int]]:
    """An ImageFolder-style tree (`root/<class>/<image>`, spec 6.5): image paths and labels, classes numbered in
    sorted order of their folder names."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root}: no class folders (expected {root}/<class>/<image>)")
    paths, labels = [], []
    for label, name in enumerate(classes):
        for image in sorted((root / name).iterdir()):
            if image.is_file() and is_image(str(image)):
                paths.append(str(image))
                labels.append(label)
    return paths, labels


def balanced_subset(labels: Sequence[int], *, fraction: float | None, per_class: int | None, seed: int,
                    split: int) -> np.ndarray:
    """Sorted entry indices of split `split` of a class-balanced label-efficiency study: from every class,
    m = `ceil(fraction * n_c)` (at least 1) or `per_class` entries. Each class is permuted once by a generator
    seeded with (seed, class), and split k takes its k-th block of m: splits of one seed are disjoint."""
    labels = np.asarray(labels)
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        m = per_class if per_class is not None else max(1, math.ceil(fraction * len(members)))
        if (split + 1) * m > len(members):
            raise ValueError(f"class {c} has {len(members)} entries: too few for {split + 1} disjoint splits of {m}")
        order = np.random.default_rng([seed, int(c)]).permutation(members)
        chosen.append(order[split * m:(split + 1) * m])
    return np.sort(np.concatenate(chosen))
