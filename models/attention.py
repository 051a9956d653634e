"""The one attention call of encoder, target encoder and predictor: softmax(q k^T / sqrt(Dh)) v per sequence.

Plain PyTorch for now (the kernel issues put a varlen flash kernel and the other backends behind this same call).
Equal lengths, the common case (target encoder, predictor, evaluation), are one dense batched SDPA call; ragged
sets (the context encoder) are regrouped by length, one batched SDPA call per distinct length: never padded, never
truncated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .packing import Packing


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_seqs: int, seqlen: int) -> torch.Tensor:
    total, heads, head_dim = q.shape
    # (T, H, Dh) -> (S, H, L, Dh): splitting the row axis is a view even on strided q/k/v
    q, k, v = (t.view(num_seqs, seqlen, heads, head_dim).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(total, heads, head_dim)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing) -> torch.Tensor:
    """q, k, v: (T, H, Dh), possibly strided views of a qkv projection. Returns (T, H, Dh) contiguous."""
    if packing.is_uniform:
        return _dense(q, k, v, packing.num_seqs, packing.max_seqlen)
    groups, order, inverse = packing.length_groups
    order, inverse = order.to(q.device, non_blocking=True), inverse.to(q.device, non_blocking=True)
    q, k, v = (t.index_select(0, order) for t in (q, k, v))
    outs, row = [], 0
    for seqlen, count in groups:
        rows = slice(row, row + seqlen * count)
        outs.append(_dense(q[rows], k[rows], v[rows], count, seqlen))
        row += seqlen * count
    return torch.cat(outs).index_select(0, inverse)
