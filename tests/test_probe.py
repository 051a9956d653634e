"""Probing index entries without decoding them, and the per-index probe cache."""

import dataclasses
import os
import subprocess
import sys

import pytest

from engine.data.index import read_index
from engine.data.probe import Probe, ProbeTable, cache_path, codec_of, probe_file, within_size_limits
from tests.video_faults import make_bad_files, write_image, write_video

from .conftest import ROOT


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    return make_bad_files(tmp_path_factory.mktemp("bad"))


def test_good_files(tmp_path):
    probe = probe_file(write_video(tmp_path / "a.webm", 24))
    assert (probe.ok, probe.reason, probe.frames, probe.fps, probe.width, probe.height, probe.codec) == (
        True, "", 24, 25.0, 64, 64, "vp9")
    assert probe.duration == pytest.approx(24 / 25) and probe.size == os.path.getsize(tmp_path / "a.webm")
    h264 = probe_file(write_video(tmp_path / "b.mp4", 10, codec="libx264"))
    assert (h264.ok, h264.frames, h264.codec) == (True, 10, "h264")
    image = probe_file(write_image(tmp_path / "c.jpg"))
    assert (image.ok, image.frames, image.codec, image.fps) == (True, 1, "mjpeg", 0.0)


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "not a video", "unsupported codec"])
def test_each_bad_file_gets_its_reason(bad_files, kind):
    probe = probe_file(bad_files[kind])
    assert not probe.ok and probe.reason.startswith(f"{kind}: "), probe.reason


def test_size_limits(bad_files, tmp_path):
    small = within_size_limits(probe_file(bad_files["too small"]))
    assert not small.ok and small.reason.startswith("too small: 600 bytes < data.min_video_bytes = 1024")
    video = probe_file(write_video(tmp_path / "a.webm", 24))
    assert within_size_limits(video) is video
    large = within_size_limits(video, max_bytes=1000)
    assert not large.ok and large.reason.startswith("too large:")
    assert within_size_limits(probe_file(write_image(tmp_path / "tiny.png")), min_bytes=10**6).ok  # no image minimum


def test_cache_round_trip_and_invalidation(tmp_path, bad_files):
    videos = [write_video(tmp_path / f"{i}.webm", 8 + i, seed=i) for i in range(3)]
    index_file = tmp_path / "train.csv"
    index_file.write_text("".join(f"{p} 0\n" for p in videos + [bad_files["not a video"], bad_files["missing"]]))
    index = read_index([str(index_file)])
    table = ProbeTable(index)
    made = [table.probe(e) for e in range(len(index))]
    assert all(fresh for _, fresh in made) and [p.ok for p, _ in made] == [True] * 3 + [False] * 2
    assert table.probe(1) == (made[1][0], False)  # now cached
    table.save()
    assert cache_path(str(index_file)).is_file()

    reloaded = ProbeTable(index)
    assert reloaded.load() == 4  # every entry but the missing file, which is probed again in case it comes back
    assert [reloaded.get(e) for e in range(4)] == [p for p, _ in made[:4]] and reloaded.get(4) is None
    write_video(videos[2], 30, seed=9)  # the file changes: its cached probe no longer applies
    assert reloaded.get(2) is None
    probe, fresh = reloaded.probe(2)
    assert fresh and probe.frames == 30


def test_unreadable_cache_is_ignored_and_read_only_folder_keeps_none(tmp_path, caplog, monkeypatch):
    video = write_video(tmp_path / "a.webm", 8)
    index_file = tmp_path / "train.csv"
    index_file.write_text(f"{video} 0\n")
    cache_path(str(index_file)).write_text("garbage,header\n1,2\n")
    table = ProbeTable(read_index([str(index_file)]))
    assert table.load() == 0 and "ignoring the unreadable probe cache" in caplog.text
    table.probe(0)

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("engine.data.probe.tempfile.mkstemp", read_only)  # as root, chmod would not stop a write
    table.save()
    assert "cannot write the probe cache" in caplog.text and table.get(0).ok


def test_probe_is_plain_data():
    probe = Probe("a.mp4", True, "", 10, 5.0, 4, 4, "h264")
    assert probe.duration == 2.0 and Probe("b.mp4", False, "missing: x").duration == 0.0


def av1_video(path, num_frames: int) -> str:
    """An AV1 clip, encoded in a child process: SVT-AV1, run as root, switches its caller's thread to SCHED_FIFO 99,
    which every later subprocess of the suite would inherit (two DeepSpeed ranks spinning in BLAS at realtime
    priority on two cores starve each other: the CI hung in test_train)."""
    subprocess.run([sys.executable, "-c", f"from tests.video_faults import write_video; write_video({str(path)!r}, "
                    f"{num_frames}, codec='libsvtav1')"], cwd=ROOT, check=True, capture_output=True, timeout=120,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return str(path)


def test_av1_is_recorded_as_its_codec_whichever_decoder_ffmpeg_picks(tmp_path):
    """PyAV's FFmpeg decodes AV1 with libdav1d; the probe records the codec ("av1", what DALI's NVDEC list names),
    and a cache written with the decoder's name reads as the same codec."""
    probe = probe_file(av1_video(tmp_path / "a.mkv", 6))
    assert (probe.ok, probe.codec) == (True, "av1")
    assert codec_of("libdav1d") == "av1" and codec_of("libvpx-vp9") == "vp9" and codec_of("h264") == "h264"


def test_an_av1_entry_from_an_older_cache_still_goes_to_dali(tmp_path):
    from engine.data.dataset import PretrainDataset

    path = av1_video(tmp_path / "a.mkv", 12)
    index_file = tmp_path / "train.csv"
    index_file.write_text(f"{path} 0\n")
    index = read_index([str(index_file)])
    for codec in ("av1", "libdav1d"):  # this version's probe, and an older cache's
        probes = ProbeTable(index)
        probes.put(0, dataclasses.replace(probe_file(path), codec=codec))
        data = PretrainDataset(index, frames_per_clip=4, num_clips=1, crop_size=32, frame_step=2,
                               random_resize_scale=(0.3, 1.0), random_resize_aspect_ratio=(0.75, 1.35), seed=0,
                               output="encoded", dali_codecs={"av1"}, probes=probes)
        assert data[0].encoded is not None, codec  # planned for DALI, not decoded by PyAV
