"""Optimizer backends behind one small interface: plain PyTorch, or DeepSpeed when launched by `deepspeed`.

Both use AdamW with the reference's four parameter groups (spec 4.3): weights of the encoder, of the predictor
(weight-decayed; this includes the patch-embed kernel and the 3-D mask tokens), then their biases and 1-D gains
(no weight decay). The reference clips the encoder and the predictor separately at `clip_grad`, only after warmup.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import Config, ConfigError


def param_groups(encoder: nn.Module, predictor: nn.Module) -> list[dict[str, Any]]:
    def split(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        decay, no_decay = [], []
        for name, p in module.named_parameters():
            (no_decay if ("bias" in name or p.ndim == 1) else decay).append(p)
        return decay, no_decay

    enc_decay, enc_no = split(encoder)
    pred_decay, pred_no = split(predictor)
    # frozen position tables sit in the decayed groups as in the reference; they never get a gradient
    return [{"params": enc_decay}, {"params": pred_decay},
            {"params": enc_no, "WD_exclude": True, "weight_decay": 0.0},
            {"params": pred_no, "WD_exclude": True, "weight_decay": 0.0}]


def _adamw(encoder: nn.Module, predictor: nn.Module, cfg: Config) -> torch.optim.AdamW:
    o = cfg.optimization
    fused = torch.cuda.is_available() and next(encoder.parameters()).is_cuda  # one kernel per step on GPU
    return torch.optim.AdamW(param_groups(encoder, predictor), lr=o.start_lr, weight_decay=o.weight_decay,
                             betas=tuple(o.betas), eps=o.eps, fused=fused or None)


class Backend:
    """What the step needs from an optimizer backend."""

    optimizer: torch.optim.Optimizer
    encoder: nn.Module
    predictor: nn.Module

    def set_lr_wd(self, lr: float, wd: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if not group.get("WD_exclude", False):
                group["weight_decay"] = wd

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def clip_and_step(self, clip_grad: float | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        raise NotImplementedError


class TorchBackend(Backend):
    def __init__(self, encoder: nn.Module, predictor: nn.Module, cfg: Config) -> None:
        self.encoder, self.predictor = encoder, predictor
        self.optimizer = _adamw(encoder, predictor, cfg)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_and_step(self, clip_grad: float | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        norms = None
        if clip_grad:
            norms = (torch.nn.utils.clip_grad_norm_(self.encoder.parameters(), clip_grad),
                     torch.nn.utils.clip_grad_norm_(self.predictor.parameters(), clip_grad))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norms

    def state_dict(self) -> dict[str, Any]:
        return {"encoder": self.encoder.state_dict(), "predictor": self.predictor.state_dict(),
                "opt": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.encoder.load_state_dict(state["encoder"])
        self.predictor.load_state_dict(state["predictor"])
        self.optimizer.load_state_dict(state["opt"])


class OnlineModels(nn.Module):
    """The trained modules as one nn.Module, which is what deepspeed.initialize takes."""

    def __init__(self, encoder: nn.Module, predictor: nn.Module) -> None:
        super().__init__()
        self.encoder, self.predictor = encoder, predictor


class DeepSpeedBackend(Backend):
    """DeepSpeed engine over encoder + predictor with a torch AdamW (no fused_adam JIT build needed).

    ZeRO stage 0 clips as the reference (encoder and predictor separately, after warmup). With stage >= 1 the
    gradients are partitioned and DeepSpeed clips one global norm at `clip_grad` from the first step: a deviation
    until the engine issue implements separate clipping on partitioned gradients; a warning says so.
    """

    def __init__(self, encoder: nn.Module, predictor: nn.Module, cfg: Config) -> None:
        try:
            import deepspeed
        except ImportError:
            raise ConfigError("the deepspeed backend needs the deepspeed package: pip install -e '.[deepspeed]' "
                              "(or run with plain python: meta.backend=torch)") from None
        self.encoder, self.predictor = encoder, predictor
        ds_config = dict(cfg.deepspeed or {})
        ds_config.setdefault("train_micro_batch_size_per_gpu", cfg.data.batch_size)
        ds_config.setdefault("gradient_accumulation_steps", 1)
        ds_config.pop("train_batch_size", None)  # inferred from the two above and the world size
        self.stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        if self.stage >= 1 and cfg.optimization.clip_grad:
            print(f"warning: ZeRO stage {self.stage}: gradients are clipped as one global norm at "
                  f"{cfg.optimization.clip_grad} from step 0 (the reference clips encoder and predictor separately "
                  "after warmup; stage 0 does)", flush=True)
            ds_config["gradient_clipping"] = cfg.optimization.clip_grad
        else:
            ds_config["gradient_clipping"] = 0.0
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=OnlineModels(encoder, predictor), optimizer=_adamw(encoder, predictor, cfg), config=ds_config)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def clip_and_step(self, clip_grad: float | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        norms = None
        if clip_grad and self.stage == 0:
            norms = (torch.nn.utils.clip_grad_norm_(self.encoder.parameters(), clip_grad),
                     torch.nn.utils.clip_grad_norm_(self.predictor.parameters(), clip_grad))
        self.engine.step()  # optimizer step and zero_grad
        return norms

    def save(self, folder: str, tag: str, client_state: dict[str, Any], keep_last: int) -> None:
        """Collective. DeepSpeed writes `latest` after the tag's files, so a partial tag is never resumed from;
        rank 0 then deletes all but the newest `keep_last` tags."""
        self.engine.save_checkpoint(folder, tag=tag, client_state=client_state)
        if self.engine.global_rank == 0:
            tags = sorted((p for p in Path(folder).iterdir() if p.is_dir() and p.name.startswith("step")),
                          key=lambda p: int(p.name[4:]))
            for old in tags[:-keep_last]:
                shutil.rmtree(old)

    def load(self, folder: str) -> dict[str, Any] | None:
        if not os.path.isfile(os.path.join(folder, "latest")):
            return None
        _, client_state = self.engine.load_checkpoint(folder)
        return client_state
