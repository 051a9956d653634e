"""Fixed 3-D sin-cos position table (spec section 1.3).

Per axis a 1-D table of `d` columns: all sines first, then all cosines, frequencies 10000^(-k/(d/2)). The 3-D
embedding concatenates [temporal | height | width] and keeps the first D columns. `uniform_power=True` (every V1
recipe) gives each axis 2*ceil(D/6) columns, so e.g. D=1024 computes 3 x 342 = 1026 and drops the last 2.
Computed in float64 and stored in float32, as the reference.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """(len(positions), dim) table: [sin(p w_0) .. sin(p w_{d/2-1}), cos(p w_0) .. cos(p w_{d/2-1})]."""
    if dim % 2:
        raise ValueError(f"a sin-cos axis needs an even width, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_3d(dim: int, grid: tuple[int, int, int], uniform_power: bool = True) -> torch.Tensor:
    """(T'*H'*W', dim) float32 table in the global token order n = t*(H'*W') + h*W' + w."""
    t_len, h_len, w_len = grid
    if uniform_power:
        d_t = d_h = d_w = 2 * math.ceil(dim / 6)
    else:
        d_t, d_h, d_w = dim // 2, dim // 4, dim // 4
    t, h, w = np.meshgrid(np.arange(t_len), np.arange(h_len), np.arange(w_len), indexing="ij")
    table = np.concatenate(
        [sincos_1d(d_t, t.ravel()), sincos_1d(d_h, h.ravel()), sincos_1d(d_w, w.ravel())], axis=1
    )[:, :dim]
    if table.shape[1] != dim:
        raise ValueError(f"sin-cos split {d_t}+{d_h}+{d_w} cannot cover width {dim}")
    return torch.from_numpy(table).float()
