"""Leaving the process group before the interpreter exits.

A rank that exits with its gloo process group still alive leaves the group's worker threads to the C++ static
destructors, which abort the process ("terminate called without an active exception", exit -6) now and then, after
all the work is done and written. So each entry point leaves the group itself: after a normal end every rank first
waits at a barrier (no rank closes its connections while a peer still talks to it), then destroys the group; after
an error it only destroys its own (a barrier would wait forever for a rank that died).
"""

from __future__ import annotations

import torch.distributed as dist


def leave_process_group(*, clean: bool) -> None:
    """Destroy this process's default group, if any; `clean`: every rank got here, so meet at a barrier first."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()
