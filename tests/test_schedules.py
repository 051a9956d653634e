"""Tests for engine.schedules against the spec's sanity table and a stateful replica of the reference."""

import math
from types import SimpleNamespace

import pytest

from engine.schedules import Schedules, cosine_wd, ema_momentum, warmup_cosine_lr

# V1 pretrain optimization block (spec section 4.1), identical in all three configs.
V1_OPT = SimpleNamespace(
    ipe=300,
    epochs=300,
    ipe_scale=1.25,
    warmup=40,
    start_lr=2e-4,
    lr=6.25e-4,
    final_lr=1e-6,
    weight_decay=0.04,
    final_weight_decay=0.4,
    ema=[0.998, 1.0],
)


def test_from_config_horizons():
    sched = Schedules.from_config(V1_OPT)
    assert sched.warmup_steps == 12_000
    assert sched.total_steps == 112_500
    assert sched.ema_horizon == 112_500.0


@pytest.mark.parametrize(
    "iteration, lr, wd, momentum",
    [
        (1, "2.0004e-04", "0.04000", "0.998000"),
        (11_999, "6.2496e-04", "0.05001", "0.998213"),
        (12_000, "6.2500e-04", "0.05001", "0.998213"),
        (45_000, "4.7320e-04", "0.16438", "0.998800"),
        (90_000, "7.5042e-05", "0.36562", "0.999600"),
    ],
)
def test_spec_sanity_table(iteration, lr, wd, momentum):
    # The table's iteration k is 1-based; the loop's 0-based iteration is k-1, which uses lr/wd step k and EMA
    # update k-1. Off-by-one alternatives fail here: lr step k-1 gives 2.0000e-04 at k=1 and 4.7321e-04 at 45000.
    got_lr, got_wd, got_m = Schedules.from_config(V1_OPT).at(iteration - 1)
    assert (f"{got_lr:.4e}", f"{got_wd:.5f}", f"{got_m:.6f}") == (lr, wd, momentum)


def test_peak_lr_is_exact_at_end_of_warmup():
    lr, _, _ = Schedules.from_config(V1_OPT).at(12_000 - 1)
    assert lr == V1_OPT.lr


def test_matches_stateful_reference_over_the_whole_run():
    """Replays the reference's step-counting objects and generator; ``at`` must agree bit for bit."""
    sched = Schedules.from_config(V1_OPT)
    warmup, t_max = int(V1_OPT.warmup * V1_OPT.ipe), int(V1_OPT.ipe_scale * V1_OPT.epochs * V1_OPT.ipe)
    horizon = V1_OPT.ipe * V1_OPT.epochs * V1_OPT.ipe_scale
    ema0, ema1 = V1_OPT.ema
    momentum_gen = (ema0 + i * (ema1 - ema0) / horizon for i in range(int(horizon) + 1))
    lr_step = wd_step = 0
    for it in range(V1_OPT.ipe * V1_OPT.epochs):
        lr_step += 1  # WarmupCosineSchedule.step(): increment, then evaluate
        if lr_step < warmup:
            lr = V1_OPT.start_lr + lr_step / max(1, warmup) * (V1_OPT.lr - V1_OPT.start_lr)
        else:
            progress = (lr_step - warmup) / max(1, t_max - warmup)
            lr = max(
                V1_OPT.final_lr,
                V1_OPT.final_lr + (V1_OPT.lr - V1_OPT.final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress)),
            )
        wd_step += 1  # CosineWDSchedule.step()
        ref_wd, final_wd = V1_OPT.weight_decay, V1_OPT.final_weight_decay
        wd = final_wd + (ref_wd - final_wd) * 0.5 * (1.0 + math.cos(math.pi * wd_step / t_max))
        wd = max(final_wd, wd) if final_wd <= ref_wd else min(final_wd, wd)
        m = next(momentum_gen)  # after the optimizer step
        assert sched.at(it) == (lr, wd, m), it


@pytest.mark.parametrize("ref_wd, final_wd", [(0.4, 0.04), (0.04, 0.4)])
def test_wd_clamp_direction(ref_wd, final_wd):
    # The clamp bounds the value on the final side only; clamping the wrong way would pin it to final_wd from
    # step 1, so the first value must still sit next to ref_wd.
    values = [cosine_wd(s, ref_wd=ref_wd, final_wd=final_wd, total_steps=100) for s in range(1, 301)]
    assert values[0] == pytest.approx(ref_wd, abs=1e-3)
    assert values[99] == final_wd
    if final_wd < ref_wd:
        assert min(values) == final_wd
        assert all(a >= b for a, b in zip(values[:100], values[1:100]))
    else:
        assert max(values) == final_wd
        assert all(a <= b for a, b in zip(values[:100], values[1:100]))


def test_lr_never_below_final():
    kwargs = dict(start_lr=2e-4, ref_lr=6.25e-4, final_lr=1e-6, warmup_steps=10, total_steps=100)
    values = [warmup_cosine_lr(s, **kwargs) for s in range(1, 301)]  # runs past the horizon on purpose
    assert min(values) == 1e-6
    assert values[99] == 1e-6  # reached exactly at total_steps


def test_lr_without_warmup_starts_at_peak():
    assert warmup_cosine_lr(0, start_lr=0.0, ref_lr=1.0, final_lr=0.0, warmup_steps=0, total_steps=10) == 1.0


def test_ema_endpoints_and_horizon():
    assert ema_momentum(0, start=0.998, end=1.0, total_steps=112_500.0) == 0.998
    assert ema_momentum(112_500, start=0.998, end=1.0, total_steps=112_500.0) == 1.0
    with pytest.raises(ValueError):
        ema_momentum(112_501, start=0.998, end=1.0, total_steps=112_500.0)
    with pytest.raises(ValueError):
        ema_momentum(-1, start=0.998, end=1.0, total_steps=112_500.0)
