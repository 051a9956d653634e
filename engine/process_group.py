"""Which launcher started this process, and leaving the process group before the interpreter exits.

The deepspeed launcher passes `--local_rank` and sets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT;
torchrun (also under `srun` on SLURM) sets the same variables but passes no argument. Either way the process is one
rank of a launch, which trains under DeepSpeed.

A rank that exits with its gloo process group still alive leaves the group's worker threads to the C++ static
destructors, which abort the process ("terminate called without an active exception", exit -6) now and then, after
all the work is done and written. So each entry point leaves the group itself: after a normal end every rank first
waits at a barrier (no rank closes its connections while a peer still talks to it), then destroys the group; after
an error it only destroys its own (a barrier would wait forever for a rank that died).
"""

from __future__ import annotations

import os

import torch.distributed as dist


def launched_local_rank(argument: int | None) -> int | None:
    """This process's local rank when a launcher started it (`--local_rank`, else torchrun's LOCAL_RANK with
    WORLD_SIZE), None for a plain `python` run."""
    if argument is not None:
        return argument
    if "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    return None


def leave_process_group(*, clean: bool) -> None:
    """Destroy this process's default group, if any; `clean`: every rank got here, so meet at a barrier first."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()
