"""Where a probe's training stands, so that rerunning the same eval command continues it instead of starting over.

A K400 probe at V1's recipe runs for hours, often on preemptible nodes. The probe file (`probe-split{k}.pth.tar`, V1's
layout: `classifier`, `opt`, `epoch`, ...) is written after every epoch, every `logging.checkpoint_every_s` seconds
inside one, and when the run is stopped (SIGTERM, Ctrl-C); our `progress` key beside V1's says where the probe's
training stands: the epoch, the global batches done in it, the optimizer step, the epoch's partial loss and accuracy
sums and the history of the epochs before. Every other input of a probe step is a function of (seed, split, epoch,
entry): the epoch's permutation, the augmentation draws (engine/evaluation/data.py) and the probe's initialisation,
so skipping the batches already done continues the run bit for bit.

The record also holds a fingerprint of what the numbers depend on: the config (all but where files go and how often,
the worker count and the inference chunk size), the global batch (W ranks of b train the probe of one rank of W*b,
so a resume may change W with it), a digest of the frozen encoder's weights (a run folder's weights change when its
pretraining goes on) and digests of the entries the index files list (an index may be edited between runs). A probe
file whose fingerprint differs is never continued: the run stops and names what differs, so a folder of one
experiment is not silently mixed into another's results.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.config import ConfigError
from engine.data.index import VideoIndex
from models.pretrained import read_file

from .config import EvalConfig

# keys that change where files go or how fast the run is, never a number of the result; and the number of splits:
# split k's subset, initialisation and order depend on (seed, k) alone, so more splits later reuse the probes done
_NOT_FINGERPRINTED = {"logging.folder", "logging.checkpoint_every_s", "logging.progress_every_s", "data.num_workers",
                      "data.synthetic_root", "data.batch_size", "meta.clips_per_forward", "data.splits"}
_DIGEST_SAMPLES = 4096  # elements per tensor hashed: any change of trained weights moves every one of them


@dataclass
class Progress:
    """The `progress` record of a probe file."""

    fingerprint: dict[str, Any]
    epoch: int = 0  # epochs done
    batch: int = 0  # global batches done in epoch `epoch`
    step: int = 0  # optimizer steps done
    sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # the epoch's loss sum, correct, seen
    history: list[dict[str, float]] = field(default_factory=list)  # one row per epoch done
    complete: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "epoch": self.epoch, "batch": self.batch, "step": self.step,
                "sums": list(self.sums), "history": list(self.history), "complete": self.complete}


def encoder_digest(encoder: torch.nn.Module) -> str:
    """A digest of the encoder's weights: names, shapes, dtypes and an evenly strided sample of each tensor's
    values, exact (bytes, not sums), cheap for a ViT-g (a few MB hashed)."""
    h = hashlib.sha256()
    for name, t in encoder.state_dict().items():
        flat = t.detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // _DIGEST_SAMPLES)].cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes() if sample.numel() else b"")
    return h.hexdigest()[:16]


def _flat(cfg: EvalConfig) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, keys in cfg.to_dict().items() for key, value in keys.items()
            if f"{section}.{key}" not in _NOT_FINGERPRINTED}


def entries_digest(index: VideoIndex) -> str:
    """A digest of an index's entries (paths and labels, in order): the same index files may list others later."""
    h = hashlib.sha256()
    for path, label in zip(index.paths, index.labels):
        h.update(f"{path}\t{label}\n".encode())
    return h.hexdigest()[:16]


def fingerprint(cfg: EvalConfig, encoder: torch.nn.Module, world_size: int, train: VideoIndex,
                val: VideoIndex) -> dict[str, Any]:
    return {**_flat(cfg), "global batch (ranks x data.batch_size)": world_size * cfg.data.batch_size,
            # the entries the last batch of each epoch repeats (distributed.Ranks.train_slices): ranks that pad
            # differently train another probe
            "training entries repeated per epoch (to a multiple of the ranks)": (-len(train.paths)) % world_size,
            "encoder weights (digest)": encoder_digest(encoder),
            "training entries (digest)": entries_digest(train), "validation entries (digest)": entries_digest(val)}


def read_progress(path: Path, expected: dict[str, Any]) -> tuple[Progress, dict[str, Any]] | None:
    """(where the probe of `path` stands, the file's content: `classifier`, `opt`), or None when there is no file
    to continue. Raises ConfigError when the file is another run's (a different fingerprint, or V1's file without
    our record)."""
    if not path.is_file():
        return None
    state = read_file(path, weights_only=True)
    record = state.get("progress")
    if not isinstance(record, dict):
        raise ConfigError(f"{path} holds a probe without a record of its training (another program's file?); it "
                          f"cannot be continued. Use another logging.folder, or move the file away to start over.")
    progress = Progress(**record)
    defaults = _flat(EvalConfig())  # a key added by a later version of the engine, at its default, changes nothing
    differ = []
    for key, value in expected.items():
        if key in progress.fingerprint:
            if progress.fingerprint[key] != value:
                differ.append(f"{key}: {progress.fingerprint[key]!r} there, {value!r} now")
        elif key not in defaults or defaults[key] != value:
            differ.append(f"{key}: absent there (an older version: {defaults.get(key)!r}), {value!r} now")
    differ += [f"{key}: {value!r} there, absent now" for key, value in progress.fingerprint.items()
               if key not in expected]
    if differ:
        raise ConfigError(f"{path} is the probe of a different evaluation, so this run cannot continue it "
                          f"({'; '.join(differ[:6])}{' ...' if len(differ) > 6 else ''}). Use another "
                          f"logging.folder, or move the folder's probe files away to start over.")
    return progress, state
