"""The pretraining dataset: global sample index -> one video's clip(s), decoded by PyAV or planned for DALI (reference
spec §5.1-§5.3).

Everything random is a pure function of `(seed, global sample index g)`, so any step of any rank can be rebuilt
without replaying the ones before it (resume skips batches without decoding them):

* `g` -> index entry: `order_e[g % N]`, `order_e` a permutation of the N entries seeded by `(seed, e = g // N)`, one
  "data epoch" per pass; with `datasets_weights`, `order_e` is instead N weighted draws with replacement (V2's
  sampler: V1 draws without replacement over all N, which only reorders the entries and ignores the weights);
* the k-th attempt's clip position, crop box and flip: generators seeded by `(seed, g, purpose, k)`;
* the entry replacing a bad one: a generator seeded by `(seed, g, retry)`.

Deviation, written down: the reference shuffles with a DistributedSampler (seed 0, `set_epoch`) and draws clip
positions and crops from each loader worker's global NumPy / Python RNG, so its samples depend on the worker count and
on which worker loads what; here they depend on nothing but the seed and `g`, and each rank reads its own shard of
every step (`engine.data.loader`) as the reference's sampler does.

An entry that fails (missing, empty, not a video, too short, damaged, ...) is replaced by another drawn from the
sample's own generator, and the failure is returned with the sample, for the training process to report
(`engine.data.bad_videos`). Probes (`engine.data.probe`) catch most failures before any decoding.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.data.decode import VideoDecodeError, decode_frames
from engine.data.index import VideoIndex, is_image
from engine.data.probe import MAX_BYTES, MIN_BYTES, Probe, ProbeTable, codec_of, within_size_limits
from engine.data.sampling import clip_frame_indices, frame_step_for
from engine.data.transforms import draw_crop_and_flip, finish_clip

# Purpose tags keep the random streams of one sample (and the epoch order) independent of each other.
_TAG_ORDER, _TAG_CLIP, _TAG_AUGMENT, _TAG_RETRY = 0, 1, 2, 3

# How far a worker takes a sample: "clip" = normalised float32 clips (CPU training), "crop" = uint8 crops whose resize
# and normalisation run on the GPU, "encoded" = the file's bytes and the clip plan, for DALI (crops for what DALI
# cannot decode).
OUTPUTS = ("clip", "crop", "encoded")


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(entropy)))


class SampleError(RuntimeError):
    """Every entry tried for one sample failed; lists them with their reasons."""


@dataclass
class Sample:
    """One global sample: its clips in the form `output` asked for, and what failed on the way."""

    global_index: int
    entry: int  # the index entry finally used
    label: int
    path: str
    clips: list[torch.Tensor]  # "clip": float32 (3, F, crop, crop) each; "crop": uint8 (F, h, w, 3); "encoded": []
    flips: list[bool]
    frame_indices: list[np.ndarray]
    boxes: list[tuple[int, int, int, int]]  # (top, left, h, w) in the native frame
    encoded: np.ndarray | None = None  # the whole file, uint8, when DALI decodes this sample
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of the entries replaced
    probes: list[tuple[int, Probe]] = field(default_factory=list)  # probes made while loading (for the cache)


class PretrainDataset(torch.utils.data.Dataset):
    """Map-style dataset keyed by the global sample index `g` (any `g >= 0`, not only `g < len(self)`); item `g` is
    a `Sample`. The frame step is one of `frame_step`, `clip_duration` (seconds) or `fps` (spec §5.2)."""

    def __init__(self, index: VideoIndex, *, frames_per_clip: int, num_clips: int, crop_size: int,
                 random_resize_scale: tuple[float, float], random_resize_aspect_ratio: tuple[float, float], seed: int,
                 frame_step: int | None = 4, clip_duration: float | None = None, fps: int | None = None,
                 filter_short_videos: bool = False, min_bytes: int = MIN_BYTES, max_bytes: int = MAX_BYTES,
                 max_retries: int = 10, output: str = "clip", dali_codecs: Collection[str] = (),
                 probes: ProbeTable | None = None):
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        frame_step_for(25.0, frames_per_clip, frame_step=frame_step, clip_duration=clip_duration, fps=fps)  # checks
        self.index = index
        self.frames_per_clip = frames_per_clip
        self.num_clips = num_clips
        self.crop_size = crop_size
        self.scale = tuple(random_resize_scale)
        self.ratio = tuple(random_resize_aspect_ratio)
        self.seed = seed
        self.step_options = {"frame_step": frame_step, "clip_duration": clip_duration, "fps": fps}
        self.filter_short_videos = filter_short_videos
        self.size_limits = (min_bytes, max_bytes)
        self.max_retries = max_retries
        self.output = output
        self.dali_codecs = frozenset(dali_codecs)
        self.probes = probes if probes is not None else ProbeTable(index)
        self._order_epoch = -1  # the data epoch whose order is cached in _order
        self._order = np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        """Number of entries in the index."""
        return len(self.index)

    def video_of(self, global_index: int) -> int:
        """The index entry that global sample `global_index` reads first (before any replacement)."""
        epoch, offset = divmod(global_index, len(self))
        if epoch != self._order_epoch:
            rng = _rng(self.seed, epoch, _TAG_ORDER)
            n = len(self)
            weights = self.index.weights
            self._order = rng.permutation(n) if weights is None else rng.choice(n, size=n, p=weights)
            self._order_epoch = epoch
        return int(self._order[offset])

    def __getitem__(self, global_index: int) -> Sample:
        return self.load(global_index)

    def load(self, global_index: int, *, output: str | None = None, banned: Mapping[str, str] | None = None) -> Sample:
        """Sample `global_index`; `output` overrides the dataset's; entries whose path is in `banned` fail with the
        reason given there, unopened (how the DALI fallback replaces a file that no decoder could read)."""
        banned = banned or {}
        if global_index < 0:
            raise IndexError(f"global sample index must be >= 0, got {global_index}")
        output = output or self.output
        entry = self.video_of(global_index)
        retry_rng = _rng(self.seed, global_index, _TAG_RETRY)
        failures: list[tuple[str, str]] = []
        fresh: list[tuple[int, Probe]] = []
        for attempt in range(self.max_retries + 1):
            path = self.index.paths[entry]
            probe, is_new = self.probes.probe(entry)
            if is_new:
                fresh.append((entry, probe))
            probe = within_size_limits(probe, *self.size_limits)
            problem = probe.reason or self._length_problem(probe)
            if not problem and path in banned:
                problem = banned[path]
            if not problem:
                try:
                    sample = self._build(global_index, entry, probe, attempt, output)
                    sample.failures, sample.probes = failures, fresh
                    return sample
                except VideoDecodeError as e:
                    problem = e.reason
            failures.append((path, problem))
            entry = int(retry_rng.integers(len(self)))
        tries: dict[tuple[str, str], int] = {}  # the same entry may be drawn again: listed once, with its count
        for failure in failures:
            tries[failure] = tries.get(failure, 0) + 1
        listed = "\n".join(f"  {p}: {r}" + (f" ({n} tries)" if n > 1 else "") for (p, r), n in tries.items())
        raise SampleError(f"sample {global_index}: {len(failures)} index entries in a row failed (is the dataset "
                          f"mounted? check it with `python -m engine.data.inspect INDEX`):\n{listed}")

    def _length_problem(self, probe: Probe) -> str:
        if is_image(probe.path):
            return ""
        if probe.frames < self.num_clips:
            return f"too short: {probe.frames} frames cannot be split into {self.num_clips} clips"
        clip_len = self.frames_per_clip * self._frame_step(probe)
        if self.filter_short_videos and probe.frames < clip_len:
            return f"too short: {probe.frames} frames < clip length {clip_len} (data.filter_short_videos)"
        return ""

    def _frame_step(self, probe: Probe) -> int:
        return frame_step_for(probe.fps, self.frames_per_clip, **self.step_options)

    def _build(self, global_index: int, entry: int, probe: Probe, attempt: int, output: str) -> Sample:
        clip_rng = _rng(self.seed, global_index, _TAG_CLIP, attempt)
        augment_rng = _rng(self.seed, global_index, _TAG_AUGMENT, attempt)
        f = self.frames_per_clip
        if is_image(probe.path):  # V2: an image is a clip of F copies of itself
            indices = [np.zeros(f, np.int64) for _ in range(self.num_clips)]
        else:
            indices = clip_frame_indices(probe.frames, f, self._frame_step(probe), self.num_clips, clip_rng)
        boxes, flips = [], []
        for _ in range(self.num_clips):
            box, flip = draw_crop_and_flip(probe.height, probe.width, self.scale, self.ratio, augment_rng)
            boxes.append(box)
            flips.append(flip)
        sample = Sample(global_index, entry, self.index.labels[entry], probe.path, [], flips, indices, boxes)
        if output == "encoded" and codec_of(probe.codec) in self.dali_codecs and not is_image(probe.path):
            sample.encoded = np.fromfile(probe.path, dtype=np.uint8)
            return sample

        frames = decode_frames(probe.path, np.concatenate(indices))
        if frames.shape[1:3] != (probe.height, probe.width):
            raise VideoDecodeError(probe.path, f"corrupt: frames decode at {frames.shape[2]}x{frames.shape[1]}, the "
                                               f"stream says {probe.width}x{probe.height}")
        frames = torch.from_numpy(frames)
        for k, ((top, left, h, w), flip) in enumerate(zip(boxes, flips)):
            crop = frames[k * f:(k + 1) * f, top:top + h, left:left + w]
            sample.clips.append(finish_clip(crop, self.crop_size, flip) if output == "clip" else crop.contiguous())
        return sample
