"""Video ViT encoder over packed token sets (spec section 1).

`forward(video, token_index, packing)` embeds only the tubelets in `token_index` (every sequence of a step, of any
lengths, all mask generators together) and runs the blocks once over the packed set: one call where the reference
runs one encoder pass per mask generator over sets truncated to the batch minimum. `forward(video)` (or
`forward_dense`) is the all-token case (target encoder, evaluation), (B, N, D).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .blocks import LN_EPS, Block, init_weights, run_blocks
from .packing import Packing
from .patch_embed import TubeletEmbed
from .pos_embed import sincos_3d


@dataclass(frozen=True)
class Variant:
    dim: int
    depth: int
    heads: int
    mlp_ratio: float = 4.0

    @property
    def mlp_hidden(self) -> int:
        return int(self.dim * self.mlp_ratio)  # the reference's int(D * ratio): 1408 * 48/11 = 6144


# the reference's constructors (spec 1.1); a dict of flavours, no registry
VARIANTS: dict[str, Variant] = {
    "vit_tiny": Variant(192, 12, 3),
    "vit_small": Variant(384, 12, 6),
    "vit_base": Variant(768, 12, 12),
    "vit_large": Variant(1024, 24, 16),
    "vit_huge": Variant(1280, 32, 16),
    "vit_giant": Variant(1408, 40, 16, 48 / 11),
}


class VisionTransformer(nn.Module):
    def __init__(self, variant: Variant, *, img_size: int = 224, num_frames: int = 16, patch_size: int = 16,
                 tubelet_size: int = 2, uniform_power: bool = True, rescale_init_by_depth: bool = False) -> None:
        super().__init__()
        self.variant = variant
        self.grid = (num_frames // tubelet_size, img_size // patch_size, img_size // patch_size)
        self.num_tokens = self.grid[0] * self.grid[1] * self.grid[2]
        self.embed_dim, self.num_heads = variant.dim, variant.heads
        self.patch_embed = TubeletEmbed(variant.dim, patch_size, tubelet_size)
        # a frozen Parameter, not a buffer, so the state dict has the reference's `pos_embed [1, N, D]`
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, variant.dim), requires_grad=False)
        self.blocks = nn.ModuleList(Block(variant.dim, variant.heads, variant.mlp_hidden) for _ in range(variant.depth))
        self.norm = nn.LayerNorm(variant.dim, eps=LN_EPS)
        self.checkpoint_every = 0  # activation checkpointing, see blocks.run_blocks (set by engine.build)
        init_weights(self, self.blocks, rescale_init_by_depth)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_3d(variant.dim, self.grid, uniform_power)[None])

    def forward(self, video: torch.Tensor, token_index: torch.Tensor | None = None,
                packing: Packing | None = None) -> torch.Tensor:
        """video (B, C, F, H, W); token_index (T,) int64 ids clip*N + n, grouped by `packing` -> (T, D). Without
        them, all N tokens of every clip -> (B, N, D)."""
        if token_index is None:
            b = video.shape[0]
            index = torch.arange(b * self.num_tokens, device=video.device)
            return self(video, index, Packing.uniform(b, self.num_tokens, video.device)).view(b, self.num_tokens, -1)
        x = self.patch_embed(video, token_index, self.pos_embed)  # embedding + position rows, in the compute dtype
        x = run_blocks(self.blocks, x, packing, self.checkpoint_every)
        return self.norm(x)

    def forward_dense(self, video: torch.Tensor) -> torch.Tensor:
        """All N tokens of every clip: (B, C, F, H, W) -> (B, N, D). Through the module call, so that hooks (ZeRO-3's
        parameter gathering) see it."""
        return self(video)
