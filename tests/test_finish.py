"""The device-side last stage: uint8 crops finished on the device equal the workers' finished clips; DALI batches that
fail are decoded again with PyAV, and samples no decoder can read are replaced."""

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine.data.dataset import PretrainDataset
from engine.data.finish import ClipFinisher
from engine.data.index import read_index
from engine.data.loader import ClipParts, build_loader
from tests.video_faults import corrupt_packet, write_image, write_video

FPC, CROP = 4, 24


def record_masks(step, first, batch_size):
    return None


@pytest.fixture(scope="module")
def index_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("finish")
    paths = [write_video(root / f"{i}.webm", 16 + 4 * i, seed=i) for i in range(3)]
    paths += [write_video(root / "h264.mp4", 20, codec="libx264", seed=5), write_image(root / "photo.png")]
    index = root / "train.csv"
    index.write_text("".join(f"{p} {i}\n" for i, p in enumerate(paths)))
    return str(index)


def dataset(index_file, **options):
    return PretrainDataset(read_index([index_file]), frames_per_clip=FPC, num_clips=options.pop("num_clips", 1),
                           crop_size=CROP, frame_step=2, random_resize_scale=(0.3, 1.0),
                           random_resize_aspect_ratio=(0.75, 1.35), seed=1, **options)


@pytest.mark.parametrize("num_clips", [1, 2])
def test_crops_finished_on_the_device_equal_finished_clips(index_file, num_clips):
    finished = build_loader(dataset(index_file, num_clips=num_clips), global_batch_size=5, rank=0, world_size=1,
                            make_masks=record_masks, num_workers=0, num_steps=2)
    crops_data = dataset(index_file, num_clips=num_clips, output="crop")
    crops = build_loader(crops_data, global_batch_size=5, rank=0, world_size=1, make_masks=record_masks,
                         num_workers=0, num_steps=2)
    finish = ClipFinisher(crops_data, torch.device("cpu"), torch.float32)
    for ready, raw in zip(finished, crops, strict=True):
        assert isinstance(raw.video, ClipParts) and raw.video.crops.dtype == torch.uint8
        assert len(raw.video.crop_shapes) == 5 * num_clips and not raw.video.encoded
        video = finish(raw)
        assert video.shape == ready.video.shape and video.dtype == torch.float32
        torch.testing.assert_close(video, ready.video, rtol=0, atol=1e-5)
        assert torch.equal(finish(ready), ready.video)  # finished clips are only moved
    half = ClipFinisher(crops_data, torch.device("cpu"), torch.bfloat16)(next(iter(crops)))
    assert half.dtype == torch.bfloat16  # the step's dtype on GPU


def test_crop_bytes_are_what_the_boxes_say(index_file):
    data = dataset(index_file, output="crop")
    parts = ClipParts.from_samples([data[g] for g in range(5)], 1)
    expected = sum(FPC * h * w * 3 for (_, _, h, w) in (data[g].boxes[0] for g in range(5)))
    assert parts.crops.numel() == expected  # no padding to a common size


# ------------------------------------------------------------------------------------------------ DALI and fallback


@pytest.fixture(scope="module")
def vp9_index(tmp_path_factory):
    """Four good VP9 clips and one whose stream probes fine but fails to decode (a zeroed frame header)."""
    root = tmp_path_factory.mktemp("dali")
    paths = [write_video(root / f"{i}.webm", 20 + 2 * i, seed=10 + i) for i in range(4)]
    paths.append(corrupt_packet(paths[0], root / "corrupt.webm", packet=3))
    index = root / "train.csv"
    index.write_text("".join(f"{p} {i}\n" for i, p in enumerate(paths)))
    return str(index)


def dali_decoder(batch_size):
    from engine.data.dali_decode import DaliClipDecoder

    return DaliClipDecoder(crop_size=CROP, frames_per_clip=FPC, device="cpu", max_batch_size=batch_size)


def loaders(index, steps=1):
    encoded = dataset(index, output="encoded", dali_codecs={"vp9"})
    crops = dataset(index, output="crop")
    make = lambda d: build_loader(d, global_batch_size=5, rank=0, world_size=1, make_masks=record_masks,  # noqa: E731
                                  num_workers=0, num_steps=steps)
    return encoded, make(encoded), make(crops)


def test_dali_batch_matches_the_pyav_path(index_file):
    pytest.importorskip("nvidia.dali")  # the `dali` extra; `make test` installs it
    data, encoded, crops = loaders(index_file)
    finish = ClipFinisher(data, torch.device("cpu"), torch.float32, dali_decoder(5))
    batch, reference = next(iter(encoded)), next(iter(crops))
    parts = batch.video
    # VP9 goes to DALI; the H.264 file (DALI's CPU decoder lacks it) and the image arrive as PyAV crops.
    assert len(parts.encoded) == 3 and len(parts.crop_shapes) == 2
    video = finish(batch)
    expected = ClipFinisher(data, torch.device("cpu"), torch.float32)(reference)
    # Same frames, boxes and flips; only the YUV->RGB conversions differ (DALI interpolates 4:2:0 chroma, PyAV
    # repeats it): ~0.07 here on saturated noise (~4 levels of 255), against ~0.7 for a wrong flip.
    slots = parts.encoded_slots
    error = (video[slots] - expected[slots]).abs().mean()
    assert error < 0.15 and error < 0.25 * (video[slots] - expected[slots].flip(-1)).abs().mean()
    assert torch.equal(video[parts.crop_slots], expected[parts.crop_slots])


def test_failed_dali_batch_is_decoded_one_sample_at_a_time_and_bad_samples_replaced(vp9_index, caplog):
    pytest.importorskip("nvidia.dali")  # the `dali` extra; `make test` installs it
    data, encoded, crops = loaders(vp9_index)
    batch, reference = next(iter(encoded)), next(iter(crops))
    corrupt = vp9_index.replace("train.csv", "corrupt.webm")
    assert corrupt in batch.paths and not batch.failures  # the probe could not tell
    bad = batch.paths.index(corrupt)
    finish = ClipFinisher(data, torch.device("cpu"), torch.float32, dali_decoder(5))
    video = finish(batch)
    assert "DALI failed on step 0" in caplog.text and "decoding its 5 samples one at a time" in caplog.text
    assert f"DALI cannot decode {corrupt}" in caplog.text and caplog.text.count("DALI cannot decode") == 1
    assert finish.dali is not None and finish.dali_failures == 0  # a bad file, not a broken decoder
    assert corrupt not in batch.paths  # the finisher replaced it
    # The PyAV path's worker met the same file: it decoded it, failed and replaced it the same way.
    assert batch.failures == reference.failures and {p for p, _ in batch.failures} == {corrupt}
    assert batch.failures[0][1].startswith("corrupt: FFmpeg failed after frame")
    assert reference.paths == batch.paths and torch.equal(reference.labels, batch.labels)
    expected = ClipFinisher(data, torch.device("cpu"), torch.float32)(reference)
    torch.testing.assert_close(video[bad], expected[bad], rtol=0, atol=1e-5)  # the replacement, through PyAV
    good = [s for s in range(len(batch.paths)) if s != bad]  # through DALI: its YUV->RGB conversion, as above
    error = (video[good] - expected[good]).abs().mean()
    assert error < 0.15 and error < 0.25 * (video[good] - expected[good].flip(-1)).abs().mean()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_crops_finished_on_the_gpu(index_file):
    data = dataset(index_file, num_clips=2, output="crop")
    batch = next(iter(build_loader(data, global_batch_size=5, rank=0, world_size=1, make_masks=record_masks,
                                   num_workers=0, num_steps=1, pin_memory=True)))
    assert batch.video.crops.is_pinned()
    on_gpu = ClipFinisher(data, torch.device("cuda"), torch.bfloat16)(batch)
    on_cpu = ClipFinisher(data, torch.device("cpu"), torch.float32)(batch)
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.bfloat16
    torch.testing.assert_close(on_gpu.float().cpu(), on_cpu, rtol=1e-2, atol=2e-2)  # bf16 rounding


# ------------------------------------------------------------------------------------------------ host syncs


class BlockingTransfers(TorchDispatchMode):
    """Ops that move a host tensor to another device in a way that blocks the host: a copy without non_blocking, or
    a host tensor (not a 0-dim scalar) handed to an op on another device, which copies it blocking. On a GPU each
    waits for the stream to drain: the previous step's backward, then counted as data wait."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
        host = [t for t in tensors if t.device.type == "cpu" and t.dim() > 0]
        if name.startswith("_to_copy") and args[0].device.type == "cpu" and kwargs.get("device") not in (
                None, torch.device("cpu")) and not kwargs.get("non_blocking", False):
            self.found.append(name)
        elif name.startswith("copy_") and args[1].device != args[0].device and not (len(args) > 2 and args[2]):
            self.found.append(name)
        elif not name.startswith(("_to_copy", "copy_")) and host and len(host) < len(tensors):
            self.found.append(name)
        return func(*args, **kwargs)


class StubDali:
    """Decodes nothing: clips of the right shape, on the host as DALI's CPU pipeline returns them."""

    def decode(self, encoded, indices, boxes, flips):
        return torch.zeros(len(encoded), 3, FPC, CROP, CROP)


def test_finishing_a_batch_moves_nothing_to_the_device_blocking(index_file):
    """The meta device stands in for a GPU: the finish's host-to-device moves are visible as ops (all but the copy
    of a Python list used as an index, which PyTorch makes below the dispatcher: the GPU test below sees it)."""
    data, encoded, _ = loaders(index_file)
    batch = next(iter(encoded))
    assert batch.video.encoded and batch.video.crop_shapes  # both paths: PyAV crops and DALI's items
    finish = ClipFinisher(data, torch.device("meta"), torch.bfloat16, StubDali())
    with BlockingTransfers() as audit:
        video = finish(batch)
    assert video.device.type == "meta" and video.shape == (5, 3, FPC, CROP, CROP)
    assert audit.found == []
    with BlockingTransfers() as audit:  # the audit sees a blocking move when there is one
        torch.zeros(3).to("meta")
        torch.empty(3, device="meta").copy_(torch.zeros(3))
    assert audit.found == ["_to_copy.default", "copy_.default"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_finishing_a_pinned_batch_never_syncs_the_gpu(index_file):
    data = dataset(index_file, output="crop")
    batch = next(iter(build_loader(data, global_batch_size=5, rank=0, world_size=1, make_masks=record_masks,
                                   num_workers=0, num_steps=1, pin_memory=True)))
    finish = ClipFinisher(data, torch.device("cuda"), torch.bfloat16)
    finish(batch)  # the first call places the normalisation constants
    torch.cuda.set_sync_debug_mode("error")
    try:
        finish(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")


class FailingDali:
    """Raises the given DALI errors in turn (None: decodes, as StubDali), counting the calls."""

    def __init__(self, *errors):
        self.errors, self.calls = list(errors), 0

    def decode(self, encoded, indices, boxes, flips):
        self.calls += 1
        error = self.errors.pop(0) if self.errors else None
        if error is not None:
            raise error
        return StubDali().decode(encoded, indices, boxes, flips)


def test_dali_that_cannot_build_is_switched_off_after_one_batch(index_file, caplog):
    from engine.data.dali_decode import DaliUnavailable

    data, encoded, crops = loaders(index_file)
    batch, reference = next(iter(encoded)), next(iter(crops))
    dali = FailingDali(DaliUnavailable("DALI could not build its gpu pipeline: CUDA driver too old"))
    finish = ClipFinisher(data, torch.device("cpu"), torch.float32, dali)
    expected = ClipFinisher(data, torch.device("cpu"), torch.float32)(reference)
    for _ in range(2):
        torch.testing.assert_close(finish(batch), expected, rtol=0, atol=1e-5)  # PyAV decoded DALI's clips
    assert dali.calls == 1 and finish.dali is None
    assert "DALI is off for the rest of the run (its pipeline does not build here)" in caplog.text
    assert "data.decoder=pyav" in caplog.text


def test_dali_is_switched_off_after_reading_no_sample_of_failed_batches_in_a_row(index_file, caplog):
    from engine.data.dali_decode import DaliDecodeError
    from engine.data.finish import DALI_FAILURES_TO_GIVE_UP

    data, encoded, _ = loaders(index_file)
    batch = next(iter(encoded))
    samples = len({slot // batch.video.num_clips for slot in batch.video.encoded_slots})
    bad = DaliDecodeError("a bad file")
    broken = [bad] * (1 + samples)  # the batch, then each of its samples alone
    one_bad_file = [bad, bad] + [None] * (samples - 1)  # the batch and its first sample fail, the others decode
    dali = FailingDali(*broken, *one_bad_file, *broken * DALI_FAILURES_TO_GIVE_UP)
    finish = ClipFinisher(data, torch.device("cpu"), torch.float32, dali)
    finish(batch)
    assert finish.dali_failures == 1
    finish(batch)
    assert finish.dali_failures == 0 and dali.calls == 2 * (1 + samples)  # a file DALI cannot read starts it again
    for _ in range(DALI_FAILURES_TO_GIVE_UP - 1):
        finish(batch)
        assert finish.dali is dali
    finish(batch)
    assert finish.dali is None and f"({DALI_FAILURES_TO_GIVE_UP} batches in a row)" in caplog.text
    calls = dali.calls
    finish(batch)
    assert dali.calls == calls  # not asked again


def test_a_pipeline_that_does_not_build_is_dali_unavailable(monkeypatch):
    pytest.importorskip("nvidia.dali")  # the `dali` extra; `make test` installs it
    from engine.data.dali_decode import DaliUnavailable

    decoder = dali_decoder(2)

    def broken():
        raise RuntimeError("CUDA driver version is insufficient for CUDA runtime version")

    monkeypatch.setattr(decoder, "_build", broken)
    frames = np.arange(FPC)
    with pytest.raises(DaliUnavailable, match="could not build its cpu pipeline: CUDA driver version"):
        decoder.decode([np.zeros(2048, np.uint8)], [frames], [(0, 0, 16, 16)], [False])
