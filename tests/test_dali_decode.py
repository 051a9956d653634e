"""DALI clip decoding (engine.data.dali_decode) on DALI's CPU backend, against PyAV and the torch transform, on tiny
VP9 WebM clips. In the plain videos frame i has red = green = 10 * i (decoded values tell which frames were read)
and blue = 2 * column (flips and horizontal shifts show); the textured one varies in both directions."""

import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.data.dali_decode import DaliClipDecoder, DaliDecodeError
from engine.data.decode import decode_frames
from engine.data.transforms import IMAGENET_MEAN, IMAGENET_STD

ROOT = Path(__file__).resolve().parents[1]
NUM_FRAMES = 24
SIDE = 32  # square videos: with crop_size == SIDE and the whole frame as box, DALI returns the frames unresized
WIDE = (40, 48)  # (height, width)
FPC, CROP = 4, 16
TOLERANCE = 3  # per pixel, DALI's vs PyAV's YUV -> RGB on the plain pattern (3 measured)
TRANSFORM_TOLERANCE = 0.03  # mean |difference| of normalised clips, DALI vs torch on PyAV's frames (0.024 measured)

MEAN_255 = (torch.tensor(IMAGENET_MEAN) * 255.0).view(3, 1, 1, 1)
STD_255 = (torch.tensor(IMAGENET_STD) * 255.0).view(3, 1, 1, 1)


def plain(i: int, height: int, width: int) -> np.ndarray:
    image = np.empty((height, width, 3), np.uint8)
    image[..., :2] = 10 * i
    image[..., 2] = 2 * np.arange(width)
    return image


def textured(i: int, height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    channels = [(7 * x + 10 * i) % 256, 6 * y, 128 + 100 * np.sin(x / 3.0 + y / 5.0 + i)]
    return np.stack(channels, axis=-1).astype(np.uint8)


def write_video(path: Path, pattern, height: int, width: int) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx-vp9", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(NUM_FRAMES):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pattern(i, height, width), format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dali_videos")
    specs = {"square": (plain, SIDE, SIDE), "wide": (plain, *WIDE), "textured": (textured, SIDE, SIDE)}
    for name, (pattern, height, width) in specs.items():
        write_video(root / f"{name}.webm", pattern, height, width)
    return {name: root / f"{name}.webm" for name in specs}


@pytest.fixture(scope="module")
def dali():
    # Only a guard: the test extras install DALI, and test_module_imports_without_dali runs without it.
    return pytest.importorskip("nvidia.dali")


@pytest.fixture(scope="module")
def encoded(videos, dali) -> dict[str, np.ndarray]:
    return {name: np.fromfile(path, dtype=np.uint8) for name, path in videos.items()}


@pytest.fixture(scope="module")
def decoder(dali) -> DaliClipDecoder:
    return DaliClipDecoder(crop_size=CROP, frames_per_clip=FPC, device="cpu", max_batch_size=5)


@pytest.fixture(scope="module")
def whole_frames(dali) -> DaliClipDecoder:
    """Decodes 8 frames of a SIDE x SIDE video unresized: DALI's raw frames, through the public API."""
    return DaliClipDecoder(crop_size=SIDE, frames_per_clip=8, device="cpu", max_batch_size=1)


def unnormalise(clip: torch.Tensor) -> torch.Tensor:
    """(3, F, H, W) normalised -> (F, H, W, 3) in the 0-255 scale."""
    return (clip * STD_255 + MEAN_255).permute(1, 2, 3, 0)


def frame_numbers(clip: torch.Tensor) -> np.ndarray:
    return (unnormalise(clip)[..., 0].mean(dim=(1, 2)) / 10).round().long().numpy()


def reference(frames: np.ndarray | torch.Tensor, box: tuple[int, int, int, int], flip: bool) -> torch.Tensor:
    """The torch transform DALI must reproduce, on uint8 (F, H, W, 3) frames."""
    top, left, h, w = box
    crop = torch.as_tensor(frames)[:, top:top + h, left:left + w].permute(0, 3, 1, 2).float()
    resized = F.interpolate(crop, size=(CROP, CROP), mode="bilinear", align_corners=False, antialias=False)
    video = resized.permute(1, 0, 2, 3)
    if flip:
        video = video.flip(-1)
    return (video - MEAN_255) / STD_255


def random_boxes(rng: np.random.Generator, height: int, width: int, n: int,
                 min_width: int = 1) -> list[tuple[int, int, int, int]]:
    """Boxes of any size from 1 pixel to the whole frame: smaller and larger than CROP, odd and even."""
    boxes = []
    for _ in range(n):
        h, w = int(rng.integers(1, height + 1)), int(rng.integers(min_width, width + 1))
        boxes.append((int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w))
    return boxes


# --------------------------------------------------------------------------------------------- frames and transform


def test_frames_match_pyav(videos, encoded, whole_frames):
    indices = np.array([5, 0, 23, 5, 7, 12, 1, 22])
    clip = whole_frames.decode([encoded["square"]], [indices], [(0, 0, SIDE, SIDE)], [False])[0]
    assert clip.shape == (3, 8, SIDE, SIDE) and clip.dtype == torch.float32
    assert frame_numbers(clip).tolist() == indices.tolist()
    dali = unnormalise(clip)
    assert (dali - dali.round()).abs().max() < 1e-3  # an identity resize: whole levels, as decoded
    pyav = torch.from_numpy(decode_frames(str(videos["square"]), indices)).float()
    assert (dali.round() - pyav).abs().max() <= TOLERANCE


def test_transform_matches_torch_on_pyav_frames(videos, encoded, decoder):
    rng = np.random.default_rng(0)
    # Wide enough for flips to show on the blue ramp; plus boxes surely below and above CROP.
    boxes = random_boxes(rng, *WIDE, 6, min_width=6) + [(3, 5, 5, 7), (1, 0, 37, 43)]
    for k, box in enumerate(boxes):
        indices = rng.integers(0, NUM_FRAMES, FPC)
        flip = k % 2 == 1
        clip = decoder.decode([encoded["wide"]], [indices], [box], [flip])[0]
        frames = decode_frames(str(videos["wide"]), indices)
        # Mean |difference| 0.013 to 0.024 measured (0.7 to 1.4 levels): only the colour conversion differs, the
        # transform itself is exact (test_transform_is_exact_on_dali_frames). A wrong flip measured 0.054 to 0.26, a
        # box 4 pixels off 0.050 to 0.066: either would fail the first assertion.
        assert (clip - reference(frames, box, flip)).abs().mean() < TRANSFORM_TOLERANCE, (box, flip)
        assert (clip - reference(frames, box, not flip)).abs().mean() > TRANSFORM_TOLERANCE, (box, flip)
        # PyAV replicates chroma where DALI interpolates it, which blurs the blue ramp by about a pixel: 4 pixels
        # is the shift this comparison tells apart (test_transform_is_exact_on_dali_frames checks single pixels).
        top, left, h, w = box
        moved = (top, left + 4 if left + w + 4 <= WIDE[1] else left - 4, h, w)
        assert (clip - reference(frames, moved, flip)).abs().mean() > TRANSFORM_TOLERANCE, (box, flip)


def test_transform_is_exact_on_dali_frames(encoded, decoder, whole_frames):
    """Given the frames DALI decoded, slice + resize + mirror + normalise reproduce the torch transform."""
    rng = np.random.default_rng(1)
    indices = np.array([3, 9, 9, 17, 0, 1, 2, 3])
    raw = unnormalise(whole_frames.decode([encoded["textured"]], [indices], [(0, 0, SIDE, SIDE)], [False])[0]).round()
    for box in random_boxes(rng, SIDE, SIDE, 8) + [(1, 2, 31, 29), (7, 3, 6, 11)]:
        for flip in (False, True):
            clip = decoder.decode([encoded["textured"]], [indices[:FPC]], [box], [flip])[0]
            assert (clip - reference(raw[:FPC], box, flip)).abs().max() < 1e-4, (box, flip)  # 0 measured


# ------------------------------------------------------------------------------------------------------- batches


def test_variable_batches_repeats_and_shared_bytes(encoded, decoder):
    rng = np.random.default_rng(2)
    names = ["square", "wide", "square", "textured", "wide"]  # frame sizes differ within a batch
    sizes = {"square": (SIDE, SIDE), "wide": WIDE, "textured": (SIDE, SIDE)}
    items = [(name, np.array([7, 7, 0, 20]) if k == 0 else rng.integers(0, NUM_FRAMES, FPC),
              random_boxes(rng, *sizes[name], 1)[0], bool(k % 2)) for k, name in enumerate(names)]
    singles = [decoder.decode([encoded[name]], [indices], [box], [flip])[0] for name, indices, box, flip in items]
    for batch in ([0, 1, 2], [3], [0, 1, 2, 3, 4]):  # the same array is passed twice in the first and the last
        chosen = [items[k] for k in batch]
        out = decoder.decode([encoded[item[0]] for item in chosen], *[[item[j] for item in chosen] for j in (1, 2, 3)])
        assert out.shape == (len(batch), 3, FPC, CROP, CROP)
        for clip, k in zip(out, batch):
            assert torch.equal(clip, singles[k])
    assert torch.equal(singles[0][:, 0], singles[0][:, 1])  # a repeated index is the same frame
    assert frame_numbers(decoder.decode([encoded["square"]], [np.array([7, 7, 0, 20])], [(0, 0, SIDE, SIDE)],
                                        [False])[0]).tolist() == [7, 7, 0, 20]


def test_argument_errors(encoded, decoder):
    good = dict(encoded=[encoded["square"]], frame_indices=[np.arange(FPC)], boxes=[(0, 0, 8, 8)], flips=[False])
    bad = [dict(encoded=[], frame_indices=[], boxes=[], flips=[]),
           {key: value * 6 for key, value in good.items()},  # above max_batch_size
           good | dict(flips=[False, True]),
           good | dict(frame_indices=[np.arange(FPC + 1)]),
           good | dict(boxes=[(0, 0, 0, 8)]),
           good | dict(boxes=[(-1, 0, 8, 8)]),
           good | dict(encoded=[encoded["square"].astype(np.int16)])]
    for arguments in bad:
        with pytest.raises(ValueError):
            decoder.decode(**arguments)
    for options in (dict(device="tpu"), dict(dtype=torch.int8), dict(max_batch_size=0)):
        with pytest.raises(ValueError):
            DaliClipDecoder(**(dict(crop_size=CROP, frames_per_clip=FPC, device="cpu", max_batch_size=2) | options))


# ------------------------------------------------------------------------------------------------- corrupt input


@pytest.mark.parametrize("case", ["random bytes", "truncated header", "truncated", "empty", "index past the end",
                                  "negative index", "box outside the frame"])
def test_corrupt_input_raises_and_next_batch_decodes(encoded, decoder, case):
    """DALI 2.4 raises on all of these (no crash in ~7,000 fuzzed files either), so they run in-process."""
    good = encoded["wide"]
    data, indices, box = good, np.arange(FPC), (0, 0, *WIDE)
    if case == "random bytes":
        data = np.random.default_rng(3).integers(0, 256, len(good), dtype=np.uint8)
    elif case == "truncated header":
        data = good[:100]
    elif case == "truncated":  # the first frames are there, frame 23 is not
        data, indices = good[:len(good) // 2], np.array([0, 1, 2, 23])
    elif case == "empty":
        data = good[:0]
    elif case == "index past the end":
        indices = np.array([0, 1, NUM_FRAMES, 2])  # DALI's default pad_mode would return a black frame here
    elif case == "negative index":
        indices = np.array([0, -1, 1, 2])
    elif case == "box outside the frame":
        box = (WIDE[0] - 8, 0, 10, 10)
    expected = decoder.decode([good, good], [np.arange(FPC)] * 2, [(0, 0, *WIDE)] * 2, [False, True])
    with pytest.raises(DaliDecodeError, match="DALI could not decode a batch of 2 clip"):
        decoder.decode([good, data], [np.arange(FPC), indices], [(0, 0, *WIDE), box], [False, True])
    again = decoder.decode([good, good], [np.arange(FPC)] * 2, [(0, 0, *WIDE)] * 2, [False, True])
    assert torch.equal(again, expected)


# --------------------------------------------------------------------------------------------- devices and dtypes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_output_dtype(encoded, decoder, dtype):
    arguments = ([encoded["textured"]] * 2, [np.array([1, 5, 5, 9])] * 2, [(2, 3, 21, 17), (0, 0, 5, 9)],
                 [True, False])
    low = DaliClipDecoder(crop_size=CROP, frames_per_clip=FPC, device="cpu", max_batch_size=2, dtype=dtype)
    out = low.decode(*arguments)
    assert out.dtype == dtype and out.device.type == "cpu"
    # float16 comes out of DALI, bfloat16 is cast from float32: both equal the rounded float32 result (measured).
    assert torch.equal(out, decoder.decode(*arguments).to(dtype))


@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="checks the error on a host without a CUDA device")
def test_gpu_without_cuda_device_is_a_clear_error(dali):
    with pytest.raises(RuntimeError, match="needs a CUDA device.*device='cpu' or data.decoder=pyav"):
        DaliClipDecoder(crop_size=CROP, frames_per_clip=FPC, device="gpu", max_batch_size=2)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() == 0, reason="needs a GPU with NVDEC")
@pytest.mark.parametrize("height,width", [(144, 160), (145, 161)])
def test_gpu_matches_cpu(dali, tmp_path, height, width):
    """NVDEC refuses tiny frames (VP9 needs at least 128 x 128 px), hence a larger video than the others here. Odd
    sizes (VP8/VP9/AV1 allow them: SSv2's 427 x 240): DALI's NV12 -> RGB kernel writes 2 x 2 pixel blocks, and the
    source's last column and row are where a block would spill into the next row's first pixel or past the frame."""
    write_video(tmp_path / "large.webm", plain, height, width)
    data = np.fromfile(tmp_path / "large.webm", dtype=np.uint8)
    arguments = ([data] * 3, [np.array([0, 3, 3, 23])] * 3, [(0, 0, height, width), (5, 7, 33, 121), (20, 0, 9, 11)],
                 [False, True, False])
    options = dict(crop_size=CROP, frames_per_clip=FPC, max_batch_size=3)
    gpu = DaliClipDecoder(device="gpu", **options).decode(*arguments)
    cpu = DaliClipDecoder(device="cpu", **options).decode(*arguments)
    assert gpu.is_cuda and gpu.shape == cpu.shape
    for clip in gpu.cpu():
        assert frame_numbers(clip).tolist() == [0, 3, 3, 23]
    assert (gpu.cpu() - cpu).abs().mean() < 0.05  # NVDEC's colour conversion may differ from the CPU one by a level
    # the whole frame's first and last output columns (clip 0, not flipped): a spilled block would show there
    assert (gpu.cpu() - cpu)[0, ..., 0].abs().mean() < 0.1 and (gpu.cpu() - cpu)[0, ..., -1].abs().mean() < 0.1


# ------------------------------------------------------------------------------------------- lazy import and build


def test_constructor_starts_no_threads(encoded):
    """Threads start on the first decode, so DataLoader workers can fork after the decoder is made."""

    def threads() -> int:
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("Threads:")).split()[1])

    before = threads()
    lazy = DaliClipDecoder(crop_size=CROP, frames_per_clip=FPC, device="cpu", max_batch_size=1)
    assert threads() == before
    lazy.decode([encoded["square"]], [np.arange(FPC)], [(0, 0, SIDE, SIDE)], [False])
    assert threads() > before


def test_module_imports_without_dali():
    script = """
import sys
import engine.data.dali_decode as m
assert "nvidia.dali" not in sys.modules, "the module imported DALI"
sys.modules["nvidia.dali"] = None  # what an environment without DALI looks like to import
assert not m.dali_available()
try:
    m.DaliClipDecoder(crop_size=16, frames_per_clip=4, device="cpu", max_batch_size=2)
except ImportError as e:
    assert "pip install nvidia-dali-cuda130" in str(e) and "dali" in str(e) and "data.decoder=pyav" in str(e), e
else:
    raise AssertionError("no ImportError")
"""
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, capture_output=True, text=True)


def test_av1_goes_to_nvdec_only_where_it_decodes_av1():
    from engine.data.dali_decode import dali_codecs

    for capability, av1 in (((8, 0), False), ((8, 6), True), ((8, 9), True), ((9, 0), False), ((10, 0), True),
                            ((12, 1), True)):
        assert ("av1" in dali_codecs("gpu", capability)) == av1, capability
        assert {"h264", "hevc", "vp9"} <= dali_codecs("gpu", capability)
    assert "av1" not in dali_codecs("cpu") and "h264" not in dali_codecs("cpu")
