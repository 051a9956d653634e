"""Pretraining transform against reference spec §5.3 (`app/vjepa/transforms.py::VideoTransform`)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.data.transforms import IMAGENET_MEAN, IMAGENET_STD, pretrain_transform, random_resized_crop_box

SCALE, RATIO = (0.3, 1.0), (0.75, 1.35)
MEAN_255 = torch.tensor(IMAGENET_MEAN, dtype=torch.float32) * 255
STD_255 = torch.tensor(IMAGENET_STD, dtype=torch.float32) * 255


def reference_transform(frames: np.ndarray, box: tuple[int, int, int, int], crop_size: int) -> torch.Tensor:
    """The reference's order: whole clip to float (C, T, H, W), crop, bilinear resize, normalise in 0-255 scale."""
    top, left, h, w = box
    video = torch.tensor(frames, dtype=torch.float32).permute(3, 0, 1, 2)
    video = F.interpolate(video[:, :, top:top + h, left:left + w], size=(crop_size, crop_size), mode="bilinear",
                          align_corners=False)
    return (video - MEAN_255.view(3, 1, 1, 1)) / STD_255.view(3, 1, 1, 1)


def test_box_within_bounds_area_and_aspect_in_range():
    height, width = 120, 160
    rng = np.random.default_rng(0)
    boxes = [random_resized_crop_box(height, width, SCALE, RATIO, rng) for _ in range(2000)]
    for top, left, h, w in boxes:
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0
        # w and h are rounded, so the drawn area and aspect ratio are only known to within half a pixel each.
        assert (w + 0.5) * (h + 0.5) >= SCALE[0] * height * width
        assert (w - 0.5) * (h - 0.5) <= SCALE[1] * height * width
        assert (w + 0.5) / (h - 0.5) >= RATIO[0] and (w - 0.5) / (h + 0.5) <= RATIO[1]
    assert len(set(boxes)) > 1500  # random sizes and positions, not a constant fallback
    assert len({top for top, _, _, _ in boxes}) > 40 and len({left for _, left, _, _ in boxes}) > 60
    assert min(h * w for _, _, h, w in boxes) < 0.35 * height * width


@pytest.mark.parametrize("height, width, expected", [
    (100, 100, (0, 0, 100, 100)),  # aspect ratio 1 lies in RATIO: whole frame
    (90, 300, (0, 89, 90, 122)),  # too wide: width = round(90 * 1.35 = 121.5), centred
    (300, 110, (76, 0, 147, 110)),  # too tall: height = round(110 / 0.75 = 146.7), centred
])
def test_box_fallback_is_central_crop(height, width, expected):
    # An area of 2-3 frames never fits, so all 10 attempts fail.
    assert random_resized_crop_box(height, width, (2.0, 3.0), RATIO, np.random.default_rng(0)) == expected


def test_normalises_constant_clip():
    frames = np.empty((3, 24, 32, 3), dtype=np.uint8)
    frames[...] = (10, 128, 250)
    out = pretrain_transform(frames, 16, SCALE, RATIO, np.random.default_rng(0))
    assert out.shape == (3, 3, 16, 16) and out.dtype == torch.float32 and out.is_contiguous()
    expected = (torch.tensor([10.0, 128.0, 250.0]) - MEAN_255) / STD_255
    torch.testing.assert_close(out, expected.view(3, 1, 1, 1).expand_as(out), atol=1e-5, rtol=0)


def test_flip_flips_width():
    # A horizontal ramp: without flip the output increases along width, flipped it decreases.
    ramp = np.broadcast_to(np.arange(0, 256, 4, dtype=np.uint8)[None, None, :, None], (2, 48, 64, 3)).copy()
    kept = pretrain_transform(ramp, 16, SCALE, RATIO, np.random.default_rng(3), hflip_prob=0.0)
    flipped = pretrain_transform(ramp, 16, SCALE, RATIO, np.random.default_rng(3), hflip_prob=1.0)
    assert torch.equal(flipped, kept.flip(-1))
    assert (kept.diff(dim=-1) > 0).all() and (flipped.diff(dim=-1) < 0).all()


def test_matches_reference_order_float_crop_resize():
    frames = np.random.default_rng(0).integers(0, 256, size=(5, 37, 53, 3), dtype=np.uint8)
    for seed in range(5):
        box = random_resized_crop_box(37, 53, SCALE, RATIO, np.random.default_rng(seed))
        out = pretrain_transform(frames, 24, SCALE, RATIO, np.random.default_rng(seed), hflip_prob=0.0)
        torch.testing.assert_close(out, reference_transform(frames, box, 24), atol=1e-5, rtol=1e-5)
        # Tensors are accepted as well as arrays.
        same = pretrain_transform(torch.from_numpy(frames), 24, SCALE, RATIO, np.random.default_rng(seed),
                                  hflip_prob=0.0)
        assert torch.equal(out, same)


def test_rejects_float_frames():
    with pytest.raises(ValueError, match="uint8"):
        pretrain_transform(np.zeros((2, 8, 8, 3), np.float32), 4, SCALE, RATIO, np.random.default_rng(0))
