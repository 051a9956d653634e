"""Bit-exact resume on the CPU: 16 steps straight == 8 + 8 == killed with SIGKILL mid-run and rerun, in per-step
losses and in every tensor of the final checkpoint (weights, optimizer state, EMA target); checkpoint rotation; an
unreadable newest checkpoint passed over for the one before it."""

import copy
import csv
import signal
import subprocess
import sys
import time

import pytest
import torch

from engine.backends import keep_optimizer_implementation
from engine.checkpoint import UnreadableCheckpoint, latest_path, load_checkpoint
from engine.loop import train

from .conftest import ROOT

STEPS = ["--logging.log_every=1", "--logging.checkpoint_every=4", "--optimization.ipe=4", "--optimization.warmup=1"]


def tensors(state, prefix=""):
    """Every tensor of a (nested) checkpoint, by path."""
    if isinstance(state, torch.Tensor):
        return {prefix: state}
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else []
    out = {}
    for key, value in items:
        out.update(tensors(value, f"{prefix}/{key}"))
    return out


def assert_same_checkpoint(a, b):
    first, second = tensors(load_checkpoint(latest_path(a, "jepa"))), tensors(load_checkpoint(latest_path(b, "jepa")))
    assert first.keys() == second.keys() and any("/opt/state/" in k for k in first)
    different = [k for k in first if not torch.equal(first[k], second[k])]
    assert not different, different[:5]


def test_straight_equals_two_halves(tiny_config, tmp_path):
    straight = train(tiny_config("--meta.max_steps=16", *STEPS, f"--logging.folder={tmp_path}/a"))
    half = train(tiny_config("--meta.max_steps=8", *STEPS, f"--logging.folder={tmp_path}/b"))
    rest = train(tiny_config("--meta.max_steps=16", *STEPS, f"--logging.folder={tmp_path}/b"))
    assert rest["start_step"] == 8 and sorted(rest["losses"]) == list(range(9, 17))
    assert half["losses"] | rest["losses"] == straight["losses"]  # == on floats: bit-exact
    assert_same_checkpoint(tmp_path / "a", tmp_path / "b")
    # rotation: the two newest step files stay, and latest is the newest
    kept = sorted(p.name for p in (tmp_path / "b").glob("jepa-step*.pth.tar"))
    assert kept == ["jepa-step00000012.pth.tar", "jepa-step00000016.pth.tar"]
    assert load_checkpoint(latest_path(tmp_path / "b", "jepa"))["step"] == 16


def test_sigkill_mid_run_then_rerun_is_bit_exact(tiny_config, synthetic_root, tmp_path):
    straight = train(tiny_config("--meta.max_steps=16", *STEPS, f"--logging.folder={tmp_path}/a"))
    folder = tmp_path / "b"
    args = [sys.executable, str(ROOT / "engine" / "train.py"), "--config", str(ROOT / "configs" / "tiny_synthetic.json"),
            "--data.synthetic_root=null", f"--data.datasets=[\"{synthetic_root}/motion_train.csv\"]",
            "--data.num_workers=0", "--data.batch_size=4", "--meta.max_steps=16", *STEPS, f"--logging.folder={folder}"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (folder / "jepa-step00000008.pth.tar").exists() and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint at step 8 after 120 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, process.stderr.read()  # killed mid-run, not finished
    (folder / "jepa-step00000099.pth.tar.tmp").write_bytes(b"a partial write")  # never picked up
    rerun = train(tiny_config("--meta.max_steps=16", *STEPS, f"--logging.folder={folder}"))
    assert rerun["start_step"] in (8, 12)
    assert rerun["losses"] == {s: v for s, v in straight["losses"].items() if s > rerun["start_step"]}
    assert_same_checkpoint(tmp_path / "a", folder)
    with open(folder / "metrics.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, 17))  # no step logged twice


def test_an_unreadable_newest_checkpoint_is_named_and_passed_over(tiny_config, tmp_path, capsys):
    straight = train(tiny_config("--meta.max_steps=16", *STEPS, f"--logging.folder={tmp_path}/a"))
    folder = tmp_path / "b"
    train(tiny_config("--meta.max_steps=12", *STEPS, f"--logging.folder={folder}"))
    newest = folder / "jepa-step00000012.pth.tar"
    newest.write_bytes(newest.read_bytes()[:100_000])  # cut short in place (latest, its hard link, with it)
    capsys.readouterr()
    rerun = train(tiny_config("--meta.max_steps=16", *STEPS, f"--logging.folder={folder}"))
    assert f"warning: checkpoint {newest} cannot be read" in capsys.readouterr().out
    assert rerun["start_step"] == 8
    assert rerun["losses"] == {s: v for s, v in straight["losses"].items() if s > 8}
    assert_same_checkpoint(tmp_path / "a", folder)  # step 12 written again, whole


def test_no_readable_checkpoint_stops_naming_each(tiny_config, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    for step in (4, 8):
        (folder / f"jepa-step{step:08d}.pth.tar").write_bytes(b"not a checkpoint")
    with pytest.raises(UnreadableCheckpoint, match="(?s)no checkpoint in .* can be read:.*step00000008.*step00000004"):
        train(tiny_config("--meta.max_steps=12", *STEPS, f"--logging.folder={folder}"))


def test_a_full_disk_at_a_save_stops_clearly_and_keeps_the_last_checkpoint(tiny_config, tmp_path, monkeypatch):
    import errno

    import engine.checkpoint

    folder = tmp_path / "run"
    train(tiny_config("--meta.max_steps=4", *STEPS, f"--logging.folder={folder}"))
    real_save = torch.save

    def full_disk(state, f):
        real_save({"part": torch.zeros(1000)}, f)  # a part written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(engine.checkpoint.torch, "save", full_disk)
    with pytest.raises(engine.checkpoint.CheckpointWriteError,
                       match=r"step 8 .* failed \(No space left on device\); the last checkpoint, .*step00000004"
                             r"\.pth\.tar, is intact\. Free space in .* GB\)"):
        train(tiny_config("--meta.max_steps=8", *STEPS, f"--logging.folder={folder}"))
    assert sorted(p.name for p in folder.glob("jepa-*")) == ["jepa-latest.pth.tar", "jepa-step00000004.pth.tar"]
    assert load_checkpoint(latest_path(folder, "jepa"))["step"] == 4


def test_loaded_optimizer_state_keeps_the_runs_implementation():
    """A file from a run whose AdamW was not fused (a CPU run) loaded into a fused one (a GPU run): torch's loader takes
    `fused` from the file's groups; the run keeps its own choice, and its step counters are where that path reads
    them. The fused step then continues the file's optimizer to rounding."""
    def step(net, opt):
        net(torch.ones(3, 6)).square().sum().backward()
        opt.step()
        opt.zero_grad()

    torch.manual_seed(0)
    written = torch.nn.Linear(6, 5)
    plain = torch.optim.AdamW(written.parameters(), lr=1e-2)
    step(written, plain)
    resumed = torch.nn.Linear(6, 5)
    resumed.load_state_dict(written.state_dict())
    fused = torch.optim.AdamW(resumed.parameters(), lr=1e-2, fused=True)
    fused.load_state_dict(copy.deepcopy(plain.state_dict()))  # as read from a file: no tensor shared
    assert fused.param_groups[0]["fused"] is None  # torch's loader took the file's setting
    keep_optimizer_implementation(fused)
    assert fused.param_groups[0]["fused"] is True
    for p in resumed.parameters():
        assert fused.state[p]["step"].dtype == torch.float32 and fused.state[p]["step"].device == p.device
    step(written, plain)
    step(resumed, fused)
    for p, q in zip(resumed.parameters(), written.parameters()):
        torch.testing.assert_close(p, q)
