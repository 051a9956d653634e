"""The disk a run's checkpoints take, and a warning at start when the run folder's disk cannot hold them: a save that
does not fit stops the run (engine/checkpoint.py, engine/ds_checkpoint.py), and at ViT-H scale the first save comes
an hour or more after the start.

Bytes per checkpoint, everything fp32 (torch.save's overhead is under 0.1%):
- PyTorch backend: encoder, predictor and target encoder weights, position tables included, 4 B each; AdamW's two
  moments, 8 B per trained parameter.
- DeepSpeed: the same weights (rank 0's model-states file holds encoder and predictor, the client state the target),
  and the optimizer partitions of all ranks together hold DeepSpeed's fp32 master copy besides the moments: 12 B per
  trained parameter.
Measured on a 12.7 M-parameter model (1 rank): 197.0 MB against 196.8 MB estimated (PyTorch), 247.8 MB against
247.7 MB (ZeRO-2); ZeRO-3 wrote 240.6 MB, the estimate being an upper bound there. A change of world size converts a
ZeRO-1/2 tag once to the universal format, another copy of about the same size, not counted here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

GB = 1e9


def checkpoint_bytes(encoder_params: int, predictor_params: int, trained_params: int, deepspeed: bool) -> int:
    """One checkpoint; `encoder_params` and `predictor_params` count every parameter (the target is an encoder copy),
    `trained_params` those AdamW updates."""
    weights = 4 * (2 * encoder_params + predictor_params)
    return weights + (12 if deepspeed else 8) * trained_params


def space_warning(folder: Path, each: int, keep_last: int, present: int) -> str | None:
    """A warning when `folder`'s disk has less free space than the checkpoints still to come need at their peak: the
    newest `keep_last` plus the one being written (the oldest goes only once the new one is whole), less the
    `present` ones already there. None when they fit or the free space cannot be read."""
    more = (keep_last + 1 - min(present, keep_last)) * each
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    if free >= more:
        return None
    return (f"warning: checkpoints of this run take about {each / GB:.1f} GB each; logging.keep_last={keep_last} "
            f"and the one being written need about {more / GB:.1f} GB more in {folder.resolve()}, whose disk has "
            f"{free / GB:.1f} GB free. The first save that does not fit stops the run (the last checkpoint stays "
            "intact): free space, point logging.folder elsewhere, or lower logging.keep_last.")
