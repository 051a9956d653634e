"""Cheap validation of index entries before anything decodes them, and a cache of the results per index file.

`probe_file` opens the container and counts the video stream's packets without decoding: it learns the frame count
(which clip sampling needs before decoding, spec §5.2), the frame rate (for `clip_duration` / `fps` modes), the
resolution (for the crop box when DALI decodes) and the codec (DALI's CPU decoder reads only VP8/VP9/MJPEG), and it
rejects a missing, empty, non-video or frameless file with a reason, never an exception. A damaged stream
that demuxes cleanly is caught later, at decode time.

Probes are cached in `<index file>.probe.csv` next to each index (written atomically by the dataset doctor and by
rank 0 of a training run), keyed by path, size and modification time, so that a file changed since is probed again.
The in-memory table is a few NumPy columns indexed by entry number rather than a dict of objects, so millions of
entries cost tens of MB in each loader worker instead of gigabytes.
"""

from __future__ import annotations

import csv
import logging
import os
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

import av
import numpy as np

from engine.data.index import VideoIndex, is_image

logger = logging.getLogger(__name__)

# The reference's own rejections (V1 `VideoDataset`): files under 1 KiB and over 1e9 bytes.
MIN_BYTES = 1024
MAX_BYTES = 10**9


# FFmpeg decoders that may be chosen for a stream -> the codec they decode. Probes record the codec
# (`codec.canonical_name`: "av1" whichever decoder FFmpeg picks, libdav1d in PyAV's wheels); caches written before
# hold the decoder's name, which `codec_of` reads as its codec.
_DECODER_CODECS = {"libdav1d": "av1", "libaom-av1": "av1", "libvpx": "vp8", "libvpx-vp9": "vp9", "libopenh264": "h264"}


def codec_of(name: str) -> str:
    """The codec a probe's `codec` field names (a decoder's name from an older cache included)."""
    return _DECODER_CODECS.get(name, name)


@dataclass(frozen=True)
class Probe:
    """What a cheap look at one file found. `reason` is empty when `ok`; else `"<kind>: <detail>"`."""

    path: str
    ok: bool
    reason: str = ""
    frames: int = 0  # packets of the video stream (1 for an image)
    fps: float = 0.0  # average frame rate (0 when unknown, and for images)
    width: int = 0
    height: int = 0
    codec: str = ""  # FFmpeg's codec name: h264, hevc, vp9, vp8, av1, mjpeg, png, ...
    size: int = 0  # bytes
    mtime_ns: int = 0

    @property
    def duration(self) -> float:
        """Seconds (0 when the frame rate is unknown)."""
        return self.frames / self.fps if self.fps > 0 else 0.0


def bad(path: str, kind: str, detail: str, size: int = 0, mtime_ns: int = 0) -> Probe:
    """A failed probe; `kind` is one of the short words the reports group by (missing, empty, not a video, ...)."""
    return Probe(path, False, f"{kind}: {detail}", size=size, mtime_ns=mtime_ns)


def within_size_limits(probe: Probe, min_bytes: int = MIN_BYTES, max_bytes: int = MAX_BYTES) -> Probe:
    """`probe`, or a failed one when the file's size is outside the limits (kept out of the cached probe itself, so
    changing `data.min_video_bytes` / `data.max_video_bytes` needs no new probe). Images have no minimum."""
    if 0 < probe.size < min_bytes and not is_image(probe.path):
        return bad(probe.path, "too small", f"{probe.size} bytes < data.min_video_bytes = {min_bytes}", probe.size,
                   probe.mtime_ns)
    if probe.size > max_bytes:
        return bad(probe.path, "too large", f"{probe.size} bytes > data.max_video_bytes = {max_bytes}", probe.size,
                   probe.mtime_ns)
    return probe


def probe_file(path: str) -> Probe:
    """Probe one index entry without decoding it (an image's one frame is decoded: that is its whole content)."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return bad(path, "missing", "no such file")
    except OSError as e:
        return bad(path, "unreadable", e.strerror or str(e))
    size, mtime = stat.st_size, stat.st_mtime_ns
    if size == 0:
        return bad(path, "empty", "0 bytes", size, mtime)
    try:
        with av.open(path) as container:
            if not container.streams.video:
                return bad(path, "no video stream", f"streams: {[s.type for s in container.streams]}", size, mtime)
            stream = container.streams.video[0]
            context = stream.codec_context
            codec = context.codec.canonical_name if context is not None and context.codec is not None else ""
            if not codec:
                return bad(path, "unsupported codec", "FFmpeg has no decoder for this stream", size, mtime)
            if is_image(path):
                next(container.decode(stream))
                frames = 1
            else:
                frames = sum(1 for packet in container.demux(stream) if packet.size > 0)
            fps = float(stream.average_rate or stream.guessed_rate or 0) if not is_image(path) else 0.0
            listed = stream.frames
            width, height = stream.codec_context.width, stream.codec_context.height
    except av.FFmpegError as e:
        return bad(path, "not a video", f"FFmpeg cannot read it ({e.strerror or e})", size, mtime)
    except StopIteration:
        return bad(path, "no frames", "the image holds no decodable frame", size, mtime)
    if frames == 0:
        return bad(path, "no frames", "the video stream holds no frames", size, mtime)
    if listed > frames:
        return bad(path, "truncated", f"the container lists {listed} frames, {frames} are present", size, mtime)
    return Probe(path, True, "", frames, fps, width, height, codec, size, mtime)


def cache_path(index_file: str) -> Path:
    """Where the probes of one index file are cached."""
    return Path(f"{index_file}.probe.csv")


_FIELDS = [f.name for f in fields(Probe)]
_UNKNOWN, _OK, _BAD = 0, 1, 2


class ProbeTable:
    """Probes of a `VideoIndex`'s entries by entry number, loaded from and saved to the per-index caches."""

    def __init__(self, index: VideoIndex):
        n = len(index)
        self.index = index
        self.status = np.zeros(n, np.int8)
        self.size = np.zeros(n, np.int64)
        self.mtime_ns = np.zeros(n, np.int64)
        self.frames = np.zeros(n, np.int64)
        self.fps = np.zeros(n, np.float64)
        self.width = np.zeros(n, np.int32)
        self.height = np.zeros(n, np.int32)
        self.codec_id = np.zeros(n, np.int16)
        self.codecs: list[str] = [""]
        self.reasons: dict[int, str] = {}  # only bad entries carry a reason
        self.dirty = False

    def __len__(self) -> int:
        return int((self.status != _UNKNOWN).sum())

    def put(self, entry: int, probe: Probe) -> None:
        if probe.codec not in self.codecs:
            self.codecs.append(probe.codec)
        self.status[entry] = _OK if probe.ok else _BAD
        self.size[entry], self.mtime_ns[entry], self.frames[entry] = probe.size, probe.mtime_ns, probe.frames
        self.fps[entry], self.width[entry], self.height[entry] = probe.fps, probe.width, probe.height
        self.codec_id[entry] = self.codecs.index(probe.codec)
        if probe.ok:
            self.reasons.pop(entry, None)
        else:
            self.reasons[entry] = probe.reason
        self.dirty = True

    def get(self, entry: int) -> Probe | None:
        """The cached probe of `entry` if there is one and the file has not changed since (one `stat`)."""
        if self.status[entry] == _UNKNOWN:
            return None
        try:
            stat = os.stat(self.index.paths[entry])
        except OSError:
            return None  # probe again: it reports why
        if (stat.st_size, stat.st_mtime_ns) != (self.size[entry], self.mtime_ns[entry]):
            return None
        return self._stored(entry)

    def _stored(self, entry: int) -> Probe:
        path = self.index.paths[entry]
        if self.status[entry] == _BAD:
            return Probe(path, False, self.reasons[entry], size=int(self.size[entry]),
                         mtime_ns=int(self.mtime_ns[entry]))
        return Probe(path, True, "", int(self.frames[entry]), float(self.fps[entry]), int(self.width[entry]),
                     int(self.height[entry]), self.codecs[self.codec_id[entry]], int(self.size[entry]),
                     int(self.mtime_ns[entry]))

    def probe(self, entry: int) -> tuple[Probe, bool]:
        """`(probe, fresh)`: the cached probe of `entry`, else a new one (stored here; `fresh` is then True)."""
        cached = self.get(entry)
        if cached is not None:
            return cached, False
        probe = probe_file(self.index.paths[entry])
        self.put(entry, probe)
        return probe, True

    def load(self) -> int:
        """Read every index file's cache that exists; returns the number of entries found. A missing file status
        (absent or bad) is not recorded: a missing file is probed again, in case it has come back."""
        first_entry = {}
        for entry, path in enumerate(self.index.paths):
            first_entry.setdefault(path, entry)
        found = 0
        for source in self.index.sources:
            path = cache_path(source)
            if not path.is_file():
                continue
            try:
                with open(path, newline="") as f:
                    for row in csv.DictReader(f):
                        entry = first_entry.get(row["path"])
                        if entry is None or row["reason"].startswith("missing"):
                            continue
                        self.put(entry, Probe(row["path"], row["ok"] == "True", row["reason"], int(row["frames"]),
                                              float(row["fps"]), int(row["width"]), int(row["height"]), row["codec"],
                                              int(row["size"]), int(row["mtime_ns"])))
                        found += 1
            except (KeyError, ValueError, csv.Error) as e:
                logger.warning("ignoring the unreadable probe cache %s (%s); it will be rewritten", path, e)
        self.dirty = False
        return found

    def save(self) -> None:
        """Write each index file's probes to its cache (temporary file, then rename: never a partial cache). An
        index in a read-only folder keeps no cache (one warning)."""
        if not self.dirty:
            return
        start = 0
        for source, n in zip(self.index.sources, self.index.sizes):
            rows = [self._row(e) for e in range(start, start + n) if self.status[e] != _UNKNOWN]
            start += n
            target = cache_path(source)
            try:
                fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
            except OSError as e:
                logger.warning("cannot write the probe cache %s (%s); probes are kept in memory only", target, e)
                continue
            with os.fdopen(fd, "w", newline="") as f:
                writer = csv.DictWriter(f, _FIELDS)
                writer.writeheader()
                writer.writerows(rows)
            os.replace(tmp, target)
        self.dirty = False

    def _row(self, entry: int) -> dict[str, object]:
        probe = self._stored(entry)
        return {name: getattr(probe, name) for name in _FIELDS}
