"""V1's attentive probe (spec 6.1), with V1's state-dict names so released probe files (spec 8.2) load and ours load
into V1's code: `pooler.query_tokens`, `pooler.cross_attention_block.{norm1, xattn.q, xattn.kv, xattn.proj, norm2,
mlp.fc1, mlp.fc2}`, `linear`.

One learned query cross-attends to the layer-normed encoder tokens (the query itself is not normalised), then an MLP
on the query, then a linear head. V1 defines `xattn.proj` but never applies it (spec 10 #9): kept, unused, so the
weights round-trip; the optimizer still holds it, as V1's does (its gradient is always None).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.checkpoint import CheckpointWriteError
from engine.durable import fsync_dir
from models.pretrained import read_file

PROBE_LN_EPS = 1e-5  # nn.LayerNorm's default, which V1's probe uses (the encoder uses 1e-6)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)  # V1: defined, never applied

    def forward(self, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        b, n, d = q.shape
        h = self.num_heads
        q = self.q(q).view(b, n, h, d // h).transpose(1, 2)
        k, v = self.kv(x).view(b, x.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CrossAttentionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=PROBE_LN_EPS)
        self.xattn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=PROBE_LN_EPS)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q = q + self.xattn(q, self.norm1(x))
        return q + self.mlp(self.norm2(q))


class AttentivePooler(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.query_tokens = nn.Parameter(torch.zeros(1, 1, dim))
        self.cross_attention_block = CrossAttentionBlock(dim, num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cross_attention_block(self.query_tokens.expand(x.shape[0], -1, -1), x)


class AttentiveProbe(nn.Module):
    """(B, T, D) frozen encoder tokens -> (B, num_classes) logits."""

    def __init__(self, dim: int, num_heads: int, num_classes: int) -> None:
        super().__init__()
        self.pooler = AttentivePooler(dim, num_heads)
        self.linear = nn.Linear(dim, num_classes)  # PyTorch's default init, as V1 (its init covers the pooler only)
        self._init_pooler()

    def _init_pooler(self) -> None:
        """V1: trunc-normal(0.02) Linears and query, zero biases, unit LayerNorms, then the residual branches' output
        weights (xattn.proj, mlp.fc2) divided by sqrt(2 * layer_id), layer_id 1."""
        nn.init.trunc_normal_(self.pooler.query_tokens, std=0.02)
        for m in self.pooler.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        block = self.pooler.cross_attention_block
        with torch.no_grad():
            block.xattn.proj.weight.div_(math.sqrt(2.0))
            block.mlp.fc2.weight.div_(math.sqrt(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.pooler(x).squeeze(1))


def save_probe(path: str | Path, probe: AttentiveProbe, **extra: Any) -> Path:
    """V1's probe file (spec 8.2): `classifier` keys under DDP's `module.`, plus `extra` (opt, epoch, ...);
    written under a temporary name, flushed to the disk and renamed (engine/durable.py: a node crash leaves the old
    file or the new one)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"classifier": {f"module.{k}": v for k, v in probe.state_dict().items()}, **extra}, f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # a full disk, a quota, a lost mount: the part written goes, the last file stays
        tmp.unlink(missing_ok=True)
        kept = f"the last one, {path}, is intact" if path.is_file() else "none was written yet"
        raise CheckpointWriteError(f"writing the probe file {path} failed ({e.strerror or e}); {kept}. Free space "
                                   f"in {path.parent.resolve()} and rerun the same command to continue.") from e
    tmp.replace(path)
    fsync_dir(path.parent)
    return path


def load_probe_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A V1 probe file's classifier weights without the `module.` prefix (load them with `load_state_dict`, strict)."""
    state = read_file(path, weights_only=True)
    if "classifier" not in state:
        raise ValueError(f"{path}: not a V1 probe file (top-level keys {list(state)}; expected 'classifier')")
    return {k.removeprefix("module."): v for k, v in state["classifier"].items()}
