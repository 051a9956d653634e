"""One V-JEPA training step (spec section 4.2), read top to bottom in named phases.

Differences from the reference that change no number: the context encoder and the predictor each run once over
the packed sets of every mask generator (the reference loops over generators), the target layer norm is applied to
the gathered target rows only (it is per row, and fused into the loss kernel), and nothing in the step reads a value back to the host: the loop
syncs only on logging steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kernels import ema_, masked_l1_loss
from models import Predictor, VisionTransformer

from .backends import Backend
from .packed_masks import StepMasks


@dataclass
class Models:
    encoder: VisionTransformer  # context encoder (trained)
    predictor: Predictor  # trained
    target_encoder: VisionTransformer  # EMA of the encoder, never receives gradients


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar, on device (read it only when logging)
    target_features: torch.Tensor | None  # (B, N, D) target encoder output, for collapse diagnostics
    predictions: torch.Tensor | None  # (Tt, D), for collapse diagnostics
    grad_norms: tuple[torch.Tensor, torch.Tensor] | None  # encoder / predictor norms before clipping, when clipped
    skipped: bool = False  # no backward and no optimizer step: the loss was not finite on some rank


def autocast_context(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on GPU with fp32 weights, as the reference; the CPU always runs fp32."""
    if device.type != "cuda" or dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=getattr(torch, dtype))


def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target = m * target + (1 - m) * online for every parameter (including the frozen position table), one
    multi-tensor launch with the Triton kernels."""
    ema_(list(target.parameters()), list(online.parameters()), momentum)


def forward_loss(models: Models, video: torch.Tensor, masks: StepMasks, *, loss_exp: float,
                 dtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Target, context and predictor passes and the loss: (loss, target features (B, N, D), predictions (Tt, D))."""
    autocast = autocast_context(video.device, dtype)

    # target (no grad): all N tokens of every clip; its layer norm happens inside the loss, on the target rows only
    with torch.no_grad(), autocast:
        h = models.target_encoder.forward_dense(video)  # (B, N, D)

    # context + predictor: every generator's packed context set in one encoder call and one predictor call
    with autocast:
        z = models.encoder(video, masks.context_index, masks.context_packing)
        pred = models.predictor(z, masks.context_index, masks.target_index, masks.predictor)

    # loss (fp32): mean |pred - LN(h)[targets]|^p / p per generator, then the average over generators (the
    # reference's weighting: every generator counts equally whatever its number of target tokens)
    loss = masked_l1_loss(pred, h.flatten(0, 1), masks.target_index, loss_exp=loss_exp,
                          segments=masks.targets_per_generator)
    return loss, h, pred


def train_step(models: Models, backend: Backend, video: torch.Tensor, masks: StepMasks, *, lr: float, wd: float,
               momentum: float, clip_grad: float | None, loss_exp: float, dtype: str,
               keep_features: bool = False, proceed: Callable[[torch.Tensor], bool] | None = None) -> StepOutput:
    """video (B, C, F, H, W) normalised clips; masks built by the loader; schedule values for this step.
    `proceed(loss)` (engine.faults.StepGuard) decides after the forward pass whether to run backward and the
    optimizer step; the EMA runs either way, as in the reference."""
    # schedules
    backend.set_lr_wd(lr, wd)

    # target, context + predictor, loss
    loss, h, pred = forward_loss(models, video, masks, loss_exp=loss_exp, dtype=dtype)

    # backward + clip + step
    grad_norms = None
    skipped = proceed is not None and not proceed(loss)
    if not skipped:
        backend.backward(loss)
        grad_norms = backend.clip_and_step(clip_grad)

    # EMA
    ema_update(models.target_encoder, models.encoder, momentum)

    return StepOutput(loss.detach(), h if keep_features else None, pred.detach() if keep_features else None,
                      grad_norms, skipped)
