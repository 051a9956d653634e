"""Narrow predictor over packed token sets (spec section 2).

For each (generator g, clip b) the predictor sequence is that clip's context tokens (projected to the predictor
width, plus positions) followed by one mask token per target position (mask token g, plus positions); without
truncation that is exactly N tokens. All M*B sequences of a step go through the blocks in one call. Only target rows
are normalised and projected back (the reference normalises every row and then drops the context ones; LayerNorm
is per row, so the result is the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .blocks import LN_EPS, Block, init_weights, run_blocks
from .packing import Packing
from .pos_embed import sincos_3d


@dataclass(frozen=True)
class PredictorLayout:
    """Where each row of the predictor's packed input comes from; built on the host by the loader."""

    order: torch.Tensor  # (Tc+Tt,) int64: packed input = cat([context rows, target rows])[order]
    target_rows: torch.Tensor  # (Tt,) int64: rows of the packed input holding targets, in target-set order
    target_counts: tuple[int, ...]  # target rows of each generator (host ints): they come generator by generator
    packing: Packing  # sequence s = g*B + b of length context_s + target_s

    @classmethod
    def build(cls, context_seqlens: Sequence[int], target_seqlens: Sequence[int], batch_size: int) -> PredictorLayout:
        ctx, tgt = np.asarray(context_seqlens, np.int64), np.asarray(target_seqlens, np.int64)
        if ctx.shape != tgt.shape or ctx.size % batch_size:
            raise ValueError("context and target sets need one sequence each per (generator, clip)")
        ctx_start = np.concatenate([[0], np.cumsum(ctx)[:-1]])
        tgt_start = np.concatenate([[0], np.cumsum(tgt)[:-1]])
        seq_start = ctx_start + tgt_start  # start of sequence s in the packed predictor input
        total_ctx = int(ctx.sum())
        order = np.concatenate([
            part for s in range(ctx.size)
            for part in (np.arange(ctx_start[s], ctx_start[s] + ctx[s]),
                         total_ctx + np.arange(tgt_start[s], tgt_start[s] + tgt[s]))
        ])
        target_rows = np.concatenate([seq_start[s] + ctx[s] + np.arange(tgt[s]) for s in range(ctx.size)])
        counts = tuple(int(n) for n in tgt.reshape(-1, batch_size).sum(1))  # sequence s = g * B + b
        return cls(torch.from_numpy(order), torch.from_numpy(target_rows), counts,
                   Packing.from_seqlens((ctx + tgt).tolist()))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PredictorLayout:
        return PredictorLayout(self.order.to(device, non_blocking=non_blocking),
                               self.target_rows.to(device, non_blocking=non_blocking), self.target_counts,
                               self.packing.to(device, non_blocking))

    def pin_memory(self) -> PredictorLayout:
        return PredictorLayout(self.order.pin_memory(), self.target_rows.pin_memory(), self.target_counts,
                               self.packing.pin_memory())


class Predictor(nn.Module):
    def __init__(self, embed_dim: int, grid: tuple[int, int, int], *, pred_dim: int = 384, depth: int = 12,
                 num_heads: int = 16, mlp_ratio: float = 4.0, num_mask_tokens: int = 2, uniform_power: bool = True,
                 zero_init_mask_tokens: bool = True, rescale_init_by_depth: bool = False) -> None:
        super().__init__()
        self.grid = grid
        self.num_tokens = grid[0] * grid[1] * grid[2]
        self.pred_dim, self.num_heads = pred_dim, num_heads
        self.predictor_embed = nn.Linear(embed_dim, pred_dim)
        self.mask_tokens = nn.ParameterList(nn.Parameter(torch.zeros(1, 1, pred_dim)) for _ in range(num_mask_tokens))
        self.predictor_pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, pred_dim), requires_grad=False)
        self.predictor_blocks = nn.ModuleList(Block(pred_dim, num_heads, int(pred_dim * mlp_ratio)) for _ in range(depth))
        self.predictor_norm = nn.LayerNorm(pred_dim, eps=LN_EPS)
        self.predictor_proj = nn.Linear(pred_dim, embed_dim)
        self.checkpoint_every = 0  # activation checkpointing, see blocks.run_blocks (set by engine.build)
        init_weights(self, self.predictor_blocks, rescale_init_by_depth)
        with torch.no_grad():
            self.predictor_pos_embed.copy_(sincos_3d(pred_dim, grid, uniform_power)[None])
            if not zero_init_mask_tokens:
                for token in self.mask_tokens:
                    nn.init.trunc_normal_(token, std=0.02)

    def forward(self, z: torch.Tensor, context_index: torch.Tensor, target_index: torch.Tensor,
                layout: PredictorLayout) -> torch.Tensor:
        """z (Tc, D) context features; global ids of context and target rows -> predictions (Tt, D)."""
        pos = self.predictor_pos_embed[0]
        x = self.predictor_embed(z)
        x = (x + pos.index_select(0, context_index % self.num_tokens)).to(x.dtype)  # in-place add in the reference
        # each generator's mask token added to its target rows' positions by broadcasting: the token's gradient is
        # then a sum over its rows in a fixed order, where a gather's backward (index_add: atomic adds on CUDA) would
        # add tens of thousands of rows into each token in any order, a different result every run
        pos_t = pos.index_select(0, target_index % self.num_tokens)
        t = torch.cat([rows + token.view(1, -1) for rows, token in
                       zip(pos_t.split(list(layout.target_counts)), self.mask_tokens)])
        # cat type-promotes (bf16 context, fp32 mask tokens under autocast): the residual stream is fp32, as the ref
        x = torch.cat([x, t]).index_select(0, layout.order)
        x = run_blocks(self.predictor_blocks, x, layout.packing, self.checkpoint_every)
        return self.predictor_proj(self.predictor_norm(x.index_select(0, layout.target_rows)))
