"""Generated bad index entries, one per failure the data pipeline must survive, beside good videos and an image.

Shared by the probe, dataset, doctor and training tests. Everything is written with PyAV in a few hundred ms.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

SIZE = 64


def write_video(path: str | Path, num_frames: int, *, codec: str = "libvpx-vp9", seed: int = 0,
                options: dict[str, str] | None = None, stream_options: dict[str, str] | None = None) -> str:
    """A `SIZE`-square video of `num_frames` frames of smooth noise (so it is well over 1 KiB), 25 fps. `options` go
    to the muxer, `stream_options` to the encoder (keyframe interval, B-frames)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (SIZE // 8, SIZE // 8, 3)).astype(np.uint8).repeat(8, 0).repeat(8, 1)
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = SIZE, SIZE, "yuv420p"
        stream.options = stream_options or {}
        for i in range(num_frames):
            frame = np.roll(base, i, axis=1) // 2 + rng.integers(0, 128, base.shape, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return str(path)


def write_image(path: str | Path, seed: int = 0) -> str:
    """A `SIZE`-square PNG (or JPEG, by suffix) written through FFmpeg's image muxer."""
    rng = np.random.default_rng(seed)
    codec = "png" if str(path).endswith(".png") else "mjpeg"
    with av.open(str(path), "w", format="image2") as container:
        stream = container.add_stream(codec, rate=1)
        stream.width, stream.height = SIZE, SIZE
        stream.pix_fmt = "rgb24" if codec == "png" else "yuvj420p"
        frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8), format="rgb24")
        for packet in stream.encode(frame):
            container.mux(packet)
        container.mux(stream.encode())
    return str(path)


def corrupt_packet(source: str, target: str | Path, packet: int = 12) -> str:
    """`source` with the first bytes of one packet's payload zeroed: a VP9 frame header or an H.264 NAL length,
    which FFmpeg reports as an error. (Zeroing the middle of a payload is concealed: it decodes without error.)"""
    data = bytearray(Path(source).read_bytes())
    with av.open(source) as container:
        found = [p for p in container.demux(container.streams.video[0]) if p.size][packet]
        start = data.find(bytes(found)[:16], found.pos)  # `pos` may point at the container's block header
    assert start >= 0
    data[start:start + 8] = bytes(8)
    Path(target).write_bytes(bytes(data))
    return str(target)


def make_bad_files(folder: str | Path) -> dict[str, str]:
    """One file per failure, by the reason kind the pipeline reports for it: missing, empty, truncated, not a video,
    unsupported codec, too short (with `data.filter_short_videos`) and too small (under the reference's 1 KiB)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {"missing": str(folder / "missing.mp4")}
    (folder / "empty.mp4").write_bytes(b"")
    files["empty"] = str(folder / "empty.mp4")
    # An MP4 whose index (moov, moved to the front) lists 48 frames, cut to 60%: the index survives, frames do not.
    whole = Path(write_video(folder / "whole.mp4", 48, codec="libx264", seed=7, options={"movflags": "faststart"}))
    data = whole.read_bytes()
    whole.unlink()
    (folder / "truncated.mp4").write_bytes(data[:len(data) * 6 // 10])
    files["truncated"] = str(folder / "truncated.mp4")
    (folder / "notes.mp4").write_text("this is a text file, not a video\n" * 64)
    files["not a video"] = str(folder / "notes.mp4")
    # A valid MP4 whose sample entry names a codec FFmpeg does not know ('avc1' renamed).
    (folder / "unknown_codec.mp4").write_bytes(data.replace(b"avc1", b"zzz9"))
    files["unsupported codec"] = str(folder / "unknown_codec.mp4")
    files["too short"] = write_video(folder / "short.webm", 6, seed=8)
    (folder / "tiny.webm").write_bytes(Path(files["too short"]).read_bytes()[:600])
    files["too small"] = str(folder / "tiny.webm")
    return files
