"""The frozen evaluation's training augmentations (engine/evaluation/augment.py; spec 6.3 video, 6.5 images)."""

from collections import Counter

import numpy as np
import pytest
import torch

from engine.data.transforms import finish_clip, random_resized_crop_box
from engine.evaluation import augment as A
from engine.evaluation.config import EvalAugConfig, EvalDataConfig
from engine.evaluation.data import EvalClips
from engine.evaluation.views import train_view

FILL = A.VIDEO_FILL


def _clip(n=2, h=24, w=30, seed=0) -> torch.Tensor:
    """uint8 (n, 3, h, w): blocky structure plus noise, every frame different."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (n, 3, h // 4 + 1, w // 5 + 1), generator=g, dtype=torch.uint8)
    base = blocks.repeat_interleave(4, 2).repeat_interleave(5, 3)[..., :h, :w]
    return (base // 2 + torch.randint(0, 120, (n, 3, h, w), generator=g, dtype=torch.uint8)).contiguous()


# ------------------------------------------------------------------------------------------------ the ops' math


def test_point_ops():
    x = _clip()
    assert torch.equal(A.invert(x), 255 - x)
    for bits in range(0, 9):
        out = A.posterize(x, bits)
        step = 2 ** (8 - bits)
        assert torch.equal(out, (x.int() // step * step).to(torch.uint8)), bits  # the top bits kept, the rest zero
    for t in (0, 77, 128, 255, 256):
        assert torch.equal(A.solarize(x, t), torch.where(x.int() >= t, 255 - x.int(), x.int()).to(torch.uint8))
    expect = torch.where(x.int() < 128, (x.int() + 77).clamp(max=255), x.int()).to(torch.uint8)
    assert torch.equal(A.solarize_add(x, 77), expect)


def test_autocontrast_and_equalize():
    x = _clip()
    x[1, 2] = 90  # a constant channel is left alone
    out = A.autocontrast(x).int()
    assert torch.equal(out[1, 2], x[1, 2].int())
    for f, c in [(0, 0), (0, 1), (1, 0)]:
        lo, hi = x[f, c].double().min(), x[f, c].double().max()
        s = 255.0 / (hi - lo)
        assert torch.equal(out[f, c], (x[f, c].double() * s - lo * s).trunc().int())
        assert out[f, c].min() == 0 and out[f, c].max() == 255

    eq = A.equalize(x)
    assert torch.equal(eq[1, 2], x[1, 2])
    for f, c in [(0, 0), (1, 1)]:  # PIL's equalisation, written out with a python loop
        v = x[f, c].flatten().tolist()
        hist = np.bincount(v, minlength=256)
        step = (len(v) - hist[max(v)]) // 256
        lut, n = [], step // 2
        for i in range(256):
            lut.append(min(255, n // step))
            n += hist[i]
        assert eq[f, c].flatten().tolist() == [lut[i] for i in v]
    # equalising spreads the values: the output histogram is flatter than a narrow input's
    narrow = (x // 4 + 100).contiguous()
    assert A.equalize(narrow).float().std() > 3 * narrow.float().std()


def test_enhance_ops():
    x = _clip()
    xf = x.float()
    assert torch.equal(A.brightness(x, 0.63), (xf * 0.63).trunc().to(torch.uint8))
    assert torch.equal(A.brightness(x, 1.63), (xf * 1.63).clamp(0, 255).trunc().to(torch.uint8))
    luma = (x[:, 0:1].int() * 19595 + x[:, 1:2].int() * 38470 + x[:, 2:3].int() * 7471 + 32768) >> 16
    assert torch.equal(A.color(x, 0.0), luma.expand_as(x).to(torch.uint8))  # fully desaturated: the grey frame
    grey = luma.expand(-1, 3, -1, -1).to(torch.uint8).contiguous()
    assert torch.equal(A.color(grey, 1.9), grey)  # a grey frame has no colour to enhance
    mean = torch.floor(luma.double().mean(dim=(1, 2, 3)) + 0.5)  # one grey level per frame
    flat = A.contrast(x, 0.0)
    for f in range(2):
        assert torch.equal(flat[f], torch.full_like(x[f], int(mean[f])))
    expect = (mean.view(2, 1, 1, 1) + 1.5 * (xf - mean.view(2, 1, 1, 1))).clamp(0, 255).trunc().to(torch.uint8)
    assert torch.equal(A.contrast(x, 1.5), expect)
    smooth = A.sharpness(x, 0.0).int()  # factor 0: the SMOOTH filter itself, borders kept
    xi = x.int()
    box = sum(xi[..., 1 + dy:xi.shape[-2] - 1 + dy, 1 + dx:xi.shape[-1] - 1 + dx]
              for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    assert torch.equal(smooth[..., 1:-1, 1:-1], torch.floor((box + 4 * xi[..., 1:-1, 1:-1]) / 13 + 0.5).int())
    assert torch.equal(smooth[..., 0, :], xi[..., 0, :]) and torch.equal(smooth[..., :, -1], xi[..., :, -1])
    for op in (A.color, A.contrast, A.brightness, A.sharpness):
        assert torch.equal(op(x, 1.0), x)  # factor 1 is the identity


def test_geometric_ops():
    x = _clip(h=20, w=20)
    # rotation about the centre, counter-clockwise: 90 and 180 degrees are exact pixel permutations
    assert torch.equal(A.rotate(x, 90.0, FILL), torch.rot90(x, 1, dims=(-2, -1)))
    assert torch.equal(A.rotate(x, 180.0, FILL), x.flip(-1, -2))
    assert torch.equal(A.rotate(x, -90.0, FILL), torch.rot90(x, -1, dims=(-2, -1)))
    # translation by whole pixels: output (x, y) <- input (x + p, y), the rest filled
    fill = torch.tensor(FILL, dtype=torch.uint8).view(1, 3, 1, 1)
    moved = A.translate_x(x, 9.0, FILL)
    assert torch.equal(moved[..., :11], x[..., 9:]) and torch.equal(moved[..., 11:], fill.expand(2, 3, 20, 9))
    moved = A.translate_y(x, -6.0, FILL)
    assert torch.equal(moved[..., 6:, :], x[..., :14, :]) and torch.equal(moved[..., :6, :], fill.expand(2, 3, 6, 20))
    # shear about the top-left corner: row y moves by f * (y + 0.5); on a linear ramp the cubic is exact inside
    ramp = (torch.arange(40).float() * 4 + 20).to(torch.uint8).expand(1, 3, 16, 40).contiguous()
    f = 0.3
    sheared = A.shear_x(ramp, f, FILL)
    for y in range(16):
        shift = f * (y + 0.5)
        src = torch.arange(40) + 0.5 + shift  # where each output pixel samples, in continuous coordinates
        inside = src < 40
        assert (sheared[0, :, y, ~inside] == fill[0, :, 0]).all()  # the fill enters from the right, row by row
        interior = (src >= 1.5) & (src < 40 - 2.5)  # away from the replicated edges
        expect = ((src[interior] - 0.5) * 4 + 20).floor()  # truncated; PIL's cubic is exact on lines to 0.4
        assert torch.allclose(sheared[0, 0, y, interior].float(), expect, atol=1), y
    shear_y = A.shear_y(ramp.transpose(-1, -2).contiguous(), f, FILL)
    assert torch.equal(shear_y, sheared.transpose(-1, -2))  # ShearY is ShearX of the transposed frame
    # the Rel translations move by a fraction of the frame's own width / height (20 x 40 here)
    tall = _clip(h=40, w=20)
    x_draw, y_draw = A.OpDraw("TranslateXRel", True, 10.0, 0.45), A.OpDraw("TranslateYRel", True, 10.0, -0.45)
    assert torch.equal(A.apply_ops(tall, [x_draw], FILL), A.translate_x(tall, 9.0, FILL))
    assert torch.equal(A.apply_ops(tall, [y_draw], FILL), A.translate_y(tall, -18.0, FILL))


def test_fill_colours():
    assert A.VIDEO_FILL == (128, 128, 128)  # V1's RandAugment gets no img_mean: timm's default grey
    assert A.IMAGE_FILL == (124, 116, 104)  # timm's create_transform passes the ImageNet mean


def test_ops_match_pil_frame_by_frame():
    """Each op against its PIL counterpart (the reference applies those to every frame)."""
    pil = pytest.importorskip("PIL.Image")
    from PIL import ImageEnhance, ImageOps

    x = _clip(h=37, w=45)
    frames = [pil.fromarray(f.permute(1, 2, 0).numpy()) for f in x]
    bicubic = {"resample": pil.BICUBIC, "fillcolor": FILL}

    def affine(im, m):
        return im.transform(im.size, pil.AFFINE, m, **bicubic)

    cases = [
        (lambda t: A.autocontrast(t), lambda im: ImageOps.autocontrast(im), 0),
        (lambda t: A.equalize(t), lambda im: ImageOps.equalize(im), 0),
        (lambda t: A.posterize(t, 3), lambda im: ImageOps.posterize(im, 3), 0),
        (lambda t: A.solarize(t, 77), lambda im: ImageOps.solarize(im, 77), 0),
        (lambda t: A.color(t, 1.63), lambda im: ImageEnhance.Color(im).enhance(1.63), 0),
        (lambda t: A.contrast(t, 0.37), lambda im: ImageEnhance.Contrast(im).enhance(0.37), 0),
        (lambda t: A.brightness(t, 1.55), lambda im: ImageEnhance.Brightness(im).enhance(1.55), 0),
        (lambda t: A.sharpness(t, 1.8), lambda im: ImageEnhance.Sharpness(im).enhance(1.8), 0),
        (lambda t: A.rotate(t, 21.3, FILL), lambda im: im.rotate(21.3, **bicubic), 1),
        (lambda t: A.shear_x(t, -0.21, FILL), lambda im: affine(im, (1, -0.21, 0, 0, 1, 0)), 1),
        (lambda t: A.shear_y(t, 0.27, FILL), lambda im: affine(im, (1, 0, 0, 0.27, 1, 0)), 1),
        (lambda t: A.translate_x(t, -7.3, FILL), lambda im: affine(im, (1, 0, -7.3, 0, 1, 0)), 1),
        (lambda t: A.translate_y(t, 5.6, FILL), lambda im: affine(im, (1, 0, 0, 0, 1, 5.6)), 1),
    ]
    for k, (ours, theirs, tolerance) in enumerate(cases):
        out = ours(x).permute(0, 2, 3, 1).numpy().astype(int)
        ref = np.stack([np.asarray(theirs(im)) for im in frames]).astype(int)
        diff = np.abs(out - ref)
        # point and enhance ops: exact; geometric ops: one level off where the true value is an integer and
        # float32 lands on the other side of it than PIL's double (~1e-3 of the pixels)
        assert diff.max() <= tolerance and (diff > 0).mean() < 5e-3, (k, diff.max(), (diff > 0).mean())


# ------------------------------------------------------------------------------------------------ the draws


def _draws(n, seed=0):
    rng = np.random.default_rng(seed)
    return [d for _ in range(n) for d in A.draw_rand_augment(rng)]


def test_level_to_argument_mappings():
    expected = {
        "Rotate": lambda m: m / 10 * 30, "PosterizeIncreasing": lambda m: 4 - int(m / 10 * 4),
        "SolarizeIncreasing": lambda m: 256 - int(m / 10 * 256), "SolarizeAdd": lambda m: int(m / 10 * 110),
        "ColorIncreasing": lambda m: m / 10 * 0.9, "ContrastIncreasing": lambda m: m / 10 * 0.9,
        "BrightnessIncreasing": lambda m: m / 10 * 0.9, "SharpnessIncreasing": lambda m: m / 10 * 0.9,
        "ShearX": lambda m: m / 10 * 0.3, "ShearY": lambda m: m / 10 * 0.3,
        "TranslateXRel": lambda m: m / 10 * 0.45, "TranslateYRel": lambda m: m / 10 * 0.45,
    }
    signs = Counter()
    for d in _draws(600):
        if not d.fired:
            continue
        if d.name in ("AutoContrast", "Equalize", "Invert"):
            assert d.arg is None
        elif d.name.endswith("Increasing") and d.name[:-10] in ("Color", "Contrast", "Brightness", "Sharpness"):
            assert abs(d.arg - 1) == pytest.approx(expected[d.name](d.level))  # 1 +/- ...
            signs[d.arg > 1] += 1
        elif d.name in ("PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd"):
            assert d.arg == expected[d.name](d.level) and isinstance(d.arg, int)
        else:
            assert abs(d.arg) == pytest.approx(expected[d.name](d.level))
            signs[d.arg > 0] += 1
    assert abs(signs[True] - signs[False]) < 0.15 * (signs[True] + signs[False])  # signs drawn +/- evenly
    # AutoAugment's own ("original") mappings, at the policy's fixed levels
    rng = np.random.default_rng(1)
    seen = {}
    for _ in range(400):
        for d in A.draw_auto_augment(rng):
            if d.fired:
                seen.setdefault((d.name, d.level), set()).add(d.arg)
    assert seen[("PosterizeOriginal", 8.0)] == {7} and seen[("PosterizeOriginal", 5.0)] == {6}
    assert seen[("Solarize", 5.0)] == {128} and seen[("Solarize", 3.0)] == {76}
    assert sorted(seen[("Color", 0.0)]) == pytest.approx([0.1])
    assert sorted(seen[("Contrast", 8.0)]) == pytest.approx([1.54])
    assert sorted(seen[("Rotate", 9.0)]) == pytest.approx([-27.0, 27.0])
    assert sorted(seen[("ShearX", 5.0)]) == pytest.approx([-0.15, 0.15])


def test_rand_augment_statistics():
    draws = _draws(2500)  # 10 000 ops
    assert len(draws) == 10_000
    fired = [d for d in draws if d.fired]
    assert abs(len(fired) / len(draws) - 0.5) < 0.02
    levels = np.array([d.level for d in fired])
    assert abs(levels.mean() - 7) < 0.03 and abs(levels.std() - 0.5) < 0.03
    assert 0 <= levels.min() and levels.max() <= 10
    counts = Counter(d.name for d in draws)
    assert set(counts) == set(A.RAND_INCREASING_OPS)
    assert all(abs(c - len(draws) / 15) < 0.15 * len(draws) / 15 for c in counts.values()), counts


def test_rand_augment_is_the_same_on_every_frame_and_reproducible():
    clip = _clip(n=3, h=24, w=30, seed=5).permute(0, 2, 3, 1)  # (T, H, W, 3)
    same = clip[:1].expand(3, -1, -1, -1)
    changed = 0
    for seed in range(40):
        out = A.rand_augment_clip(same, np.random.default_rng(seed))
        assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])
        # two different frames: exactly the drawn ops, applied to each frame on its own
        draws = A.draw_rand_augment(np.random.default_rng(seed))
        out = A.rand_augment_clip(clip, np.random.default_rng(seed))
        for t in range(3):
            alone = A.apply_ops(clip[t:t + 1].permute(0, 3, 1, 2).contiguous(), draws, FILL)
            assert torch.equal(out[t], alone[0].permute(1, 2, 0))
        assert torch.equal(out, A.rand_augment_clip(clip, np.random.default_rng(seed)))  # same seed, same clip
        changed += not torch.equal(out, clip)
    assert changed >= 30  # 4 ops at p 0.5: nothing fires 1 time in 16
    outputs = {A.rand_augment_clip(clip, np.random.default_rng(s)).numpy().tobytes() for s in range(40)}
    assert len(outputs) >= 30  # different seeds, different clips


# ------------------------------------------------------------------------------------------------ random erasing


def test_erase_boxes_follow_the_recipe():
    rng = np.random.default_rng(0)
    h, w = 64, 80
    for _ in range(500):
        top, left, bh, bw = A.draw_erase_box(h, w, rng, attempts=100)
        assert 0 <= top and top + bh <= h and 0 <= left and left + bw <= w and bh < h and bw < w
        # area fraction in [0.02, 1/3] and aspect h/w in [0.3, 1/0.3], up to the rounding of h and w
        assert (bh + 0.5) * (bw + 0.5) >= 0.02 * h * w and (bh - 0.5) * (bw - 0.5) <= h * w / 3
        assert (bh + 0.5) / (bw - 0.5) >= 0.3 and (bh - 0.5) / (bw + 0.5) <= 1 / 0.3


def test_random_erasing_one_box_on_every_frame():
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(800):
        x = torch.zeros(3, 4, 16, 20)  # (C, T, H, W)
        A.random_erase(x, rng, 0.25)
        erased = x != 0
        if erased.any():
            hits += 1
            assert (erased == erased[0, 0]).all()  # the same box on every frame and channel
            rows, cols = erased[0, 0].any(1).nonzero(), erased[0, 0].any(0).nonzero()
            assert erased[0, 0].sum() == len(rows) * len(cols)  # a rectangle
            noise = x[erased].view(3, 4, -1)
            assert not torch.equal(noise[:, 0], noise[:, 1])  # noise drawn for every frame
    assert abs(hits / 800 - 0.25) < 0.05
    big = torch.zeros(3, 2, 64, 64)
    while not big.any():
        A.random_erase(big, rng, 1.0)
    noise = big[big != 0]
    assert abs(noise.mean()) < 0.1 and abs(noise.std() - 1) < 0.1  # N(0, 1)
    x = torch.randn(3, 4, 16, 20)
    assert torch.equal(A.random_erase(x.clone(), rng, 0.0), x)  # p = 0: the identity


# ------------------------------------------------------------------------------------------------ the pipelines


def test_train_view_composes_randaugment_crop_and_erasing_in_v1s_order():
    frames = _clip(n=4, h=32, w=40, seed=2).permute(0, 2, 3, 1)
    for seed in range(6):
        out = train_view(frames, 16, (0.08, 1.0), (0.75, 4 / 3), np.random.default_rng(seed), rand_augment=True,
                         reprob=0.5)
        rng = np.random.default_rng(seed)
        augmented = A.rand_augment_clip(frames, rng)
        top, left, h, w = random_resized_crop_box(32, 40, (0.08, 1.0), (0.75, 4 / 3), rng)
        expect = A.random_erase(finish_clip(augmented[:, top:top + h, left:left + w], 16, flip=False), rng, 0.5)
        assert out.shape == (1, 3, 4, 16, 16) and torch.equal(out[0], expect)


def test_image_training_transform():
    image = _clip(n=1, h=40, w=52, seed=3)[0].permute(1, 2, 0)
    outs = [A.image_train_clip(image, 24, 6, (0.08, 1.0), (0.75, 4 / 3), np.random.default_rng(s)) for s in range(8)]
    for out in outs:
        assert out.shape == (3, 6, 24, 24) and out.dtype == torch.float32 and torch.isfinite(out).all()
        assert (out == out[:, :1]).all()  # one image repeated along time, erased box and noise included
    assert len({o.numpy().tobytes() for o in outs}) == 8
    again = A.image_train_clip(image, 24, 6, (0.08, 1.0), (0.75, 4 / 3), np.random.default_rng(0))
    assert torch.equal(again, outs[0])
    # timm's order: crop, flip, AutoAugment, normalise, erase (10 attempts), drawn in that order
    for seed in range(8):
        rng = np.random.default_rng(seed)
        top, left, h, w = random_resized_crop_box(40, 52, (0.08, 1.0), (0.75, 4 / 3), rng)
        x = torch.nn.functional.interpolate(image[top:top + h, left:left + w].permute(2, 0, 1)[None].contiguous(),
                                            size=(24, 24), mode="bicubic", antialias=True, align_corners=False)
        if rng.random() < 0.5:
            x = x.flip(-1)
        x = A.apply_ops(x, A.draw_auto_augment(rng), A.IMAGE_FILL)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1) * 255
        std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) * 255
        expect = A.random_erase((x[0].float() - mean) / std, rng, 0.25, attempts=10)
        assert torch.equal(outs[seed][:, 0], expect)
    # without AutoAugment nor erasing: the crop and the flip of the normalised image
    plain = A.image_train_clip(image, 24, 2, (1.0, 1.0), (52 / 40, 52 / 40), np.random.default_rng(0),
                               auto_augment=False, reprob=0.0, hflip_prob=0.0)
    ref = torch.nn.functional.interpolate(image.permute(2, 0, 1)[None].contiguous(), size=(24, 24), mode="bicubic",
                                          antialias=True, align_corners=False)[0].float()
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    assert torch.allclose(plain[:, 0], (ref / 255 - mean) / std, atol=1e-5)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    from .video_faults import write_image, write_video

    folder = tmp_path_factory.mktemp("aug")
    return write_video(folder / "a.webm", 24, seed=1), write_image(folder / "b.png", seed=2)


def test_eval_clips_training_items_with_augmentation(media):
    video, image = media
    data = EvalDataConfig(train=["x"], val=["y"], num_classes=2, frames_per_clip=8, num_segments=2, num_views=3,
                          frame_step=2, crop_size=32)
    aug = EvalAugConfig()  # V1's recipe: RandAugment, AutoAugment for images, random erasing 0.25
    ds = EvalClips([video, image], [0, 1], data, aug, training=True, seed=0)
    for i in (0, 1):
        clips, label, index, failures = ds[i]
        assert clips.shape == (2, 1, 3, 8, 32, 32) and clips.dtype == torch.float32 and torch.isfinite(clips).all()
        assert (label, index, failures) == (i, i, "")
        assert torch.equal(ds[i][0], clips)  # a pure function of (seed, epoch, entry)
        ds.set_epoch(1)
        assert not torch.equal(ds[i][0], clips)
        ds.set_epoch(0)
    assert (ds[1][0] == ds[1][0][:, :, :, :1]).all()  # an image: every frame the same
    val = EvalClips([video, image], [0, 1], data, aug, training=False, seed=0)
    assert val[0][0].shape == (2, 3, 3, 8, 32, 32) and val[1][0].shape == (2, 3, 3, 8, 32, 32)


def test_a_bad_entry_is_replaced_by_another_and_reported(media, tmp_path):
    video, image = media
    (tmp_path / "corrupt.webm").write_bytes(b"\x1aE\xdf\xa3" + bytes(range(256)) * 8)
    paths = [video, str(tmp_path / "missing.webm"), str(tmp_path / "corrupt.webm"), image]
    data = EvalDataConfig(train=["x"], val=["y"], num_classes=4, frames_per_clip=8, num_segments=1, num_views=1,
                          frame_step=2, crop_size=32)
    ds = EvalClips(paths, [0, 1, 2, 3], data, EvalAugConfig(enabled=False), training=True, seed=0)
    for i in (1, 2):
        clips, label, index, failures = ds[i]
        assert index == i and label in (0, 3)  # the replacement's own label, as V1 returns it
        assert torch.equal(clips, ds[[0, 0, 0, 3][label]][0])  # and the replacement's own clip
        lines = failures.split("\n")
        assert lines[0].startswith(f"{paths[i]}\t") and all(line.split("\t")[0] in paths[1:3] for line in lines)
    assert "missing" in ds[1][3].split("\n")[0]
    from engine.data.dataset import SampleError

    broken = EvalClips(paths[1:3], [1, 2], data, EvalAugConfig(enabled=False), training=True, seed=0)
    with pytest.raises(SampleError, match="11 index entries in a row failed"):
        broken[0]
