"""The frozen encoder's side of evaluation: which encoder, and its features for a batch of segments x views.

The encoder runs without autograd state (no_grad: nothing is saved for a backward), in chunks of
`meta.clips_per_forward` clips, so inference memory is one chunk's activations of one block at a time, not the
B*S*V clips the reference pushes through in one call. Per view, the S segments' tokens are concatenated in
segment order ([B, S*N, D], spec 6.2: time-major within a segment, segments one after the other), with no extra
position embedding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.build import build_encoder, encoder_variant
from engine.config import Config, ConfigError, config_from_dict
from engine.step import autocast_context
from models import VisionTransformer, load_pretrained
from models.pretrained import load_strict, read_file, strip_wrappers

from .config import EvalConfig


def frozen_encoder(checkpoint: str, cfg: EvalConfig, *, random_init: bool = False) -> tuple[VisionTransformer, str]:
    """(encoder in eval mode without gradients, a description of where its weights came from), built for the eval
    clips (`data.crop_size`, `data.frames_per_clip`). `checkpoint` is a training run folder, a file exported from
    one (`python -m engine.export`) or a released V-JEPA file. `random_init`: the same architecture with fresh
    weights (seeded by meta.seed), the baseline a pretrained encoder must beat."""
    path = Path(checkpoint)
    return load_frozen_encoder(path, checkpoint_config(path), key=cfg.model.checkpoint_key,
                               crop_size=cfg.data.crop_size, frames=cfg.data.frames_per_clip,
                               random_init=random_init, seed=cfg.meta.seed)


def load_frozen_encoder(path: Path, run_cfg: Config | None, *, key: str, crop_size: int, frames: int,
                        random_init: bool = False, seed: int = 0) -> tuple[VisionTransformer, str]:
    """`frozen_encoder` for any clip shape: `run_cfg` is `checkpoint_config(path)` (the architecture of our runs
    and files; None for a released file, whose variant comes from its shapes)."""
    if run_cfg is not None:
        encoder = _encoder_for(run_cfg, crop_size, frames, seed)
        if random_init:
            source = f"random init (seed {seed}) of {path}'s encoder"
        else:
            from engine.export import export_state

            weights = export_state(path) if path.is_dir() else read_file(path, weights_only=False)
            load_strict(encoder, strip_wrappers(weights[key]), where=f"{path} [{key}]")
            source = f"{path} [{key}]"
    elif random_init:
        raise ConfigError(f"--random-init needs a run folder or a file exported from one (for the architecture); "
                          f"{path} is neither")
    else:
        encoder = load_pretrained(path, which=key, img_size=crop_size, num_frames=frames)
        source = f"{path} [{key}]"
    return encoder.requires_grad_(False).eval(), source


def checkpoint_config(path: Path) -> Config | None:
    """The pretraining config of a run folder or of a file of ours (checkpoint or export); None for a released
    file."""
    from engine.export import run_config

    if path.is_dir():
        return run_config(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (a run folder, an exported file or a released one)")
    # mmap: the config is read without loading the weights
    state: dict[str, Any] = read_file(path, weights_only=False, mmap=True)
    return config_from_dict(state["config"], str(path)) if isinstance(state.get("config"), dict) else None


def _encoder_for(run_cfg: Config, crop_size: int, frames: int, seed: int) -> VisionTransformer:
    """The run's encoder architecture on another clip size (its sin-cos table follows the grid)."""
    torch.manual_seed(seed)
    d = run_cfg.data
    if (d.crop_size, d.num_frames) == (crop_size, frames):
        return build_encoder(run_cfg)
    return VisionTransformer(encoder_variant(run_cfg), img_size=crop_size, num_frames=frames,
                             patch_size=d.patch_size, tubelet_size=d.tubelet_size,
                             uniform_power=run_cfg.model.uniform_power)


@torch.no_grad()
def encode_views(encoder: nn.Module, clips: torch.Tensor, *, dtype: str, clips_per_forward: int) -> torch.Tensor:
    """clips (B, S, V, 3, F, H, W) -> features (B, V, S*N, D) in float32: the encoder's last op is its LayerNorm,
    which autocast runs in float32 (the blocks before it run in the autocast dtype on GPU)."""
    b, s, v = clips.shape[:3]
    flat = clips.flatten(0, 2)
    with autocast_context(clips.device, dtype):
        out = torch.cat([encoder(flat[i:i + clips_per_forward]) for i in range(0, len(flat), clips_per_forward)])
    n, d = out.shape[1:]
    return out.view(b, s, v, n, d).transpose(1, 2).reshape(b, v, s * n, d)
