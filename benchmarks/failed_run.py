"""A measured run that raised, recorded instead of ending the command: on a lent GPU one out-of-memory (a batch one
side fits and the other does not is a result) or one error must not cost the runs after it."""

from __future__ import annotations

import dataclasses
import gc
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch


@dataclasses.dataclass
class Failed:
    """A run that raised: out of memory (a batch one side fits and the other does not is a result, not a crash) or an
    error. The other runs still go ahead."""

    name: str
    error: str
    out_of_memory: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def attempt(name: str, run: Callable[[], Any], device: torch.device) -> Any:
    """`run()`, or a Failed record when it raises (printed with its traceback unless it is an out-of-memory), with the
    device's cache emptied so the next run starts from a clean allocator."""
    try:
        return run()
    except Exception as e:  # one failing run never stops the others; Ctrl-C (not an Exception) still does
        oom = isinstance(e, torch.OutOfMemoryError)
        error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}".rstrip(": ")
        if oom:
            print(f"{name}: out of memory ({error}); the other runs go on", file=sys.stderr, flush=True)
        else:
            traceback.print_exc()
            print(f"{name}: failed ({error}); the other runs go on", file=sys.stderr, flush=True)
        failed = Failed(name, error, oom)
    gc.collect()  # the traceback's frames (freed with the except block) held the failed run's tensors
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return failed
