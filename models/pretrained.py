"""Released V-JEPA checkpoints (spec 8.1: `vitl16.pth.tar`, `vith16.pth.tar`, `vith16-384.pth.tar`) into our modules.

A file holds `encoder`, `predictor` and `target_encoder` state dicts whose keys carry DDP's `module.` and the training
wrappers' `backbone.`; stripped, they are exactly our modules' keys (same names, same shapes: our tubelet embedding
keeps the Conv3d weight). The official loaders delete those substrings and load non-strictly, which silently leaves
random weights behind any renamed key; here every key of the file's entry must be used, and every key of the module
must be found, except one on an explicit allow-list:

* `pos_embed` / `predictor_pos_embed` when its length differs from the requested grid (another `img_size` or
  `num_frames`): the table is the fixed sin-cos one of spec 1.3, so the module's own table for its grid is the
  right one, and the file's is left unused.

The variant is read from the tensor shapes (width, depth, MLP width, patch and tubelet sizes); heads, which shapes
cannot tell, come from the variant of that width and depth (`VARIANTS`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .predictor import Predictor
from .vit import VARIANTS, Variant, VisionTransformer

ENTRIES = ("target_encoder", "encoder", "predictor")
WRAPPER_PREFIXES = ("module.", "backbone.")


class CheckpointMismatch(ValueError):
    """A checkpoint's keys or shapes do not fit the module built for it."""


class UnreadableCheckpoint(ValueError):
    """A file torch.load cannot read (not a checkpoint, or damaged), or a run folder none of whose checkpoints loads."""


def read_file(path: str | Path, *, weights_only: bool, mmap: bool = False) -> Any:
    """torch.load onto the CPU; a file that does not load is an UnreadableCheckpoint naming it, not a traceback from
    deep inside torch's unpickler or zip reader."""
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as e:  # zip, unpickler, EOF, I/O: whatever a wrong or damaged file raises
        raise UnreadableCheckpoint(f"{path} does not load as a checkpoint ({load_failure(e)}); is it one, and whole? "
                                   "A copy cut short or a disk error damages one.") from e


def load_failure(e: BaseException) -> str:
    """An exception from torch.load in a few words: its type and its message's first sentence."""
    first = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:160]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def strip_wrappers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without DDP's `module.` and the wrappers' `backbone.` (removed anywhere in the key, as the reference's
    loaders do; none of our names contains either)."""
    out = {}
    for key, value in state.items():
        for prefix in WRAPPER_PREFIXES:
            key = key.replace(prefix, "")
        out[key] = value
    return out


def add_wrappers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our keys as a reference training run writes them (`module.backbone.<key>`)."""
    return {f"module.backbone.{key}": value for key, value in state.items()}


@dataclass(frozen=True)
class EncoderShape:
    dim: int
    depth: int
    mlp_hidden: int
    patch_size: int
    tubelet_size: int
    num_tokens: int | None  # length of the file's position table (None: absent)


def encoder_shape(state: Mapping[str, torch.Tensor]) -> EncoderShape:
    """What the tensor shapes of a stripped encoder state dict say about the model."""
    try:
        proj = state["patch_embed.proj.weight"]  # (D, C, t, p, p)
        hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise CheckpointMismatch(f"not a V-JEPA encoder state dict: no {e.args[0]} (keys: {_some(state)})") from None
    depth = 1 + max(int(key.split(".")[1]) for key in state if key.startswith("blocks."))
    pos = state.get("pos_embed")
    return EncoderShape(proj.shape[0], depth, hidden, proj.shape[-1], proj.shape[2],
                        None if pos is None else pos.shape[1])


def _matching(shape: EncoderShape) -> str | None:
    return next((name for name, v in VARIANTS.items()
                 if (v.dim, v.depth, v.mlp_hidden) == (shape.dim, shape.depth, shape.mlp_hidden)), None)


def infer_variant(shape: EncoderShape) -> str:
    """The name of the variant with this width, depth and MLP width."""
    name = _matching(shape)
    if name is not None:
        return name
    known = ", ".join(f"{n} ({v.dim}x{v.depth}, MLP {v.mlp_hidden})" for n, v in VARIANTS.items())
    raise CheckpointMismatch(f"no variant has width {shape.dim}, depth {shape.depth} and MLP width "
                             f"{shape.mlp_hidden}; known: {known}")


def _variant(shape: EncoderShape, model_name: str | None, num_heads: int | None) -> Variant:
    if model_name is None and num_heads is not None:  # a model outside the named variants
        return Variant(shape.dim, shape.depth, num_heads, shape.mlp_hidden / shape.dim)
    name = model_name or infer_variant(shape)
    if name not in VARIANTS:
        raise CheckpointMismatch(f"model_name {name!r} unknown; variants: {', '.join(VARIANTS)}")
    variant = VARIANTS[name]
    if (variant.dim, variant.depth, variant.mlp_hidden) != (shape.dim, shape.depth, shape.mlp_hidden):
        raise CheckpointMismatch(f"model_name {name!r} is {variant.dim} wide and {variant.depth} deep (MLP "
                                 f"{variant.mlp_hidden}); the checkpoint's encoder is {shape.dim} wide, {shape.depth} "
                                 f"deep (MLP {shape.mlp_hidden}): {_matching(shape) or 'no named variant'}")
    return variant


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], *, where: str) -> list[str]:
    """Copy `state` into `module`. Every key on both sides must match in name and shape, except a position table of
    another length, which keeps the module's (returned in the list of keys left unused)."""
    own = module.state_dict()
    unused = [k for k in ("pos_embed", "predictor_pos_embed")
              if k in state and k in own and state[k].shape != own[k].shape]
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state))
    shapes = sorted(f"{k}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)}" for k in set(state) & set(own)
                    if state[k].shape != own[k].shape and k not in unused)
    if unexpected or missing or shapes:
        parts = [f"{len(unexpected)} keys the model lacks: {_some(unexpected)}" if unexpected else "",
                 f"{len(missing)} keys missing from the file: {_some(missing)}" if missing else "",
                 f"shape mismatches: {_some(shapes)}" if shapes else ""]
        raise CheckpointMismatch(f"{where}: " + "; ".join(p for p in parts if p))
    with torch.no_grad():
        for key, value in state.items():
            if key not in unused:
                own[key].copy_(value)
    return unused


def _some(keys: object, n: int = 8) -> str:
    keys = list(keys)
    return ", ".join(map(str, keys[:n])) + (f" ... (+{len(keys) - n})" if len(keys) > n else "")


def read_entries(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """The file's encoder / predictor / target_encoder state dicts with wrapper prefixes stripped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    checkpoint = read_file(path, weights_only=False)
    if not isinstance(checkpoint, dict) or not any(e in checkpoint for e in ENTRIES):
        keys = list(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointMismatch(f"{path}: not a V-JEPA pretraining checkpoint (top-level keys {keys}; expected "
                                 f"{', '.join(ENTRIES)})")
    return {e: strip_wrappers(checkpoint[e]) for e in ENTRIES if isinstance(checkpoint.get(e), Mapping)}


def load_pretrained(path: str | Path, *, which: str = "target_encoder", img_size: int = 224, num_frames: int = 16,
                    model_name: str | None = None, num_heads: int | None = None,
                    pred_num_heads: int | None = None) -> VisionTransformer | Predictor:
    """Our encoder (`which` = "target_encoder", the evaluations' choice, or "encoder") or predictor (`which` =
    "predictor") with a released V-JEPA file's weights, fp32, in eval mode, for clips of `num_frames` x `img_size`.

    The encoder's `forward(video)` maps (B, 3, F, H, W) to (B, N, D); the predictor's shape comes from the file and
    its encoder's width and heads from the file's encoder. `model_name` checks the file against a named variant;
    `num_heads` (without `model_name`) builds a model of the file's shapes outside the named variants;
    `pred_num_heads` is the predictor's (default: the encoder's, as V1; V2 uses 12)."""
    if which not in ENTRIES:
        raise ValueError(f"which={which!r}: use one of {', '.join(ENTRIES)}")
    entries = read_entries(path)
    if which not in entries:
        raise CheckpointMismatch(f"{path} has no {which!r} entry (it has {', '.join(entries) or 'none'})")
    encoder_state = entries.get(which if which != "predictor" else "target_encoder", entries.get("encoder"))
    if encoder_state is None:
        raise CheckpointMismatch(f"{path}: the predictor's encoder width and heads come from the file's encoder, "
                                 "which it lacks")
    shape = encoder_shape(encoder_state)
    variant = _variant(shape, model_name, num_heads)
    if which != "predictor":
        module: nn.Module = VisionTransformer(variant, img_size=img_size, num_frames=num_frames,
                                              patch_size=shape.patch_size, tubelet_size=shape.tubelet_size)
    else:
        grid = (num_frames // shape.tubelet_size, img_size // shape.patch_size, img_size // shape.patch_size)
        module = _predictor(entries["predictor"], variant, grid, pred_num_heads or variant.heads)
    load_strict(module, entries[which], where=f"{path} [{which}]")
    return module.eval()


def _predictor(state: Mapping[str, torch.Tensor], variant: Variant, grid: tuple[int, int, int],
               heads: int) -> Predictor:
    try:
        pred_dim = state["predictor_embed.weight"].shape[0]
        hidden = state["predictor_blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise CheckpointMismatch(f"not a V-JEPA predictor state dict: no {e.args[0]} (keys: {_some(state)})") from None
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("predictor_blocks."))
    num_mask_tokens = sum(1 for k in state if k.startswith("mask_tokens."))
    return Predictor(variant.dim, grid, pred_dim=pred_dim, depth=depth, num_heads=heads,
                     mlp_ratio=hidden / pred_dim, num_mask_tokens=num_mask_tokens)
