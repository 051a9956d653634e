"""Pre-norm transformer block over packed tokens (spec section 1.4) and the reference's initialisation (1.5).

Parameter names match the reference (`norm1`, `attn.qkv`, `attn.proj`, `norm2`, `mlp.fc1`, `mlp.fc2`) so official
checkpoints map onto these modules key for key.
"""

from __future__ import annotations

import math

import torch
import torch.utils.checkpoint
from torch import nn

from .attention import packed_attention
from .packing import Packing

LN_EPS = 1e-6  # encoder / predictor LayerNorm eps (the probe uses 1e-5)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)  # rows [q | k | v], heads contiguous in each
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        total, dim = x.shape
        qkv = self.qkv(x).view(total, 3, self.num_heads, dim // self.num_heads)
        out = packed_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], packing)
        return self.proj(out.reshape(total, dim))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, as the reference
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = MLP(dim, mlp_hidden)

    def forward(self, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), packing)
        return x + self.mlp(self.norm2(x))


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, packing: Packing, checkpoint_every: int = 0) -> torch.Tensor:
    """Apply `blocks` in order. With `checkpoint_every = k > 0`, blocks 0, k, 2k, ... keep only their input for
    backward and run their forward again there (non-reentrant `torch.utils.checkpoint`, which replays the autocast
    state): the activations of a block (~10 tensors of the token count x width or MLP width) are traded for one
    more forward of it, i.e. ~4/3 of its training FLOPs (hardware work; the FLOP counter counts model work)."""
    for i, block in enumerate(blocks):
        if checkpoint_every and torch.is_grad_enabled() and i % checkpoint_every == 0:
            x = torch.utils.checkpoint.checkpoint(block, x, packing, use_reentrant=False)
        else:
            x = block(x, packing)
    return x


@torch.no_grad()
def init_weights(module: nn.Module, blocks: nn.ModuleList, rescale_by_depth: bool) -> None:
    """Trunc-normal(0.02) Linear/Conv weights, zero biases, unit LayerNorms.

    The V1 recipe re-initialises every Linear and LayerNorm after construction, which erases the constructor's depth
    rescaling (spec quirk 1), so V1 trains *without* it: `rescale_by_depth=False`. V2 keeps it: block i (1-based)
    divides attn.proj and mlp.fc2 by sqrt(2 i).
    """
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv3d)):
            nn.init.trunc_normal_(m.weight, std=0.02)  # absolute bounds +-2: effectively untruncated, as the reference
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if rescale_by_depth:
        for i, blk in enumerate(blocks, start=1):
            blk.attn.proj.weight.div_(math.sqrt(2.0 * i))
            blk.mlp.fc2.weight.div_(math.sqrt(2.0 * i))
