"""One V-JEPA training step (spec section 4.2), read top to bottom in named phases.

Differences from the reference that change no number: the context encoder and the predictor each run once over
the packed sets of every mask generator (the reference loops over generators), the target layer norm is applied to
the gathered target rows only (it is per row, and fused into the loss kernel), and nothing in the step reads a value back to the host: the loop
syncs only on logging steps.

Each phase is a named range for the profiler (engine/profiling.py `phase`: a no-op unless a profiler records).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from kernels import masked_l1_loss
from models import Predictor, VisionTransformer

from .backends import Backend
from .packed_masks import StepMasks
from .profiling import phase


@dataclass
class Models:
    encoder: VisionTransformer  # context encoder (trained)
    predictor: Predictor  # trained
    target_encoder: VisionTransformer  # EMA of the encoder, never receives gradients


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar on device, the mean of the finite micro-batch losses (read it only when logging)
    finite_losses: list[torch.Tensor]  # each micro-batch's loss that was finite on every rank
    target_features: torch.Tensor | None  # (B, N, D) target encoder output of the last micro-batch, for diagnostics
    predictions: torch.Tensor | None  # (Tt, D) of the last micro-batch, for collapse diagnostics
    grad_norms: tuple[torch.Tensor, torch.Tensor] | None  # encoder / predictor norms before clipping, when clipped
    skipped: int = 0  # micro-batches without backward: their loss was not finite on some rank

    @property
    def updated(self) -> bool:
        """Whether the optimizer stepped (some micro-batch was finite)."""
        return bool(self.finite_losses)


def autocast_context(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on GPU with fp32 weights, as the reference; the CPU always runs fp32."""
    if device.type != "cuda" or dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=getattr(torch, dtype))


def forward_loss(models: Models, video: torch.Tensor, masks: StepMasks, *, loss_exp: float,
                 dtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Target, context and predictor passes and the loss: (loss, target features (B, N, D), predictions (Tt, D))."""
    autocast = autocast_context(video.device, dtype)

    # target (no grad): all N tokens of every clip; its layer norm happens inside the loss, on the target rows only
    with phase("target_forward"), torch.no_grad(), autocast:
        h = models.target_encoder.forward_dense(video)  # (B, N, D)

    # context + predictor: every generator's packed context set in one encoder call and one predictor call
    with phase("context_predictor_forward"), autocast:
        z = models.encoder(video, masks.context_index, masks.context_packing)
        pred = models.predictor(z, masks.context_index, masks.target_index, masks.predictor)

    # loss (fp32): mean |pred - LN(h)[targets]|^p / p per generator, then the average over generators (the
    # reference's weighting: every generator counts equally whatever its number of target tokens)
    with phase("loss"):
        loss = masked_l1_loss(pred, h.flatten(0, 1), masks.target_index, loss_exp=loss_exp,
                              segments=masks.targets_per_generator)
    return loss, h, pred


def train_step(models: Models, backend: Backend, micro_batches: Iterable[tuple[torch.Tensor, StepMasks]], *,
               lr: float, wd: float, momentum: float, clip_grad: float | None, loss_exp: float, dtype: str,
               keep_features: bool = False, proceed: Callable[[torch.Tensor], bool] | None = None) -> StepOutput:
    """One optimizer step over `backend.accumulation_steps` micro-batches of (video (B, C, F, H, W) normalised
    clips, masks built by the loader), with this step's schedule values. `micro_batches` may be a generator that
    loads each one when asked, so only one micro-batch's activations live at a time.

    `proceed(loss)` (engine.faults.StepGuard, collective) decides after each forward pass whether that micro-batch
    runs its backward. A skipped one contributes no gradient and the others keep their weight 1/accumulation_steps;
    when none ran the optimizer does not step. The EMA moves once per step either way, as in the reference."""
    # schedules
    backend.set_lr_wd(lr, wd)

    # per micro-batch: target, context + predictor, loss, backward (gradients accumulate)
    count = backend.accumulation_steps
    losses, ran = [], []
    features = (None, None)
    for micro, (video, masks) in enumerate(micro_batches):
        loss, h, pred = backend.run_forward(forward_loss, models, video, masks, loss_exp=loss_exp, dtype=dtype)
        features = (h, pred.detach()) if keep_features else (None, None)
        del h, pred
        losses.append(loss.detach())
        ran.append(proceed is None or proceed(loss))
        if ran[-1]:
            with phase("backward"):
                backend.backward(loss, boundary=micro == count - 1)
        del loss  # a skipped micro-batch's graph is freed before the next one's forward
    if len(ran) != count:
        raise ValueError(f"a step takes {count} micro-batches (deepspeed.gradient_accumulation_steps), got {len(ran)}")

    # clip + optimizer step, at the boundary
    finite = [loss for loss, ok in zip(losses, ran) if ok]
    with phase("clip_optimizer"):
        grad_norms = backend.clip_and_step(clip_grad, boundary_backward=ran[-1]) if finite else None

    # EMA
    with phase("ema"):
        backend.ema_update(models.target_encoder, models.encoder, momentum)

    mean = torch.stack(finite).mean() if finite else losses[-1]
    return StepOutput(mean, finite, *features, grad_norms, len(ran) - len(finite))
