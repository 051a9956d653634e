"""Rerunning a run folder with another config (engine/rerun.py): changes that reshape the networks, rename the
checkpoints or switch the backend are refused before anything is built, with the folder untouched; schedule and data
changes are announced key by key and the run continues; operational keys pass silently."""

import json
import subprocess
import sys

import pytest

from engine.checkpoint import latest_path
from engine.config import Config, ConfigError
from engine.loop import train
from engine.rerun import changes, check_rerun

from .conftest import ROOT

STEPS = ["--meta.max_steps=2", "--logging.checkpoint_every=2", "--logging.log_every=1", "--optimization.ipe=4"]


def test_changes_sorts_refused_announced_and_silent_keys():
    saved = Config().to_dict()
    current = Config().to_dict()
    current["model"]["depth"] = 12
    current["mask"][1]["num_blocks"] = 3
    current["optimization"]["lr"] = 1e-4
    current["data"]["num_workers"] = 2
    current["logging"]["log_every"] = 1
    current["deepspeed"] = {"zero_optimization": {"stage": 3}}
    del saved["loss"]  # a key an older config.json lacks is not a difference
    current["loss"]["loss_exp"] = 2.0
    refused, announced = changes(saved, current)
    assert refused == ["model.depth: null -> 12"]
    assert announced == ["mask.1.num_blocks: 2 -> 3", "optimization.lr: 0.000625 -> 0.0001"]
    current["mask"].append(current["mask"][0])  # one more generator: one more mask token in the predictor
    assert changes(saved, current)[0] == ["mask: 2 -> 3", "model.depth: null -> 12"]


def test_a_changed_network_is_refused_and_the_folder_left_as_it_was(tiny_config, tmp_path):
    train(tiny_config(*STEPS))
    folder = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    with pytest.raises(ConfigError) as refused:
        train(tiny_config(*STEPS, "--meta.max_steps=4", "--model.depth=3", "--data.crop_size=48"))
    message = str(refused.value)
    assert "data.crop_size: 64 -> 48" in message and "model.depth: 4 -> 3" in message
    assert "--logging.folder=NEW" in message and "--meta.load_checkpoint=true" in message
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before


def test_a_changed_checkpoint_name_is_refused(tiny_config):
    train(tiny_config(*STEPS))
    with pytest.raises(ConfigError, match='logging.write_tag: "jepa" -> "other"'):
        train(tiny_config(*STEPS, "--meta.max_steps=4", "--logging.write_tag=other"))


def test_schedule_changes_are_announced_and_the_run_continues(tiny_config, tmp_path, capsys):
    train(tiny_config(*STEPS))
    capsys.readouterr()
    rerun = train(tiny_config(*STEPS, "--meta.max_steps=4", "--optimization.lr=1e-4", "--logging.log_every=2",
                              "--logging.checkpoint_every=4"))
    out = capsys.readouterr().out
    assert rerun["start_step"] == 2 and sorted(rerun["losses"]) == [3, 4]
    assert "with 1 setting(s) changed since its run last started" in out
    assert "  optimization.lr: 0.0005 -> 0.0001" in out
    assert "log_every" not in out and "max_steps" not in out and "checkpoint_every" not in out
    # config.json now holds the values the checkpoints were written with: the same rerun again announces nothing
    assert json.loads((tmp_path / "run" / "config.json").read_text())["optimization"]["lr"] == 1e-4
    train(tiny_config(*STEPS, "--meta.max_steps=6", "--optimization.lr=1e-4"))
    assert "changed since" not in capsys.readouterr().out


def test_a_checkpoint_of_the_other_backend_is_refused(tiny_config, tmp_path):
    cfg = tiny_config(*STEPS)
    train(cfg)
    folder = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"holds a checkpoint of the PyTorch backend \(jepa-step00000002.pth.tar\)"
                                          r" and none of DeepSpeed's") as refused:
        check_rerun(cfg, folder, use_ds=True)
    assert f"--meta.read_checkpoint={latest_path(folder, 'jepa')}" in str(refused.value)
    # the other way: a folder that only a DeepSpeed run wrote to
    ds_only = tmp_path / "ds_run"
    (ds_only / "deepspeed").mkdir(parents=True)
    (ds_only / "deepspeed" / "latest").write_text("step8")
    with pytest.raises(ConfigError, match=r"holds a DeepSpeed checkpoint \(deepspeed/step8\) and none of the PyTorch"):
        check_rerun(cfg, ds_only, use_ds=False)
    assert check_rerun(cfg, ds_only, use_ds=True) == []  # no config.json to compare with: nothing to say


def test_a_new_folder_and_an_unchanged_rerun_say_nothing(tiny_config, tmp_path):
    cfg = tiny_config(*STEPS)
    assert check_rerun(cfg, tmp_path / "run", use_ds=False) == []
    train(cfg)
    assert check_rerun(cfg, tmp_path / "run", use_ds=False) == []
    (tmp_path / "run" / "config.json").write_text("{ damaged")
    assert check_rerun(cfg, tmp_path / "run", use_ds=False) == [
        f"warning: {tmp_path / 'run' / 'config.json'} cannot be read; the rerun's config is not checked against the "
        "run's"]


def test_the_command_prints_one_config_error_line(tiny_config, synthetic_root, tmp_path):
    train(tiny_config(*STEPS))
    args = [sys.executable, str(ROOT / "engine" / "train.py"), "--config", str(ROOT / "configs" / "tiny_synthetic.json"),
            "--data.synthetic_root=null", f"--data.datasets=[\"{synthetic_root}/motion_train.csv\"]",
            "--data.num_workers=0", "--data.batch_size=4", *STEPS, f"--logging.folder={tmp_path}/run",
            "--model.pred_depth=3"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("config error: logging.folder") and "model.pred_depth: 2 -> 3" in result.stderr
    assert "Traceback" not in result.stderr
