"""What ZeRO stage 3 changes for V-JEPA: the EMA target partitioned like the encoder and updated shard by shard, the
parameter accesses DeepSpeed's gathering hooks cannot see, and the local gradient partitions for clipping.

Under stage 3 each rank holds 1/W of every parameter (`p.ds_tensor`, flat; `p.data` is empty outside the modules'
forward and backward, where DeepSpeed's hooks gather it). The target encoder is put inside the DeepSpeed module, so it
is partitioned exactly like the context encoder (a parameter's partition depends only on its size and W) and its
forward gathers block by block as the encoder's does: the EMA is then an element-wise update of local partitions,
with no communication, and never materialises a whole copy of either network.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from kernels import ema_


def register_hidden_parameters(encoders: list[nn.Module], predictor: nn.Module) -> None:
    """DeepSpeed gathers a module's own parameters when that module is called. Two reads bypass a call: the tubelet
    embedding reads its Conv3d's weight and bias without calling the Conv3d (a gather + GEMM, models/patch_embed.py),
    and the predictor reads its mask tokens from a ParameterList; both are registered as parameters the reading
    module uses, so they are gathered with it."""
    from deepspeed.runtime.zero import register_external_parameter

    for encoder in encoders:
        embed = encoder.patch_embed
        for p in embed.proj.parameters():
            register_external_parameter(embed, p)
    for token in predictor.mask_tokens:
        register_external_parameter(predictor, token)


def gathered(params: list[nn.Parameter]) -> contextlib.AbstractContextManager:
    """The parameters whole on every rank inside the block (all-gathered, partitioned again on exit)."""
    from deepspeed.runtime.zero import GatheredParameters

    return GatheredParameters(params)


def local_shards(module: nn.Module) -> list[torch.Tensor]:
    """This rank's partition of every parameter, in `parameters()` order."""
    return [p.ds_tensor for p in module.parameters()]


def ema_update_shards(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """The EMA on local partitions: identical parameter sizes give identical partitions, so element i of a target
    partition is element i of the online one (checked by shape).

    Parameters below `stage3_param_persistence_threshold` elements (biases, norms; DeepSpeed marks them `ds_persist`)
    also stay whole on every rank and the forward reads that copy, never re-gathering it; the optimizer refreshes the
    online ones after its step, so the target's whole copies get the same update (the same fp32 arithmetic on the
    same values as their partitions)."""
    targets, onlines = local_shards(target), local_shards(online)
    if [t.shape for t in targets] != [o.shape for o in onlines]:
        raise RuntimeError("the target encoder is not partitioned like the encoder")
    ema_(targets, onlines, momentum)
    whole = [(t, o) for t, o in zip(target.parameters(), online.parameters()) if getattr(t, "ds_persist", False)]
    if whole:
        ema_([t.data for t, _ in whole], [o.data for _, o in whole], momentum)


def local_gradients(module: nn.Module) -> list[torch.Tensor]:
    """This rank's fp32 gradient partition of every trained parameter, after the boundary's reduce-scatter (views
    of ZeRO's gradient buffer without offload, so scaling them in place scales what the optimizer reads)."""
    from deepspeed.utils import safe_get_local_grad

    return [safe_get_local_grad(p) for p in module.parameters() if p.requires_grad]


def target_state(target: nn.Module) -> dict[str, Any]:
    """The target's local partitions, for this rank's checkpoint file (each rank writes its own under stage 3)."""
    return {"target_encoder_shards": [t.detach().clone() for t in local_shards(target)]}


def load_target_state(target: nn.Module, state: dict[str, Any]) -> None:
    shards = state["target_encoder_shards"]
    local = local_shards(target)
    if [s.shape for s in shards] != [t.shape for t in local]:
        raise RuntimeError("the checkpoint's target-encoder partitions do not match this run's: ZeRO-3 checkpoints "
                           "resume on the number of ranks that wrote them")
    with torch.no_grad():
        for mine, saved in zip(local, shards):
            mine.copy_(saved)
