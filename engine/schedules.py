"""LR, weight-decay and EMA-momentum schedules of V-JEPA as pure functions of the step.

The reference (``src/utils/schedulers.py`` and the momentum generator in ``app/vjepa/train.py``) keeps these as
stateful objects. Here they are closed-form functions of the iteration, so resuming needs only the iteration
count and cannot drift from a fresh run.

Step mapping (spec section 4.4). The reference calls ``lr_sched.step()`` and ``wd_sched.step()`` once per iteration
before the forward, and each call increments its counter first, so iteration ``k`` (1-based) uses ``step = k``.
The EMA update after iteration ``k`` takes the ``k``-th value of a generator indexed from 0, i.e. ``update = k-1``.
With a 0-based iteration ``i = k-1`` as used by the training loop: lr/wd use ``step = i+1``, momentum uses
``update = i``. This is what reproduces the spec's sanity table, e.g. iteration 1 -> lr 2.0004e-4 and m 0.998.
"""

import math
from dataclasses import dataclass
from typing import Any


def warmup_cosine_lr(
    step: int, *, start_lr: float, ref_lr: float, final_lr: float, warmup_steps: int, total_steps: int
) -> float:
    """Learning rate at 1-based ``step``: linear warmup, then cosine decay towards ``final_lr``.

    The cosine runs over ``total_steps - warmup_steps``; with ``ipe_scale > 1`` training stops before the end of
    the cosine, so ``final_lr`` is never reached. Past ``total_steps`` the cosine would rise again, as in the
    reference; the V1 configs never get there. The ``max(1, ...)`` guards match the reference for zero-length
    phases.
    """
    if step < warmup_steps:
        progress = step / max(1, warmup_steps)
        return start_lr + progress * (ref_lr - start_lr)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    # 1 + cos >= 0, so the reference's max only absorbs rounding and keeps lr >= final_lr.
    return max(final_lr, final_lr + (ref_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def cosine_wd(step: int, *, ref_wd: float, final_wd: float, total_steps: int) -> float:
    """Weight decay at 1-based ``step``: cosine from ``ref_wd`` to ``final_wd`` over ``total_steps``.

    As in the reference, the value is clamped toward ``final_wd`` (``max`` when decaying, ``min`` when growing)
    so it never overshoots ``final_wd``; as with the lr, the cosine would turn back past ``total_steps``.
    """
    wd = final_wd + (ref_wd - final_wd) * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
    return max(final_wd, wd) if final_wd <= ref_wd else min(final_wd, wd)


def ema_momentum(update: int, *, start: float, end: float, total_steps: float) -> float:
    """Target-encoder EMA momentum for the 0-based ``update`` (the first EMA update uses ``update = 0``).

    ``total_steps`` is the reference's unrounded horizon ``ipe*epochs*ipe_scale``: the reference divides by that
    product, not by its ``int``, which matters only when the product is not a whole number.

    Raises:
        ValueError: for ``update`` outside ``0 .. int(total_steps)``. The reference generator is exhausted there
            (it stops the run); extrapolating would push the momentum past ``end``, e.g. above 1.
    """
    if not 0 <= update <= int(total_steps):
        raise ValueError(f"EMA update {update} outside the schedule horizon 0..{int(total_steps)}")
    return start + update * (end - start) / total_steps


@dataclass(frozen=True)
class Schedules:
    """All three schedules of one run, evaluated by :meth:`at` from the 0-based iteration alone."""

    start_lr: float
    ref_lr: float
    final_lr: float
    warmup_steps: int  # int(warmup * ipe)
    total_steps: int  # int(ipe_scale * epochs * ipe), the lr / wd horizon
    ref_wd: float
    final_wd: float
    ema_start: float
    ema_end: float
    ema_horizon: float  # ipe * epochs * ipe_scale, unrounded (see ema_momentum)

    @classmethod
    def from_config(cls, opt: Any) -> "Schedules":
        """Build from the optimization config.

        ``opt`` needs attributes ``ipe, epochs, ipe_scale, warmup`` (in epochs), ``start_lr, lr, final_lr,
        weight_decay, final_weight_decay`` and ``ema`` (a pair ``(start, end)``).
        """
        ema_start, ema_end = opt.ema
        return cls(
            start_lr=opt.start_lr,
            ref_lr=opt.lr,
            final_lr=opt.final_lr,
            warmup_steps=int(opt.warmup * opt.ipe),
            total_steps=int(opt.ipe_scale * opt.epochs * opt.ipe),
            ref_wd=opt.weight_decay,
            final_wd=opt.final_weight_decay,
            ema_start=ema_start,
            ema_end=ema_end,
            ema_horizon=opt.ipe * opt.epochs * opt.ipe_scale,
        )

    def at(self, step: int) -> tuple[float, float, float]:
        """``(lr, wd, momentum)`` for 0-based iteration ``step``: lr/wd at schedule step ``step+1``, EMA update
        index ``step`` (see the module docstring for why)."""
        lr = warmup_cosine_lr(
            step + 1,
            start_lr=self.start_lr,
            ref_lr=self.ref_lr,
            final_lr=self.final_lr,
            warmup_steps=self.warmup_steps,
            total_steps=self.total_steps,
        )
        wd = cosine_wd(step + 1, ref_wd=self.ref_wd, final_wd=self.final_wd, total_steps=self.total_steps)
        momentum = ema_momentum(step, start=self.ema_start, end=self.ema_end, total_steps=self.ema_horizon)
        return lr, wd, momentum
