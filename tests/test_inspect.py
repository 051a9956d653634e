"""The dataset doctor (`python -m engine.data.inspect`) on an index of good videos, an image and every bad kind."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from engine.data.inspect import decode_all_pyav, main
from engine.data.probe import cache_path, probe_file
from tests.video_faults import corrupt_packet, make_bad_files, write_image, write_video

# What the doctor reports for each file of `make_bad_files` with the default --min-frames 1.
EXPECTED_BAD = ["missing", "empty", "truncated", "not a video", "unsupported codec", "too small"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("doctor")
    files = make_bad_files(folder / "bad")
    files["vp9"] = write_video(folder / "good.webm", 24, seed=1)
    files["h264"] = write_video(folder / "good.mp4", 24, codec="libx264", seed=2)
    files["image"] = write_image(folder / "still.png")
    files["corrupt"] = corrupt_packet(files["vp9"], folder / "corrupt.webm")
    return files


def write_index(path: Path, paths: list[str]) -> str:
    path.write_text("".join(f"{p} 0\n" for p in paths))
    return str(path)


def run(capsys, *argv: str) -> tuple[int, dict[str, list[str]], str]:
    """Exit code, the report's tab-separated lines by path, and the summary."""
    code = main([*argv])
    out = capsys.readouterr().out
    rows = [line.split("\t") for line in out.splitlines() if "\t" in line]
    return code, {row[0]: row[1:] for row in rows}, "\n".join(line for line in out.splitlines() if "\t" not in line)


@pytest.fixture
def mixed(files, tmp_path) -> str:
    return write_index(tmp_path / "mixed.csv", list(files.values()))


def test_mixed_index(files, mixed, tmp_path, capsys):
    bad_list = tmp_path / "bad.tsv"
    code, rows, summary = run(capsys, mixed, "--workers", "2", "--bad-list", str(bad_list))
    assert code == 1
    assert list(rows) == list(files.values())  # every entry, in index order
    for kind in EXPECTED_BAD:
        assert rows[files[kind]][0].startswith(f"BAD {kind}: "), (kind, rows[files[kind]])
    assert re.fullmatch(r"BAD corrupt: .* after \d+ frames", rows[files["corrupt"]][0])
    assert rows[files["corrupt"]][1:5] == ["24", "25.00", "64x64", "vp9"]  # what the probe knew is still shown
    for good in ["vp9", "h264", "image", "too short"]:  # 6 frames are enough for --min-frames 1
        assert rows[files[good]][0] == "ok", good
    assert rows[files["h264"]] == ["ok", "24", "25.00", "64x64", "h264", "0.96s"]
    assert rows[files["image"]][:5] == ["ok", "1", "-", "64x64", "png"]

    assert "checked 11 of 11 files: 4 ok, 7 bad" in summary
    bad_counts = re.search(r"^bad: (.*)$", summary, re.M)[1].split(", ")
    assert sorted(bad_counts) == sorted(f"{kind} 1" for kind in [*EXPECTED_BAD, "corrupt"])
    assert re.search(r"^codecs: vp9 2, h264 1, png 1$", summary, re.M)
    assert "resolution: 64x64 to 64x64" in summary
    assert "(2.2 s)" in summary  # 24 + 24 + 6 frames at 25 fps; the image has no duration
    listed = dict(line.split("\t") for line in bad_list.read_text().splitlines())
    assert {p: r.split(":")[0] for p, r in listed.items()} == {files[k]: k for k in [*EXPECTED_BAD, "corrupt"]}

    # The cache, next to the index, holds the probes, and the corrupt file as a failed probe training will skip.
    cached = cache_path(mixed).read_text()
    assert f"{files['vp9']},True,,24,25.0,64,64,vp9," in cached
    assert f"{files['corrupt']},False,corrupt: " in cached


def test_cache_written_and_reused(files, tmp_path, capsys):
    index = write_index(tmp_path / "index.csv", [files[k] for k in ["vp9", "h264", "image", "empty", "corrupt"]])
    uncached = run(capsys, index, "--no-cache", "--workers", "1")
    assert not cache_path(index).exists()  # --no-cache writes nothing
    assert run(capsys, index, "--workers", "1") == uncached
    assert cache_path(index).exists()
    assert run(capsys, index, "--workers", "1") == uncached  # from the cache: the same report

    # Plant a verdict in the cache (same size and mtime): the doctor trusts it, --no-cache neither reads nor writes.
    text = cache_path(index).read_text()
    planted = re.sub(rf"^{re.escape(files['h264'])},True,,", f"{files['h264']},False,not a video: planted,", text,
                     flags=re.M)
    assert planted != text
    cache_path(index).write_text(planted)
    code, rows, _ = run(capsys, index, "--workers", "1", "--no-cache")
    assert code == 1 and rows[files["h264"]][0] == "ok"
    assert cache_path(index).read_text() == planted
    code, rows, _ = run(capsys, index, "--workers", "1")
    assert rows[files["h264"]][0] == "BAD not a video: planted"
    # A file once found corrupt is decoded again rather than trusted: still corrupt, the same report.
    assert rows[files["corrupt"]][0] == uncached[1][files["corrupt"]][0]


def test_all_good_exits_0(files, tmp_path, capsys):
    index = write_index(tmp_path / "good.csv", [files[k] for k in ["vp9", "h264", "image"]])
    code, rows, summary = run(capsys, index, "--workers", "1", "--no-cache")
    assert code == 0 and [r[0] for r in rows.values()] == ["ok"] * 3
    assert "checked 3 of 3 files: 3 ok, 0 bad" in summary and "bad:" not in summary and "hint" not in summary


def test_limit_samples_reproducibly(files, mixed, capsys):
    paths = list(files.values())
    expected = [paths[i] for i in np.sort(np.random.default_rng(0).choice(len(paths), 4, replace=False))]
    code, rows, summary = run(capsys, mixed, "--limit", "4", "--workers", "1", "--no-cache")
    assert list(rows) == expected and "checked 4 of 4 files" in summary
    assert run(capsys, mixed, "--limit", "4", "--workers", "1", "--no-cache")[1] == rows
    assert len(run(capsys, mixed, "--limit", "100", "--workers", "1", "--no-cache")[1]) == len(paths)


def test_min_frames(files, tmp_path, capsys):
    index = write_index(tmp_path / "short.csv", [files[k] for k in ["too short", "vp9", "image"]])
    code, rows, summary = run(capsys, index, "--min-frames", "8", "--workers", "1")
    assert code == 1
    assert rows[files["too short"]][0] == "BAD too short: 6 frames < 8"
    assert rows[files["vp9"]][0] == rows[files["image"]][0] == "ok"  # an image is a clip of one repeated frame
    assert "bad: too short 1" in summary
    assert ",True,,6,25.0," in cache_path(index).read_text()  # --min-frames depends on the config: not cached


def test_min_max_bytes(files, tmp_path, capsys):
    index = write_index(tmp_path / "sizes.csv", [files["vp9"], files["too small"]])
    code, rows, _ = run(capsys, index, "--min-bytes", "100", "--max-bytes", "20000", "--workers", "1", "--no-cache")
    assert rows[files["vp9"]][0].startswith("BAD too large: ")
    assert rows[files["too small"]][0].startswith("BAD no frames: ")  # over 100 bytes, but only 600 of a video


def test_index_errors_exit_2(tmp_path, capsys):
    assert main([str(tmp_path / "absent.csv")]) == 2
    assert "index file not found" in capsys.readouterr().err
    (tmp_path / "empty.csv").write_text("")
    assert main([str(tmp_path / "empty.csv")]) == 2
    assert "lists no videos" in capsys.readouterr().err
    (tmp_path / "bad.csv").write_text("a video without a label\n")
    assert main([str(tmp_path / "bad.csv")]) == 2
    assert "expected '<video path> <integer label>'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "bad.csv"), "--limit", "0"])
    assert exit_info.value.code == 2


def test_corruption_ffmpeg_reports_and_conceals(files, tmp_path):
    """What a full decode can and cannot see: a damaged frame header or NAL length is an FFmpeg error; damage in
    the middle of a payload is concealed (the file decodes, with garbled pixels) and no decoder-based check sees it."""
    assert probe_file(files["corrupt"]).ok  # demuxes cleanly: only decoding finds it
    assert re.fullmatch(r"corrupt: Invalid data found when processing input after \d+ frames",
                        decode_all_pyav(files["corrupt"]))
    h264 = corrupt_packet(files["h264"], tmp_path / "corrupt.mp4", packet=5)
    assert decode_all_pyav(h264).startswith("corrupt: ")
    data = bytearray(Path(files["vp9"]).read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    (tmp_path / "concealed.webm").write_bytes(bytes(data))
    assert decode_all_pyav(str(tmp_path / "concealed.webm")) == ""
    assert decode_all_pyav(files["vp9"]) == ""


def test_dali_decoder(files, tmp_path, capsys):
    from engine.data.dali_decode import DALI_CODECS, dali_available

    if not dali_available():
        index = write_index(tmp_path / "dali.csv", [files["vp9"]])
        assert main([index, "--decoder", "dali"]) == 2
        assert "pip install nvidia-dali-cuda130" in capsys.readouterr().err
        return
    import torch

    device = "gpu" if torch.cuda.is_available() else "cpu"
    index = write_index(tmp_path / "dali.csv", [files[k] for k in ["vp9", "h264", "image", "corrupt"]])
    code, rows, summary = run(capsys, index, "--decoder", "dali", "--workers", "1", "--no-cache")
    assert code == 1
    assert rows[files["vp9"]][0] == rows[files["image"]][0] == "ok"
    assert rows[files["corrupt"]][0].startswith("BAD corrupt: ")
    if "h264" not in DALI_CODECS[device]:
        assert rows[files["h264"]] == ["ok", "24", "25.00", "64x64", "h264", "0.96s",
                                       f"pyav fallback: DALI ({device}) cannot decode h264"]
        assert "notes: pyav fallback 1" in summary
