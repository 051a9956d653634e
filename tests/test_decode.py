"""PyAV decoding from the last keyframe before the clip gives exactly the frames of decoding from the start, for
keyframe intervals, B-frames and open GOPs."""

import av
import numpy as np
import pytest

from engine.data.decode import _decode, _keyframe_start, decode_frames, to_rgb
from tests.video_faults import write_video

CASES = {
    "vp9 gop 8": ("libvpx-vp9", {"g": "8"}),
    "h264 gop 12 b-frames": ("libx264", {"x264-params": "keyint=12:min-keyint=12:scenecut=0:bframes=3"}),
    "h264 open gop": ("libx264", {"x264-params": "keyint=10:min-keyint=10:scenecut=0:bframes=2:open-gop=1"}),
}


@pytest.fixture(scope="module", params=list(CASES))
def video(request, tmp_path_factory):
    codec, options = CASES[request.param]
    suffix = ".webm" if "vp9" in codec else ".mp4"
    path = tmp_path_factory.mktemp("gop") / f"clip{suffix}"
    write_video(path, 60, codec=codec, seed=4, stream_options=options)
    return str(path)


def test_seeking_decodes_exactly_the_frames_of_a_full_decode(video):
    with av.open(video) as container:
        keyframes = sum(p.is_keyframe for p in container.demux(container.streams.video[0]) if p.size)
    assert keyframes >= 5  # the encoder honoured the keyframe interval
    rng = np.random.default_rng(0)
    for first in (0, 7, 23, 41, 52):
        indices = np.sort(rng.integers(first, min(first + 8, 60), 5))
        start = _keyframe_start(video, int(indices.min()))
        assert (start is None) == (first < 8)  # nothing to gain before the second keyframe
        expected = _decode(video, set(range(60)), None)  # every frame, from the start
        np.testing.assert_array_equal(decode_frames(video, indices), np.stack([expected[i] for i in indices]))


def test_long_gop_decodes_from_the_start(tmp_path):
    path = write_video(tmp_path / "long.mp4", 40, codec="libx264",
                       stream_options={"x264-params": "keyint=250:scenecut=0"})
    assert _keyframe_start(path, 30) is None
    assert decode_frames(path, np.array([30, 39])).shape == (2, 64, 64, 3)


@pytest.mark.parametrize("codec", ["libvpx-vp9", "libx264"])
def test_fast_rgb_conversion_is_identical_for_yuv420p(tmp_path, codec):
    path = write_video(tmp_path / ("a.webm" if "vp9" in codec else "a.mp4"), 12, codec=codec, seed=2)
    with av.open(path) as container:
        for frame in container.decode(container.streams.video[0]):
            assert frame.format.name == "yuv420p"
            np.testing.assert_array_equal(to_rgb(frame), frame.to_ndarray(format="rgb24"))


def test_rgb_conversion_starts_no_threads(tmp_path):
    # swscale's default (threads=0) starts a pool of threads per process. A DataLoader worker forked from a parent
    # that converted frames inherits that pool's state without its threads, and with PyAV 19 (Python 3.12) its
    # first conversion waits for them forever; one thread per conversion also keeps to the one-thread-per-worker rule.
    import subprocess
    import sys

    from .conftest import ROOT

    path = write_video(tmp_path / "a.webm", 6, codec="libvpx-vp9", seed=3)
    script = ("import os, sys, av\n"
              "from engine.data.decode import to_rgb\n"
              "with av.open(sys.argv[1]) as c:\n"
              "    s = c.streams.video[0]; s.codec_context.thread_count = 1\n"
              "    frames = list(c.decode(s))\n"
              "threads = len(os.listdir('/proc/self/task'))\n"
              "rgb = [to_rgb(f) for f in frames]\n"
              "print(threads, len(os.listdir('/proc/self/task')))\n")
    out = subprocess.run([sys.executable, "-c", script, str(path)], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    before, after = map(int, out.stdout.split())
    assert after == before
