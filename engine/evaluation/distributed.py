"""Several ranks for one evaluation (`deepspeed --num_gpus N engine/eval.py ...`, or torchrun): each rank keeps the
frozen encoder and a replica of the probe, encodes its own share of the clips and averages the probe's gradients.

Work split, chosen so that W ranks of `data.batch_size` b train the probe that one rank of W*b trains (when W
divides the number of training entries; see the padding):
* training: the epoch's permutation (the same on every rank) is padded by wrapping to a multiple of W, as
  torch's DistributedSampler does (and V1 with it), and cut into global batches of W*b entries; rank r takes the
  r-th of W equal slices of each, so a global batch is the same set of clips whatever W is, except the last, which
  repeats the epoch's first (-entries) mod W entries (a resume on ranks that would pad differently is refused:
  engine/evaluation/resume.py's fingerprint);
* gradients: each rank's loss is the mean over its slice and the slices are equal, so the mean of the ranks'
  gradients (one all-reduce of the flattened gradients) is the gradient of the global batch's mean loss; every
  rank then clips and steps identically;
* validation: rank r reads entries r, r+W, ... (no padding: every entry exactly once) and the correct and seen
  counts are summed over ranks, so top-1 is over the whole set (V1 averages per-batch accuracies over ranks);
* the feature cache: each rank encodes a 1/W share of the entries once and the shares are all-gathered, so every
  rank holds every feature whatever its later slices are.
Rank 0 alone prints and writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


GATHER_CHUNK_BYTES = 256 * 2**20  # fp32 feature rows per rank per all-gather of the feature cache


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def train_slices(self, order: list[int], batch_size: int) -> list[list[int]]:
        """This rank's entries of each global batch of the epoch's `order`."""
        w = self.world
        padded = order + order[:(-len(order)) % w]
        slices = []
        for start in range(0, len(padded), batch_size * w):
            chunk = padded[start:start + batch_size * w]  # a multiple of w long
            share = len(chunk) // w
            slices.append(chunk[self.rank * share:(self.rank + 1) * share])
        return slices

    def val_share(self, entries: list[int]) -> list[int]:
        return entries[self.rank::self.world]

    def average_gradients(self, module: torch.nn.Module) -> None:
        """Mean of every rank's gradients, in place. Parameters without a gradient (V1's unused `xattn.proj`) have
        none on any rank, so every rank flattens the same list."""
        if self.world == 1:
            return
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))

    def sum(self, *values: float) -> list[float]:
        """Element-wise sums over ranks of a few numbers (counts, loss sums)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def merge(self, mine: dict[Any, Any]) -> dict[Any, Any]:
        """The union of every rank's map of plain values (the bad entries each rank met, the labels of the entries
        it encoded), in sorted key order."""
        if self.world == 1:
            return dict(sorted(mine.items()))
        every: list[dict[Any, Any] | None] = [None] * self.world
        dist.all_gather_object(every, mine)
        return dict(sorted((k, v) for part in every for k, v in (part or {}).items()))

    def gather_features(self, mine: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Every rank's {entry: features} on the host; features share one shape. Shares differ by at most one entry,
        so they are padded to the longest for the all-gather and the padding is dropped by its entry id -1. The
        rows travel in chunks of about GATHER_CHUNK_BYTES per rank, each moved to the host as it arrives: the device
        never holds the whole cache (W shares of it), which for a large validation set exceeds a GPU."""
        if self.world == 1:
            return dict(mine)
        ids = sorted(mine)
        longest = torch.tensor([len(ids)], device=self.device)
        dist.all_reduce(longest, op=dist.ReduceOp.MAX)
        n = int(longest)
        shape = next(iter(mine.values())).shape if ids else None
        shapes = [None] * self.world
        dist.all_gather_object(shapes, shape)
        shape = next(s for s in shapes if s is not None)
        id_row = torch.full((n,), -1, dtype=torch.int64, device=self.device)
        id_row[:len(ids)] = torch.tensor(ids, dtype=torch.int64).to(self.device, non_blocking=True)
        all_ids = [torch.empty_like(id_row) for _ in range(self.world)]
        dist.all_gather(all_ids, id_row)
        all_ids = [i.tolist() for i in all_ids]
        rows = max(1, GATHER_CHUNK_BYTES // (4 * max(1, torch.Size(shape).numel())))
        out = {}
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            chunk = torch.zeros((stop - start, *shape), device=self.device)
            mine_here = [mine[entry] for entry in ids[start:stop]]
            if mine_here:
                chunk[:len(mine_here)] = torch.stack(mine_here).to(self.device, torch.float32, non_blocking=True)
            gathered = [torch.empty_like(chunk) for _ in range(self.world)]
            dist.all_gather(gathered, chunk)
            for feats, entries in zip(gathered, all_ids):
                feats = feats.cpu()
                for row, entry in enumerate(entries[start:stop]):
                    if entry >= 0:
                        out[entry] = feats[row]
        return out


def init_ranks() -> Ranks:
    """A process group when a launcher set WORLD_SIZE > 1 (deepspeed, torchrun): NCCL on GPUs, else gloo; the
    device is this process's GPU (LOCAL_RANK), or the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world == 1:
        return Ranks(0, 1, device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), device)
