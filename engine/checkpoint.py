"""Atomic checkpoints of the PyTorch backend, in the reference's top-level layout (spec 4.7, 8.1).

A checkpoint is written to a temporary name and renamed into place, so a crash mid-write never leaves a partial
file that resume would pick up. Keys: encoder, predictor, target_encoder, opt, epoch, loss, batch_size, world_size,
lr (the reference's), plus step (the next step to run) and config (the resolved config).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def latest_path(folder: str | Path, write_tag: str) -> Path:
    return Path(folder) / f"{write_tag}-latest.pth.tar"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half of one


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (meta.read_checkpoint)")
    return torch.load(path, map_location="cpu", weights_only=True)
