"""Atomic checkpoints of the PyTorch backend, in the reference's top-level layout (spec 4.7, 8.1), and RNG states.

Each save writes `{tag}-step{N:08d}.pth.tar` under a temporary name, flushes it to the disk (fsync: a rename of a file
whose data is still in the page cache can survive a power loss or node crash as an empty file) and renames it into
place, then points
`{tag}-latest.pth.tar` (the reference's name, what resume reads) at it with a hard link (a copy where the file system
has none), also by rename: a crash at any moment leaves the previous latest checkpoint or the new one, never half of
one. The newest `logging.keep_last` step files are kept. Keys: encoder, predictor, target_encoder, opt, epoch, loss,
batch_size, world_size, lr (the reference's), plus step (the next step to run), config and rng.

A rerun resumes from the newest step file that loads: one that does not (a disk error, a copy cut short) is named in a
warning and passed over for the one before it.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.pretrained import (CheckpointMismatch, UnreadableCheckpoint, load_failure, load_strict, read_file,
                               strip_wrappers)

from .durable import fsync_dir, fsync_file


def latest_path(folder: str | Path, write_tag: str) -> Path:
    return Path(folder) / f"{write_tag}-latest.pth.tar"


def step_path(folder: str | Path, write_tag: str, step: int) -> Path:
    return Path(folder) / f"{write_tag}-step{step:08d}.pth.tar"


def save_checkpoint(folder: str | Path, write_tag: str, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Write the checkpoint of `step`, make it the latest, and delete step files beyond the newest `keep_last`."""
    path = step_path(folder, write_tag, step)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # a full disk, a quota, a lost mount: the part written goes, the last checkpoint stays
        tmp.unlink(missing_ok=True)
        previous = step_files(folder, write_tag)
        kept = f"the last checkpoint, {previous[-1]}, is intact" if previous else "no checkpoint was written yet"
        raise CheckpointWriteError(f"writing the checkpoint of step {step} to {path} failed ({e.strerror or e}); "
                                   f"{kept}. Free space in {Path(folder).resolve()} (this one needs about "
                                   f"{_state_gb(state):.1f} GB) and rerun the same command to continue.") from e
    os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half of one
    latest = latest_path(folder, write_tag)
    link = latest.with_name(latest.name + ".tmp")
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)
    except OSError:  # no hard links (some network and object-store mounts)
        shutil.copyfile(path, link)
        fsync_file(link)
    os.replace(link, latest)
    fsync_dir(folder)  # the renames themselves
    for old in step_files(folder, write_tag)[:-keep_last]:
        old.unlink()
    return path


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the previous one is intact."""


def _state_gb(state: Any) -> float:
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size() / 1e9
    values = state.values() if isinstance(state, dict) else state if isinstance(state, (list, tuple)) else ()
    return sum(_state_gb(v) for v in values)


def step_files(folder: str | Path, write_tag: str) -> list[Path]:
    pattern = re.compile(re.escape(write_tag) + r"-step(\d{8})\.pth\.tar")
    return sorted(p for p in Path(folder).iterdir() if pattern.fullmatch(p.name))


def load_resumable(folder: str | Path, write_tag: str,
                   warn: Callable[[str], None]) -> tuple[Path, dict[str, Any]] | None:
    """(path, state) of the newest checkpoint of `folder` that loads: the step files newest first (the newest is newer
    than `latest` if a crash came between the two renames), else `latest` (a folder of the reference's code); None
    when there is none. One that does not load is named in `warn` and passed over; UnreadableCheckpoint when none
    loads."""
    if not Path(folder).is_dir():
        return None
    candidates = [p for p in step_files(folder, write_tag)[::-1] or [latest_path(folder, write_tag)] if p.is_file()]
    failed = []
    for i, path in enumerate(candidates):
        try:
            return path, load_checkpoint(path)
        except UnreadableCheckpoint as e:
            reason = load_failure(e.__cause__ or e)
            failed.append(f"  {path}: {reason}")
            if i + 1 < len(candidates):
                warn(f"warning: checkpoint {path} cannot be read ({reason}); resuming from the one before it. The "
                     "next save of that step replaces it: move it away now to keep it.")
    if failed:
        listed = "\n".join(failed)
        raise UnreadableCheckpoint(f"no checkpoint in {folder} can be read:\n{listed}\nMove them away to start the "
                                    "run over, or set logging.folder to a new folder.")
    return None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (meta.read_checkpoint)")
    return read_file(path, weights_only=True)


def load_start_weights(path: str | Path, encoder: nn.Module, predictor: nn.Module,
                       target_encoder: nn.Module) -> dict[str, Any]:
    """`meta.read_checkpoint`: a checkpoint of ours, an exported one or a released V-JEPA file (wrapper prefixes
    stripped), loaded strictly into the three modules (a file without a target starts it from its encoder). Returns
    the file's state for the rest (opt, epoch, step, rng where present)."""
    state = load_checkpoint(path)
    for entry, module in (("encoder", encoder), ("predictor", predictor), ("target_encoder", target_encoder)):
        weights = state.get(entry) or (state.get("encoder") if entry == "target_encoder" else None)
        if not weights:
            raise CheckpointMismatch(f"{path} has no {entry!r} entry (meta.read_checkpoint)")
        load_strict(module, strip_wrappers(weights), where=f"{path} [{entry}]")
    return state


def rng_state() -> dict[str, Any]:
    """Every global RNG (torch CPU and CUDA, NumPy, Python), in types `torch.load(weights_only=True)` accepts. The
    engine's own randomness (masks, clips, crops) is a function of the step and sample index; these cover the rest."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # CUDA: this process's device only (a rank's own); every visible device's would not restore where fewer are visible
    return {"torch": torch.get_rng_state(), "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": list(random.getstate()[1]), "python_gauss": random.getstate()[2]}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():  # files of earlier versions hold one state per visible device
        current = torch.cuda.current_device()
        torch.cuda.set_rng_state(state["cuda"][current if current < len(state["cuda"]) else 0])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
