"""The training run's data path, assembled from the config: index, probes, dataset, decoder choice, loader, the
device-side finisher, and the accounting of bad videos and new probes.

Decoder (`data.decoder`):

| setting | GPU run | CPU run |
|---|---|---|
| `auto` | DALI when installed (NVDEC), else PyAV | PyAV |
| `dali` | DALI (NVDEC; PyAV for images and codecs NVDEC lacks) | DALI's CPU operators (VP8/VP9/MJPEG; PyAV otherwise) |
| `pyav` | PyAV in the workers, resize and normalise on the GPU | PyAV, the whole transform in the workers |
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.config import Config, ConfigError
from engine.data.bad_videos import BadVideoReport
from engine.data.dataset import PretrainDataset
from engine.data.finish import ClipFinisher
from engine.data.index import VideoIndex, read_index
from engine.data.loader import Batch, build_loader
from engine.data.probe import ProbeTable


def choose_decoder(requested: str, device: torch.device) -> str:
    """"pyav" or "dali" for `data.decoder` on `device`; asking for DALI without it installed is an error."""
    from engine.data.dali_decode import dali_available

    if requested == "pyav":
        return "pyav"
    if requested == "dali":
        if not dali_available():
            raise ConfigError("data.decoder=dali needs NVIDIA DALI: pip install nvidia-dali-cuda130 (the package's "
                              "'dali' extra), or set data.decoder=pyav")
        return "dali"
    return "dali" if device.type == "cuda" and dali_available() else "pyav"


@dataclass
class TrainingData:
    loader: torch.utils.data.DataLoader
    finish: ClipFinisher
    report: BadVideoReport
    probes: ProbeTable
    decoder: str
    main: bool  # rank 0 keeps the probe cache

    def account(self, batch: Batch) -> None:
        """Record the batch's replaced entries (may raise TooManyBadVideos) and the probes its workers made."""
        self.report.update(batch.failures, len(batch.labels), batch.step)
        if self.main:
            for entry, probe in batch.probes:
                self.probes.put(entry, probe)

    def save_probes(self) -> None:
        if self.main:
            self.probes.save()

    def stop_workers(self, batches: Iterator[Batch]) -> None:
        """Stop the loader's worker processes now, however the iteration over `batches` ended. They ignore SIGTERM
        (they must outlive a preemption's last step, engine/data/loader.py), so after an error the interpreter's
        exit, which terminates and then joins them, would wait for them forever."""
        shutdown = getattr(batches, "_shutdown_workers", None)  # torch's multi-process iterator; none in-process
        if shutdown is not None:
            shutdown()

    def describe(self) -> str:
        cached = len(self.probes)
        return f"decoder {self.decoder}, {len(self.probes.index)} index entries ({cached} probes cached)"


def read_run_index(cfg: Config) -> VideoIndex:
    """The run's index files, read; a missing, malformed or empty one is a ConfigError naming it."""
    if not cfg.data.datasets:
        raise ConfigError("data.datasets is empty: list index files ('<video path> <label>' per line)")
    try:
        return read_index(cfg.data.datasets, cfg.data.datasets_weights)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"data.datasets: {e}") from None


def build_training_data(cfg: Config, index: VideoIndex, *, rank: int, world: int, device: torch.device,
                        folder: Path, start_step: int, num_steps: int, make_masks: Any) -> TrainingData:
    d, aug = cfg.data, cfg.data_aug
    probes = ProbeTable(index)
    probes.load()
    decoder = choose_decoder(d.decoder, device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, cfg.meta.dtype) if cuda else torch.float32  # the step's autocast dtype
    dali = None
    dali_codecs: frozenset[str] = frozenset()
    if decoder == "dali":
        from engine.data.dali_decode import DaliClipDecoder, dali_codecs as codecs_on

        dali_device = "gpu" if cuda else "cpu"
        dali_codecs = codecs_on(dali_device, torch.cuda.get_device_capability(device) if cuda else None)
        dali = DaliClipDecoder(crop_size=d.crop_size, frames_per_clip=d.num_frames, device=dali_device,
                               max_batch_size=d.batch_size * d.num_clips, num_threads=max(2, min(d.num_workers, 8)),
                               device_id=device.index if cuda else None, dtype=dtype)
    output = "encoded" if decoder == "dali" else ("crop" if cuda else "clip")
    timed = d.clip_duration is not None or d.fps is not None
    dataset = PretrainDataset(index, frames_per_clip=d.num_frames, num_clips=d.num_clips, crop_size=d.crop_size,
                              random_resize_scale=tuple(aug.random_resize_scale),
                              random_resize_aspect_ratio=tuple(aug.random_resize_aspect_ratio), seed=cfg.meta.seed,
                              frame_step=None if timed else d.sampling_rate, clip_duration=d.clip_duration, fps=d.fps,
                              filter_short_videos=d.filter_short_videos, min_bytes=d.min_video_bytes,
                              max_bytes=d.max_video_bytes, output=output, dali_codecs=dali_codecs, probes=probes)
    accumulation = cfg.accumulation_steps
    loader = build_loader(dataset, global_batch_size=d.batch_size * world * accumulation, rank=rank, world_size=world,
                          make_masks=make_masks, num_workers=d.num_workers, start_step=start_step,
                          num_steps=num_steps, pin_memory=d.pin_mem and cuda, accumulation_steps=accumulation)
    # Judge the bad fraction after 100 attempts, or after as many as the index has entries when it is smaller.
    report = BadVideoReport(folder, rank, d.max_bad_fraction, min_attempts=min(100, len(index)))
    return TrainingData(loader, ClipFinisher(dataset, device, dtype, dali), report, probes, decoder, rank == 0)
