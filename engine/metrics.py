"""Training metrics: collapse diagnostics and the run folder's metrics.csv.

A falling L1 loss is also what representation collapse looks like (constant targets are easy to predict), so the
log carries the spread of target and predicted features and the effective rank of a batch of target features.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

import torch


@torch.no_grad()
def effective_rank(x: torch.Tensor, max_rows: int = 2048) -> float:
    """exp(entropy of the normalised singular values) of centred rows (RankMe): 1 for collapse, up to min(rows, D)."""
    x = x.float()[:max_rows]
    x = x - x.mean(0, keepdim=True)
    s = torch.linalg.svdvals(x)
    p = s / s.sum().clamp_min(1e-12)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return float(torch.exp(entropy))


@torch.no_grad()
def collapse_diagnostics(target_features: torch.Tensor, predictions: torch.Tensor) -> dict[str, float]:
    """target_features (B, N, D) target encoder output; predictions (Tt, D)."""
    h = target_features.float()
    per_clip = h.mean(1)
    return {
        "target_std_tokens": float(h.flatten(0, 1).std(0).mean()),  # spread across all tokens, mean over dims
        "target_std_clips": float(per_clip.std(0).mean()) if h.shape[0] > 1 else math.nan,  # across clips
        "pred_std": float(predictions.float().std(0).mean()),
        "target_rank": effective_rank(h.flatten(0, 1)),
    }


class MetricsCSV:
    """Appends one row per logging step to `metrics.csv`; the header is fixed by the first row."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.columns: list[str] | None = None
        if self.path.is_file():  # a resumed run appends under the existing header
            with self.path.open() as f:
                self.columns = next(csv.reader(f), None)

    def drop_after(self, step: int) -> None:
        """Remove the rows of steps after `step` (atomically: temporary file, then rename)."""
        if self.columns is None:
            return
        with self.path.open(newline="") as f:
            rows = [row for row in csv.DictReader(f) if int(row["step"]) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)

    def write(self, row: dict[str, Any]) -> None:
        new = self.columns is None
        if new:
            self.columns = list(row)
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
