"""Tubelet embedding of only the kept tubelets (spec section 1.2).

Mathematically `Conv3d(C, D, kernel=(t, p, p), stride=kernel)` flattened to (B*N, D) and indexed at `token_index`.
Because the convolution does not overlap, each token is a Linear of its flattened (c, t, h, w) pixels, so we gather
the kept tubelets straight from the clip and run one GEMM: a context set keeps ~20-40% of the N tokens, and the
reference computes (and discards) the other 60-80% once per mask generator. `kernels.masked_tubelet_embed` does the
gather, GEMM, bias and position add in one Triton kernel on GPU (its PyTorch reference elsewhere). The weight is stored as the Conv3d's
(`patch_embed.proj.weight [D, C, t, p, p]`) so checkpoints keep the reference's keys and shapes.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels import masked_tubelet_embed


class TubeletEmbed(nn.Module):
    def __init__(self, dim: int, patch_size: int, tubelet_size: int, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size, self.tubelet_size = patch_size, tubelet_size
        kernel = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, dim, kernel_size=kernel, stride=kernel)

    def forward(self, video: torch.Tensor, token_index: torch.Tensor,
                pos_embed: torch.Tensor | None = None) -> torch.Tensor:
        """video (B, C, F, H, W), token_index (T,) int64 global ids clip*N + n, pos_embed (1, N, D) -> (T, D)."""
        return masked_tubelet_embed(video, self.proj.weight, self.proj.bias, pos_embed, token_index)
