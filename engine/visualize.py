"""`python -m engine.visualize --checkpoint CKPT --video VIDEO [--out OUT.gif]`: what the encoder sees, as a GIF.

Each frame of the clip beside an RGB picture of the first three principal components of the target encoder's patch
features (PCA over all tokens of the clip, so colours compare across frames): parts the encoder represents alike get
alike colours, and a model that learned something shows objects and motion, where a random or collapsed one shows
noise or a flat colour. CKPT is a training run folder (its latest weights, any backend) or a checkpoint file (ours or
a released V-JEPA file).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from engine.data.decode import VideoDecodeError, decode_frames
from engine.data.probe import probe_file
from engine.evaluation.features import checkpoint_config, load_frozen_encoder
from models import VisionTransformer

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1, 1)  # ImageNet statistics, as the training transforms
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1, 1)
FILE_DEFAULTS = (16, 224, 4)  # frames, size, frame step for a file without a config: the released models' clips
FRAME_MS = 120


@dataclasses.dataclass(frozen=True)
class Clip:
    frames: int
    size: int
    frame_step: int


def load_encoder(checkpoint: str | Path, frames: int | None = None, size: int | None = None,
                 frame_step: int | None = None) -> tuple[VisionTransformer, Clip]:
    """The target encoder of a run folder or checkpoint file, built for the clip it will see (the evaluation's
    loader). Unset clip settings come from the run's config (a folder, or a file of ours, which carries it), else
    the released models' clips."""
    path = Path(checkpoint)
    cfg = checkpoint_config(path)
    if cfg is not None:
        d = cfg.data
        clip = Clip(frames or d.num_frames, size or d.crop_size, frame_step or d.sampling_rate)
    else:
        clip = Clip(frames or FILE_DEFAULTS[0], size or FILE_DEFAULTS[1], frame_step or FILE_DEFAULTS[2])
    encoder, _ = load_frozen_encoder(path, cfg, key="target_encoder", crop_size=clip.size, frames=clip.frames)
    return encoder, clip


def read_clip(video: str | Path, clip: Clip) -> np.ndarray:
    """`clip.frames` frames `clip.frame_step` apart from the start (the last one repeated past the end), short side
    resized to `clip.size` and centre-cropped: uint8 (F, S, S, 3)."""
    probe = probe_file(str(video))
    if not probe.ok:
        raise VideoDecodeError(str(video), probe.reason)
    indices = np.minimum(np.arange(clip.frames) * clip.frame_step, probe.frames - 1)
    frames = torch.from_numpy(decode_frames(str(video), indices)).permute(0, 3, 1, 2).float()  # (F, 3, H, W)
    h, w = frames.shape[-2:]
    scale = clip.size / min(h, w)
    new_h, new_w = max(clip.size, round(h * scale)), max(clip.size, round(w * scale))
    frames = F.interpolate(frames, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=False)
    top, left = (new_h - clip.size) // 2, (new_w - clip.size) // 2
    frames = frames[..., top:top + clip.size, left:left + clip.size]
    return frames.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def encode(encoder: VisionTransformer, frames: np.ndarray) -> torch.Tensor:
    """uint8 (F, S, S, 3) -> the encoder's features (N, D)."""
    device = next(encoder.parameters()).device
    video = torch.from_numpy(frames).permute(3, 0, 1, 2).float().div(255)  # (3, F, S, S)
    video = ((video - MEAN) / STD)[None].to(device)
    return encoder(video)[0].float().cpu()


def pca_rgb(features: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Features (N, D) (or (1, N, D)) of a (T', H', W') token grid -> their first three principal components as RGB,
    (T', H', W', 3) in [0, 1]. Each component is scaled by its 1st and 99th percentiles (a few extreme tokens would
    otherwise wash the rest out) and its sign fixed so that its largest loading is positive (SVD's sign is arbitrary:
    this keeps colours stable between runs)."""
    x = features.reshape(-1, features.shape[-1]).float()
    x = x - x.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    components = vh[:3]
    largest = components.gather(1, components.abs().argmax(1, keepdim=True))
    components = components * torch.sign(largest)
    projected = x @ components.T
    projected = F.pad(projected, (0, 3 - projected.shape[1]))  # fewer than 3 tokens or dims: black channels
    lo, hi = torch.quantile(projected, torch.tensor([0.01, 0.99]), dim=0)
    rgb = ((projected - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
    return rgb.view(*grid, 3)


def compose(frames: np.ndarray, rgb: torch.Tensor, tubelet: int) -> list[Image.Image]:
    """One image per frame: the input frame | its tubelet's PCA colours, upsampled to the frame (nearest)."""
    size = frames.shape[1]
    pictures = F.interpolate(rgb.permute(0, 3, 1, 2), size=(size, size), mode="nearest")  # (T', 3, S, S)
    pictures = (pictures * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(np.concatenate([frame, pictures[i // tubelet]], axis=1)) for i, frame in enumerate(frames)]


def visualize(checkpoint: str | Path, video: str | Path, out: str | Path | None = None, *, frames: int | None = None,
              size: int | None = None, frame_step: int | None = None) -> Path:
    """Write the GIF (default: VIDEO's name with .pca.gif, beside it) and return its path."""
    if not Path(video).is_file():
        raise FileNotFoundError(f"video not found: {video}")
    encoder, clip = load_encoder(checkpoint, frames, size, frame_step)
    patch, tubelet = encoder.patch_embed.patch_size, encoder.patch_embed.tubelet_size
    if clip.frames % tubelet or clip.size % patch:
        raise ValueError(f"--frames {clip.frames} must be a multiple of the tubelet size {tubelet} and --size "
                         f"{clip.size} a multiple of the patch size {patch}")
    if torch.cuda.is_available():
        encoder = encoder.cuda()
    pixels = read_clip(video, clip)
    images = compose(pixels, pca_rgb(encode(encoder, pixels), encoder.grid), tubelet)
    out = Path(out) if out is not None else Path(video).with_suffix(".pca.gif")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Pillow merges a frame identical to the previous one into it (adding the durations): a clip padded with its
    # last frame shows that frame longer, with fewer frames in the file
    images[0].save(out, save_all=True, append_images=images[1:], duration=FRAME_MS, loop=0)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.visualize", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a training run folder or a checkpoint file")
    parser.add_argument("--video", required=True, help="a video file")
    parser.add_argument("--out", help="the GIF to write (default: VIDEO.pca.gif)")
    parser.add_argument("--frames", type=int, help="frames per clip (default: the run's data.num_frames, else 16)")
    parser.add_argument("--size", type=int, help="crop side in pixels (default: the run's data.crop_size, else 224)")
    parser.add_argument("--frame-step", type=int, help="frames between sampled frames (default: the run's "
                        "data.sampling_rate, else 4)")
    args = parser.parse_args(argv)
    try:
        path = visualize(args.checkpoint, args.video, args.out, frames=args.frames, size=args.size,
                         frame_step=args.frame_step)
    except (FileNotFoundError, ValueError, VideoDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
