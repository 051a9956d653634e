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
"""

from __future__ import annotations

import math
import signal
import threading
import time

import torch

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


class NonFiniteLoss(FloatingPointError):
    """Too many non-finite losses in a row."""


class StepGuard:
    def __init__(self, *, distributed: bool, max_nonfinite: int, device: torch.device):
        self.distributed = distributed
        self.max_nonfinite = max_nonfinite
        self.device = device
        self.stop_requested_at: float | None = None  # monotonic time of the signal, on this rank
        self.stop = False  # agreed: some rank was signalled
        self.skipped = 0
        self.in_a_row = 0
        self.last_finite: tuple[int, float] | None = None
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: object) -> None:
        if self.stop_requested_at is None:
            self.stop_requested_at = time.monotonic()

    def check(self, loss: torch.Tensor, step: int) -> bool:
        """Whether to run this step's backward and optimizer step (the loss is finite on every rank). One host sync
        and, when distributed, one all-reduce of two flags per step. Raises NonFiniteLoss at the limit."""
        flags = torch.stack([(~torch.isfinite(loss.detach())).float(),
                             torch.tensor(float(self.stop_requested_at is not None), device=loss.device)])
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

    def record(self, step: int, loss: float) -> None:
        """The host value of a finite loss, for the message above (called at logging steps: no extra sync)."""
        if math.isfinite(loss):
            self.last_finite = (step, loss)

    def agree_to_save(self, grace_s: float, save_s: float | None) -> bool:
        """Whether every rank expects a save taking about `save_s` (the last one's duration; None: never saved) to end
        within the grace period that started at its signal. Collective: the save is."""
        fits = True
        if self.stop_requested_at is not None:
            left = grace_s - (time.monotonic() - self.stop_requested_at)
            fits = left > (save_s or 0.0)
        if not self.distributed:
            return fits
        flag = torch.tensor(float(fits), device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())
