"""Tests for engine.masks (spec §3.2-3.4)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from engine.masks import MaskSet, block_size, sample_masks

VITL_GRID = (8, 14, 14)


@dataclasses.dataclass
class MaskCfg:
    """Stand-in for the engine's mask generator config; defaults are the spec §3.1 short-range generator."""

    num_blocks: int = 8
    spatial_scale: list[float] = dataclasses.field(default_factory=lambda: [0.15, 0.15])
    temporal_scale: list[float] = dataclasses.field(default_factory=lambda: [1.0, 1.0])
    aspect_ratio: list[float] = dataclasses.field(default_factory=lambda: [0.75, 1.5])
    max_temporal_keep: float = 1.0
    max_keep: int | None = None
    truncate_to_batch_min: bool = False
    ratio: float = 0.9


def short_range(**kw) -> MaskCfg:
    return MaskCfg(**kw)


def long_range(**kw) -> MaskCfg:
    return MaskCfg(num_blocks=2, spatial_scale=[0.7, 0.7], **kw)


def split(index: torch.Tensor, seqlens: tuple[int, ...]) -> list[np.ndarray]:
    """Unpack a packed index tensor into one array per sequence."""
    assert index.numel() == sum(seqlens)
    return np.split(index.numpy(), np.cumsum(seqlens)[:-1])


def reference_block_size(step: int, cfg: MaskCfg, grid: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """Replica of the reference `_sample_block_size`, written from the spec's pseudocode; also returns `keep`."""
    duration, height, width = grid
    g = torch.Generator()
    g.manual_seed(step)
    u1, u2, u3 = (torch.rand(1, generator=g).item() for _ in range(3))
    t = max(1, int(duration * (cfg.temporal_scale[0] + u1 * (cfg.temporal_scale[1] - cfg.temporal_scale[0]))))
    keep = int(height * width * (cfg.spatial_scale[0] + u2 * (cfg.spatial_scale[1] - cfg.spatial_scale[0])))
    ar = cfg.aspect_ratio[0] + u3 * (cfg.aspect_ratio[1] - cfg.aspect_ratio[0])
    h = min(height, int(round(math.sqrt(keep * ar))))
    w = min(width, int(round(math.sqrt(keep / ar))))
    return t, h, w, keep


# (grid side, spatial scale, keep, {aspect ratio: (h, w)}) from the spec §3.2 block-size table.
SPEC_BLOCK_TABLE = [
    (14, 0.15, 29, {0.75: (5, 6), 1.0: (5, 5), 1.5: (7, 4)}),
    (14, 0.7, 137, {0.75: (10, 14), 1.0: (12, 12), 1.5: (14, 10)}),
    (16, 0.15, 38, {0.75: (5, 7), 1.0: (6, 6), 1.5: (8, 5)}),
    (16, 0.7, 179, {0.75: (12, 15), 1.0: (13, 13), 1.5: (16, 11)}),
    (24, 0.15, 86, {0.75: (8, 11), 1.0: (9, 9), 1.5: (11, 8)}),
    (24, 0.7, 403, {0.75: (17, 23), 1.0: (20, 20), 1.5: (24, 16)}),
]


@pytest.mark.parametrize("side,scale,keep,sizes", SPEC_BLOCK_TABLE)
def test_block_size_matches_spec_table(side, scale, keep, sizes):
    grid = (8, side, side)
    for ar, (h, w) in sizes.items():
        cfg = MaskCfg(spatial_scale=[scale, scale], aspect_ratio=[ar, ar])
        for step in (0, 7):
            assert block_size(step, cfg, grid) == (8, h, w)
            assert reference_block_size(step, cfg, grid)[3] == keep


@pytest.mark.parametrize("grid", [VITL_GRID, (8, 16, 16), (8, 24, 24)])
def test_block_size_matches_reference_formula(grid):
    configs = [short_range(), long_range(), MaskCfg(temporal_scale=[0.3, 1.0], spatial_scale=[0.1, 0.9])]
    seen = set()
    for step in range(50):
        for cfg in configs:
            t, h, w, _ = reference_block_size(step, cfg, grid)
            assert block_size(step, cfg, grid) == (t, h, w)
            seen.add((t, h, w))
    assert len(seen) > 10  # the draws really vary with the step


def test_single_block_target_has_block_size_volume():
    cfg = MaskCfg(num_blocks=1, temporal_scale=[0.4, 0.9])
    for step in range(10):
        t, h, w = block_size(step, cfg, VITL_GRID)
        masks = sample_masks([cfg], VITL_GRID, 6, step=step, seed=3, first_sample_index=0)
        assert set(masks.target_seqlens) == {t * h * w}
        # The target is one contiguous box: its extent along each axis equals the block size.
        for b, tgt in enumerate(split(masks.target_index, masks.target_seqlens)):
            tt, hh, ww = np.unravel_index(tgt - b * masks.num_tokens, VITL_GRID)
            assert (np.ptp(tt) + 1, np.ptp(hh) + 1, np.ptp(ww) + 1) == (t, h, w)


def test_structure_and_packing():
    gens = [short_range(), long_range()]
    batch = 5
    masks = sample_masks(gens, VITL_GRID, batch, step=4, seed=11, first_sample_index=100)
    n = 8 * 14 * 14
    assert isinstance(masks, MaskSet)
    assert (masks.num_generators, masks.batch_size, masks.num_tokens) == (2, batch, n)
    assert masks.context_index.dtype == torch.int64 and masks.target_index.dtype == torch.int64
    assert len(masks.context_seqlens) == len(masks.target_seqlens) == 2 * batch
    ctx = split(masks.context_index, masks.context_seqlens)
    tgt = split(masks.target_index, masks.target_seqlens)
    for s in range(2 * batch):
        b = s % batch  # generator-major: s = g*B + b
        for ids in (ctx[s], tgt[s]):
            assert np.all(np.diff(ids) > 0)
            assert ids.min() >= b * n and ids.max() < (b + 1) * n
        assert len(np.intersect1d(ctx[s], tgt[s])) == 0
        np.testing.assert_array_equal(np.union1d(ctx[s], tgt[s]), np.arange(b * n, (b + 1) * n))
        assert len(ctx[s]) > 0
    # Generator 1 (long-range, 2 big blocks) leaves far less context than generator 0.
    assert sum(masks.context_seqlens[batch:]) < sum(masks.context_seqlens[:batch])


def test_monte_carlo_lengths_without_truncation():
    gens = [short_range(), long_range()]
    means = np.zeros(2)
    steps = 60
    for step in range(steps):
        m = sample_masks(gens, VITL_GRID, 24, step=step, seed=0, first_sample_index=24 * step)
        lens = np.array(m.context_seqlens).reshape(2, 24)
        np.testing.assert_array_equal(lens + np.array(m.target_seqlens).reshape(2, 24), 8 * 14 * 14)
        means += lens.mean(axis=1) / steps
    assert means[0] == pytest.approx(587, rel=0.05)
    assert means[1] == pytest.approx(296, rel=0.05)


def test_monte_carlo_lengths_with_batch_min_truncation():
    gens_full = [short_range(), long_range()]
    gens_trunc = [short_range(truncate_to_batch_min=True), long_range(truncate_to_batch_min=True)]
    ctx_means, tgt_means = np.zeros(2), np.zeros(2)
    steps = 60
    for step in range(steps):
        kw = dict(step=step, seed=0, first_sample_index=24 * step)
        full = sample_masks(gens_full, VITL_GRID, 24, **kw)
        trunc = sample_masks(gens_trunc, VITL_GRID, 24, **kw)
        for g in range(2):
            sl = slice(g * 24, (g + 1) * 24)
            ctx_lens = set(trunc.context_seqlens[sl])
            tgt_lens = set(trunc.target_seqlens[sl])
            assert len(ctx_lens) == 1 and len(tgt_lens) == 1  # all sequences of a generator equal length
            assert ctx_lens.pop() == min(full.context_seqlens[sl])
            assert tgt_lens.pop() == min(full.target_seqlens[sl])
            ctx_means[g] += trunc.context_seqlens[g * 24] / steps
            tgt_means[g] += trunc.target_seqlens[g * 24] / steps
        # Truncation keeps the lowest ids of the untruncated sets.
        for key in ("context", "target"):
            f = split(getattr(full, f"{key}_index"), getattr(full, f"{key}_seqlens"))
            t = split(getattr(trunc, f"{key}_index"), getattr(trunc, f"{key}_seqlens"))
            for fs, ts in zip(f, t):
                np.testing.assert_array_equal(ts, fs[: len(ts)])
    assert ctx_means[0] == pytest.approx(367, rel=0.15)
    assert ctx_means[1] == pytest.approx(102, rel=0.15)
    assert tgt_means[0] == pytest.approx(750, rel=0.15)
    assert tgt_means[1] == pytest.approx(1100, rel=0.15)


def test_max_keep_caps_context_without_truncation():
    kw = dict(step=2, seed=5, first_sample_index=0)
    full = sample_masks([short_range()], VITL_GRID, 8, **kw)
    capped = sample_masks([short_range(max_keep=500)], VITL_GRID, 8, **kw)
    assert max(full.context_seqlens) > 500  # otherwise the cap would not be exercised
    assert capped.context_seqlens == tuple(min(n, 500) for n in full.context_seqlens)
    full_ctx = split(full.context_index, full.context_seqlens)
    for fs, cs in zip(full_ctx, split(capped.context_index, capped.context_seqlens)):
        np.testing.assert_array_equal(cs, fs[: len(cs)])
    assert capped.target_seqlens == full.target_seqlens
    torch.testing.assert_close(capped.target_index, full.target_index)


def test_max_keep_with_truncation_applies_after_batch_min():
    cfg = long_range(truncate_to_batch_min=True, max_keep=40)
    m = sample_masks([cfg], VITL_GRID, 8, step=1, seed=0, first_sample_index=0)
    assert set(m.context_seqlens) == {40}


def test_determinism_and_batch_split_invariance():
    gens = [short_range(), long_range()]
    a = sample_masks(gens, VITL_GRID, 8, step=9, seed=42, first_sample_index=0)
    b = sample_masks(gens, VITL_GRID, 8, step=9, seed=42, first_sample_index=0)
    torch.testing.assert_close(a.context_index, b.context_index)
    torch.testing.assert_close(a.target_index, b.target_index)
    assert a == dataclasses.replace(b, context_index=a.context_index, target_index=a.target_index)

    n = a.num_tokens
    halves = [sample_masks(gens, VITL_GRID, 4, step=9, seed=42, first_sample_index=first) for first in (0, 4)]
    for key in ("context", "target"):
        whole = split(getattr(a, f"{key}_index"), getattr(a, f"{key}_seqlens"))
        for g in range(2):
            for b in range(8):
                half = halves[b // 4]
                part = split(getattr(half, f"{key}_index"), getattr(half, f"{key}_seqlens"))[g * 4 + b % 4]
                np.testing.assert_array_equal(whole[g * 8 + b] - b * n, part - (b % 4) * n)

    # Any of seed / step / sample index changes the locations.
    other_seed = sample_masks(gens, VITL_GRID, 8, step=9, seed=43, first_sample_index=0)
    other_first = sample_masks(gens, VITL_GRID, 8, step=9, seed=42, first_sample_index=8)
    for other in (other_seed, other_first):
        assert not torch.equal(a.context_index, other.context_index)


def test_causal_variant_has_no_future_context():
    grid = VITL_GRID
    gens = [short_range(max_temporal_keep=0.5), long_range(max_temporal_keep=0.5)]
    m = sample_masks(gens, grid, 6, step=3, seed=0, first_sample_index=0)
    n, spatial = m.num_tokens, grid[1] * grid[2]
    t_ctx = (m.context_index.numpy() % n) // spatial
    t_tgt = (m.target_index.numpy() % n) // spatial
    assert t_ctx.max() < grid[0] // 2
    # Every token of the future tubelets is a target.
    assert np.sum(t_tgt >= grid[0] // 2) == 2 * 6 * (grid[0] // 2) * spatial
    np.testing.assert_array_equal(np.array(m.context_seqlens) + np.array(m.target_seqlens), n)


def test_empty_context_is_resampled():
    # Four 3x3 boxes on a 4x4 grid cover it completely fairly often; those samples must be redrawn.
    cfg = MaskCfg(num_blocks=4, spatial_scale=[0.5, 0.5], aspect_ratio=[1.0, 1.0])
    grid = (2, 4, 4)
    assert block_size(0, cfg, grid) == (2, 3, 3)
    for step in range(5):
        m = sample_masks([cfg], grid, 64, step=step, seed=0, first_sample_index=0)
        assert min(m.context_seqlens) > 0


def test_full_grid_block_is_rejected():
    cfg = MaskCfg(num_blocks=1, spatial_scale=[1.0, 1.0], aspect_ratio=[1.0, 1.0])
    with pytest.raises(ValueError, match="whole grid"):
        sample_masks([cfg], VITL_GRID, 2, step=0, seed=0, first_sample_index=0)


def test_random_tube():
    grid = VITL_GRID
    cfg = MaskCfg(ratio=0.9)
    m = sample_masks([cfg, MaskCfg(ratio=0.5)], grid, 4, step=0, seed=1, first_sample_index=0, mask_type="random_tube")
    spatial = grid[1] * grid[2]
    keep = int(spatial * (1 - 0.9))
    assert m.context_seqlens[:4] == (keep * grid[0],) * 4
    assert m.context_seqlens[4:] == (int(spatial * 0.5) * grid[0],) * 4
    ctx = split(m.context_index, m.context_seqlens)
    tgt = split(m.target_index, m.target_seqlens)
    for s in range(8):
        b = s % 4
        local = ctx[s] - b * m.num_tokens
        t, pos = local // spatial, local % spatial
        per_t = [pos[t == i] for i in range(grid[0])]
        for p in per_t[1:]:
            np.testing.assert_array_equal(p, per_t[0])  # the same spatial positions at every tubelet
        assert np.all(np.diff(ctx[s]) > 0)
        np.testing.assert_array_equal(np.union1d(ctx[s], tgt[s]), np.arange(b * m.num_tokens, (b + 1) * m.num_tokens))
    # Different samples get different tubes.
    assert not np.array_equal(ctx[0] % m.num_tokens, ctx[1] % m.num_tokens)


def test_unknown_mask_type():
    with pytest.raises(ValueError, match="multiblock3d.*random_tube"):
        sample_masks([short_range()], VITL_GRID, 2, step=0, seed=0, first_sample_index=0, mask_type="tube")
