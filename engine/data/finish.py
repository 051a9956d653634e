"""The last stage of the data path, on the training device: a `Batch`'s clips as the step's input tensor.

* Finished float32 clips (CPU training: the workers did everything) are moved and cast.
* uint8 crops (GPU training with PyAV) are resized, flipped and normalised on the GPU: the host-to-device copy carries
  uint8 crops instead of float32 clips (about 4x fewer bytes at 224 px from 256-320 px video, more at 384 px), and the
  workers' CPU time goes to decoding only.
* Encoded items go through DALI (NVDEC on GPU). One bad sample fails a whole DALI batch, so a failed batch is decoded
  again one sample at a time, through DALI, and what DALI cannot read with PyAV; a sample PyAV cannot decode either is
  replaced as the workers would replace it.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from engine.data.dataset import PretrainDataset
from engine.data.decode import VideoDecodeError, decode_frames
from engine.data.loader import Batch, ClipParts
from engine.data.transforms import finish_clip

logger = logging.getLogger(__name__)


# DALI batches that fail in a row before the finisher stops asking DALI (a bad file fails one batch; a decoder that
# fails every batch is broken here, and each failure costs a DALI run before the PyAV fallback)
DALI_FAILURES_TO_GIVE_UP = 3


class ClipFinisher:
    """`finisher(batch)` -> (B, 3, F, crop, crop) (or (B, num_clips, 3, F, crop, crop)) on `device` in `dtype`.

    May replace samples (DALI fallback), in which case it updates `batch.labels`, `batch.paths` and
    `batch.sample_failures`. When DALI cannot build its pipeline, or reads none of the samples of
    DALI_FAILURES_TO_GIVE_UP failed batches in a row, the finisher decodes every later encoded item with PyAV (said
    once, with the faster way out).
    """

    def __init__(self, dataset: PretrainDataset, device: torch.device, dtype: torch.dtype, dali=None):
        self.dataset = dataset
        self.device = device
        self.dtype = dtype
        self.dali = dali  # an engine.data.dali_decode.DaliClipDecoder, when the dataset plans encoded items
        self.dali_failures = 0  # in a row

    def __call__(self, batch: Batch) -> torch.Tensor:
        if isinstance(batch.video, torch.Tensor):
            return batch.video.to(self.device, self.dtype, non_blocking=True)
        parts = batch.video
        d = self.dataset
        out = torch.empty(parts.num_samples * parts.num_clips, 3, d.frames_per_clip, d.crop_size, d.crop_size,
                          dtype=self.dtype, device=self.device)
        self._finish_crops(parts, out)
        if parts.encoded:
            self._decode_encoded(parts, batch, out)
        shape = (parts.num_samples,) if parts.num_clips == 1 else (parts.num_samples, parts.num_clips)
        return out.view(*shape, *out.shape[1:])

    def _finish_crops(self, parts: ClipParts, out: torch.Tensor) -> None:
        flat = parts.crops.to(self.device, non_blocking=True)
        offset = 0
        for shape, slot, flip in zip(parts.crop_shapes, parts.crop_slots, parts.crop_flips):
            numel = shape[0] * shape[1] * shape[2] * 3
            crop = flat[offset:offset + numel].view(*shape, 3)
            out[slot] = finish_clip(crop, self.dataset.crop_size, flip, self.dtype)
            offset += numel

    def _decode_encoded(self, parts: ClipParts, batch: Batch, out: torch.Tensor) -> None:
        from engine.data.dali_decode import DaliDecodeError, DaliUnavailable

        by_sample: dict[int, list[int]] = {}
        for item, slot in enumerate(parts.encoded_slots):
            by_sample.setdefault(slot // parts.num_clips, []).append(item)
        if self.dali is not None:
            try:
                self._dali_into(parts, list(range(len(parts.encoded))), out)
                self.dali_failures = 0
                return
            except DaliUnavailable as e:
                logger.warning("DALI failed on step %d (%s)", batch.step, e)
                self._dali_off("its pipeline does not build here")
            except DaliDecodeError as e:
                # one file NVDEC cannot read (a codec profile, a size or a container this GPU's decoder lacks, a
                # corrupt stream) fails the whole batch: the others still go through DALI, one sample at a time
                logger.warning("DALI failed on step %d (%s); decoding its %d samples one at a time", batch.step, e,
                               len(by_sample))
                failed = {b: items for b, items in by_sample.items() if not self._dali_sample(parts, batch, out, b,
                                                                                               items)}
                # DALI is broken here only if it reads none of them; else the failures are files
                self.dali_failures = self.dali_failures + 1 if len(failed) == len(by_sample) else 0
                if self.dali_failures >= DALI_FAILURES_TO_GIVE_UP:
                    self._dali_off(f"{self.dali_failures} batches in a row")
                by_sample = failed
        for b, items in by_sample.items():
            self._pyav_fallback(parts, batch, out, b, items)

    def _dali_into(self, parts: ClipParts, items: list[int], out: torch.Tensor) -> None:
        clips = self.dali.decode([parts.encoded[i] for i in items], [parts.encoded_indices[i] for i in items],
                                 [parts.encoded_boxes[i] for i in items], [parts.encoded_flips[i] for i in items])
        # the slots as a device tensor copied without a stream sync (a list index would be copied blocking)
        slots = torch.tensor([parts.encoded_slots[i] for i in items]).to(self.device, non_blocking=True)
        out.index_copy_(0, slots, clips.to(self.device, self.dtype, non_blocking=True))

    def _dali_sample(self, parts: ClipParts, batch: Batch, out: torch.Tensor, b: int, items: list[int]) -> bool:
        from engine.data.dali_decode import DaliDecodeError

        try:
            self._dali_into(parts, items, out)
            return True
        except DaliDecodeError as e:
            logger.warning("DALI cannot decode %s (%s); decoding it with PyAV", batch.paths[b], e)
            return False

    def _dali_off(self, why: str) -> None:
        self.dali = None
        logger.warning("DALI is off for the rest of the run (%s); its clips are decoded with PyAV in the training "
                       "process, slower than the loader's workers would: rerun with data.decoder=pyav", why)

    def _pyav_fallback(self, parts: ClipParts, batch: Batch, out: torch.Tensor, b: int, items: list[int]) -> None:
        """Decode sample `b`'s planned clips with PyAV; if that fails too, load a replacement sample."""
        path, crop_size = batch.paths[b], self.dataset.crop_size
        try:
            frames = torch.from_numpy(decode_frames(path, np.concatenate([parts.encoded_indices[i] for i in items])))
        except VideoDecodeError as e:
            # Loading the sample again replays its whole history (the workers' failures included) up to this file.
            sample = self.dataset.load(batch.first_sample_index + b, output="crop", banned={path: e.reason})
            batch.sample_failures[b] = sample.failures
            batch.labels[b], batch.paths[b] = sample.label, sample.path
            for k, (crop, flip) in enumerate(zip(sample.clips, sample.flips)):
                out[b * parts.num_clips + k] = finish_clip(crop.to(self.device), crop_size, flip, self.dtype)
            return
        f = self.dataset.frames_per_clip
        for k, item in enumerate(items):
            top, left, h, w = parts.encoded_boxes[item]
            crop = frames[k * f:(k + 1) * f, top:top + h, left:left + w].to(self.device)
            out[parts.encoded_slots[item]] = finish_clip(crop, crop_size, parts.encoded_flips[item], self.dtype)
