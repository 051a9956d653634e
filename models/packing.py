"""Packed variable-length token sets: every sequence of a step laid end to end.

A packed set is `x (T, D)` plus a `Packing`: sequence s owns rows `cu_seqlens[s]:cu_seqlens[s+1]`. The sequence
lengths also live on the host (`seqlens`), because they are known there when the loader builds the masks: code that
needs them (splitting, "are all lengths equal?") never has to read `cu_seqlens` back from the GPU, i.e. no host sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import torch


def host_to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor built during the step (lengths, index orders) on `device` without stalling the host. A blocking
    copy to a GPU waits for everything queued before it (the previous step's backward, optimizer and EMA) before the
    host may launch anything more; from pinned memory the copy is queued like a kernel, and PyTorch's caching host
    allocator keeps the pinned block until the copy has run."""
    device = torch.device(device)
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


@dataclass(frozen=True)
class Packing:
    seqlens: tuple[int, ...]  # host copy of the lengths
    cu_seqlens: torch.Tensor  # (S+1,) int32, cumulative lengths starting at 0
    max_seqlen: int  # longest sequence: the launch bound of varlen kernels

    @classmethod
    def from_seqlens(cls, seqlens: Sequence[int], device: torch.device | str | None = None) -> Packing:
        lens = tuple(int(n) for n in seqlens)
        if not lens or min(lens) < 1:
            raise ValueError(f"a packing needs at least one sequence and no empty one, got lengths {lens[:8]}...")
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int64), 0)
        return cls(lens, host_to_device(cu, device) if device is not None else cu, max(lens))

    @classmethod
    def uniform(cls, num_seqs: int, seqlen: int, device: torch.device | str | None = None) -> Packing:
        return cls.from_seqlens([seqlen] * num_seqs, device)

    @property
    def num_seqs(self) -> int:
        return len(self.seqlens)

    @property
    def total(self) -> int:
        """Rows of the packed tensor."""
        return sum(self.seqlens)

    @property
    def is_uniform(self) -> bool:
        """All sequences equal: attention can run as one dense batched call."""
        return all(n == self.max_seqlen for n in self.seqlens)

    @cached_property
    def length_groups(self) -> tuple[tuple[tuple[int, int], ...], torch.Tensor, torch.Tensor]:
        """Sequences grouped by length, for batching equal-length ones: ((length, count), ...), order, inverse.

        `x.index_select(0, order)` lays the groups end to end; `.index_select(0, inverse)` restores packing order.
        Computed once per packing on the device of `cu_seqlens`: every layer of the step shares the packing, so the
        index tensors cross to the GPU once per step, not twice per layer.
        """
        starts = [0]
        for n in self.seqlens[:-1]:
            starts.append(starts[-1] + n)
        by_len: dict[int, list[int]] = {}
        for s, n in enumerate(self.seqlens):
            by_len.setdefault(n, []).append(s)
        order = torch.cat([torch.arange(starts[s], starts[s] + n) for n, seqs in by_len.items() for s in seqs])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel())
        device = self.cu_seqlens.device
        return (tuple((n, len(seqs)) for n, seqs in by_len.items()), host_to_device(order, device),
                host_to_device(inverse, device))

    @cached_property
    def padded_rows(self) -> torch.Tensor:
        """(T,) int64: row of each packed token in the padded (S * max_seqlen) layout, on the device of `cu_seqlens`.

        Only the `sdpa_padded` attention backend pads (a comparison baseline); computed once per packing.
        """
        rows = torch.cat([s * self.max_seqlen + torch.arange(n) for s, n in enumerate(self.seqlens)])
        return host_to_device(rows, self.cu_seqlens.device)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Packing:
        return Packing(self.seqlens, self.cu_seqlens.to(device, non_blocking=non_blocking), self.max_seqlen)

    def pin_memory(self) -> Packing:
        return Packing(self.seqlens, self.cu_seqlens.pin_memory(), self.max_seqlen)
