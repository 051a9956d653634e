"""Index files in the reference's formats (spec §5.1), concatenated, with optional per-dataset sampling weights.

* `.csv` (any suffix but `.npy`): one `<path> <integer label>` per line, single space, no header, as the reference
  reads them with pandas. V2's `<path>::<label>` is accepted too. The path may itself contain spaces: the label is
  what follows the last separator.
* `.npy`: an array of paths; every label is 0.

Image files (`.jpg`, `.jpeg`, `.png`) may stand in a video index; the dataset turns each into a clip of one repeated
frame (V2's behaviour).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

# Greedy path: a path may contain spaces, the label is whatever follows the last separator.
_SPACE_LINE = re.compile(r"(.+) (-?[0-9]+)")
_COLONS_LINE = re.compile(r"(.+)::(-?[0-9]+)")


def is_image(path: str) -> bool:
    """Whether an index entry is an image (a clip of one repeated frame) rather than a video."""
    return path.lower().endswith(IMAGE_SUFFIXES)


@dataclass(frozen=True)
class VideoIndex:
    """Every entry of the run's index files, in order. `weights` (None: uniform) is the per-entry sampling
    probability: entry j of dataset d gets `w_d / n_d`, normalised to sum to 1 (spec §5.1)."""

    paths: list[str]
    labels: list[int]
    sources: list[str]  # the index files
    sizes: list[int]  # entries per index file
    weights: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def source_of(self, entry: int) -> str:
        """The index file that lists `entry`."""
        return self.sources[int(np.searchsorted(np.cumsum(self.sizes), entry, side="right"))]


def _read_csv(index_path: str) -> tuple[list[str], list[int]]:
    paths, labels = [], []
    with open(index_path) as f:
        lines = f.read().splitlines()
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        match = _SPACE_LINE.fullmatch(line) or _COLONS_LINE.fullmatch(line)
        if match is None:
            raise ValueError(f"{index_path}:{line_number}: expected '<video path> <integer label>' (one space, no "
                             f"header), got {line!r}")
        paths.append(match[1])
        labels.append(int(match[2]))
    return paths, labels


def _read_npy(index_path: str) -> tuple[list[str], list[int]]:
    try:
        array = np.load(index_path, allow_pickle=False)
    except ValueError as e:  # object arrays need pickle; an index of paths never does
        raise ValueError(f"{index_path}: expected a NumPy array of path strings ({e})") from None
    if array.ndim != 1 or array.dtype.kind not in "US":
        raise ValueError(f"{index_path}: expected a 1-D NumPy array of path strings, got {array.dtype} "
                         f"{array.shape}")
    paths = [p.decode() if isinstance(p, bytes) else str(p) for p in array.tolist()]
    return paths, [0] * len(paths)


def read_index(index_files: Sequence[str], weights: Sequence[float] | None = None) -> VideoIndex:
    """Read and concatenate index files; `weights` (one per file, the reference's `datasets_weights`) sets each
    entry's sampling probability. Raises a clear error for a missing, malformed or empty index."""
    if weights is not None:
        if len(weights) != len(index_files):
            raise ValueError(f"data.datasets_weights has {len(weights)} entries for {len(index_files)} index files")
        if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
            raise ValueError(f"data.datasets_weights must be >= 0 with at least one > 0, got {list(weights)}")
    paths: list[str] = []
    labels: list[int] = []
    sizes: list[int] = []
    for index_path in index_files:
        if not Path(index_path).is_file():
            raise FileNotFoundError(f"index file not found: {index_path} (an index file lists "
                                    f"'<video path> <label>' per line)")
        read = _read_npy if index_path.endswith(".npy") else _read_csv
        file_paths, file_labels = read(index_path)
        if not file_paths:
            raise ValueError(f"index file {index_path} lists no videos")
        paths += file_paths
        labels += file_labels
        sizes.append(len(file_paths))
    if not paths:
        raise ValueError("data.datasets lists no index files")
    per_entry = None
    if weights is not None:
        per_entry = np.concatenate([np.full(n, w / n) for w, n in zip(weights, sizes)])
        per_entry /= per_entry.sum()
    return VideoIndex(paths, labels, list(index_files), sizes, per_entry)
