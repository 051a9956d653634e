"""DeepSpeed checkpoint folders: publishing a tag once it is whole, choosing the tag to resume from, rotation, and
resuming on a different number of ranks through DeepSpeed's universal checkpoint format.

DeepSpeed's own `latest` is written by rank 0 as soon as rank 0's files are, before the other ranks' optimizer
partitions are (its barrier comes after), and nothing is flushed to the disk: a crash in between leaves `latest`
naming a tag with missing or empty partitions. So the engine saves with `save_latest=False` and `commit` publishes
the tag: every rank flushes its own files, a barrier, then rank 0 replaces `latest` atomically. A rerun resumes from
`latest`, or, when one of its files is damaged later (a disk error, a copy cut short), from the newest older tag
whose files all open, on every rank (`resume_tag`).

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
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from .checkpoint import CheckpointWriteError, UnreadableCheckpoint
from .durable import fsync_file, write_text_atomic

_TAG = re.compile(r"step(\d+)")
UNIVERSAL_SUFFIX = "_universal"


def universal_info() -> dict[str, float]:
    """What `ds_to_universal` requires in the client state: the format version (no tensor or pipeline parallelism
    here, so no parameter patterns)."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_VERSION_KEY, UNIVERSAL_CHECKPOINT_VERSION_VALUE

    return {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}


def step_tags(folder: str | Path) -> list[Path]:
    """The step tags' folders, oldest first (none when `folder` does not exist)."""
    if not Path(folder).is_dir():
        return []
    return sorted((p for p in Path(folder).iterdir() if p.is_dir() and _step(p.name) is not None),
                  key=lambda p: _step(p.name))


def prune_tags(folder: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step tags, with their universal conversions."""
    for old in step_tags(folder)[:-keep_last]:
        shutil.rmtree(old)
        shutil.rmtree(old.with_name(old.name + UNIVERSAL_SUFFIX), ignore_errors=True)


def latest_tag(folder: str | Path) -> str | None:
    path = Path(folder) / "latest"
    return path.read_text().strip() if path.is_file() else None


def _step(tag: str) -> int | None:
    match = _TAG.fullmatch(tag)
    return int(match[1]) if match else None


def _own_files(tag_dir: Path, rank: int) -> list[Path]:
    """The files of a tag that `rank` flushes and checks: its ZeRO partitions (`zero_pp_rank_{rank}_*`); rank 0 also
    those of no rank (the model states). Each rank touches only its own: on a shared file system, every rank opening
    every file would cost world-size squared metadata operations."""
    if not tag_dir.is_dir():
        return []
    files = sorted(p for p in tag_dir.rglob("*") if p.is_file())
    return [p for p in files if f"zero_pp_rank_{rank}_" in p.name or (rank == 0 and "zero_pp_rank_" not in p.name)]


def commit(folder: str | Path, tag: str, rank: int) -> None:
    """Collective, after `engine.save_checkpoint(..., save_latest=False)`: make `tag` the one a rerun resumes from,
    once every rank's files of it are on the disk."""
    for path in _own_files(Path(folder) / tag, rank):
        fsync_file(path)
    barrier()
    if rank == 0:
        write_text_atomic(Path(folder) / "latest", tag)


def write_error(folder: str | Path, tag: str, rank: int, error: OSError) -> CheckpointWriteError:
    """The error for a rank whose files of `tag` could not be written. The tag stays incomplete and unnamed (`latest`
    moves only in `commit`), so a rerun resumes from the last whole one and writes this step again over it."""
    latest = Path(folder) / "latest"
    kept = (f"the last checkpoint, tag {latest.read_text().strip()!r}, is intact" if latest.is_file()
            else "no checkpoint was written yet")
    return CheckpointWriteError(f"rank {rank}: writing the DeepSpeed checkpoint {Path(folder) / tag} failed "
                                f"({error.strerror or error}); {kept}. Free space in {Path(folder).resolve()} and "
                                f"rerun the same command to continue.")


def _opens(tag_dir: Path, rank: int) -> bool:
    """Whether this rank's files of a tag open: each a torch zip archive whose central directory (at its end: what a
    cut-short copy loses) reads; rank 0 also needs the model states."""
    own = _own_files(tag_dir, rank)
    if rank == 0 and not any(p.name.endswith("model_states.pt") for p in own):
        return False
    for path in own:
        if path.suffix != ".pt":
            continue
        try:
            with zipfile.ZipFile(path):
                pass
        except (zipfile.BadZipFile, OSError):
            return False
    return True


def resume_tag(folder: str | Path, rank: int, warn: Callable[[str], None],
               device: torch.device | None = None) -> str | None:
    """The tag a rerun resumes from: `latest`, else the newest older tag whose files open on every rank (each damaged
    one named by rank 0 in `warn`); None without `latest`; UnreadableCheckpoint when none opens. Collective, over a
    tensor on `device`: the process group's (NCCL reduces CUDA tensors only; gloo the CPU's)."""
    folder = Path(folder)
    latest = latest_tag(folder)
    if latest is None:
        return None
    newest = _step(latest)
    steps = sorted((_step(p.name), p.name) for p in folder.iterdir() if p.is_dir() and _step(p.name) is not None)
    tags = [latest, *(name for step, name in reversed(steps) if newest is not None and step < newest)]
    whole = torch.tensor([float(_opens(folder / tag, rank)) for tag in tags], device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(whole, op=torch.distributed.ReduceOp.MIN)  # whole only if whole everywhere
    for i, (tag, ok) in enumerate(zip(tags, whole.tolist())):
        if ok:
            return tag
        if rank == 0 and i + 1 < len(tags):
            warn(f"warning: DeepSpeed checkpoint {folder / tag} is damaged (a file of it is missing or does not "
                 "open); resuming from the one before it. The next save of that step replaces it: move it away now "
                 "to keep it.")
    raise UnreadableCheckpoint(f"no DeepSpeed checkpoint in {folder} opens (tags {', '.join(tags)}: a file of each "
                                "is missing or damaged). Move them away to start the run over, or set logging.folder "
                                "to a new folder.")


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
    write_text_atomic(folder / "latest_universal", target.name)
    return target.name


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
