"""Decoding, index files, the pretraining dataset and the step-indexed loader, on tiny VP9 WebM clips. Frame i of
video k is red = green = 10 * i (so decoded values tell which frames were read) and blue = 30 * k + 2 * column (so
videos differ, and crops and flips show)."""

import pickle

import av
import numpy as np
import pytest
import torch

from engine.data.dataset import PretrainDataset, Sample, SampleError
from engine.data.decode import VideoDecodeError, decode_frames
from engine.data.index import read_index
from engine.data.loader import Batch, StepBatchSampler, build_loader, make_collate
from engine.data.probe import probe_file
from engine.data.transforms import IMAGENET_MEAN, IMAGENET_STD

HEIGHT, WIDTH = 40, 48
LENGTHS = (24, 24, 20, 12)
LABELS = (3, 1, 4, 1)
FPC, STEP, CROP = 4, 2, 16  # a clip spans 8 frames: random position in the 20/24-frame videos, padded in neither
TOLERANCE = 8  # per pixel, VP9 + YUV 4:2:0 round trip (7 measured on the blue ramp)


def pattern(frame_number: int, video_number: int) -> np.ndarray:
    image = np.empty((HEIGHT, WIDTH, 3), np.uint8)
    image[..., :2] = 10 * frame_number
    image[..., 2] = 30 * video_number + 2 * np.arange(WIDTH)
    return image


def write_video(path: str, num_frames: int, video_number: int) -> None:
    with av.open(path, "w") as container:
        stream = container.add_stream("libvpx-vp9", rate=25)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for i in range(num_frames):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pattern(i, video_number), format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    paths = [str(root / f"video{k}.webm") for k in range(len(LENGTHS))]
    for k, (path, length) in enumerate(zip(paths, LENGTHS)):
        write_video(path, length, k)
    return paths


@pytest.fixture(scope="module")
def index_file(videos, tmp_path_factory):
    path = tmp_path_factory.mktemp("index") / "train.csv"
    path.write_text("".join(f"{video} {label}\n" for video, label in zip(videos, LABELS)))
    return str(path)


def make_dataset(index_file: str, **overrides) -> PretrainDataset:
    # min_bytes=0: these flat test clips are a few hundred bytes, under the reference's 1 KiB minimum.
    options = dict(frames_per_clip=FPC, frame_step=STEP, num_clips=1, crop_size=CROP, random_resize_scale=(0.3, 1.0),
                   random_resize_aspect_ratio=(0.75, 1.35), seed=0, min_bytes=0)
    return PretrainDataset(read_index([index_file]), **(options | overrides))


def frame_numbers(clip: torch.Tensor) -> np.ndarray:
    """Undo the normalisation of the red channel of a (3, F, H, W) clip and read back each frame's number."""
    red = clip[0] * IMAGENET_STD[0] * 255 + IMAGENET_MEAN[0] * 255
    return (red.mean(dim=(1, 2)) / 10).round().long().numpy()


# ------------------------------------------------------------------------------------------------------ decoding


def test_probe_counts_frames_of_webm(videos):
    with av.open(videos[0]) as container:
        assert container.streams.video[0].frames == 0  # the container does not know: counting is needed
    probes = [probe_file(path) for path in videos]
    assert [p.frames for p in probes] == list(LENGTHS)
    assert all((p.ok, p.width, p.height, p.codec, p.fps) == (True, WIDTH, HEIGHT, "vp9", 25.0) for p in probes)


def test_decode_frames_returns_requested_frames(videos):
    indices = np.array([5, 0, 23, 5, 7])
    frames = decode_frames(videos[2], indices[indices < 20])
    assert frames.shape == (4, HEIGHT, WIDTH, 3) and frames.dtype == np.uint8
    expected = np.stack([pattern(i, 2) for i in indices[indices < 20]])
    assert np.abs(frames.astype(int) - expected).max() <= TOLERANCE
    frames = decode_frames(videos[0], indices)
    np.testing.assert_allclose(frames[..., 0].mean(axis=(1, 2)), 10 * indices, atol=3)  # frames are 10 apart


def test_decode_errors_name_the_file(videos, tmp_path):
    with pytest.raises(VideoDecodeError, match="truncated: frame 12 requested, only 12 frames decode") as error:
        decode_frames(videos[3], np.array([0, 12]))
    assert error.value.path == videos[3]
    garbage = tmp_path / "garbage.webm"
    garbage.write_bytes(b"not a video" * 300)
    for path in (str(tmp_path / "missing.webm"), str(garbage)):
        assert not probe_file(path).ok
        with pytest.raises(VideoDecodeError, match="missing.webm|garbage.webm"):
            decode_frames(path, np.array([0]))
    copy = pickle.loads(pickle.dumps(VideoDecodeError("a.webm", "broken")))  # crosses worker processes
    assert (copy.path, copy.reason, str(copy)) == ("a.webm", "broken", "cannot decode video 'a.webm': broken")


# ------------------------------------------------------------------------------------------------------- dataset


def test_item_shape_dtype_label_and_frames(index_file, videos):
    dataset = make_dataset(index_file)
    assert len(dataset) == 4
    for g in range(8):
        sample = dataset[g]
        clip, label = sample.clips[0], sample.label
        video = dataset.video_of(g)
        assert clip.shape == (3, FPC, CROP, CROP) and clip.dtype == torch.float32
        assert label == LABELS[video]
        numbers = frame_numbers(clip)
        # The linspace pattern of a random 8-frame span: floor(linspace(s, s + 8, 4)) clipped = s + (0, 2, 5, 7).
        assert (numbers - numbers[0]).tolist() == [0, 2, 5, 7]
        assert 0 <= numbers[0] and numbers[-1] < LENGTHS[video]


def test_several_clips_per_video(index_file):
    sample = make_dataset(index_file, num_clips=2)[0]
    assert [c.shape for c in sample.clips] == [(3, FPC, CROP, CROP)] * 2


def test_each_data_epoch_visits_every_video_once(index_file):
    dataset = make_dataset(index_file)
    orders = [[dataset.video_of(epoch * 4 + i) for i in range(4)] for epoch in range(3)]
    assert all(sorted(order) == [0, 1, 2, 3] for order in orders)
    assert len({tuple(order) for order in orders}) > 1


def test_items_are_a_pure_function_of_seed_and_index(index_file):
    first, second = make_dataset(index_file), make_dataset(index_file)
    for g in (0, 5, 13):
        assert torch.equal(first[g].clips[0], second[g].clips[0])
    # Read out of order, from a fresh dataset: nothing depends on what was read before.
    assert torch.equal(make_dataset(index_file)[5].clips[0], first[5].clips[0])
    assert not torch.equal(first[0].clips[0], first[1].clips[0])
    assert not torch.equal(first[0].clips[0], make_dataset(index_file, seed=1)[0].clips[0])


def test_broken_video_is_replaced_deterministically(videos, tmp_path):
    missing = str(tmp_path / "missing.webm")
    index = tmp_path / "index.csv"
    index.write_text(f"{missing} 9\n{videos[0]} 3\n")
    dataset = make_dataset(str(index))
    broken = next(g for g in range(10) if dataset.video_of(g) == 0)
    sample = dataset[broken]
    assert sample.label == 3 and sample.path == videos[0]
    assert sample.failures == [(missing, "missing: no such file")]
    assert torch.equal(make_dataset(str(index))[broken].clips[0], sample.clips[0])

    all_broken = tmp_path / "broken.csv"
    all_broken.write_text(f"{missing} 9\n")
    with pytest.raises(SampleError, match="3 index entries in a row failed.*\n.*missing.webm: missing"):
        make_dataset(str(all_broken), max_retries=2)[0]


# -------------------------------------------------------------------------------------------------------- loader


def test_sampler_splits_steps_across_ranks():
    single = list(StepBatchSampler(8, rank=0, world_size=1, start_step=2, num_steps=3))
    assert single == [list(range(16, 24)), list(range(24, 32)), list(range(32, 40))]
    ranks = [list(StepBatchSampler(8, rank=r, world_size=2, start_step=2, num_steps=3)) for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == single
    assert len(StepBatchSampler(8, 0, 1, num_steps=3)) == 3
    endless = iter(StepBatchSampler(4, 1, 2))
    assert [next(endless) for _ in range(2)] == [[2, 3], [6, 7]]
    with pytest.raises(ValueError, match="multiple"):
        StepBatchSampler(6, 0, 4)


def test_sampler_with_accumulation_reads_the_same_samples_per_step():
    """A step of global batch 8 is the same 8 samples however it splits into ranks x micro-batches x batch."""
    whole = list(StepBatchSampler(8, 0, 1, start_step=1, num_steps=2))
    for world, accumulation in ((1, 2), (2, 2), (2, 4), (1, 8)):
        ranks = [list(StepBatchSampler(8, r, world, start_step=1, num_steps=2, accumulation_steps=accumulation))
                 for r in range(world)]
        assert all(len(micro) == 2 * accumulation for micro in ranks)
        for step in range(2):
            micro_batches = [ranks[r][step * accumulation + k] for k in range(accumulation) for r in range(world)]
            assert sum(micro_batches, []) == whole[step]  # micro-step k over all ranks is one contiguous block
    assert list(StepBatchSampler(8, 1, 2, num_steps=1, accumulation_steps=2)) == [[2, 3], [6, 7]]
    assert len(StepBatchSampler(8, 1, 2, num_steps=3, accumulation_steps=2)) == 6
    with pytest.raises(ValueError, match="world size 2 x accumulation steps 3"):
        StepBatchSampler(8, 0, 2, accumulation_steps=3)


def test_loader_numbers_the_micro_batches_of_a_step(index_file):
    loader = build_loader(make_dataset(index_file), global_batch_size=8, rank=1, world_size=2, make_masks=record_masks,
                          num_workers=0, start_step=2, num_steps=2, accumulation_steps=2)
    batches = list(loader)
    assert [(b.step, b.micro, b.first_sample_index) for b in batches] == [(2, 0, 18), (2, 1, 22), (3, 0, 26),
                                                                          (3, 1, 30)]
    assert [b.masks["call"] for b in batches] == [(2, 18, 2), (2, 22, 2), (3, 26, 2), (3, 30, 2)]  # step's counter


def record_masks(step: int, first_sample_index: int, batch_size: int) -> dict:
    """A stand-in mask maker (module level, so worker processes can unpickle it)."""
    return {"call": (step, first_sample_index, batch_size), "keep": torch.arange(batch_size)}


def test_loader_batches_and_masks_are_the_same_with_and_without_workers(index_file):
    dataset = make_dataset(index_file)
    runs = []
    for num_workers in (0, 2):
        loader = build_loader(dataset, global_batch_size=4, rank=1, world_size=2, make_masks=record_masks,
                              num_workers=num_workers, start_step=3, num_steps=3)
        runs.append(list(loader))
    for plain, worker in zip(*runs, strict=True):
        assert isinstance(plain, Batch)
        assert torch.equal(plain.video, worker.video) and torch.equal(plain.labels, worker.labels)
        assert (plain.step, plain.first_sample_index) == (worker.step, worker.first_sample_index)
        assert plain.masks["call"] == worker.masks["call"]
    steps = [3, 4, 5]
    # Rank 1 of 2 with global batch 4 takes samples 4s + 2 and 4s + 3 of step s.
    assert [b.masks["call"] for b in runs[0]] == [(s, 4 * s + 2, 2) for s in steps]
    assert [(b.step, b.first_sample_index) for b in runs[0]] == [(s, 4 * s + 2) for s in steps]
    batch = runs[0][0]
    assert batch.video.shape == (2, 3, FPC, CROP, CROP) and batch.labels.dtype == torch.int64
    assert torch.equal(batch.video[1], dataset[15].clips[0])  # step 3, rank 1, second sample: 3*4 + 2 + 1


def fake_sample(global_index: int) -> Sample:
    return Sample(global_index, 0, 5, "a.webm", [torch.zeros(3, 1, 2, 2)], [False], [np.zeros(1)], [(0, 0, 2, 2)])


def test_collate_rejects_non_consecutive_indices():
    collate = make_collate(record_masks, 4)
    with pytest.raises(ValueError, match="consecutive"):
        collate([fake_sample(0), fake_sample(2)])
    batch = pickle.loads(pickle.dumps(collate))([fake_sample(4)])
    assert batch.step == 1 and batch.labels.tolist() == [5] and batch.paths == ["a.webm"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning memory needs an accelerator")
def test_batch_pin_memory():
    class Masks:
        def pin_memory(self):
            return "pinned"

    batch = Batch(torch.zeros(1, 3, 1, 2, 2), torch.zeros(1, dtype=torch.int64), 0, 0, Masks()).pin_memory()
    assert batch.video.is_pinned() and batch.labels.is_pinned() and batch.masks == "pinned"
    plain = Batch(torch.zeros(1), torch.zeros(1), 0, 0, [1, 2]).pin_memory()
    assert plain.masks == [1, 2]
