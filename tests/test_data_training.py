"""Bad input never kills a run: a short training run on an index mixing good clips with every kind of bad entry, the
stop above data.max_bad_fraction, and resume-skip landing on the same batches."""

import csv

import pytest
import torch

from engine.data.bad_videos import TooManyBadVideos
from engine.data.index import read_index
from engine.data.pipeline import build_training_data
from engine.loop import train
from engine.packed_masks import MaskMaker
from tests.video_faults import make_bad_files, write_image

BAD_KINDS = ["missing", "empty", "truncated", "not a video", "unsupported codec", "too short", "too small"]


@pytest.fixture
def mixed_index(synthetic_root, tmp_path):
    """8 good synthetic clips, a PNG image and one file of each bad kind (16 entries), as an index file."""
    good = [line.split(" ")[0] for line in (synthetic_root / "motion_train.csv").read_text().splitlines()[:8]]
    bad = make_bad_files(tmp_path / "bad")
    entries = good + [write_image(tmp_path / "photo.png")] + [bad[kind] for kind in BAD_KINDS]
    index = tmp_path / "mixed.csv"
    index.write_text("".join(f"{path} {i % 8}\n" for i, path in enumerate(entries)))
    return index, bad


def test_training_survives_every_kind_of_bad_entry(tiny_config, mixed_index, tmp_path):
    index, bad = mixed_index
    # 5 steps of 4 = 20 samples > 16 entries: the first data epoch opens every entry once.
    summary = train(tiny_config(f"--data.datasets=[\"{index}\"]", "--meta.max_steps=5", "--data.max_bad_fraction=0.6",
                                "--data.filter_short_videos=true", f"--logging.folder={tmp_path}/run"))
    assert summary["steps"] == 5 and summary["last_loss"] > 0
    with open(tmp_path / "run" / "bad_videos.csv", newline="") as f:
        reported = {row["path"]: row["reason"] for row in csv.DictReader(f)}
    assert {path: reason.split(":")[0] for path, reason in reported.items()} == {bad[k]: k for k in BAD_KINDS}
    assert "photo.png" not in str(reported)  # an image is a clip, not a bad video
    # rank 0 wrote the probe cache, so the next run skips known-bad files without opening them
    cache = index.parent / "mixed.csv.probe.csv"
    with open(cache, newline="") as f:
        assert len(list(csv.DictReader(f))) == 16


def test_too_many_bad_entries_stop_the_run_with_the_list(tiny_config, mixed_index, tmp_path):
    index, bad = mixed_index
    with pytest.raises(TooManyBadVideos, match="data.max_bad_fraction = 10.0%") as error:
        train(tiny_config(f"--data.datasets=[\"{index}\"]", "--meta.max_steps=8", "--data.max_bad_fraction=0.1",
                          f"--logging.folder={tmp_path}/run"))
    assert bad["not a video"] in str(error.value) and "not a video:" in str(error.value)


def test_empty_index_is_a_clear_error_at_start(tiny_config, tmp_path):
    from engine.config import ConfigError

    empty = tmp_path / "empty.csv"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="data.datasets: index file .*empty.csv lists no videos"):
        train(tiny_config(f"--data.datasets=[\"{empty}\"]"))


def test_resume_skip_lands_on_the_same_batches(tiny_config, mixed_index, tmp_path):
    index, _ = mixed_index
    cfg = tiny_config(f"--data.datasets=[\"{index}\"]", "--data.max_bad_fraction=1.0")
    masks = MaskMaker(cfg.mask, cfg.grid, cfg.meta.seed, cfg.data.mask_type)

    def batches(start, steps):
        data = build_training_data(cfg, read_index([str(index)]), rank=1, world=2, device=torch.device("cpu"),
                                   folder=tmp_path, start_step=start, num_steps=steps, make_masks=masks)
        return [(b, data.finish(b)) for b in data.loader]

    straight, resumed = batches(0, 6), batches(4, 2)
    for (a, video_a), (b, video_b) in zip(straight[4:], resumed, strict=True):
        assert (a.step, a.first_sample_index, a.paths, a.failures) == (b.step, b.first_sample_index, b.paths,
                                                                       b.failures)
        assert torch.equal(video_a, video_b) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.masks.context_index, b.masks.context_index)
    assert any(a.failures for a, _ in straight)  # the mix did make the loader replace entries


def test_decoder_choice(monkeypatch):
    from engine.config import ConfigError
    from engine.data import dali_decode
    from engine.data.pipeline import choose_decoder

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setattr(dali_decode, "dali_available", lambda: True)
    assert choose_decoder("auto", cpu) == "pyav" and choose_decoder("pyav", gpu) == "pyav"
    assert choose_decoder("auto", gpu) == "dali" and choose_decoder("dali", cpu) == "dali"
    monkeypatch.setattr(dali_decode, "dali_available", lambda: False)
    assert choose_decoder("auto", gpu) == "pyav"
    with pytest.raises(ConfigError, match="data.decoder=dali needs NVIDIA DALI: pip install nvidia-dali-cuda130"):
        choose_decoder("dali", cpu)


def test_training_with_dali_on_cpu(tiny_config, mixed_index, tmp_path, capsys):
    """The DALI pipeline on DALI's CPU operators (the synthetic set is VP9), images and bad files alongside."""
    pytest.importorskip("nvidia.dali")  # the `dali` extra; `make test` installs it
    index, bad = mixed_index
    summary = train(tiny_config(f"--data.datasets=[\"{index}\"]", "--meta.max_steps=5", "--data.decoder=dali",
                                "--data.max_bad_fraction=0.6", f"--logging.folder={tmp_path}/run"))
    assert "decoder dali" in capsys.readouterr().out
    assert summary["steps"] == 5 and 0 < summary["last_loss"] < 2
    with open(tmp_path / "run" / "bad_videos.csv", newline="") as f:
        assert {row["path"] for row in csv.DictReader(f)} == {bad[k] for k in BAD_KINDS if k != "too short"}
