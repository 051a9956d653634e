"""DeepSpeed checkpoint folders: rotation, and resuming on a different number of ranks through DeepSpeed's
universal checkpoint format.

ZeRO-1/2 checkpoints hold one optimizer-state partition per data-parallel rank (`zero_pp_rank_{r}_*`), so they load
only on the world size that wrote them. When the world size changes, rank 0 converts the tag once with DeepSpeed's
`ds_to_universal` (per-parameter fp32 weights and AdamW moments, independent of the partitioning) into
`<tag>_universal` (written under a temporary name, then renamed), and every rank loads that with DeepSpeed's
`load_universal` switch. Stage 0 checkpoints hold the whole optimizer and need no conversion.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

_TAG = re.compile(r"step(\d+)")
UNIVERSAL_SUFFIX = "_universal"


def universal_info() -> dict[str, float]:
    """What `ds_to_universal` requires in the client state: the format version (no tensor or pipeline parallelism
    here, so no parameter patterns)."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_VERSION_KEY, UNIVERSAL_CHECKPOINT_VERSION_VALUE

    return {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}


def prune_tags(folder: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step tags, with their universal conversions."""
    tags = sorted((p for p in Path(folder).iterdir() if p.is_dir() and _TAG.fullmatch(p.name)),
                  key=lambda p: int(_TAG.fullmatch(p.name)[1]))
    for old in tags[:-keep_last]:
        shutil.rmtree(old)
        shutil.rmtree(old.with_name(old.name + UNIVERSAL_SUFFIX), ignore_errors=True)


def latest_tag(folder: str | Path) -> str | None:
    path = Path(folder) / "latest"
    return path.read_text().strip() if path.is_file() else None


def saved_world_size(folder: str | Path, tag: str) -> int:
    """Data-parallel ranks that wrote a ZeRO-1/2 tag (0 for stage 0: no partitioned optimizer files)."""
    return len(list((Path(folder) / tag).glob("zero_pp_rank_*_mp_rank_00_optim_states.pt")))


def convert_to_universal(folder: str | Path, tag: str) -> str:
    """Rank 0 only: `<tag>_universal` beside `tag` (kept if it exists), and `latest_universal` naming it.

    The converter runs in a fresh process: its worker pool forks, and forking a training process (gloo threads,
    CUDA) can hang, as it did here on the CPU.
    """
    folder = Path(folder)
    target = folder / (tag + UNIVERSAL_SUFFIX)
    if not target.is_dir():
        tmp = folder / (target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        workers = max(1, min(8, os.cpu_count() or 1))
        # --inject_missing_state: checkpoints written before the client state carried universal_info() convert too.
        result = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                                 str(folder / tag), "--output_folder", str(tmp), "--num_extract_workers", str(workers),
                                 "--num_merge_workers", str(max(1, workers // 2)), "--inject_missing_state"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"converting {folder / tag} to DeepSpeed's universal format failed (resume on the "
                               f"world size that wrote it instead):\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
        os.replace(tmp, target)
    latest = folder / "latest_universal"
    latest.with_name("latest_universal.tmp").write_text(target.name)
    os.replace(latest.with_name("latest_universal.tmp"), latest)
    return target.name


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
