"""Video decoding with PyAV (the CPU decoder, and the fallback of DALI): selected frames to uint8 RGB.

Decoding is sequential from the first frame: clips are short spans near random positions and PyAV's seeking is
keyframe-granular and container-dependent, so one forward pass up to the last requested frame is the simple exact
method. Only the requested frames are converted to RGB, which is most of the per-frame cost at small sizes.
"""

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
    """Frames `indices` (any order, repeats allowed) as uint8 RGB of shape (len(indices), H, W, 3).

    Decodes once from the start up to `max(indices)`. An image file is a one-frame video here.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if indices.ndim != 1 or len(indices) == 0:
        raise ValueError(f"indices must be a non-empty 1-D array, got shape {indices.shape}")
    if indices.min() < 0:
        raise VideoDecodeError(path, f"negative frame index {int(indices.min())} requested")
    last = int(indices.max())
    wanted = set(indices.tolist())

    decoded: dict[int, np.ndarray] = {}
    num_decoded = 0
    try:
        with av.open(path) as container:
            stream = _video_stream(container, path)
            # One thread: parallelism comes from DataLoader workers, and FFmpeg's default of one thread per core in
            # every worker oversubscribes the host (single-threaded was also fastest on small clips, measured).
            stream.codec_context.thread_count = 1
            for frame in container.decode(stream):
                if num_decoded in wanted:
                    decoded[num_decoded] = frame.to_ndarray(format="rgb24")
                num_decoded += 1
                if num_decoded > last:
                    break
    except av.FFmpegError as e:
        raise VideoDecodeError(path, f"corrupt: FFmpeg failed after {num_decoded} frames ({e.strerror or e})") from e
    if last not in decoded:
        raise VideoDecodeError(path, f"truncated: frame {last} requested, only {num_decoded} frames decode")
    return np.stack([decoded[i] for i in indices.tolist()])


def _video_stream(container: av.container.InputContainer, path: str) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise VideoDecodeError(path, "no video stream: the file has none")
    return container.streams.video[0]
