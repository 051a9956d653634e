"""Clip decoding and the pretraining transform with NVIDIA DALI, from encoded file bytes and a host-made plan.

The host draws all randomness (frame indices, crop box, flip) exactly as the PyAV path does, so both paths produce
the same clip from the same draws. DALI then runs one pipeline per batch:

    decoders.video(frames=...) -> slice(box) -> resize(crop x crop, linear, no antialias, float) -> mirror + normalise

On device "gpu" the decoder is NVDEC (`device="mixed"`) and the rest runs on the GPU; on "cpu" the same definition
runs on DALI's CPU operators (libavcodec).

Agreement with the torch reference (`F.interpolate(bilinear, align_corners=False, antialias=False)` of the cropped
frames, then flip and normalise), measured on the CPU backend:
  * Given the same decoded frames the transform is exact (0 difference measured, float32). The crop must be a real
    slice before the resize: resizing the whole frame with `roi_start/roi_end` samples the pixels just outside the
    box at its border where torch clamps to the box's edge pixels (up to 17 levels when upscaling small boxes).
  * The decoded frames are the same frames as PyAV's, but DALI's YUV -> RGB conversion differs from libswscale's
    rgb24: DALI interpolates the 4:2:0 chroma where swscale replicates it. ~1 level mean on smooth content (3 at
    most), ~6 mean and up to ~66 at saturated colour edges.

Corrupt input (random bytes, truncated files, empty arrays, frame indices past the end, boxes outside the frame)
raises a Python exception in DALI 2.4's CPU backend; no crash was found in ~7,000 fuzzed files. DALI then declares
the pipeline invalid, so it is dropped and rebuilt for the next batch. Out-of-range frame indices are errors only
because of `pad_mode="none"`: by default DALI silently pads with black frames, also for negative indices.

nvidia.dali is imported lazily, so that this module imports without it and DataLoader workers can be forked before
DALI starts any thread (the pipeline is built on the first `decode`). A decoder is not thread-safe.
"""

import re

import numpy as np
import torch

from engine.data.transforms import IMAGENET_MEAN, IMAGENET_STD

# FFmpeg codec names (a probe's `codec`, engine.data.probe.codec_of) that DALI's video decoder reads, per backend.
DALI_CODECS: dict[str, frozenset[str]] = {
    "cpu": frozenset({"vp8", "vp9", "mjpeg"}),
    "gpu": frozenset({"vp8", "vp9", "mjpeg", "h264", "hevc", "av1", "mpeg4"}),
}

# NVDEC decodes AV1 on Ampere's GA10x (compute capability 8.6), Orin (8.7), Ada (8.9) and Blackwell (10 and up), not
# on A100 (8.0) or Hopper (9.0) (NVIDIA's NVDEC application note, Video Codec SDK 13): there it goes to PyAV.
_AV1_NVDEC = ((8, 6), (8, 7), (8, 9))


def dali_codecs(device: str, capability: tuple[int, int] | None = None) -> frozenset[str]:
    """The codecs DALI's decoder reads on `device` ("cpu" or "gpu"; the GPU's compute capability, (major, minor))."""
    codecs = DALI_CODECS[device]
    if device == "gpu" and capability is not None and not (capability in _AV1_NVDEC or capability[0] >= 10):
        codecs = codecs - {"av1"}
    return codecs


_INSTALL_HINT = ("NVIDIA DALI is not installed: pip install nvidia-dali-cuda130 (or the `dali` extra of this "
                 "package), or decode with PyAV: data.decoder=pyav")

# Float32 products, as the torch reference computes them (engine.data.transforms).
_MEAN_255 = (torch.tensor(IMAGENET_MEAN, dtype=torch.float32) * 255.0).tolist()
_STD_255 = (torch.tensor(IMAGENET_STD, dtype=torch.float32) * 255.0).tolist()

# DALI has no bfloat16: such output is produced as float32 and cast by torch.
_DALI_OUTPUT_DTYPE = {torch.float32: torch.float32, torch.float16: torch.float16, torch.bfloat16: torch.float32}


class DaliDecodeError(RuntimeError):
    """A batch DALI could not decode (bad bytes, decoder error, frame index or box out of range)."""


class DaliUnavailable(DaliDecodeError):
    """DALI could not build its pipeline here (e.g. a DALI wheel for a newer CUDA than the driver's): no batch will
    decode."""


def dali_available() -> bool:
    """Whether nvidia.dali can be imported (imports it)."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


class DaliClipDecoder:
    """Decodes and transforms batches of clips: `decode(...)` -> (N, 3, frames_per_clip, crop_size, crop_size).

    `device` "gpu" decodes with NVDEC on CUDA device `device_id` (default: torch's current device) and returns
    CUDA tensors; "cpu" uses DALI's CPU operators and returns CPU tensors (`device_id` is ignored).
    `max_batch_size` bounds the clips per `decode` call; `num_threads` is DALI's CPU thread count.
    """

    def __init__(self, *, crop_size: int, frames_per_clip: int, device: str, max_batch_size: int,
                 num_threads: int = 2, device_id: int | None = None, dtype: torch.dtype = torch.float32):
        if device not in DALI_CODECS:
            raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
        if dtype not in _DALI_OUTPUT_DTYPE:
            raise ValueError(f"dtype must be one of {sorted(map(str, _DALI_OUTPUT_DTYPE))}, got {dtype}")
        if min(crop_size, frames_per_clip, max_batch_size, num_threads) < 1:
            raise ValueError("crop_size, frames_per_clip, max_batch_size and num_threads must be positive")
        if not dali_available():
            raise ImportError(_INSTALL_HINT)
        if device == "gpu":
            # device_count asks NVML where it can, creating no CUDA context: the check keeps the process fork-safe.
            count = torch.cuda.device_count()
            if count == 0:
                raise RuntimeError("DaliClipDecoder(device='gpu') needs a CUDA device that torch can use, and none "
                                   "is visible: use device='cpu' or data.decoder=pyav")
            if device_id is not None and not 0 <= device_id < count:
                raise ValueError(f"device_id {device_id} is out of range: {count} CUDA device(s) visible")
        self.crop_size = crop_size
        self.frames_per_clip = frames_per_clip
        self.device = device
        self.max_batch_size = max_batch_size
        self.num_threads = num_threads
        self.device_id = device_id
        self.dtype = dtype
        self._pipe = None  # built on the first decode, dropped after a DALI error

    def decode(self, encoded: list[np.ndarray], frame_indices: list[np.ndarray],
               boxes: list[tuple[int, int, int, int]], flips: list[bool]) -> torch.Tensor:
        """One item per clip: the whole file as a 1-D uint8 array (the same array may repeat), `frames_per_clip`
        frame indices (any order, repeats allowed), the crop box `(top, left, h, w)` in pixels of the native frame
        and whether to flip horizontally. Returns normalised clips of shape (N, 3, F, crop, crop) in `dtype`, on
        the decoder's device. Raises DaliDecodeError if DALI fails, ValueError for malformed arguments."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        inputs = self._inputs(encoded, frame_indices, boxes, flips)
        if self._pipe is None:
            try:
                self._pipe = self._build()
            except Exception as e:  # as run's: DALI raises generic exceptions
                raise DaliUnavailable(f"DALI could not build its {self.device} pipeline: {_reason(e)}") from e
        stream = torch.cuda.current_stream(self._pipe.device_id) if self.device == "gpu" else None
        try:
            # With a stream, outputs are ready on it (no host sync) and their memory is released in its order.
            (output,) = self._pipe.run(stream, **inputs)
            dense = output.as_tensor()
            result = torch.empty(dense.shape(), dtype=_DALI_OUTPUT_DTYPE[self.dtype],
                                 device=f"cuda:{self._pipe.device_id}" if stream is not None else "cpu")
            # A copy: DALI reuses its output buffers on the next run.
            feed_ndarray(dense, result, cuda_stream=stream)
        except Exception as e:  # DALI reports every failure as a generic exception (mostly RuntimeError)
            # DALI declares the pipeline invalid after an error: the next batch gets a fresh one.
            self._pipe = None
            raise DaliDecodeError(f"DALI could not decode a batch of {len(encoded)} clip(s): {_reason(e)}") from e
        return result.to(self.dtype)

    def _inputs(self, encoded: list[np.ndarray], frame_indices: list[np.ndarray],
                boxes: list[tuple[int, int, int, int]], flips: list[bool]) -> dict[str, list[np.ndarray]]:
        """Validates the batch and converts it to the per-sample arrays the external sources take."""
        n = len(encoded)
        if not 1 <= n <= self.max_batch_size:
            raise ValueError(f"a batch has 1 to {self.max_batch_size} clips, got {n}")
        if not len(frame_indices) == len(boxes) == len(flips) == n:
            raise ValueError(f"encoded, frame_indices, boxes and flips differ in length: "
                             f"{n}, {len(frame_indices)}, {len(boxes)}, {len(flips)}")
        for array in encoded:
            if not (isinstance(array, np.ndarray) and array.dtype == np.uint8 and array.ndim == 1):
                raise ValueError("each encoded item must be a 1-D uint8 numpy array of the file's bytes")
        frames = [np.ascontiguousarray(indices, dtype=np.int32) for indices in frame_indices]
        for indices in frames:
            if indices.shape != (self.frames_per_clip,):
                raise ValueError(f"each clip takes {self.frames_per_clip} frame indices, got shape {indices.shape}")
        for top, left, h, w in boxes:
            # A zero-sized box would not fail in DALI but yield an empty clip; the frame size is unknown here, so
            # boxes reaching past the frame are left to DALI (an error).
            if top < 0 or left < 0 or h < 1 or w < 1:
                raise ValueError(f"crop box (top, left, h, w) = {(top, left, h, w)} is empty or negative")
        return {
            "encoded": list(encoded),
            "frames": frames,
            "anchor": [np.array([top, left], np.int32) for top, left, _, _ in boxes],
            "shape": [np.array([h, w], np.int32) for _, _, h, w in boxes],
            "mirror": [np.array(int(flip), np.int32) for flip in flips],
        }

    def _build(self):
        """Defines and builds the DALI pipeline (starts its threads)."""
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device == "gpu"
        device_id = (torch.cuda.current_device() if self.device_id is None else self.device_id) if gpu else None
        output_dtype = types.FLOAT16 if _DALI_OUTPUT_DTYPE[self.dtype] == torch.float16 else types.FLOAT

        # prefetch_queue_depth=1: each run consumes exactly the batch fed to it (deeper queues run ahead and would
        # need the next batch before it exists). Batches smaller than batch_size are fine for external sources.
        @pipeline_def(batch_size=self.max_batch_size, num_threads=self.num_threads, device_id=device_id,
                      exec_dynamic=True, prefetch_queue_depth=1)
        def clips():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
            anchor = fn.external_source(name="anchor", dtype=types.INT32, ndim=1)
            shape = fn.external_source(name="shape", dtype=types.INT32, ndim=1)
            mirror = fn.external_source(name="mirror", dtype=types.INT32, ndim=0)
            # pad_mode="none": an index past the end is an error, not a black frame.
            video = fn.decoders.video(encoded, device="mixed" if gpu else "cpu", frames=frames, pad_mode="none")
            # The operators below follow their input's device; the box and flip stay CPU arguments.
            crop = fn.slice(video, anchor, shape, axis_names="HW", normalized_anchor=False, normalized_shape=False)
            # Float output: rounding to uint8 here would add up to half a level of error.
            resized = fn.resize(crop, size=[self.crop_size, self.crop_size], interp_type=types.INTERP_LINEAR,
                                antialias=False, dtype=types.FLOAT)
            return fn.crop_mirror_normalize(resized, dtype=output_dtype, output_layout="CFHW", mean=_MEAN_255,
                                            std=_STD_255, mirror=mirror)

        pipe = clips()
        pipe.build()
        return pipe


def _reason(error: Exception) -> str:
    """The operator and message of a DALI error, without the pipeline-definition traceback DALI wraps them in."""
    text = str(error)
    operator = re.search(r"Error in \w+ operator `([^`]+)`", text)
    message = re.search(r"encountered:\s*(.*?)\s*(?:C\+\+ context|Current pipeline object|$)", text, re.S)
    if message is None:
        return " ".join(text.split())
    return (f"{operator.group(1)}: " if operator else "") + " ".join(message.group(1).split())
