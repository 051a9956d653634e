"""Video decoding with PyAV (the CPU decoder, and the fallback of DALI): selected frames to uint8 RGB.

Decoding starts at the last keyframe before the clip (found by demuxing the packets, which is cheap) and runs
forward to the clip's last frame; frames are identified by presentation timestamp, so the result is exactly that of
decoding from the first frame. Only the requested frames are converted to RGB. On a 568x320 H.264 video of 250
frames with a keyframe every 50 (Kinetics-like), a random 16-frame clip of step 4 took 66 ms instead of 86 ms decoding
from the start with the default RGB conversion (one core, measured; identical frames).
"""

from typing import NamedTuple

import av
import numpy as np


class VideoDecodeError(RuntimeError):
    """A video could not be opened or decoded. Carries the path and the reason (`"<kind>: <detail>"`, the kinds of
    `engine.data.probe`)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot decode video {path!r}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self):
        # The default exception pickling would call __init__(message); DataLoader workers may need to pickle us.
        return type(self), (self.path, self.reason)


def decode_frames(path: str, indices: np.ndarray) -> np.ndarray:
    """Frames `indices` (any order, repeats allowed) as uint8 RGB of shape (len(indices), H, W, 3). Frame i is the
    i-th frame in presentation order; an image file is a one-frame video.

    Decodes from the last keyframe at or before `min(indices)` up to `max(indices)` (see `_keyframe_start`), else
    from the start of the stream.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if indices.ndim != 1 or len(indices) == 0:
        raise ValueError(f"indices must be a non-empty 1-D array, got shape {indices.shape}")
    if indices.min() < 0:
        raise VideoDecodeError(path, f"negative frame index {int(indices.min())} requested")
    wanted = set(indices.tolist())
    start = _keyframe_start(path, int(indices.min()))
    decoded = _decode(path, wanted, start)
    if start is not None and len(decoded) < len(wanted):
        decoded = _decode(path, wanted, None)  # the seek did not land where the index said: decode it all
    return np.stack([decoded[i] for i in indices.tolist()])


class _Start(NamedTuple):
    keyframe_pts: int
    index_of_pts: dict[int, int]  # presentation timestamp -> frame index


def _keyframe_start(path: str, first: int) -> _Start | None:
    """Where to start decoding for frame `first`, from one pass over the packets (demuxing only, no decoding: a few
    microseconds a packet, against ~1 ms to decode a 320p H.264 frame).

    Decoding from the stream's start costs frames up to the clip's end: ~160 decoded per 16 kept for a random 64-frame
    span of a 250-frame video. Starting at the last keyframe before the clip saves all frames before that keyframe.
    Frames are identified by their presentation timestamps, so B-frame reordering and open GOPs do not shift them.
    None (decode from the start) when there is nothing to gain or timestamps cannot identify frames.
    """
    try:
        with av.open(path) as container:
            stream = _video_stream(container, path)
            packets = [(p.pts, p.is_keyframe) for p in container.demux(stream) if p.size > 0]
    except av.FFmpegError:
        return None  # the decode itself reports what is wrong
    timestamps = sorted(pts for pts, _ in packets if pts is not None)
    if len(timestamps) != len(packets) or len(set(timestamps)) != len(timestamps) or first >= len(timestamps):
        return None
    first_pts = timestamps[first]
    keyframes = [pts for pts, key in packets if key and pts <= first_pts]
    if not keyframes or max(keyframes) == timestamps[0]:
        return None
    return _Start(max(keyframes), {pts: i for i, pts in enumerate(timestamps)})


def _decode(path: str, wanted: set[int], start: _Start | None) -> dict[int, np.ndarray]:
    """The wanted frames by index: sequentially from the start (frame i is the i-th decoded), or from
    `start.keyframe_pts` (frame index from the timestamp). Stops after the last wanted frame."""
    last = max(wanted)
    decoded: dict[int, np.ndarray] = {}
    index = -1
    try:
        with av.open(path) as container:
            stream = _video_stream(container, path)
            # One thread: parallelism comes from DataLoader workers, and FFmpeg's default of one thread per core in
            # every worker oversubscribes the host (single-threaded was also fastest on small clips, measured).
            stream.codec_context.thread_count = 1
            if start is not None:
                container.seek(start.keyframe_pts, stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                if start is None:
                    index += 1
                elif frame.pts in start.index_of_pts:
                    index = start.index_of_pts[frame.pts]
                else:
                    continue  # a frame the index does not know: the retry from the start decides
                if index in wanted:
                    decoded[index] = to_rgb(frame)
                if index >= last:
                    break
    except av.FFmpegError as e:
        raise VideoDecodeError(path, f"corrupt: FFmpeg failed after frame {index} ({e.strerror or e})") from e
    if start is None and last not in decoded:
        raise VideoDecodeError(path, f"truncated: frame {last} requested, only {index + 1} frames decode")
    return decoded


def to_rgb(frame: av.VideoFrame) -> np.ndarray:
    """uint8 RGB (H, W, 3) of a decoded frame. For yuv420p (nearly all video) swscale's fast-bilinear flag gives the
    same bytes as its default at half the cost (0.55 vs 1.1 ms a 568x320 frame, measured; the tests check the
    identity); for other formats (yuv444p, 10-bit) it does not, so they keep the default.

    One swscale thread, as the decoder: its default starts a thread pool per process, which a DataLoader worker
    forked from a parent that converted frames inherits without the threads; with PyAV 19 the worker's first
    conversion then waits for them forever (seen with Python 3.12, the GPU machine's)."""
    if frame.format.name == "yuv420p":
        return frame.to_ndarray(format="rgb24", interpolation="FAST_BILINEAR", threads=1)
    return frame.to_ndarray(format="rgb24", threads=1)


def _video_stream(container: av.container.InputContainer, path: str) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise VideoDecodeError(path, "no video stream: the file has none")
    return container.streams.video[0]
