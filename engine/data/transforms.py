"""The V-JEPA pretraining clip transform (reference spec §5.3: `app/vjepa/transforms.py::VideoTransform` with no
auto-augment and no random erasing): random resized crop (one box for the whole clip), horizontal flip, normalise.

The reference converts the whole clip to float and then crops. Cropping commutes with the conversion, so here the
uint8 frames are cropped first: the same numbers, with less memory traffic.
"""

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The reference normalises in the 0-255 scale (mean and std multiplied by 255 in float32), shaped for (C, F, H, W).
_MEAN_255 = (torch.tensor(IMAGENET_MEAN, dtype=torch.float32) * 255.0).view(3, 1, 1, 1)
_STD_255 = (torch.tensor(IMAGENET_STD, dtype=torch.float32) * 255.0).view(3, 1, 1, 1)

_CROP_ATTEMPTS = 10


@functools.lru_cache(maxsize=None)
def _normalization_on(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and std on `device`, copied there once: a pageable copy per clip would block the host until the GPU
    has drained its queue (the previous step's backward), on every clip the loop finishes."""
    return _MEAN_255.to(device, non_blocking=True), _STD_255.to(device, non_blocking=True)


def random_resized_crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                            rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Inception-style crop box `(top, left, h, w)` of a `height x width` frame.

    Up to 10 attempts draw an area fraction uniformly from `scale` and an aspect ratio (w/h) log-uniformly from
    `ratio`; the first box that fits is placed uniformly. If none fits, fall back to a central crop: the whole
    frame, narrowed to the nearest end of `ratio` when the frame's own aspect ratio lies outside it.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(_CROP_ATTEMPTS):
        target_area = rng.uniform(*scale) * area
        aspect_ratio = math.exp(rng.uniform(*log_ratio))
        # Python's round (half to even) as in the reference, so boxes match it given the same draws.
        w = round(math.sqrt(target_area * aspect_ratio))
        h = round(math.sqrt(target_area / aspect_ratio))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w

    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_crop_and_flip(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                       rng: np.random.Generator, hflip_prob: float = 0.5) -> tuple[tuple[int, int, int, int], bool]:
    """The random part of the transform: the crop box, then one uniform for the flip (drawn even when `hflip_prob`
    is 0, so that later draws do not depend on it). Drawn on the host, so every decoder gets the same clip."""
    box = random_resized_crop_box(height, width, scale, ratio, rng)
    return box, bool(rng.random() < hflip_prob)


def finish_clip(crop: torch.Tensor, crop_size: int, flip: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Already-cropped uint8 frames (F, h, w, 3), on any device -> normalised (3, F, crop_size, crop_size) in `dtype`:
    bilinear resize (no antialiasing, as the reference), flip, normalise in float32, then cast."""
    # (F, h, w, C) viewed as (F, C, h, w): a channels-last batch, which interpolate handles without a layout copy.
    frames = crop.permute(0, 3, 1, 2).float()
    resized = F.interpolate(frames, size=(crop_size, crop_size), mode="bilinear", align_corners=False,
                            antialias=False)
    video = resized.permute(1, 0, 2, 3)  # (C, F, crop, crop)
    if flip:
        video = video.flip(-1)
    mean, std = _normalization_on(video.device)
    return video.contiguous().sub_(mean).div_(std).to(dtype)


def pretrain_transform(frames: np.ndarray | torch.Tensor, crop_size: int, scale: tuple[float, float],
                       ratio: tuple[float, float], rng: np.random.Generator, *,
                       hflip_prob: float = 0.5) -> torch.Tensor:
    """uint8 frames (F, H, W, 3) -> normalised float32 clip (3, F, crop_size, crop_size): `draw_crop_and_flip`, then
    the crop, then `finish_clip`."""
    frames = check_frames(frames)
    (top, left, h, w), flip = draw_crop_and_flip(frames.shape[1], frames.shape[2], scale, ratio, rng, hflip_prob)
    return finish_clip(frames[:, top:top + h, left:left + w], crop_size, flip)


def check_frames(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """`frames` as a uint8 (F, H, W, 3) tensor (no copy), or a ValueError saying what it is instead."""
    frames = torch.as_tensor(frames)
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames of shape (F, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    return frames
