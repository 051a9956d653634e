"""Checkpoint sizes (engine/disk_space.py) against the files the backends write, and the start-of-run warning when
the run folder's disk cannot hold the checkpoints to come."""

import os
import subprocess
import sys
from collections import namedtuple

import pytest

from engine import disk_space
from engine.checkpoint import step_path
from engine.dry_run import format_report, dry_run_report, model_shape
from engine.loop import train

from .conftest import PYTHONPATH, ROOT
from .deepspeed_cpu import RANK_PRELUDE

STEPS = ["--meta.max_steps=2", "--logging.checkpoint_every=2"]
Usage = namedtuple("Usage", "total used free")


def estimate(cfg, deepspeed):
    m = model_shape(cfg)
    return disk_space.checkpoint_bytes(m.encoder_total, m.predictor_total, m.trained_params, deepspeed)


def test_the_estimate_matches_a_pytorch_checkpoint(tiny_config, tmp_path):
    cfg = tiny_config(*STEPS)
    train(cfg)
    size = step_path(tmp_path / "run", "jepa", 2).stat().st_size
    assert size == pytest.approx(estimate(cfg, deepspeed=False), rel=0.03)


def test_the_estimate_matches_a_deepspeed_zero2_tag(tiny_config, synthetic_root, tmp_path):
    pytest.importorskip("deepspeed")
    run = (RANK_PRELUDE + "import sys\n"
           "sys.argv = ['train.py'] + sys.argv[1:]\n"
           "from engine.train import main\n"
           "sys.exit(main())\n")
    args = ["--config", "configs/tiny_synthetic.json", "--data.synthetic_root=null",
            f"--data.datasets=[\"{synthetic_root}/motion_train.csv\"]", "--data.num_workers=0", "--data.batch_size=2",
            *STEPS, "--meta.backend=deepspeed", '--deepspeed={"zero_optimization": {"stage": 2}}',
            f"--logging.folder={tmp_path}/ds"]
    done = subprocess.run([sys.executable, "-c", run, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": PYTHONPATH})
    assert done.returncode == 0, done.stderr[-3000:]
    tag = tmp_path / "ds" / "deepspeed" / "step2"
    size = sum(p.stat().st_size for p in tag.iterdir())
    assert size == pytest.approx(estimate(tiny_config(*STEPS), deepspeed=True), rel=0.03)


def test_space_warning_counts_the_checkpoints_to_come(tmp_path, monkeypatch):
    monkeypatch.setattr(disk_space.shutil, "disk_usage", lambda _: Usage(100e9, 90e9, 10e9))
    gb = int(1e9)
    assert disk_space.space_warning(tmp_path, 3 * gb, keep_last=2, present=0) is None  # 9 GB of 10
    warning = disk_space.space_warning(tmp_path, 4 * gb, keep_last=2, present=0)
    assert warning.startswith("warning: checkpoints of this run take about 4.0 GB each; logging.keep_last=2 and the "
                              "one being written need about 12.0 GB more in")
    assert "10.0 GB free" in warning and "lower logging.keep_last" in warning
    # a resumed run already holds its two: only the one being written is still to come
    assert disk_space.space_warning(tmp_path, 4 * gb, keep_last=2, present=2) is None
    assert disk_space.space_warning(tmp_path, 11 * gb, keep_last=2, present=5) is not None


def test_a_run_whose_checkpoints_do_not_fit_says_so_at_start(tiny_config, monkeypatch, capsys):
    monkeypatch.setattr(disk_space.shutil, "disk_usage", lambda _: Usage(1e9, 1e9 - 1e6, 1e6))  # 1 MB free
    train(tiny_config("--meta.max_steps=1"))
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines.index(next(l for l in lines if "checkpoints of this run take about" in l)) < \
        lines.index(next(l for l in lines if l.startswith("step ")))  # before the first step


def test_the_dry_run_prints_the_checkpoint_size():
    from engine.config import load_config

    cfg = load_config(ROOT / "configs" / "vith16_384.json", [])
    report = format_report(dry_run_report(cfg, world_size=240))
    each = estimate(cfg, deepspeed=True)
    assert f"each {each / 1e9:.1f} GB; logging.keep_last=2 plus the one being written: {3 * each / 1e9:.1f} GB" in report
    assert "Checkpoints (DeepSpeed" in report
