"""Pre-norm transformer block over packed tokens (spec section 1.4) and the reference's initialisation (1.5).

Parameter names match the reference (`norm1`, `attn.qkv`, `attn.proj`, `norm2`, `mlp.fc1`, `mlp.fc2`) so official
checkpoints map onto these modules key for key.

Compiled blocks (`compile_blocks`, config `model.compile`): everything of a block but the attention itself is
per-token work (layer norms, projections, GELU, residuals, autocast's casts), which eager PyTorch runs as one kernel
each, every one a round trip of a (T, D) or (T, 4D) tensor through memory. `torch.compile` fuses those chains (a
residual add with the next layer norm and its bf16 cast, a bias with GELU, ...) in two functions per block, before and
after the attention, which stays on its own backend (a graph break there would split the fusion anyway). Their inputs
are the tokens and the weights, so every block of every network shares the same compiled graphs, and the token count
is marked dynamic: packed lengths that change every step run one graph, no recompilation (no length buckets needed
for per-token work). The compiled path reads the weights directly instead of calling the submodules, so it does not
run under ZeRO-3, whose per-module hooks gather the weights (engine/backends.py refuses the combination).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
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
        return self.proj(self.attend(self.qkv(x), packing))

    def attend(self, qkv: torch.Tensor, packing: Packing) -> torch.Tensor:
        """Softmax attention within each packed sequence: (T, 3D) rows [q | k | v] -> (T, D), before `proj`."""
        total, dim = qkv.shape[0], qkv.shape[1] // 3
        # unbind, not three selects: the same strided views, but the backward stacks dq, dk, dv into the (T, 3D)
        # gradient in one write, where each select's backward fills a zeroed (T, 3D) tensor and autograd then adds
        # the three (about 5x the gradient's traffic per block)
        q, k, v = qkv.view(total, 3, self.num_heads, dim // self.num_heads).unbind(1)
        return packed_attention(q, k, v, packing).reshape(total, dim)


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
        self.compiled = False  # see compile_blocks

    def forward(self, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        if self.compiled:
            return self._forward_compiled(x, packing)
        x = x + self.attn(self.norm1(x), packing)
        return x + self.mlp(self.norm2(x))

    def _forward_compiled(self, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        """The same computation as the eager forward: LN1 + qkv compiled, the attention on its backend, then proj +
        residual + LN2 + MLP + residual compiled."""
        n1, n2, attn, mlp = self.norm1, self.norm2, self.attn, self.mlp
        torch._dynamo.maybe_mark_dynamic(x, 0)  # the packed token count
        qkv = _compiled(_norm_qkv)(x, n1.weight, n1.bias, n1.eps, attn.qkv.weight, attn.qkv.bias)
        out = attn.attend(qkv, packing)
        torch._dynamo.maybe_mark_dynamic(out, 0)
        return _compiled(_proj_mlp)(x, out, attn.proj.weight, attn.proj.bias, n2.weight, n2.bias, n2.eps,
                                    mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)


def _norm_qkv(x: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, eps: float, qkv_w: torch.Tensor,
              qkv_b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(F.layer_norm(x, x.shape[-1:], ln_w, ln_b, eps), qkv_w, qkv_b)


def _proj_mlp(x: torch.Tensor, attn: torch.Tensor, proj_w: torch.Tensor, proj_b: torch.Tensor, ln_w: torch.Tensor,
              ln_b: torch.Tensor, eps: float, fc1_w: torch.Tensor, fc1_b: torch.Tensor, fc2_w: torch.Tensor,
              fc2_b: torch.Tensor) -> torch.Tensor:
    x = x + F.linear(attn, proj_w, proj_b)
    hidden = F.gelu(F.linear(F.layer_norm(x, x.shape[-1:], ln_w, ln_b, eps), fc1_w, fc1_b))  # exact (erf) GELU
    return x + F.linear(hidden, fc2_w, fc2_b)


_COMPILED: dict[Callable[..., torch.Tensor], Callable[..., torch.Tensor]] = {}


def _compiled(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`torch.compile(fn)`, made on first use and shared by every block of every network in the process."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn)
    return _COMPILED[fn]


def compile_blocks(module: nn.Module) -> None:
    """Run every Block inside `module` through the compiled per-token functions (see the module doc). Compilation
    happens on the first forward; a deepcopy (the EMA target) keeps the setting."""
    for m in module.modules():
        if isinstance(m, Block):
            m.compiled = True


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
