"""Index files (reference spec §5.1): formats, concatenation, dataset weights, images standing in for videos."""

import numpy as np
import pytest
import torch

from engine.data.dataset import PretrainDataset
from engine.data.index import is_image, read_index
from tests.video_faults import write_image, write_video


def test_csv_formats_and_concatenation(tmp_path):
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    first.write_text("/data/x.mp4 0\n/data/with space.mp4 7\n\n")
    second.write_text("/data/y.webm -1\n/data/z.webm::4")  # V2's '::' separator
    index = read_index([str(first), str(second)])
    assert index.paths == ["/data/x.mp4", "/data/with space.mp4", "/data/y.webm", "/data/z.webm"]
    assert index.labels == [0, 7, -1, 4] and index.sizes == [2, 2] and index.weights is None
    assert [index.source_of(e) for e in range(4)] == [str(first)] * 2 + [str(second)] * 2


def test_npy_index(tmp_path):
    path = tmp_path / "list.npy"
    np.save(path, np.array(["/v/a.mp4", "/v/b c.mp4"]))
    index = read_index([str(path)])
    assert index.paths == ["/v/a.mp4", "/v/b c.mp4"] and index.labels == [0, 0]
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="objects.npy: expected a NumPy array of path strings"):
        read_index([str(tmp_path / "objects.npy")])
    np.save(tmp_path / "numbers.npy", np.arange(3))
    with pytest.raises(ValueError, match="numbers.npy: expected a 1-D NumPy array of path strings"):
        read_index([str(tmp_path / "numbers.npy")])


def test_index_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="index file not found: .*nope.csv"):
        read_index([str(tmp_path / "nope.csv")])
    bad = tmp_path / "bad.csv"
    bad.write_text("/data/x.mp4 0\n/data/y.mp4,1\n")
    with pytest.raises(ValueError, match=r"bad\.csv:2: expected '<video path> <integer label>'"):
        read_index([str(bad)])
    empty = tmp_path / "empty.csv"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty.csv lists no videos"):
        read_index([str(empty)])
    good = tmp_path / "good.csv"
    good.write_text("/a.mp4 0\n")
    with pytest.raises(ValueError, match="2 entries for 1 index files"):
        read_index([str(good)], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least one > 0"):
        read_index([str(good)], [0.0])


def test_weights_are_per_dataset_over_its_size(tmp_path):
    big, small = tmp_path / "big.csv", tmp_path / "small.csv"
    big.write_text("".join(f"/big/{i}.mp4 0\n" for i in range(6)))
    small.write_text("/small/0.mp4 1\n/small/1.mp4 1\n")
    index = read_index([str(big), str(small)], [1.0, 3.0])
    # Spec: entry weight w_d / n_d, normalised: 1/6 and 3/2 -> each big entry 1/24, each small entry 3/8.
    np.testing.assert_allclose(index.weights, [1 / 24] * 6 + [3 / 8] * 2)


def test_weighted_sampling_follows_the_weights(tmp_path):
    big, small = tmp_path / "big.csv", tmp_path / "small.csv"
    big.write_text("".join(f"/big/{i}.mp4 0\n" for i in range(6)))
    small.write_text("/small/0.mp4 1\n/small/1.mp4 1\n")
    options = dict(frames_per_clip=2, num_clips=1, crop_size=8, random_resize_scale=(0.3, 1.0),
                   random_resize_aspect_ratio=(0.75, 1.35), seed=0)
    weighted = PretrainDataset(read_index([str(big), str(small)], [1.0, 3.0]), **options)
    entries = np.array([weighted.video_of(g) for g in range(8000)])
    assert abs((entries >= 6).mean() - 0.75) < 0.02  # the small dataset's weight share, not its 25% of entries
    uniform = PretrainDataset(read_index([str(big), str(small)]), **options)
    epoch = [uniform.video_of(g) for g in range(8, 16)]
    assert sorted(epoch) == list(range(8))  # without weights: a permutation per pass, as before


def test_image_in_a_video_index_is_a_clip_of_one_repeated_frame(tmp_path):
    assert is_image("/x/photo.JPG") and is_image("a.png") and not is_image("a.mp4")
    image, video = write_image(tmp_path / "photo.png"), write_video(tmp_path / "clip.webm", 24)
    index = tmp_path / "mixed.csv"
    index.write_text(f"{image} 2\n{video} 5\n")
    dataset = PretrainDataset(read_index([str(index)]), frames_per_clip=4, num_clips=2, crop_size=16, frame_step=2,
                              random_resize_scale=(0.3, 1.0), random_resize_aspect_ratio=(0.75, 1.35), seed=0)
    g = next(g for g in range(4) if dataset.video_of(g) == 0)
    sample = dataset[g]
    assert sample.label == 2 and not sample.failures and len(sample.clips) == 2
    for clip, indices in zip(sample.clips, sample.frame_indices):
        assert clip.shape == (3, 4, 16, 16) and indices.tolist() == [0, 0, 0, 0]
        assert torch.equal(clip, clip[:, :1].expand_as(clip))  # every frame the same
