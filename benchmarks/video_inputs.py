"""Realistic video input for the loader benchmark: generated once per spec, cached, with an index and a probe cache.

Content: a large random texture (three octaves of smoothly interpolated value noise) panned along a smooth, varying
path, a second such layer blended in at 25% and panned along another (a sum of two motions, which motion compensation
cannot predict exactly), two textured sprites crossing the frame, and sensor noise (one of 4 noise fields, drawn per
frame). It costs ~1.5 ms per 320p frame to render and has what a decoder's cost depends on: motion everywhere, detail
at every scale and a web-video bit rate (see `VideoSpec.crf`).

Encoding: H.264 (libx264, preset veryfast, CRF 23, yuv420p, B-frames as the preset has them) in .mp4, or VP9
(libvpx-vp9, realtime, CRF 32) in .webm, both with a long GOP: one keyframe every `gop` frames and no scene-cut
keyframes, so a clip in the middle of a video decodes from the video's start (PyAV, `engine.data.decode`) or from the
keyframe before it (DALI). Each encoder is single-threaded; files are encoded in parallel processes.

Specs (`video_spec`):
  * CUDA (the realistic set): 32 files of 568x320, 250 frames at 25 fps (10 s, one keyframe), H.264; VP9 the same.
    Generation measured on the 2-core dev machine (AMD EPYC, 2 processes): 32 H.264 files in 25.8 s (~1.6 s of one
    core per file: ~0.35 s rendering, the rest x264), 0.81 MB each (~650 kbit/s), 25 MB in all; 32 VP9 files in
    24.2 s, 0.94 MB each (~755 kbit/s). A 16-core host runs 16 processes: ~4 s per set (estimated, not measured).
    A GPU run needs the H.264 set only (NVDEC reads it).
  * no CUDA (the CI smoke run): 6 files of 96x64, 40 frames: ~0.17 s per set.

Cache: `$VJEPA_BENCH_VIDEOS` (default `<tmp>/vjepa_bench_videos`) / `<spec key>`, outside the repository. A set is
written into a temporary sibling folder and renamed into place when complete (`spec.json` last), so an interrupted run
leaves nothing that looks complete; a folder whose `spec.json` matches is reused as it is.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import av
import numpy as np

FORMAT_VERSION = 1  # bump when rendering or encoding changes: the cache key changes with it
OCTAVES = ((48, 1.0), (12, 0.45), (3, 0.3))  # (cell px, amplitude) of the texture's value noise
BLEND = 8  # weight of the second layer, of 32
NOISE = 3  # sensor noise: uniform integers in [-NOISE, NOISE] per pixel and channel


@dataclass(frozen=True)
class VideoSpec:
    """Everything that determines a generated set (the cache key is made of it)."""

    codec: str  # "h264" (.mp4) or "vp9" (.webm)
    width: int
    height: int
    frames: int
    fps: int
    gop: int  # frames between keyframes; >= frames: one keyframe, at the start
    count: int  # files
    crf: int  # H.264 23 (x264's default) / VP9 32: ~650 / ~755 kbit/s at 568x320
    seed: int = 0

    def __post_init__(self) -> None:
        if self.codec not in _ENCODERS:
            raise ValueError(f"codec must be one of {sorted(_ENCODERS)}, got {self.codec!r}")
        if self.width % 2 or self.height % 2:
            raise ValueError(f"yuv420p needs an even frame size, got {self.width}x{self.height}")

    @property
    def key(self) -> str:
        return (f"v{FORMAT_VERSION}_{self.codec}_{self.width}x{self.height}_{self.frames}f_{self.fps}fps_g{self.gop}_"
                f"crf{self.crf}_n{self.count}_s{self.seed}")

    def describe(self) -> str:
        """E.g. '568x320 h264 250f@25 gop250' (for benchmark records)."""
        return f"{self.width}x{self.height} {self.codec} {self.frames}f@{self.fps} gop{self.gop}"


_ENCODERS = {
    # x264's own threads pinned: its lookahead threads are not covered by the codec context's thread count
    "h264": ("libx264", "mp4", lambda s: {"preset": "veryfast", "crf": str(s.crf),
                                          "x264-params": f"keyint={s.gop}:scenecut=0:threads=1:lookahead-threads=1"}),
    "vp9": ("libvpx-vp9", "webm", lambda s: {"deadline": "realtime", "cpu-used": "8", "crf": str(s.crf), "b:v": "0",
                                             "g": str(s.gop)}),
}


def video_spec(codec: str, cuda: bool) -> VideoSpec:
    """The realistic set with CUDA (a GPU benchmark run), the tiny one without (the CPU smoke run)."""
    crf = 23 if codec == "h264" else 32
    if cuda:
        return VideoSpec(codec, 568, 320, frames=250, fps=25, gop=250, count=32, crf=crf)
    return VideoSpec(codec, 96, 64, frames=40, fps=25, gop=250, count=6, crf=crf)


def _cache_root() -> Path:
    return Path(os.environ.get("VJEPA_BENCH_VIDEOS") or Path(tempfile.gettempdir()) / "vjepa_bench_videos")


def _resize_linear(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear upsampling of (h, w) to (height, width), separable, in numpy."""
    for axis, size in ((0, height), (1, width)):
        pos = np.linspace(0, a.shape[axis] - 1, size)
        lo = np.minimum(pos.astype(np.int64), a.shape[axis] - 2)
        frac = (pos - lo).reshape((-1, 1) if axis == 0 else (1, -1))
        a = np.take(a, lo, axis) * (1 - frac) + np.take(a, lo + 1, axis) * frac
    return a


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(height, width, 3) int16 in [16, 235]: three octaves of value noise (cells of 48, 12 and 3 px), per channel
    partly shared so colours look natural rather than rainbow."""
    out = np.zeros((height, width, 3))
    for cell, amplitude in OCTAVES:
        grid = (max(height // cell, 1) + 2, max(width // cell, 1) + 2)
        luma = _resize_linear(rng.standard_normal(grid), height, width)
        for c in range(3):
            out[..., c] += amplitude * (0.7 * luma + 0.3 * _resize_linear(rng.standard_normal(grid), height, width))
    out = (out - out.mean()) / out.std()
    return np.clip(128 + 40 * out, 16, 235).astype(np.int16)


def _path(rng: np.random.Generator, frames: int, span: int) -> np.ndarray:
    """Integer positions in [0, span] over `frames`: a sum of two slow sinusoids (at 320p: ~1-2 px per frame on
    average, up to ~5)."""
    t = np.arange(frames)
    x = np.zeros(frames)
    for _ in range(2):
        period = rng.uniform(0.6, 1.6) * frames
        x += np.sin(2 * np.pi * t / period + rng.uniform(0, 2 * np.pi))
    x = (x - x.min()) / max(np.ptp(x), 1e-9)
    return np.rint(x * span).astype(np.int64)


def render(spec: VideoSpec, index: int):
    """Yields the RGB frames (height, width, 3) uint8 of file `index` of `spec`, one at a time."""
    rng = np.random.default_rng([spec.seed, index])
    h, w, n = spec.height, spec.width, spec.frames
    my, mx = max(h // 4, 4), max(w // 4, 4)
    # two layers panned along different paths and blended: motion compensation cannot predict their sum exactly
    layers = [(_texture(rng, h + 2 * my, w + 2 * mx), _path(rng, n, 2 * my), _path(rng, n, 2 * mx)) for _ in range(2)]
    sprites = []
    for _ in range(2):
        sh, sw = int(rng.integers(h // 4, h // 2)), int(rng.integers(w // 5, w // 3))
        # velocity in px/frame, position wraps around the frame
        sprites.append((_texture(rng, sh, sw), rng.uniform(-3, 3, 2), rng.uniform(0, 1, 2) * (h, w)))
    noise = rng.integers(-NOISE, NOISE + 1, size=(4, h, w, 3), dtype=np.int16)  # one of 4 fields per frame
    frame, overlay = np.empty((h, w, 3), np.int16), np.empty((h, w, 3), np.int16)
    for i in range(n):
        (base, ys, xs), (top_layer, ys2, xs2) = layers
        np.multiply(base[ys[i]:ys[i] + h, xs[i]:xs[i] + w], 32 - BLEND, out=frame)
        np.multiply(top_layer[ys2[i]:ys2[i] + h, xs2[i]:xs2[i] + w], BLEND, out=overlay)
        frame += overlay
        frame >>= 5
        frame += noise[rng.integers(4)]
        for texture, velocity, start in sprites:
            sh, sw = texture.shape[:2]
            top, left = (np.rint(start + velocity * i).astype(np.int64) % (h, w))
            visible_h, visible_w = min(sh, h - top), min(sw, w - left)
            frame[top:top + visible_h, left:left + visible_w] = texture[:visible_h, :visible_w]
        yield np.clip(frame, 0, 255).astype(np.uint8)


def encode(spec: VideoSpec, index: int, path: str) -> None:
    """Render file `index` of `spec` and encode it to `path`."""
    encoder, _, options = _ENCODERS[spec.codec]
    with av.open(path, "w", container_options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(encoder, rate=spec.fps)
        stream.width, stream.height, stream.pix_fmt = spec.width, spec.height, "yuv420p"
        stream.options = options(spec)
        stream.codec_context.gop_size = spec.gop
        stream.codec_context.thread_count = 1
        for rgb in render(spec, index):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode(None))


def _encode_task(args: tuple[VideoSpec, int, str]) -> None:
    encode(*args)


def _available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def ensure_videos(spec: VideoSpec, root: str | Path | None = None, workers: int | None = None) -> Path:
    """The index file ("<path> 0" per line, with its probe cache next to it) of `spec`'s set, generated unless the
    cache already holds it. `workers`: encoder processes (default: the cores available, at most one per file)."""
    folder = Path(root or _cache_root()) / spec.key
    index = folder / "index.csv"
    meta = folder / "spec.json"
    if meta.is_file() and json.loads(meta.read_text()) == asdict(spec) and index.is_file():
        if not Path(f"{index}.probe.csv").is_file():
            _write_probes(index)
        return index
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.key}.partial-", dir=folder.parent))
    try:
        extension = _ENCODERS[spec.codec][1]
        names = [f"{i:04d}.{extension}" for i in range(spec.count)]
        tasks = [(spec, i, str(tmp / name)) for i, name in enumerate(names)]
        workers = min(workers or _available_cores(), spec.count)
        if workers <= 1 or spec.width * spec.height * spec.frames * spec.count < 50_000_000:  # tiny: no pool
            for task in tasks:
                _encode_task(task)
        else:
            # fork: workers start at once and need not re-import the caller; they use numpy and PyAV only, never
            # torch or CUDA, so forking a process that has them is safe.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
                list(pool.map(_encode_task, tasks))
        (tmp / "index.csv").write_text("".join(f"{folder / name} 0\n" for name in names))
        (tmp / "spec.json").write_text(json.dumps(asdict(spec)) + "\n")
        if folder.exists():  # an incomplete or outdated set
            shutil.rmtree(folder)
        try:
            tmp.rename(folder)
        except OSError:  # another process finished the same set first
            if not (meta.is_file() and json.loads(meta.read_text()) == asdict(spec)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _write_probes(index)
    return index


def _write_probes(index: Path) -> None:
    """Probe every entry once and write `<index>.probe.csv`, as a training run's cache would hold it, so the
    workers read no probes (those are not what is measured)."""
    from engine.data.index import read_index
    from engine.data.probe import ProbeTable

    table = ProbeTable(read_index([str(index)]))
    table.load()
    for entry in range(len(table.index)):
        table.probe(entry)
    table.save()


def keyframes(path: str | Path) -> list[int]:
    """Packet numbers of the keyframes of the video stream (checks the long GOP)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        packets = [p for p in container.demux(stream) if p.size]
        packets.sort(key=lambda p: p.pts if p.pts is not None else 0)
        return [i for i, p in enumerate(packets) if p.is_keyframe]
