"""Training augmentations of the frozen evaluation: V1's video RandAugment and random erasing (spec 6.3) and the
timm ImageNet training transform of the image probes (spec 6.5), on uint8 tensors, for all frames of a clip at once.

Every random number comes from the numpy Generator passed in (EvalClips seeds one per (seed, epoch, entry)), so an
item is a pure function of its seed. The ops are written here on torch tensors, after the reference's PIL ops
(timm's `auto_augment.py` as copied into V1): the same level -> argument mappings, coordinate conventions, fill rule,
interpolation kernel and integer arithmetic (see "Faithfulness" below).

RandAugment "rand-m7-n4-mstd0.5-inc1" (video, spec 6.3)
--------------------------------------------------------
Per clip: 4 ops drawn uniformly *with replacement* from the 15 "increasing severity" ops below. Each op, in turn,
fires with probability 0.5; when it fires, its level m ~ N(7, 0.5) is drawn and clipped to [0, 10] (for every op,
also those without an argument, as the reference), then for the signed ops a sign (+/- with probability 1/2).
That one decision (op, fired, m, sign) is applied to every frame of the clip in one batched call, so frames that
are equal stay equal. It runs on the raw decoded frames, before the crop (V1: ToPIL -> RandAugment -> ToTensor ->
normalise -> random resized crop -> random erasing).

| op                   | argument from the level m in [0, 10]          | effect on each uint8 frame                    |
|----------------------|-----------------------------------------------|-----------------------------------------------|
| AutoContrast         | none                                          | per channel [lo, hi] -> [0, 255]: the lut     |
|                      |                                               | trunc(v * s - lo * s), s = 255 / (hi - lo)    |
| Equalize             | none                                          | per channel, PIL's histogram equalisation     |
| Invert               | none                                          | 255 - v                                       |
| Rotate               | angle = +/- m/10 * 30 degrees                 | about the centre, counter-clockwise if > 0    |
| PosterizeIncreasing  | bits = 4 - int(m/10 * 4)         (4 .. 0)     | keep the top `bits` bits (0 bits: black)      |
| SolarizeIncreasing   | threshold = 256 - int(m/10 * 256) (256 .. 0)  | v >= threshold -> 255 - v                     |
| SolarizeAdd          | add = int(m/10 * 110), threshold 128          | v < 128 -> min(255, v + add)                  |
| ColorIncreasing      | factor = 1 +/- m/10 * 0.9        (0.1 .. 1.9) | blend with the frame's grey (PIL's luma)      |
| ContrastIncreasing   | factor = 1 +/- m/10 * 0.9                     | blend with the frame's mean grey level        |
| BrightnessIncreasing | factor = 1 +/- m/10 * 0.9                     | blend with black                              |
| SharpnessIncreasing  | factor = 1 +/- m/10 * 0.9                     | blend with PIL's SMOOTH filter (border kept)  |
| ShearX               | f = +/- m/10 * 0.3                            | output (x, y) <- input (x + f y, y)           |
| ShearY               | f = +/- m/10 * 0.3                            | output (x, y) <- input (x, y + f x)           |
| TranslateXRel        | p = +/- m/10 * 0.45 * frame width (pixels)    | output (x, y) <- input (x + p, y)             |
| TranslateYRel        | p = +/- m/10 * 0.45 * frame height (pixels)   | output (x, y) <- input (x, y + p)             |

Blends are PIL's `degenerate + factor * (frame - degenerate)`, clipped to [0, 255] and truncated. The geometric ops
map each output pixel centre (x + 0.5, y + 0.5) through the affine map above (PIL's `Image.transform` convention),
sample bicubically (PIL's cubic, a = -1) with the frame's edge pixels replicated, truncate, and give the fill colour
to every output pixel whose source point lies outside the frame. At m = 7 exactly: rotate 21 degrees, shear 0.21,
translate 31.5 % of the frame, posterize to 2 bits, solarize threshold 77, solarize-add 77, enhance 1 +/- 0.63.

AutoAugment "original" ImageNet policy (images, spec 6.5)
----------------------------------------------------------
timm's `create_transform(is_training, auto_augment='original')`: one of the paper's 25 sub-policies (Cubuk et al.
2019, appendix) chosen uniformly, each of its two ops applied with its own probability at its fixed level, with
timm's level -> argument mappings (which differ from the RandAugment "increasing" ones above):
PosterizeOriginal bits = int(m/10 * 4) + 4; Solarize threshold = int(m/10 * 256); Color / Contrast / Sharpness
factor = m/10 * 1.8 + 0.1 (no sign); Rotate +/- m/10 * 30 degrees; ShearX +/- m/10 * 0.3; Invert, Equalize,
AutoContrast as above. Fill (124, 116, 104) (timm passes the ImageNet mean as `img_mean`), bicubic. In timm's
order: random resized crop (scale 0.08-1, ratio 3/4-4/3, bicubic) -> horizontal flip p 0.5 -> AutoAugment ->
to 0-1 -> normalise -> random erasing; the image is then repeated along time (V1's forward pre-hook), so every frame
carries the same erased box and the same noise.

Random erasing (pixel mode, one box)
------------------------------------
With probability `reprob`: up to `attempts` tries (V1's video "cube" erasing: 100; timm's image erasing: 10) draw an
area fraction U(0.02, 1/3) of the crop and an aspect ratio h/w = exp(U(log 0.3, log 1/0.3)) (log-uniform);
h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect)); the first box with h < H and w < W (strict, as
the reference) is placed uniformly and filled with per-pixel N(0, 1) noise, in normalised units. On a clip the box
is the same on every frame, and the noise is drawn independently for every frame and channel: V1's video erasing
("cube" mode, applied to the (T, C, H, W) clip) draws the box once and then calls its noise generator once per frame.
If no attempt fits, nothing is erased.

Choices where the spec is silent
--------------------------------
* RandAugment fill for video: (128, 128, 128). V1's `create_random_augment` passes only `translate_const` and the
  interpolation to timm's RandAugment, so the ops fall back to its default grey, not the ImageNet mean; the image
  AutoAugment (timm's `create_transform`) does pass the mean, (124, 116, 104).
* Translation: the "increasing" list uses TranslateXRel / TranslateYRel, whose distance is a fraction of the frame
  (m/10 * 0.45 of its width / height, the frame being the raw decoded frame since RandAugment precedes the crop).
  The "translate const = int(0.45 * crop)" of the spec is the hyper-parameter of the *absolute* TranslateX/Y ops,
  which this op list does not contain: V1 computes it and never uses it, and so do we (not at all).

Faithfulness
------------
Every op here reproduces its PIL counterpart on each frame (tests/test_eval_augment.py compares them where Pillow is
installed): the point and enhance ops exactly; the geometric ops use PIL's affine convention, fill rule and cubic
(a = -1, truncated), and differ from it by one level on ~1e-3 of the pixels (float32 against PIL's double). The image
crop is resized with torch's uint8 antialiased bicubic, PIL's `resize` to +/- 1-2 levels on under 1 % of pixels.
The random draws are numpy's, so a clip is not the one the reference (python's `random`) would draw, only
distributed like it. Pillow >= 10 refuses to posterize to 0 bits; older PIL (the reference's) gives black, as here
(level 10 exactly, which N(7, 0.5) essentially never reaches).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from engine.data.transforms import IMAGENET_MEAN, IMAGENET_STD, check_frames, random_resized_crop_box

MAX_LEVEL = 10.0
VIDEO_FILL = (128, 128, 128)  # V1's RandAugment: timm's default fill (no img_mean passed)
IMAGE_FILL = tuple(min(255, round(255 * m)) for m in IMAGENET_MEAN)  # (124, 116, 104): timm's create_transform

RAND_INCREASING_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
)

# The AutoAugment paper's ImageNet policy: 25 sub-policies of two (op, probability, level) each.
IMAGENET_POLICY = (
    (("PosterizeOriginal", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)),
    (("Equalize", 0.8, 8), ("Equalize", 0.6, 3)),
    (("PosterizeOriginal", 0.6, 7), ("PosterizeOriginal", 0.6, 6)),
    (("Equalize", 0.4, 7), ("Solarize", 0.2, 4)),
    (("Equalize", 0.4, 4), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, 7)),
    (("PosterizeOriginal", 0.8, 5), ("Equalize", 1.0, 2)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, 8), ("PosterizeOriginal", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
    (("Rotate", 0.4, 9), ("Equalize", 0.6, 2)),
    (("Equalize", 0.0, 7), ("Equalize", 0.8, 8)),
    (("Invert", 0.6, 4), ("Equalize", 1.0, 8)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
    (("Sharpness", 0.4, 7), ("Invert", 0.6, 8)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, 9)),
    (("Color", 0.4, 0), ("Equalize", 0.6, 3)),
    (("Equalize", 0.4, 7), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)),
    (("Invert", 0.6, 4), ("Equalize", 1.0, 8)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, 8), ("Equalize", 0.6, 3)),
)

_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255.0
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255.0


# ----------------------------------------------------------------------------------------------------------------
# The ops: uint8 (N, 3, H, W) -> uint8 (N, 3, H, W), each frame on its own statistics (as PIL, frame by frame).


def invert(x: torch.Tensor) -> torch.Tensor:
    return 255 - x


def posterize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Keep the top `bits` bits of every value (0 bits: all black)."""
    if bits >= 8:
        return x
    return x & ((0xFF << (8 - max(bits, 0))) & 0xFF)


def solarize(x: torch.Tensor, threshold: int) -> torch.Tensor:
    """Invert every value >= threshold (256: nothing)."""
    if threshold > 255:
        return x
    return torch.where(x >= threshold, 255 - x, x)


def solarize_add(x: torch.Tensor, add: int, threshold: int = 128) -> torch.Tensor:
    """Values below `threshold` get `add`, saturated at 255."""
    return torch.where(x < threshold, (x.to(torch.int16) + add).clamp_(max=255).to(torch.uint8), x)


def _apply_luts(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """x uint8 (N, C, H, W), lut (N * C, 256) integer: lut[frame and channel][value]."""
    n, c, h, w = x.shape
    return lut.to(torch.uint8).gather(1, x.reshape(n * c, h * w).long()).view(n, c, h, w)


def autocontrast(x: torch.Tensor) -> torch.Tensor:
    """Per frame and channel, stretch [min, max] to [0, 255]: lut(v) = trunc(v * s - min * s), s = 255 / (max - min)
    in double precision (PIL's `ImageOps.autocontrast` without cutoff); a constant channel is left alone."""
    n, c = x.shape[:2]
    lo = x.amin(dim=(-2, -1)).reshape(n * c, 1).double()
    hi = x.amax(dim=(-2, -1)).reshape(n * c, 1).double()
    flat = hi <= lo
    span = torch.where(flat, torch.ones_like(hi), hi - lo)
    scale = torch.full_like(span, 255.0) / span  # not `255.0 / span`: torch computes that as 255 * (1 / span)
    values = torch.arange(256, dtype=torch.float64).expand(n * c, 256)
    lut = torch.where(flat, values, (values * scale - lo * scale).trunc_().clamp_(0, 255))
    return _apply_luts(x, lut)


def equalize(x: torch.Tensor) -> torch.Tensor:
    """PIL's `ImageOps.equalize`, per frame and channel: step = (pixels - count of the highest value present) // 256;
    lut(i) = (step // 2 + #pixels below i) // step; identity when step is 0 (one value, or nearly one)."""
    n, c, h, w = x.shape
    flat = x.reshape(n * c, h * w).long()
    hist = torch.zeros(n * c, 256, dtype=torch.int64).scatter_add_(1, flat, torch.ones_like(flat))
    top = 255 - (hist.flip(1) > 0).int().argmax(1)  # the highest value present
    step = (h * w - hist.gather(1, top[:, None])) // 256  # (n*c, 1)
    below = hist.cumsum(1) - hist
    lut = ((step // 2 + below) // step.clamp(min=1)).clamp_(max=255)
    lut = torch.where(step == 0, torch.arange(256).expand_as(lut), lut)
    return lut.to(torch.uint8).gather(1, flat).view(n, c, h, w)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L: (19595 R + 38470 G + 7471 B + 2^15) >> 16, as (N, 1, H, W) int32."""
    x = x.to(torch.int32)
    return (x[:, 0:1] * 19595 + x[:, 1:2] * 38470 + x[:, 2:3] * 7471 + 32768) >> 16


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL's `Image.blend(degenerate, x, factor)`: degenerate + factor * (x - degenerate), clipped, truncated."""
    degenerate = degenerate.float()
    return (degenerate + factor * (x.float() - degenerate)).clamp_(0, 255).to(torch.uint8)


def color(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Saturation (PIL `ImageEnhance.Color`): blend with the frame's grey version."""
    return _blend(_luma(x).expand_as(x), x, factor)


def contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL `ImageEnhance.Contrast`: blend with a flat frame at the mean grey level, rounded half up."""
    total = _luma(x).sum(dim=(-3, -2, -1), keepdim=True, dtype=torch.int64).double()
    mean = torch.floor(total / (x.shape[-2] * x.shape[-1]) + 0.5)
    return _blend(mean.expand_as(x), x, factor)


def brightness(x: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL `ImageEnhance.Brightness`: blend with black."""
    return _blend(torch.zeros_like(x), x, factor)


def sharpness(x: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL `ImageEnhance.Sharpness`: blend with the SMOOTH-filtered frame (3x3 kernel [1 1 1; 1 5 1; 1 1 1] / 13,
    rounded; the one-pixel border keeps the original values)."""
    h, w = x.shape[-2:]
    if h < 3 or w < 3:
        return x.clone()
    v = x.float()
    rows = v[..., :-2, :] + v[..., 1:-1, :] + v[..., 2:, :]  # exact integer sums in float32
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
    degenerate = v.clone()
    degenerate[..., 1:-1, 1:-1] = box.add_(v[..., 1:-1, 1:-1], alpha=4.0).div_(13.0).add_(0.5).floor_()
    return _blend(degenerate, x, factor)


def _cubic_weights(t: torch.Tensor) -> torch.Tensor:
    """Weights of the taps at offsets -1, 0, 1, 2 for a fractional position t in [0, 1): the cubic convolution
    kernel with a = -1, the one of PIL's affine resampler (its `resize` uses a = -0.5)."""
    t2, t3 = t * t, t * t * t
    return torch.stack([-t + 2 * t2 - t3, 1 - 2 * t2 + t3, t + t2 - t3, t3 - t2])


def affine(x: torch.Tensor, matrix: Sequence[float], fill: Sequence[int]) -> torch.Tensor:
    """PIL's `Image.transform(size, AFFINE, (a, b, c, d, e, f), BICUBIC, fillcolor=fill)` on every frame: output
    pixel (x, y) takes the input at (a X + b Y + c, d X + e Y + f), (X, Y) = (x + 0.5, y + 0.5) in continuous
    coordinates where pixel i covers [i, i + 1). A point outside the frame gets `fill`; inside, bicubic (a = -1) on
    the 4 x 4 pixels around it, the frame's edge pixels replicated, clipped to [0, 255] and truncated."""
    n, c, h, w = x.shape
    a, b, c0, d, e, f = (float(v) for v in matrix)
    ys = torch.arange(h, dtype=torch.float64).add_(0.5).view(h, 1)
    xs = torch.arange(w, dtype=torch.float64).add_(0.5).view(1, w)
    sx, sy = a * xs + b * ys + c0, d * xs + e * ys + f  # (h, w) each
    inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    px, py = (sx - 0.5).expand(h, w), (sy - 0.5).expand(h, w)  # in pixel-centre units
    x0, y0 = px.floor(), py.floor()
    wx, wy = _cubic_weights(px - x0), _cubic_weights(py - y0)  # (4, h, w)
    offsets = torch.arange(-1, 3).view(4, 1, 1)
    xi = (x0.long() + offsets).clamp_(0, w - 1)
    yi = (y0.long() + offsets).clamp_(0, h - 1) * w
    # shears and translations land on whole rows or columns: 4 taps, not 16
    taps = [(j, i) for j in range(4) if wy[j].any() for i in range(4) if wx[i].any()]
    # 16 taps (rotation): gather pixel-major (H*W, N*C) rows, each a pixel of every frame and channel, ~1.5-3x faster;
    # 4 taps: the transposes would cost more than they save
    pixel_major = len(taps) > 4
    src = x.permute(2, 3, 0, 1).reshape(h * w, n * c) if pixel_major else x.reshape(n * c, h * w).float()
    acc = torch.zeros(src.shape)
    for j, i in taps:
        index = (yi[j] + xi[i]).reshape(-1)
        weight = (wy[j] * wx[i]).reshape(-1).float()
        if pixel_major:
            acc.addcmul_(src.index_select(0, index).float(), weight[:, None])
        else:
            acc.addcmul_(src.index_select(1, index), weight)
    out = acc.clamp_(0, 255).to(torch.uint8)  # truncation, as PIL
    out = out.view(h, w, n, c).permute(2, 3, 0, 1) if pixel_major else out.view(n, c, h, w)
    fill_t = torch.tensor(list(fill), dtype=torch.uint8).view(1, c, 1, 1)
    return torch.where(inside, out, fill_t)


def rotate(x: torch.Tensor, degrees: float, fill: Sequence[int]) -> torch.Tensor:
    """PIL's `Image.rotate(degrees)` (no expand): about the frame centre, counter-clockwise for degrees > 0."""
    h, w = x.shape[-2:]
    t = math.radians(degrees)
    cos, sin = math.cos(t), math.sin(t)
    cx, cy = w / 2.0, h / 2.0
    # input = centre + [[cos, -sin], [sin, cos]] (output - centre), in image coordinates (y down)
    return affine(x, (cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy), fill)


def shear_x(x: torch.Tensor, factor: float, fill: Sequence[int]) -> torch.Tensor:
    return affine(x, (1.0, factor, 0.0, 0.0, 1.0, 0.0), fill)


def shear_y(x: torch.Tensor, factor: float, fill: Sequence[int]) -> torch.Tensor:
    return affine(x, (1.0, 0.0, 0.0, factor, 1.0, 0.0), fill)


def translate_x(x: torch.Tensor, pixels: float, fill: Sequence[int]) -> torch.Tensor:
    """Output (x, y) <- input (x + pixels, y): the content moves left for pixels > 0."""
    return affine(x, (1.0, 0.0, pixels, 0.0, 1.0, 0.0), fill)


def translate_y(x: torch.Tensor, pixels: float, fill: Sequence[int]) -> torch.Tensor:
    return affine(x, (1.0, 0.0, 0.0, 0.0, 1.0, pixels), fill)


# ----------------------------------------------------------------------------------------------------------------
# Level -> argument mappings (timm's, level in [0, 10]) and the op table.


def _enhance_increasing(m: float) -> float:  # 1 +/- 0.9 m/10: the sign is applied by the draw
    return m / MAX_LEVEL * 0.9


@dataclass(frozen=True)
class _Op:
    apply: Callable[..., torch.Tensor]  # (x, arg, fill) -> x
    level_to_arg: Callable[[float], float | int] | None  # None: the op takes no argument
    signed: bool = False  # the argument's sign is drawn (+/- with probability 1/2)
    offset: float = 0.0  # added after the sign (the enhance factors: 1 +/- ...)
    relative: str | None = None  # "x" / "y": the argument is a fraction of the frame's width / height


_OPS: dict[str, _Op] = {
    "AutoContrast": _Op(lambda x, a, fill: autocontrast(x), None),
    "Equalize": _Op(lambda x, a, fill: equalize(x), None),
    "Invert": _Op(lambda x, a, fill: invert(x), None),
    "Rotate": _Op(lambda x, a, fill: rotate(x, a, fill), lambda m: m / MAX_LEVEL * 30.0, signed=True),
    "PosterizeIncreasing": _Op(lambda x, a, fill: posterize(x, a), lambda m: 4 - int(m / MAX_LEVEL * 4)),
    "PosterizeOriginal": _Op(lambda x, a, fill: posterize(x, a), lambda m: int(m / MAX_LEVEL * 4) + 4),
    "SolarizeIncreasing": _Op(lambda x, a, fill: solarize(x, a), lambda m: 256 - int(m / MAX_LEVEL * 256)),
    "Solarize": _Op(lambda x, a, fill: solarize(x, a), lambda m: int(m / MAX_LEVEL * 256)),
    "SolarizeAdd": _Op(lambda x, a, fill: solarize_add(x, a), lambda m: int(m / MAX_LEVEL * 110)),
    "ColorIncreasing": _Op(lambda x, a, fill: color(x, a), _enhance_increasing, signed=True, offset=1.0),
    "ContrastIncreasing": _Op(lambda x, a, fill: contrast(x, a), _enhance_increasing, signed=True, offset=1.0),
    "BrightnessIncreasing": _Op(lambda x, a, fill: brightness(x, a), _enhance_increasing, signed=True, offset=1.0),
    "SharpnessIncreasing": _Op(lambda x, a, fill: sharpness(x, a), _enhance_increasing, signed=True, offset=1.0),
    "Color": _Op(lambda x, a, fill: color(x, a), lambda m: m / MAX_LEVEL * 1.8 + 0.1),
    "Contrast": _Op(lambda x, a, fill: contrast(x, a), lambda m: m / MAX_LEVEL * 1.8 + 0.1),
    "Sharpness": _Op(lambda x, a, fill: sharpness(x, a), lambda m: m / MAX_LEVEL * 1.8 + 0.1),
    "ShearX": _Op(lambda x, a, fill: shear_x(x, a, fill), lambda m: m / MAX_LEVEL * 0.3, signed=True),
    "ShearY": _Op(lambda x, a, fill: shear_y(x, a, fill), lambda m: m / MAX_LEVEL * 0.3, signed=True),
    "TranslateXRel": _Op(lambda x, a, fill: translate_x(x, a, fill), lambda m: m / MAX_LEVEL * 0.45, signed=True,
                         relative="x"),
    "TranslateYRel": _Op(lambda x, a, fill: translate_y(x, a, fill), lambda m: m / MAX_LEVEL * 0.45, signed=True,
                         relative="y"),
}


@dataclass(frozen=True)
class OpDraw:
    """One drawn op of a policy: whether it fired, its level, and its argument (sign and offset included;
    for TranslateX/YRel the signed fraction of the frame, turned into pixels when applied)."""

    name: str
    fired: bool
    level: float | None = None
    arg: float | int | None = None


def _draw_op(name: str, fired: bool, level: float, rng: np.random.Generator) -> OpDraw:
    if not fired:
        return OpDraw(name, False)
    op = _OPS[name]
    if op.level_to_arg is None:
        return OpDraw(name, True, level)
    arg = op.level_to_arg(level)
    if op.signed and rng.random() < 0.5:
        arg = -arg
    return OpDraw(name, True, level, arg + op.offset if op.offset else arg)


def draw_rand_augment(rng: np.random.Generator, *, num_ops: int = 4, magnitude: float = 7.0,
                      magnitude_std: float = 0.5, prob: float = 0.5,
                      ops: Sequence[str] = RAND_INCREASING_OPS) -> list[OpDraw]:
    """The random part of RandAugment for one clip: `num_ops` ops uniformly with replacement, then per op: fires
    with `prob`; if so level ~ N(magnitude, magnitude_std) clipped to [0, 10], then the sign of a signed op."""
    chosen = rng.integers(0, len(ops), size=num_ops)
    draws = []
    for k in chosen:
        fired = bool(rng.random() < prob)
        level = min(MAX_LEVEL, max(0.0, float(rng.normal(magnitude, magnitude_std)))) if fired else 0.0
        draws.append(_draw_op(ops[int(k)], fired, level, rng))
    return draws


def draw_auto_augment(rng: np.random.Generator, policy: Sequence = IMAGENET_POLICY) -> list[OpDraw]:
    """The random part of AutoAugment for one image: a sub-policy uniformly, then per op: fires with its
    probability, at its fixed level (sign drawn for the signed ops)."""
    sub_policy = policy[int(rng.integers(0, len(policy)))]
    return [_draw_op(name, bool(rng.random() < p), float(level), rng) for name, p, level in sub_policy]


def apply_ops(x: torch.Tensor, draws: Sequence[OpDraw], fill: Sequence[int]) -> torch.Tensor:
    """Apply the fired draws, in order, to uint8 frames (N, 3, H, W): one call per op for all N frames."""
    for draw in draws:
        if not draw.fired:
            continue
        op = _OPS[draw.name]
        arg = draw.arg
        if op.relative is not None:
            arg = arg * x.shape[-1 if op.relative == "x" else -2]
        x = op.apply(x, arg, fill)
    return x


def rand_augment_clip(frames: np.ndarray | torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """RandAugment "rand-m7-n4-mstd0.5-inc1" on a clip: uint8 (T, H, W, 3) -> uint8 (T, H, W, 3), the same drawn
    ops on every frame."""
    frames = check_frames(frames)
    draws = draw_rand_augment(rng)
    if not any(d.fired for d in draws):
        return frames
    x = apply_ops(frames.permute(0, 3, 1, 2).contiguous(), draws, VIDEO_FILL)
    return x.permute(0, 2, 3, 1)


# ----------------------------------------------------------------------------------------------------------------
# Random erasing


def draw_erase_box(height: int, width: int, rng: np.random.Generator, *, attempts: int, min_area: float = 0.02,
                   max_area: float = 1 / 3, min_aspect: float = 0.3) -> tuple[int, int, int, int] | None:
    """One erasing box (top, left, h, w), or None when no attempt fits (see the module docstring)."""
    area = height * width
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    for _ in range(attempts):
        target = rng.uniform(min_area, max_area) * area
        aspect = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(target * aspect)))
        w = int(round(math.sqrt(target / aspect)))
        if 0 < w < width and 0 < h < height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return None


def random_erase(x: torch.Tensor, rng: np.random.Generator, prob: float, *, attempts: int = 100) -> torch.Tensor:
    """Pixel-mode random erasing, in place, of a normalised image (C, H, W) or clip (C, T, H, W): with probability
    `prob`, one box, the same on every frame, filled with N(0, 1) noise drawn for every pixel of every frame."""
    if not prob > 0 or rng.random() >= prob:
        return x
    box = draw_erase_box(x.shape[-2], x.shape[-1], rng, attempts=attempts)
    if box is not None:
        top, left, h, w = box
        noise = rng.standard_normal((*x.shape[:-2], h, w), dtype=np.float32)
        x[..., top:top + h, left:left + w] = torch.from_numpy(noise).to(x.dtype)
    return x


# ----------------------------------------------------------------------------------------------------------------
# The image training transform (spec 6.5)


def image_train_clip(image: np.ndarray | torch.Tensor, crop: int, num_frames: int, scale: tuple[float, float],
                     ratio: tuple[float, float], rng: np.random.Generator, *, auto_augment: bool = True,
                     reprob: float = 0.25, hflip_prob: float = 0.5) -> torch.Tensor:
    """timm's ImageNet training transform of one image (uint8 (H, W, 3), or (1, H, W, 3)), then the image repeated
    `num_frames` times: normalised float32 (3, num_frames, crop, crop). Random resized crop (bicubic, antialiased as
    PIL's resize) -> horizontal flip -> AutoAugment 'original' -> normalise -> random erasing (10 attempts)."""
    image = torch.as_tensor(image)
    image = check_frames(image if image.ndim == 4 else image[None])[:1]
    top, left, h, w = random_resized_crop_box(image.shape[1], image.shape[2], scale, ratio, rng)
    x = image[:, top:top + h, left:left + w].permute(0, 3, 1, 2).contiguous()
    # torch's uint8 antialiased bicubic is PIL's `resize` (a = -0.5, fixed-point), to +/- 1-2 levels
    x = F.interpolate(x, size=(crop, crop), mode="bicubic", align_corners=False, antialias=True)
    if rng.random() < hflip_prob:
        x = x.flip(-1)
    if auto_augment:
        x = apply_ops(x, draw_auto_augment(rng), IMAGE_FILL)
    img = (x[0].float() - _MEAN) / _STD  # (3, crop, crop)
    random_erase(img, rng, reprob, attempts=10)
    return img[:, None].expand(3, num_frames, crop, crop).contiguous()
