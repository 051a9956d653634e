"""Synthetic moving-shapes video dataset, generated on the fly and encoded as real video files.

Each clip shows one large **main object** and a few smaller **distractor** shapes over a static textured
background. The main object's shape class is the *appearance* label (4 classes) and its constant direction
of motion is the *motion* label (8 directions, 45 degrees apart). Motion wraps around the frame (toroidal),
so the direction stays constant for the whole clip. Nothing in a single frame depends on the direction:
start positions are uniform, there is no blur or trail, and shape rotations are drawn independently of the
motion. Distractors use the same shape classes and colour distribution as the main object and move in
random directions; the main object is identifiable only by its size (about twice the distractors' radius)
and by being drawn on top.

Clips are encoded with PyAV as VP9 in .webm (default) or H.264 in .mp4, so the real decoders are exercised.
Encoders run single-threaded: the output then does not depend on the machine's core count, and
parallelism comes from the process pool instead.

Layout under ``root``::

    videos/{train,val}/NNNNNN.webm
    motion_train.csv  motion_val.csv  appearance_train.csv  appearance_val.csv   # "<abs path> <label>"
    dataset.json                                                                  # spec, classes, counts

Generation time of the default spec (256 train + 128 val clips, 32 frames of 64x64, VP9), measured on the
2-core CPU development machine: about 3 s with ``workers=2`` and 6.5 s with ``workers=1`` (rendering about
9 ms and VP9 encoding about 6 ms per clip); the dataset takes 4.7 MB, about 10.5 KB per clip. H.264 is
about as fast and as large.

Run as a script: ``python -m engine.data.synthetic ROOT [--num-train N --num-val N --size S --frames F
--seed S --codec vp9|h264]``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import av
import numpy as np

__all__ = [
    "APPEARANCE_CLASSES",
    "MOTION_CLASSES",
    "ClipParams",
    "ShapeTrack",
    "SyntheticSpec",
    "encode_clip",
    "ensure_synthetic_dataset",
    "generate_synthetic_dataset",
    "main",
    "motion_vector",
    "plan_split",
    "render_frames",
    "render_main_coverage",
    "sample_clip_params",
]

#: Shape classes; the main object's class index is the appearance label.
APPEARANCE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
#: Motion directions; class k moves at angle k * 45 degrees, counter-clockwise from "right" as seen on screen.
MOTION_CLASSES: tuple[str, ...] = ("right", "up-right", "up", "up-left", "left", "down-left", "down", "down-right")

#: Bumped whenever the rendering or layout changes, so ``ensure_synthetic_dataset`` regenerates old datasets.
FORMAT_VERSION = 1

# Geometry and motion, as fractions of the frame size so that any resolution looks alike.
_MAIN_RADIUS = 0.15
_DISTRACTOR_RADIUS = 0.075
_NUM_DISTRACTORS = (2, 4)  # inclusive range
_MAIN_SPEED = (0.012, 0.024)  # frame sizes per frame: 0.75..1.5 px/frame at 64 px
_DISTRACTOR_SPEED = (0.008, 0.03)

_CODECS: dict[str, tuple[str, str, dict[str, str]]] = {
    # realtime/cpu-used 8 encodes a 32-frame 64x64 clip in a few ms; crf 24 keeps shape edges crisp.
    "vp9": ("libvpx-vp9", "webm", {"crf": "24", "b:v": "0", "deadline": "realtime", "cpu-used": "8"}),
    # x264's own threads pinned too: its lookahead threads are not covered by the codec context's thread count
    "h264": ("libx264", "mp4", {"crf": "20", "preset": "veryfast", "x264-params": "threads=1:lookahead-threads=1"}),
}
_SPLITS = ("train", "val")


@dataclass(frozen=True)
class SyntheticSpec:
    """Parameters that fully determine a synthetic dataset (same spec -> identical labels and frames)."""

    num_train: int = 256
    num_val: int = 128
    num_frames: int = 32
    size: int = 64
    fps: int = 8
    seed: int = 0
    codec: str = "vp9"

    def __post_init__(self) -> None:
        if self.codec not in _CODECS:
            raise ValueError(f"codec must be one of {sorted(_CODECS)}, got {self.codec!r}")
        if self.size < 16 or self.size % 2:
            raise ValueError(f"size must be an even number >= 16 (yuv420p), got {self.size}")
        if self.num_train < 1 or self.num_val < 1 or self.num_frames < 2 or self.fps < 1:
            raise ValueError(f"invalid spec {self}")
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative, got {self.seed}")


@dataclass(frozen=True)
class ShapeTrack:
    """One shape moving with constant velocity on the torus; lengths in pixels, position of frame 0."""

    shape: int
    radius: float
    rotation: float
    color: tuple[int, int, int]
    start: tuple[float, float]
    velocity: tuple[float, float]


@dataclass(frozen=True)
class ClipParams:
    """Everything needed to render one clip; small and picklable so pool workers render it themselves."""

    size: int
    num_frames: int
    background_seed: int
    main: ShapeTrack
    distractors: tuple[ShapeTrack, ...]


def motion_vector(label: int) -> tuple[float, float]:
    """Unit (dx, dy) image-space vector of motion class ``label``; image y grows downwards."""
    angle = label * np.pi / 4
    return float(np.cos(angle)), float(-np.sin(angle))


def _random_color(rng: np.random.Generator) -> tuple[int, int, int]:
    """Saturated, bright colour; main object and distractors share this distribution so colour is no cue."""
    hue, sat, val = rng.uniform(0, 1), rng.uniform(0.55, 1.0), rng.uniform(0.7, 1.0)
    # HSV -> RGB with the usual piecewise-linear channel ramps.
    k = (np.array([5.0, 3.0, 1.0]) + hue * 6) % 6
    rgb = val - val * sat * np.clip(np.minimum(k, 4 - k), 0, 1)
    return tuple(int(round(c * 255)) for c in rgb)  # type: ignore[return-value]


def _random_track(
    rng: np.random.Generator, size: int, shape: int, radius: float, speed: float, angle: float
) -> ShapeTrack:
    """A track with uniform start position and rotation, so neither carries direction information."""
    return ShapeTrack(
        shape=shape,
        radius=radius,
        rotation=float(rng.uniform(0, 2 * np.pi)),
        color=_random_color(rng),
        start=(float(rng.uniform(0, size)), float(rng.uniform(0, size))),
        velocity=(speed * float(np.cos(angle)), -speed * float(np.sin(angle))),
    )


def sample_clip_params(
    rng: np.random.Generator, size: int, num_frames: int, motion_label: int, appearance_label: int
) -> ClipParams:
    """Draw a random clip whose main object has shape ``appearance_label`` and moves in ``motion_label``."""
    main = _random_track(
        rng,
        size,
        appearance_label,
        _MAIN_RADIUS * size,
        float(rng.uniform(*_MAIN_SPEED)) * size,
        motion_label * np.pi / 4,
    )
    num_distractors = int(rng.integers(_NUM_DISTRACTORS[0], _NUM_DISTRACTORS[1] + 1))
    distractors = tuple(
        _random_track(
            rng,
            size,
            int(rng.integers(len(APPEARANCE_CLASSES))),
            _DISTRACTOR_RADIUS * size,
            float(rng.uniform(*_DISTRACTOR_SPEED)) * size,
            float(rng.uniform(0, 2 * np.pi)),
        )
        for _ in range(num_distractors)
    )
    return ClipParams(size, num_frames, int(rng.integers(2**31)), main, distractors)


def _shape_sdf(shape: int, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Approximate signed distance (pixels, negative inside) to a shape of nominal radius ``r`` at the origin.

    Sizes are chosen so all classes cover a similar area: area must not give the class away.
    """
    if shape == 0:  # circle
        return np.hypot(dx, dy) - r
    if shape == 1:  # square
        return np.maximum(np.abs(dx), np.abs(dy)) - 0.89 * r
    if shape == 2:  # equilateral triangle, centroid at the origin, apex up before rotation
        edges = np.maximum(dy, np.maximum(0.866 * dx - 0.5 * dy, -0.866 * dx - 0.5 * dy))
        return edges - 0.75 * r  # inradius = half the circumradius of 1.5 r
    if shape == 3:  # plus-shaped cross
        arm, half_width = 1.15 * r, 0.42 * r
        horizontal = np.maximum(np.abs(dx) - arm, np.abs(dy) - half_width)
        vertical = np.maximum(np.abs(dx) - half_width, np.abs(dy) - arm)
        return np.minimum(horizontal, vertical)
    raise ValueError(f"unknown shape class {shape}")


def _track_window(track: ShapeTrack, size: int, times: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Anti-aliased coverage of ``track`` at frame ``times`` in a square window that moves with the shape.

    Returns ``rows`` and ``cols`` (T, w) pixel indices (taken modulo ``size``: the window wraps around the
    frame, which is what makes the motion toroidal) and ``coverage`` (T, w, w) in [0, 1]. Evaluating only
    a window around the shape instead of the whole frame makes rendering several times faster.
    """
    # Every shape lies within 1.5 radii of its centre (triangle apex); +1 px for the anti-aliasing ramp.
    half = int(np.ceil(1.5 * track.radius + 1))
    width = min(2 * half + 1, size)
    offsets = np.arange(width) - width // 2
    centers = np.stack([(track.start[i] + track.velocity[i] * times) % size for i in (0, 1)])  # (2, T)
    first = np.floor(centers).astype(np.int64)[..., None] + offsets  # (2, T, w) unwrapped pixel indices
    delta = first + 0.5 - centers[..., None]
    dx, dy = delta[0][:, None, :], delta[1][:, :, None]
    cos, sin = np.cos(track.rotation), np.sin(track.rotation)
    rx, ry = cos * dx + sin * dy, -sin * dx + cos * dy
    # One-pixel linear ramp across the edge: sub-pixel motion stays smooth without blurring the shape.
    coverage = np.clip(0.5 - _shape_sdf(track.shape, rx, ry, track.radius), 0.0, 1.0)
    return first[1] % size, first[0] % size, coverage


def _background(seed: int, size: int) -> np.ndarray:
    """Static dark textured background (float, HxWx3): periodic low-frequency waves plus fine grain."""
    rng = np.random.default_rng(seed)
    coords = np.arange(size, dtype=np.float64) * (2 * np.pi / size)
    image = np.broadcast_to(rng.uniform(25, 85, size=3), (size, size, 3)).copy()
    for _ in range(4):
        fx, fy = rng.integers(-3, 4, size=2)
        wave = np.sin(fx * coords[None, :] + fy * coords[:, None] + rng.uniform(0, 2 * np.pi))
        image += wave[..., None] * rng.uniform(0, 15, size=3)
    image += rng.normal(0, 4, size=image.shape)
    return image


def _frame_times(params: ClipParams, frame_indices: np.ndarray | list[int] | None) -> np.ndarray:
    """Frame indices as float times; None means every frame of the clip."""
    if frame_indices is None:
        return np.arange(params.num_frames, dtype=np.float64)
    return np.asarray(frame_indices, dtype=np.float64)


def render_frames(params: ClipParams, frame_indices: np.ndarray | list[int] | None = None) -> np.ndarray:
    """Render RGB frames (T, H, W, 3) uint8 of a clip, all frames by default; this is what gets encoded."""
    times = _frame_times(params, frame_indices)
    image = np.broadcast_to(_background(params.background_seed, params.size), (len(times), params.size, params.size, 3))
    image = image.copy()
    frame = np.arange(len(times))[:, None, None]
    # The main object is drawn last, so distractors never occlude it.
    for track in (*params.distractors, params.main):
        rows, cols, coverage = _track_window(track, params.size, times)
        index = (frame, rows[:, :, None], cols[:, None, :])
        alpha = coverage[..., None]
        image[index] = image[index] * (1 - alpha) + np.asarray(track.color, dtype=np.float64) * alpha
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_main_coverage(params: ClipParams, frame_indices: np.ndarray | list[int] | None = None) -> np.ndarray:
    """Coverage (T, H, W) in [0, 1] of the main object, as composited by :func:`render_frames`."""
    times = _frame_times(params, frame_indices)
    rows, cols, coverage = _track_window(params.main, params.size, times)
    full = np.zeros((len(times), params.size, params.size))
    full[np.arange(len(times))[:, None, None], rows[:, :, None], cols[:, None, :]] = coverage
    return full


def encode_clip(frames: np.ndarray, path: str | Path, fps: int, codec: str = "vp9") -> None:
    """Encode RGB frames (T, H, W, 3) uint8 to ``path`` with PyAV (VP9/.webm or H.264/.mp4, yuv420p)."""
    codec_name, _, options = _CODECS[codec]
    # bitexact: no random segment UID or muxer version in the container, so equal frames give equal files.
    with av.open(str(path), "w", container_options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(codec_name, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = dict(options)
        # Encoder output depends on its thread count; pinning it makes files identical across machines.
        stream.codec_context.thread_count = 1
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))


def _render_and_encode(params: ClipParams, path: str, fps: int, codec: str) -> None:
    """Pool task: render in the worker so only the small ``ClipParams`` crosses the process boundary."""
    encode_clip(render_frames(params), path, fps, codec)


def plan_split(spec: SyntheticSpec, split: str) -> tuple[list[ClipParams], np.ndarray, np.ndarray]:
    """Clip parameters and (motion, appearance) labels of every clip of ``split``, exactly as generated.

    Labels are balanced: they cycle through the classes and are then shuffled, motion and appearance
    independently. Each clip draws from its own generator keyed by (seed, split, index), so a clip's content
    does not depend on the split sizes or on worker scheduling.
    """
    split_id = _SPLITS.index(split)
    count = (spec.num_train, spec.num_val)[split_id]
    # Entropy lists of distinct content: [seed, split, 0] never collides with a clip's [seed, split, 1, index].
    rng = np.random.default_rng([spec.seed, split_id, 0])
    motion = rng.permutation(np.arange(count) % len(MOTION_CLASSES))
    appearance = rng.permutation(np.arange(count) % len(APPEARANCE_CLASSES))
    clips = [
        sample_clip_params(
            np.random.default_rng([spec.seed, split_id, 1, index]),
            spec.size,
            spec.num_frames,
            int(motion[index]),
            int(appearance[index]),
        )
        for index in range(count)
    ]
    return clips, motion, appearance


class _Progress:
    """Prints "synthetic: NN% (i/n)" to stderr at every 10% step; overwrites one line on a terminal."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.done, self.last_decile = total, enabled, 0, 0
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def step(self) -> None:
        self.done += 1
        decile = self.done * 10 // self.total
        if not self.enabled or decile == self.last_decile:
            return
        self.last_decile = decile
        end = "\n" if (not self.tty or self.done == self.total) else ""
        elapsed = time.perf_counter() - self.start
        print(f"\rsynthetic: {decile * 10:3d}% ({self.done}/{self.total}) {elapsed:.1f}s", end=end, file=sys.stderr)
        sys.stderr.flush()


def generate_synthetic_dataset(
    root: str | Path, spec: SyntheticSpec = SyntheticSpec(), *, workers: int = 2, progress: bool = True
) -> Path:
    """Generate the dataset described by ``spec`` into ``root`` (replacing a previous synthetic dataset).

    Everything is written into a temporary sibling folder that is renamed into place at the end, so an
    interrupted run never leaves a half dataset at ``root``. Index files hold absolute paths under the
    final ``root``. A non-empty ``root`` without ``dataset.json`` is refused rather than deleted, since it
    is not something this function made.

    Args:
        root: Destination folder.
        spec: Dataset parameters.
        workers: Encoder processes; ``<= 1`` encodes in this process.
        progress: Print a progress line to stderr at every 10%.

    Returns:
        The absolute ``root`` path.
    """
    root = Path(root).expanduser().resolve()
    if root.exists() and not (root / "dataset.json").exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty and has no dataset.json; refusing to overwrite it")
    root.parent.mkdir(parents=True, exist_ok=True)
    _, extension, codec_options = _CODECS[spec.codec]
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        tasks: list[tuple[ClipParams, str, int, str]] = []
        counts: dict[str, dict[str, object]] = {}
        for split in _SPLITS:
            (tmp / "videos" / split).mkdir(parents=True)
            clips, motion, appearance = plan_split(spec, split)
            names = [f"videos/{split}/{index:06d}.{extension}" for index in range(len(clips))]
            tasks += [(params, str(tmp / name), spec.fps, spec.codec) for params, name in zip(clips, names)]
            final_paths = [root / name for name in names]
            for task_name, labels, classes in (
                ("motion", motion, MOTION_CLASSES),
                ("appearance", appearance, APPEARANCE_CLASSES),
            ):
                lines = "".join(f"{path} {int(label)}\n" for path, label in zip(final_paths, labels))
                (tmp / f"{task_name}_{split}.csv").write_text(lines)
                per_class = np.bincount(labels, minlength=len(classes))
                counts.setdefault(split, {"videos": len(clips)})[task_name] = dict(zip(classes, per_class.tolist()))

        bar = _Progress(len(tasks), progress)
        if workers <= 1:
            for task in tasks:
                _render_and_encode(*task)
                bar.step()
        else:
            # fork where available: workers start instantly and, unlike spawn/forkserver, need not re-import the
            # caller's __main__ (which breaks for stdin, notebooks and unguarded scripts). Workers use only numpy
            # and PyAV, never torch, so forking a parent whose torch thread pools exist is safe here.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            context = multiprocessing.get_context(method)
            with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                try:
                    for future in as_completed([pool.submit(_render_and_encode, *task) for task in tasks]):
                        future.result()
                        bar.step()
                except BaseException:
                    # Do not keep encoding clips that will be thrown away.
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise

        metadata = {
            "format_version": FORMAT_VERSION,
            "spec": asdict(spec),
            "tasks": {"motion": list(MOTION_CLASSES), "appearance": list(APPEARANCE_CLASSES)},
            "counts": counts,
            "generation": {
                "main_radius": _MAIN_RADIUS,
                "distractor_radius": _DISTRACTOR_RADIUS,
                "num_distractors": list(_NUM_DISTRACTORS),
                "main_speed": list(_MAIN_SPEED),
                "distractor_speed": list(_DISTRACTOR_SPEED),
                "units": "radii and speeds are fractions of the frame size (speeds per frame)",
                "encoder": {"codec": _CODECS[spec.codec][0], "pix_fmt": "yuv420p", **codec_options},
            },
        }
        # dataset.json last: its presence marks a complete dataset.
        (tmp / "dataset.json").write_text(json.dumps(metadata, indent=2) + "\n")
        if root.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            root.rename(old / root.name)
            tmp.rename(root)
            shutil.rmtree(old)
        else:
            tmp.rename(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return root


def _spec_difference(root: Path, spec: SyntheticSpec) -> str | None:
    """Why ``root`` does not hold the dataset for ``spec``, or None when it does."""
    meta_path = root / "dataset.json"
    if not meta_path.exists():
        return f"{meta_path} not found"
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as error:
        return f"{meta_path} is unreadable ({error})"
    if meta.get("format_version") != FORMAT_VERSION:
        return f"format version {meta.get('format_version')} != {FORMAT_VERSION}"
    old, new = meta.get("spec", {}), asdict(spec)
    changed = [f"{key}: {old.get(key)!r} -> {value!r}" for key, value in new.items() if old.get(key) != value]
    return f"spec changed ({', '.join(changed)})" if changed else None


def ensure_synthetic_dataset(root: str | Path, spec: SyntheticSpec = SyntheticSpec(), **kw: object) -> Path:
    """Return ``root``, generating the dataset first unless ``root/dataset.json`` already matches ``spec``.

    Keyword arguments are passed to :func:`generate_synthetic_dataset`.
    """
    root = Path(root).expanduser().resolve()
    reason = _spec_difference(root, spec)
    if reason is None:
        return root
    if (root / "dataset.json").exists():
        print(f"synthetic: regenerating {root}: {reason}", file=sys.stderr)
    else:
        print(f"synthetic: generating {root}: {reason}", file=sys.stderr)
    return generate_synthetic_dataset(root, spec, **kw)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: generate (or reuse) a synthetic dataset at ROOT."""
    defaults = SyntheticSpec()
    parser = argparse.ArgumentParser(prog="python -m engine.data.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--num-train", type=int, default=defaults.num_train)
    parser.add_argument("--num-val", type=int, default=defaults.num_val)
    parser.add_argument("--size", type=int, default=defaults.size)
    parser.add_argument("--frames", type=int, default=defaults.num_frames)
    parser.add_argument("--fps", type=int, default=defaults.fps)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--codec", choices=sorted(_CODECS), default=defaults.codec)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--force", action="store_true", help="regenerate even if the dataset is up to date")
    args = parser.parse_args(argv)
    spec = SyntheticSpec(
        num_train=args.num_train,
        num_val=args.num_val,
        num_frames=args.frames,
        size=args.size,
        fps=args.fps,
        seed=args.seed,
        codec=args.codec,
    )
    start = time.perf_counter()
    make = generate_synthetic_dataset if args.force else ensure_synthetic_dataset
    root = make(args.root, spec, workers=args.workers)
    print(f"synthetic: {root} ready ({time.perf_counter() - start:.1f}s)", file=sys.stderr)


if __name__ == "__main__":
    main()
