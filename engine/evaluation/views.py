"""Evaluation transforms (spec 6.3): uint8 frames (T, H, W, 3) -> normalised views (V, 3, T, crop, crop).

* several views: resize the short side to `crop`, then V crops of crop x crop along the long side at offsets
  i * ((long - crop) // (V - 1)) (left / centre / right);
* one view: resize the short side to int(crop * 256 / 224), then the centre crop;
* training: RandAugment "rand-m7-n4-mstd0.5-inc1" on the raw frames (the same ops on every frame), an
  Inception-style random resized crop (scale 0.08-1, ratio 3/4-4/3), no flip (V1 disables it), then random erasing
  (one box on every frame); see `augment.py`. Images in training take timm's ImageNet transform instead
  (`augment.image_train_clip`, spec 6.5).
Bilinear without antialiasing, as the reference's OpenCV resize; normalised with ImageNet's mean and std.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from engine.data.transforms import IMAGENET_MEAN, IMAGENET_STD, check_frames, finish_clip, random_resized_crop_box

from .augment import rand_augment_clip, random_erase

_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1) * 255.0
_STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1) * 255.0


def _resize_short_side(frames: torch.Tensor, size: int) -> torch.Tensor:
    """(T, 3, H, W) float -> short side `size`, the long side scaled to keep the aspect ratio."""
    h, w = frames.shape[-2:]
    scale = size / min(h, w)
    out = (size, round(w * scale)) if h <= w else (round(h * scale), size)
    return F.interpolate(frames, size=out, mode="bilinear", align_corners=False, antialias=False)


def eval_views(frames: np.ndarray | torch.Tensor, crop: int, num_views: int) -> torch.Tensor:
    """Deterministic views of one clip: (V, 3, T, crop, crop) float32."""
    x = check_frames(frames).permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    if num_views == 1:
        x = _resize_short_side(x, int(crop * 256 / 224))
        h, w = x.shape[-2:]
        top, left = (h - crop) // 2, (w - crop) // 2
        crops = [x[..., top:top + crop, left:left + crop]]
    else:
        x = _resize_short_side(x, crop)
        h, w = x.shape[-2:]
        long_side = max(h, w)
        step = (long_side - crop) // (num_views - 1)
        crops = [x[..., i * step:i * step + crop, :crop] if h > w else x[..., :crop, i * step:i * step + crop]
                 for i in range(num_views)]
    views = torch.stack(crops).permute(0, 2, 1, 3, 4)  # (V, 3, T, crop, crop)
    return views.sub_(_MEAN).div_(_STD).contiguous()


def train_view(frames: np.ndarray | torch.Tensor, crop: int, scale: tuple[float, float], ratio: tuple[float, float],
               rng: np.random.Generator, *, rand_augment: bool = False, reprob: float = 0.0) -> torch.Tensor:
    """V1's training view of a clip (spec 6.3): RandAugment on the raw frames (`rand_augment`), one random resized
    crop (the same box on every frame, no flip), normalise, random erasing with probability `reprob` (the same box
    on every frame, 100 attempts): (1, 3, T, crop, crop). Draws in that order from `rng`."""
    frames = check_frames(frames)
    if rand_augment:
        frames = rand_augment_clip(frames, rng)
    top, left, h, w = random_resized_crop_box(frames.shape[1], frames.shape[2], scale, ratio, rng)
    clip = finish_clip(frames[:, top:top + h, left:left + w], crop, flip=False)
    return random_erase(clip, rng, reprob, attempts=100)[None]
