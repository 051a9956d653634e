"""Tubelet embedding of only the kept tubelets (spec section 1.2).

Mathematically `Conv3d(C, D, kernel=(t, p, p), stride=kernel)` flattened to (B*N, D) and indexed at `token_index`.
Because the convolution does not overlap, each token is a Linear of its flattened (c, t, h, w) pixels, so we gather
the kept tubelets straight from the clip and run one GEMM: a context set keeps ~20-40% of the N tokens, and the
reference computes (and discards) the other 60-80% once per mask generator. The weight is stored as the Conv3d's
(`patch_embed.proj.weight [D, C, t, p, p]`) so checkpoints keep the reference's keys and shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TubeletEmbed(nn.Module):
    def __init__(self, dim: int, patch_size: int, tubelet_size: int, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size, self.tubelet_size = patch_size, tubelet_size
        kernel = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, dim, kernel_size=kernel, stride=kernel)

    def forward(self, video: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
        """video (B, C, F, H, W), token_index (T,) int64 global ids clip*N + n -> (T, D)."""
        b, c, f, h, w = video.shape
        t, p = self.tubelet_size, self.patch_size
        gt, gh, gw = f // t, h // p, w // p
        n = token_index % (gt * gh * gw)
        clip, ti, hi, wi = token_index // (gt * gh * gw), n // (gh * gw), (n // gw) % gh, n % gw
        # (B, C, T', t, H', p, W', p) -> (B, T', H', W', C, t, p, p): a view; advanced indexing copies kept rows only
        tubelets = video.view(b, c, gt, t, gh, p, gw, p).permute(0, 2, 4, 6, 1, 3, 5, 7)[clip, ti, hi, wi]
        weight = self.proj.weight
        return F.linear(tubelets.reshape(token_index.numel(), -1), weight.view(weight.shape[0], -1), self.proj.bias)
