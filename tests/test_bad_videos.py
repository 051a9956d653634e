"""The training run's report of bad index entries: once per path, a CSV in the run folder, a stop when too many."""

import csv
import logging

import pytest

from engine.data.bad_videos import BadVideoReport, TooManyBadVideos


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_each_bad_path_is_reported_once_and_recorded(tmp_path, caplog):
    report = BadVideoReport(tmp_path, rank=0, max_fraction=0.5, min_attempts=1)
    with caplog.at_level(logging.WARNING):
        report.update([("/v/a.mp4", "missing: no such file")], samples=4, step=0)
        report.update([("/v/a.mp4", "missing: no such file"), ("/v/b.mp4", "empty: 0 bytes")], samples=4, step=1)
    assert caplog.text.count("/v/a.mp4") == 1 and caplog.text.count("/v/b.mp4") == 1
    assert [(r["path"], r["reason"], r["step"]) for r in rows(tmp_path / "bad_videos.csv")] == [
        ("/v/a.mp4", "missing: no such file", "0"), ("/v/b.mp4", "empty: 0 bytes", "1")]
    assert (report.failed_attempts, report.attempts) == (3, 11)

    resumed = BadVideoReport(tmp_path, rank=0, max_fraction=0.5)  # a resumed run reads what is known
    resumed.update([("/v/b.mp4", "empty: 0 bytes")], samples=4, step=2)
    assert len(rows(tmp_path / "bad_videos.csv")) == 2

    other_rank = BadVideoReport(tmp_path, rank=3, max_fraction=0.5)
    other_rank.update([("/v/c.mp4", "not a video: x")], samples=1, step=0)
    assert other_rank.path.name == "bad_videos_rank3.csv" and len(rows(other_rank.path)) == 1


def test_stops_above_the_fraction_naming_files_and_reasons(tmp_path):
    report = BadVideoReport(tmp_path, rank=0, max_fraction=0.1, min_attempts=20)
    report.update([("/v/a.mp4", "truncated: t")] * 2, samples=4, step=0)  # 2 of 6, too few attempts to judge
    report.update([], samples=20, step=1)  # 2 of 26 = 7.7%
    with pytest.raises(TooManyBadVideos) as error:
        report.update([("/v/b.mp4", "corrupt: c")] * 3, samples=10, step=2)  # 5 of 39
    message = str(error.value)
    assert "5 of 39 index entries opened were bad (12.8% > data.max_bad_fraction = 10.0%)" in message
    assert "/v/a.mp4: truncated: t" in message and "/v/b.mp4: corrupt: c" in message
    assert "python -m engine.data.inspect" in message and "bad_videos.csv" in message


def test_below_the_fraction_goes_on(tmp_path):
    report = BadVideoReport(tmp_path, rank=0, max_fraction=0.1, min_attempts=20)
    for step in range(10):
        report.update([("/v/a.mp4", "missing: m")] if step == 3 else [], samples=8, step=step)
    assert report.failed_attempts == 1
