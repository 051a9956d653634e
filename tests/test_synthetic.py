"""Tests for the synthetic moving-shapes dataset (engine.data.synthetic)."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest

from engine.data import synthetic
from engine.data.synthetic import (
    APPEARANCE_CLASSES,
    MOTION_CLASSES,
    SyntheticSpec,
    ensure_synthetic_dataset,
    generate_synthetic_dataset,
    motion_vector,
    plan_split,
    render_frames,
    render_main_coverage,
    sample_clip_params,
)

SMALL = SyntheticSpec(num_train=16, num_val=8, num_frames=8, size=48, seed=1)
INDEX_FILES = ("motion_train.csv", "motion_val.csv", "appearance_train.csv", "appearance_val.csv")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small VP9 dataset, generated once with a two-process pool."""
    return generate_synthetic_dataset(tmp_path_factory.mktemp("syn") / "data", SMALL, workers=2, progress=False)


def read_index(path: Path) -> list[tuple[str, int]]:
    """Parse an index file strictly: ``<path> <label>`` with a single space, no header."""
    rows = []
    for line in path.read_text().splitlines():
        video, label = line.split(" ")
        rows.append((video, int(label)))
    return rows


def decode(path: str | Path) -> tuple[np.ndarray, str]:
    """All frames (T, H, W, 3) uint8 and the codec name of a video file."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(stream)])
        return frames, stream.codec_context.name


def test_layout_and_index_files(dataset: Path) -> None:
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["spec"] == dataclasses.asdict(SMALL)
    assert meta["tasks"] == {"motion": list(MOTION_CLASSES), "appearance": list(APPEARANCE_CLASSES)}
    for split, count in (("train", SMALL.num_train), ("val", SMALL.num_val)):
        motion = read_index(dataset / f"motion_{split}.csv")
        appearance = read_index(dataset / f"appearance_{split}.csv")
        assert len(motion) == len(appearance) == count == meta["counts"][split]["videos"]
        # Same videos in the same order, only the labels differ.
        assert [video for video, _ in motion] == [video for video, _ in appearance]
        for video, _ in motion:
            assert Path(video).is_absolute() and Path(video).is_file()
            assert Path(video).parent == dataset / "videos" / split and video.endswith(".webm")
        for rows, classes, task in ((motion, MOTION_CLASSES, "motion"), (appearance, APPEARANCE_CLASSES, "appearance")):
            counts = Counter(label for _, label in rows)
            assert set(counts) <= set(range(len(classes)))
            assert max(counts.values()) - min(counts.values()) <= 1 and len(counts) == min(count, len(classes))
            assert meta["counts"][split][task] == {name: counts[i] for i, name in enumerate(classes)}
        # Index labels are those of the generator's plan, so render_frames reproduces the dataset's content.
        _, plan_motion, plan_appearance = plan_split(SMALL, split)
        assert [label for _, label in motion] == plan_motion.tolist()
        assert [label for _, label in appearance] == plan_appearance.tolist()
    leftovers = [p.name for p in dataset.parent.iterdir() if p != dataset]
    assert leftovers == []


def test_vp9_video_decodes_to_the_rendered_clip(dataset: Path) -> None:
    video, _ = read_index(dataset / "motion_val.csv")[3]
    frames, codec = decode(video)
    assert codec == "vp9"
    assert frames.shape == (SMALL.num_frames, SMALL.size, SMALL.size, 3)
    rendered = render_frames(plan_split(SMALL, "val")[0][3])
    # Lossy yuv420p coding: close to the rendered frames, far closer than two different clips are.
    error = np.abs(frames.astype(np.float64) - rendered).mean()
    other = np.abs(frames.astype(np.float64) - render_frames(plan_split(SMALL, "val")[0][4])).mean()
    assert error < 6 and other > 3 * error


def test_h264_variant(tmp_path: Path) -> None:
    spec = SyntheticSpec(num_train=8, num_val=8, num_frames=6, size=32, seed=3, codec="h264")
    root = generate_synthetic_dataset(tmp_path / "h264", spec, workers=1, progress=False)
    video, _ = read_index(root / "appearance_train.csv")[0]
    assert video.endswith(".mp4")
    frames, codec = decode(video)
    assert codec == "h264"
    assert frames.shape == (6, 32, 32, 3)
    again = generate_synthetic_dataset(tmp_path / "again", spec, workers=1, progress=False)
    # Same seed, same content. Byte identity is asserted for VP9 (the training codec) in the determinism test; x264
    # output was seen to differ in rare full-suite runs, so here the decoded frames must agree instead.
    frames_again, _ = decode(video.replace(str(root), str(again)))
    assert np.abs(frames.astype(np.int16) - frames_again.astype(np.int16)).mean() < 0.5


def test_deterministic_from_seed(dataset: Path, tmp_path: Path) -> None:
    # workers=1 here vs 2 in the fixture: the output must not depend on scheduling either.
    again = generate_synthetic_dataset(tmp_path / "again", SMALL, workers=1, progress=False)
    for name in INDEX_FILES:
        text_a = (dataset / name).read_text().replace(str(dataset), "ROOT")
        text_b = (again / name).read_text().replace(str(again), "ROOT")
        assert text_a == text_b
    assert (dataset / "dataset.json").read_bytes() == (again / "dataset.json").read_bytes()
    video = "videos/train/000005.webm"
    assert (dataset / video).read_bytes() == (again / video).read_bytes()
    np.testing.assert_array_equal(decode(dataset / video)[0], decode(again / video)[0])

    other = generate_synthetic_dataset(
        tmp_path / "other", dataclasses.replace(SMALL, seed=2), workers=1, progress=False
    )
    labels = [label for _, label in read_index(dataset / "motion_train.csv")]
    other_labels = [label for _, label in read_index(other / "motion_train.csv")]
    assert labels != other_labels
    assert not np.array_equal(decode(dataset / video)[0], decode(other / video)[0])


def test_ensure_reuses_and_regenerates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[SyntheticSpec] = []
    real_generate = synthetic.generate_synthetic_dataset

    def counting_generate(root: Path, spec: SyntheticSpec, **kw: object) -> Path:
        calls.append(spec)
        return real_generate(root, spec, **kw)

    monkeypatch.setattr(synthetic, "generate_synthetic_dataset", counting_generate)
    spec = SyntheticSpec(num_train=8, num_val=8, num_frames=4, size=32, seed=5)
    root = ensure_synthetic_dataset(tmp_path / "data", spec, workers=1, progress=False)
    assert calls == [spec] and (root / "dataset.json").is_file()
    stamp = (root / "dataset.json").stat().st_mtime_ns

    assert ensure_synthetic_dataset(root, spec, workers=1, progress=False) == root
    assert calls == [spec] and (root / "dataset.json").stat().st_mtime_ns == stamp
    capsys.readouterr()

    changed = dataclasses.replace(spec, seed=6)
    ensure_synthetic_dataset(root, changed, workers=1, progress=False)
    assert calls == [spec, changed]
    assert "regenerating" in capsys.readouterr().err
    assert json.loads((root / "dataset.json").read_text())["spec"]["seed"] == 6


def test_refuses_foreign_folder_and_interruption_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        generate_synthetic_dataset(foreign, SMALL, workers=1, progress=False)
    assert (foreign / "precious.txt").read_text() == "keep me"

    spec = SyntheticSpec(num_train=8, num_val=8, num_frames=4, size=32, seed=5)
    existing = generate_synthetic_dataset(tmp_path / "existing", spec, workers=1, progress=False)
    meta = (existing / "dataset.json").read_bytes()
    encoded: list[str] = []
    real_task = synthetic._render_and_encode

    def interrupted_task(*args: object) -> None:
        if len(encoded) == 5:
            raise KeyboardInterrupt
        encoded.append(str(args[1]))
        real_task(*args)

    monkeypatch.setattr(synthetic, "_render_and_encode", interrupted_task)
    for root in (tmp_path / "fresh", existing):
        encoded.clear()
        with pytest.raises(KeyboardInterrupt):
            generate_synthetic_dataset(root, dataclasses.replace(spec, seed=6), workers=1, progress=False)
        assert len(encoded) == 5
    # No half dataset anywhere, no temporary folders left, and the previous dataset is untouched.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "foreign"]
    assert (existing / "dataset.json").read_bytes() == meta
    assert len(list((existing / "videos" / "train").iterdir())) == spec.num_train


def circular_centroid(coverage: np.ndarray) -> np.ndarray:
    """Wrap-aware centroid (T, 2) as (x, y) of coverage maps (T, H, W) on a torus."""
    size = coverage.shape[-1]
    phase = 2 * np.pi * (np.arange(size) + 0.5) / size
    centroid = []
    for mass in (coverage.sum(axis=1), coverage.sum(axis=2)):  # per column (x), per row (y)
        angle = np.arctan2(mass @ np.sin(phase), mass @ np.cos(phase))
        centroid.append((angle % (2 * np.pi)) * size / (2 * np.pi) - 0.5)
    return np.stack(centroid, axis=1)


def test_main_object_moves_along_labelled_direction() -> None:
    rng = np.random.default_rng(7)
    size, num_frames = 64, 32
    for label in range(len(MOTION_CLASSES)):
        for shape in range(len(APPEARANCE_CLASSES)):
            params = sample_clip_params(rng, size, num_frames, label, shape)
            coverage = render_main_coverage(params)
            frames = render_frames(params)
            # The coverage is what is drawn: fully covered pixels show the main object's colour.
            inside = coverage == 1
            assert inside.sum(axis=(1, 2)).min() > 20
            assert (frames[inside] == params.main.color).all()
            step = np.diff(circular_centroid(coverage), axis=0)
            step = (step + size / 2) % size - size / 2  # unwrap crossings of the frame border
            assert np.abs(step).max() < 3, "per-frame displacement must be small (no jumps)"
            velocity = step.mean(axis=0)
            direction = velocity / np.linalg.norm(velocity)
            assert direction @ np.asarray(motion_vector(label)) > np.cos(np.radians(3))
            # Constant velocity over the whole clip, including across the wrap-around.
            assert np.abs(step - velocity).max() < 0.3


def _gradient_histogram(images: np.ndarray, bins: int = 16) -> np.ndarray:
    """Normalised magnitude-weighted histogram of signed gradient orientations (catches blur/trails/rotation)."""
    gray = images.mean(axis=-1)
    gx = np.roll(gray, -1, axis=-1) - np.roll(gray, 1, axis=-1)
    gy = np.roll(gray, -1, axis=-2) - np.roll(gray, 1, axis=-2)
    index = ((np.arctan2(gy, gx) + np.pi) / (2 * np.pi) * bins).astype(np.int64) % bins
    hist = np.stack([np.bincount(i.ravel(), m.ravel(), bins) for i, m in zip(index, np.hypot(gx, gy))])
    return hist / hist.sum(axis=1, keepdims=True)


def _features(images: np.ndarray) -> np.ndarray:
    """Coarse 8x8 grey pixels (catch position leaks) plus the gradient-orientation histogram."""
    n, size = images.shape[0], images.shape[1]
    coarse = images.mean(axis=-1).reshape(n, 8, size // 8, 8, size // 8).mean(axis=(2, 4)).reshape(n, -1) / 255
    return np.concatenate([coarse, 10 * _gradient_histogram(images)], axis=1)


def _held_out_accuracy(features: np.ndarray, labels: np.ndarray, num_train: int) -> float:
    """Ridge least-squares one-vs-rest linear classifier: accuracy on the samples after ``num_train``."""
    x = np.concatenate([features, np.ones((len(features), 1))], axis=1)
    targets = np.eye(labels.max() + 1)[labels]
    a = x[:num_train]
    weights = np.linalg.solve(a.T @ a + np.eye(a.shape[1]), a.T @ targets[:num_train])
    return float((np.argmax(x[num_train:] @ weights, axis=1) == labels[num_train:]).mean())


def test_direction_is_invisible_in_a_single_frame() -> None:
    rng = np.random.default_rng(11)
    num_clips, size = 960, 32
    labels = np.arange(num_clips) % len(MOTION_CLASSES)
    shapes = np.arange(num_clips) % len(APPEARANCE_CLASSES)
    clips = [sample_clip_params(rng, size, 32, int(label), int(shape)) for label, shape in zip(labels, shapes)]
    # Frames 0 and 2 of every clip; a single frame vs the difference of the two, same features and classifier.
    frames = np.stack([render_frames(params, [0, 2]) for params in clips]).astype(np.float64)
    num_train = 2 * num_clips // 3
    chance = 1 / len(MOTION_CLASSES)
    single = _held_out_accuracy(_features(frames[:, 0]), labels, num_train)
    difference = _held_out_accuracy(_features(frames[:, 1] - frames[:, 0]), labels, num_train)
    # 320 held-out clips: the standard error at chance is about 0.018.
    assert single < chance + 0.07, f"single frame predicts direction: {single:.3f}"
    assert difference > chance + 0.2, f"frame difference does not reveal direction: {difference:.3f}"
