"""Benchmark cases: the recipes' real shapes and token sets, drawn by the engine's own mask sampler.

With CUDA: ViT-L/16 at 224 px (configs/vitl16.json, batch 24, N = 1568, D = 1024) and ViT-H/16 at 384 px
(configs/vith16_384.json, batch 10, N = 4608, D = 1280), each in the packed default ("packed": every context and
target token of both mask generators) and with the reference's batch-minimum truncation ("trunc"). Without CUDA the
Triton provider runs under the interpreter (numpy, one program at a time), so the same recipe shrinks to a grid of
(4, 8, 8) tokens, D = 48, batch 2, patch 8: the whole suite then takes seconds and only proves it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from engine.build import build_encoder, encoder_variant
from engine.config import Config, load_config
from engine.packed_masks import MaskMaker, StepMasks

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# Activations (embed, loss) in bf16 as training runs them; the interpreter computes bf16 dots wrongly, so fp32 there.
ACT_DTYPE = torch.bfloat16 if CUDA else torch.float32
PARAM_DTYPE = torch.float32  # EMA over the fp32 master weights
MASK_STEP = 0  # masks are a pure function of (seed, step, sample index): a fixed step keeps T the same in every run

_TINY = ("--data.crop_size=64", "--data.patch_size=8", "--data.num_frames=8", "--data.batch_size=2",
         "--model.embed_dim=48", "--model.depth=2", "--model.num_heads=3")
_MODELS = {"vitl16_224": ("vitl16.json", ()), "vith16_384": ("vith16_384.json", ())} if CUDA else \
    {"tiny": ("vitl16.json", _TINY)}
_MODES = {"packed": (), "trunc": ("--mask.truncate_to_batch_min=true",)}


@dataclass(frozen=True)
class Case:
    name: str
    cfg: Config

    @property
    def batch(self) -> int:
        return self.cfg.data.batch_size

    @property
    def dim(self) -> int:
        return encoder_variant(self.cfg).dim

    @property
    def kernel(self) -> tuple[int, int, int]:
        """Tubelet (t, p, p) of the Conv3d."""
        d = self.cfg.data
        return d.tubelet_size, d.patch_size, d.patch_size

    @property
    def video_shape(self) -> tuple[int, int, int, int, int]:
        """(B, C, F, H, W)."""
        d = self.cfg.data
        return self.batch, 3, d.num_frames, d.crop_size, d.crop_size

    def masks(self) -> StepMasks:
        cfg = self.cfg
        return MaskMaker(cfg.mask, cfg.grid, cfg.meta.seed, cfg.data.mask_type)(MASK_STEP, 0, self.batch)

    def param_shapes(self) -> list[torch.Size]:
        """Shapes of the encoder's parameters, in its order; built on the meta device, so nothing is allocated."""
        with torch.device("meta"):
            return [p.shape for p in build_encoder(self.cfg).parameters()]


def _case(name: str, model: str, mode: str, extra: tuple[str, ...] = ()) -> Case:
    file, overrides = _MODELS[model]
    return Case(name, load_config(ROOT / "configs" / file, [*overrides, *_MODES[mode], *extra]))


def token_cases() -> list[Case]:
    """Every model in both masking modes: the token sets that the embed and the loss see."""
    return [_case(f"{model}-{mode}", model, mode) for model in _MODELS for mode in _MODES]


def model_cases(*overrides: str) -> list[Case]:
    """One case per model in the packed default (the EMA; attention), with optional extra `--key=value` overrides."""
    return [_case(model, model, "packed", overrides) for model in _MODELS]
