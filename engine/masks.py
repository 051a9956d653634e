"""Context/target token masks for V-JEPA pretraining (spec §3).

Tokens of one clip live on a (T', H', W') grid and are numbered ``n = t*(H'*W') + h*W' + w``; a token of clip ``b``
in the batch has the global id ``b*N + n`` with ``N = T'*H'*W'``. :func:`sample_masks` draws, for every mask
generator and every clip, a sorted set of context ids (what the encoder sees) and the sorted set of target ids
(what the predictor must predict) and packs them as variable-length sequences, generator-major
(sequence ``s = g*B + b``), ready for a varlen/"packed" attention kernel.

Two mask types:

* ``"multiblock3d"`` (spec §3.2): ``num_blocks`` boxes of one shared size are placed at random; their union is the
  target, its complement the context. The box size depends only on ``step`` and is computed with the reference's
  exact torch-RNG arithmetic (:func:`block_size`), so sizes match the reference collator whose counter equals
  ``step``. With ``max_temporal_keep < 1`` this is the **causal multi-block** variant: context is restricted to
  the first ``max(1, int(T'*max_temporal_keep))`` tubelets and every later tubelet becomes target, i.e. the
  model predicts the future.
* ``"random_tube"`` (spec §3.4): ``int(H'*W'*(1-ratio))`` random spatial positions, tiled over all T', form the
  context; the rest is target. ``max_keep`` and ``truncate_to_batch_min`` are ignored (lengths are constant).

Randomness. Box locations (and the resampling when a sample's context came out empty) come from a numpy
Generator per (sample, generator) seeded with ``SeedSequence([seed, step, first_sample_index + b, g])``. A
sample's masks are thus a pure function of (seed, step, global sample index, generator index) — independent of
the batch it lands in, the world size and the data-loader worker. The reference instead uses the worker's
global torch RNG, so only the box *sizes* are reproduced bit-for-bit, not the locations.

Lengths. By default nothing is truncated: every sequence keeps its own length and context + target cover all N
tokens of a clip. Deviations, both as in the reference:

* ``max_keep`` (if not None) caps every context at ``max_keep`` tokens, keeping the lowest ids; the dropped
  tokens are then neither seen nor predicted.
* ``truncate_to_batch_min=True`` reproduces the reference's batch-minimum truncation: per generator, every
  context is cut to ``K_e = min_b len(context_b)`` (then ``min(K_e, max_keep)``) and every target to
  ``K_p = min_b len(target_b)``, keeping the lowest ids, so all sequences of a generator have equal length.

Speed: sampling a ViT-L batch (grid (8, 14, 14), B=24, the two §3.1 generators) takes about 1.1 ms without and
1.2 ms with batch-min truncation on one CPU core (``taskset -c 0``, ``torch.set_num_threads(1)``, median of 200
calls); about half of it is creating the 48 per-sample numpy Generators. random_tube takes about 0.7 ms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

MASK_TYPES = ("multiblock3d", "random_tube")


@dataclass(frozen=True)
class MaskSet:
    """One step's masks for all generators, packed generator-major: sequence ``s = g*B + b``."""

    context_index: torch.Tensor  # (Tc,) int64 global ids clip*N+n, ascending within each sequence
    context_seqlens: tuple[int, ...]  # length M*B
    target_index: torch.Tensor  # (Tt,) int64
    target_seqlens: tuple[int, ...]
    num_generators: int
    batch_size: int
    num_tokens: int  # N


def block_size(step: int, generator: Any, grid: tuple[int, int, int]) -> tuple[int, int, int]:
    """Return the (t, h, w) box size the reference multiblock3d collator uses when its counter equals ``step``.

    Three draws from a torch Generator seeded with ``step`` (temporal scale, spatial scale, aspect ratio, in that
    order) followed by the reference's int/round/min arithmetic, kept operation-for-operation so the float
    results, and hence the sizes, are bit-identical.
    """
    duration, height, width = grid
    g = torch.Generator()
    g.manual_seed(step)
    u_temporal = torch.rand(1, generator=g).item()
    u_spatial = torch.rand(1, generator=g).item()
    u_aspect = torch.rand(1, generator=g).item()

    t_min, t_max = generator.temporal_scale
    t = max(1, int(duration * (t_min + u_temporal * (t_max - t_min))))

    s_min, s_max = generator.spatial_scale
    spatial_keep = int(height * width * (s_min + u_spatial * (s_max - s_min)))

    ar_min, ar_max = generator.aspect_ratio
    aspect_ratio = ar_min + u_aspect * (ar_max - ar_min)
    h = min(int(round(math.sqrt(spatial_keep * aspect_ratio))), height)
    w = min(int(round(math.sqrt(spatial_keep / aspect_ratio))), width)
    return t, h, w


def sample_masks(
    generators: Sequence[Any],
    grid: tuple[int, int, int],
    batch_size: int,
    *,
    step: int,
    seed: int,
    first_sample_index: int,
    mask_type: str = "multiblock3d",
) -> MaskSet:
    """Sample context/target masks for every generator and every clip of a batch.

    Args:
        generators: mask generator configs (attributes ``num_blocks``, ``spatial_scale``, ``temporal_scale``,
            ``aspect_ratio``, ``max_temporal_keep``, ``max_keep``, ``truncate_to_batch_min``, ``ratio``).
        grid: token grid (T', H', W').
        batch_size: clips in the batch (B).
        step: the reference collator's counter for this batch (0 for the first); sets the box size.
        seed: run seed; together with ``step`` and the global sample index it sets the box locations.
        first_sample_index: global index of clip 0 of this batch, so that a sample's masks do not depend on how
            the global batch is split across ranks or calls.
        mask_type: ``"multiblock3d"`` or ``"random_tube"``.

    Returns:
        A :class:`MaskSet` with ``len(generators) * batch_size`` context and target sequences.
    """
    if mask_type not in MASK_TYPES:
        raise ValueError(f"unknown mask_type {mask_type!r}; accepted values: {', '.join(MASK_TYPES)}")
    if not generators:
        raise ValueError("at least one mask generator is required")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    grid = (int(grid[0]), int(grid[1]), int(grid[2]))
    num_tokens = grid[0] * grid[1] * grid[2]

    context_parts, target_parts = [], []
    context_lens, target_lens = [], []
    for gen_idx, gen in enumerate(generators):
        rngs = [
            np.random.default_rng(np.random.SeedSequence([seed, step, first_sample_index + b, gen_idx]))
            for b in range(batch_size)
        ]
        if mask_type == "multiblock3d":
            context = _multiblock_context(gen, grid, step, rngs)
            context_cap, target_cap = _length_caps(gen, context)
        else:
            context = _random_tube_context(gen, grid, rngs)
            context_cap, target_cap = num_tokens, num_tokens
        for mask, cap, parts, lens in (
            (context, context_cap, context_parts, context_lens),
            (~context, target_cap, target_parts, target_lens),
        ):
            kept = _keep_lowest(mask, cap)
            # flatnonzero over the (B, N) volume yields b*N + n directly, ascending and grouped by clip.
            parts.append(np.flatnonzero(kept))
            lens.extend(kept.sum(axis=1).tolist())

    return MaskSet(
        context_index=torch.from_numpy(np.concatenate(context_parts).astype(np.int64, copy=False)),
        context_seqlens=tuple(context_lens),
        target_index=torch.from_numpy(np.concatenate(target_parts).astype(np.int64, copy=False)),
        target_seqlens=tuple(target_lens),
        num_generators=len(generators),
        batch_size=batch_size,
        num_tokens=num_tokens,
    )


def _multiblock_context(
    gen: Any, grid: tuple[int, int, int], step: int, rngs: list[np.random.Generator]
) -> np.ndarray:
    """Return the (B, N) boolean context masks of one multiblock3d generator (True = context)."""
    duration, height, width = grid
    box = block_size(step, gen, grid)
    context_duration = max(1, int(duration * gen.max_temporal_keep))
    # A box spanning the whole grid always empties the context: the reference would resample forever.
    if box == grid:
        raise ValueError(f"mask block size {box} covers the whole grid {grid}; context would always be empty")
    # Number of possible box starts along (t, h, w), shaped to broadcast against (3, num_blocks) draws.
    num_starts = np.array([duration - box[0] + 1, height - box[1] + 1, width - box[2] + 1])[:, None]
    axes = [np.arange(n) for n in grid]

    def draw_starts(rng: np.random.Generator) -> np.ndarray:
        # Scaled uniform floats: ~10x cheaper than Generator.integers with an array bound, and this is the hot
        # loop. The minimum guards the (theoretical) float rounding of u*n up to n.
        starts = (rng.random((3, gen.num_blocks)) * num_starts).astype(np.int64)
        return np.minimum(starts, num_starts - 1)

    def context_of(starts: np.ndarray) -> np.ndarray:
        # starts: (..., 3, num_blocks). Box membership is separable per axis, so the union of boxes is an
        # any-over-blocks of three broadcast 1-D interval tests.
        inside = [
            (axes[a] >= starts[..., a, :, None]) & (axes[a] < starts[..., a, :, None] + box[a]) for a in range(3)
        ]
        covered = (
            inside[0][..., :, :, None, None] & inside[1][..., :, None, :, None] & inside[2][..., :, None, None, :]
        ).any(axis=-4)
        context = ~covered
        context[..., context_duration:, :, :] = False
        return context.reshape(*context.shape[:-3], -1)

    context = context_of(np.stack([draw_starts(rng) for rng in rngs]))
    # Rare: redraw the whole sample from its own Generator until its context is non-empty, as the reference does.
    for b in np.flatnonzero(~context.any(axis=1)):
        while not context[b].any():
            context[b] = context_of(draw_starts(rngs[b]))
    return context


def _random_tube_context(gen: Any, grid: tuple[int, int, int], rngs: list[np.random.Generator]) -> np.ndarray:
    """Return the (B, N) boolean context masks of one random_tube generator (True = context)."""
    duration, height, width = grid
    num_spatial = height * width
    keep = int(num_spatial * (1.0 - gen.ratio))
    if keep < 1:
        raise ValueError(f"random_tube ratio {gen.ratio} leaves no context token on a {height}x{width} grid")
    spatial = np.zeros((len(rngs), num_spatial), dtype=bool)
    for b, rng in enumerate(rngs):
        spatial[b, rng.permutation(num_spatial)[:keep]] = True
    return np.broadcast_to(spatial[:, None, :], (len(rngs), duration, num_spatial)).reshape(len(rngs), -1)


def _length_caps(gen: Any, context: np.ndarray) -> tuple[int, int]:
    """Return the maximum context and target lengths implied by ``max_keep`` and ``truncate_to_batch_min``."""
    num_tokens = context.shape[1]
    context_lens = context.sum(axis=1)
    if gen.truncate_to_batch_min:
        context_cap = int(context_lens.min())
        target_cap = int((num_tokens - context_lens).min())
    else:
        context_cap, target_cap = num_tokens, num_tokens
    if gen.max_keep is not None:
        context_cap = min(context_cap, int(gen.max_keep))
    return context_cap, target_cap


def _keep_lowest(mask: np.ndarray, cap: int) -> np.ndarray:
    """Keep, per row of a (B, N) boolean mask, only its ``cap`` lowest set positions."""
    if cap >= mask.shape[1]:
        return mask
    return mask & (np.cumsum(mask, axis=1) <= cap)
