"""What a long run survives: non-finite losses and preemption (SIGTERM), decided by all ranks together.

Once per step, after the forward pass, every rank contributes two flags, "my loss is not finite" and "I was asked to
stop", to one all-reduce (max). Both decisions must be collective: a rank that skipped its backward while the others
ran theirs would hang DeepSpeed's gradient reduction, and a checkpoint save is a collective too. A signal handler
only sets a flag: saving from inside the handler would start a collective on one rank, in the middle of whatever
that rank was doing, and deadlock.

* A step whose loss is not finite on any rank runs no backward and no optimizer step (the EMA still moves, towards
  unchanged weights, as in the reference, whose GradScaler skips such steps); `meta.max_nonfinite_steps` of them in a
  row stop the run, the last checkpoint intact.
* After SIGTERM the ranks finish the current step, then save if the last save's duration fits in what is left of
  `meta.preempt_grace_s` (the deepspeed launcher sends SIGKILL 30 s after SIGTERM, SLURM after its KillWait, 30 s by
  default; `sbatch --signal=TERM@120` warns earlier), else keep the last periodic checkpoint, and exit with 143.
* Ctrl-C (SIGINT) is the same request from a user at a terminal: finish the step, save (nothing kills the run, so
  always, unless a SIGTERM came too: the deepspeed launcher answers Ctrl-C with one, then the grace period counts),
  exit with 130. A second Ctrl-C stops at once (KeyboardInterrupt): the last checkpoint stands.
The handlers are this guard's only while its `watch` loop runs; the caller's come back however the loop ends.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator

import torch

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT
CTRL_C_NOTICE = (b"\nCtrl-C: stopping after this step and saving a checkpoint; "
                 b"press Ctrl-C again to stop at once (the last checkpoint stands)\n")


class NonFiniteLoss(FloatingPointError):
    """Too many non-finite losses in a row."""


class StepGuard:
    def __init__(self, *, distributed: bool, max_nonfinite: int, device: torch.device, announce: bool = True):
        self.distributed = distributed
        self.max_nonfinite = max_nonfinite
        self.device = device
        self.announce = announce  # print the Ctrl-C notice (rank 0: a terminal's Ctrl-C reaches every rank)
        self.signals: dict[int, float] = {}  # signal -> monotonic time of its first arrival, on this rank
        self.stop = False  # agreed: some rank was signalled
        self.skipped = 0
        self.in_a_row = 0
        self.last_finite: tuple[int, float] | None = None

    def watch(self, steps: Iterable[int]) -> Iterator[int]:
        """`steps`, with SIGTERM and SIGINT handled by this guard; the previous handlers come back when the loop ends,
        breaks or raises (the generator is closed then)."""
        if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
            yield from steps
            return
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield from steps
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT and signal.SIGINT in self.signals:
            raise KeyboardInterrupt  # the second Ctrl-C
        self.signals.setdefault(signum, time.monotonic())
        if signum == signal.SIGINT and self.announce:
            os.write(2, CTRL_C_NOTICE)  # not print(): a handler may run inside a print of the loop's

    @property
    def stop_requested_at(self) -> float | None:
        """Monotonic time of this rank's first stop signal."""
        return min(self.signals.values(), default=None)

    @property
    def stop_reason(self) -> str:
        if signal.SIGTERM in self.signals:
            return "SIGTERM"
        return "Ctrl-C" if signal.SIGINT in self.signals else "a signal to another rank"

    @property
    def exit_code(self) -> int:
        """What a stopped run exits with: 130 when only Ctrl-C stopped it (on this rank), else 143."""
        return INTERRUPTED_EXIT_CODE if self.stop_reason == "Ctrl-C" else PREEMPTED_EXIT_CODE

    def check(self, loss: torch.Tensor, step: int) -> bool:
        """Whether to run this step's backward and optimizer step (the loss is finite on every rank). One host sync
        and, when distributed, one all-reduce of two flags per step. Raises NonFiniteLoss at the limit."""
        flags = torch.stack([(~torch.isfinite(loss.detach())).float(),
                             torch.full((), float(self.stop_requested_at is not None), device=loss.device)])  # no copy
        if self.distributed:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        nonfinite, stop = (bool(v) for v in flags.tolist())
        self.stop = self.stop or stop
        if not nonfinite:
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_nonfinite:
            last = (f"the last finite loss was {self.last_finite[1]:.6g} at step {self.last_finite[0] + 1}"
                    if self.last_finite else "no loss was finite")
            raise NonFiniteLoss(f"{self.in_a_row} non-finite losses in a row (meta.max_nonfinite_steps) at step "
                                f"{step + 1}; {last}. The last checkpoint is intact: lower the lr, check the data, "
                                f"or resume from it with another seed.")
        return False

    def poll(self, due: bool = False) -> tuple[bool, bool]:
        """(stop, save) for a loop without a loss check (the frozen evaluation's probe steps): whether some rank was
        signalled, and whether some rank's `due` is set (a timed save that every rank must join, as their clocks
        differ). One all-reduce of two flags when distributed; no device work otherwise."""
        flags = [float(self.stop_requested_at is not None), float(due)]
        if self.distributed:
            reduced = torch.tensor(flags, device=self.device)
            torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.MAX)
            flags = reduced.tolist()
        self.stop = self.stop or bool(flags[0])
        return self.stop, bool(flags[1])

    def record(self, step: int, loss: float) -> None:
        """The host value of a finite loss, for the message above (called at logging steps: no extra sync)."""
        if math.isfinite(loss):
            self.last_finite = (step, loss)

    def agree_to_save(self, grace_s: float, save_s: float | None) -> bool:
        """Whether every rank expects a save taking about `save_s` (the last one's duration; None: never saved) to end
        within the grace period that started at its SIGTERM (no SIGTERM: no deadline). Collective: the save is."""
        fits = True
        terminated_at = self.signals.get(signal.SIGTERM)
        if terminated_at is not None:
            left = grace_s - (time.monotonic() - terminated_at)
            fits = left > (save_s or 0.0)
        if not self.distributed:
            return fits
        flag = torch.tensor(float(fits), device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())
