"""A frozen evaluation survives a crash, SIGTERM and Ctrl-C: rerunning the same command continues each probe bit for
bit (weights, optimizer state, history), never continues another evaluation's probe, and a finished one is not
trained again."""

import errno
import os
import signal
import subprocess
import sys

import pytest
import torch

from engine.config import ConfigError
from engine.evaluation import runner
from engine.evaluation.config import load_eval_config
from engine.evaluation.probe import AttentiveProbe, save_probe
from engine.faults import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE

from .conftest import ROOT
from .process_signals import signal_when

EPOCHS = 3  # of 6 training batches (24 clips of batch 4) and 2 validation batches each


def _args(synthetic_root, folder, *extra):
    return ["--data.synthetic_root=null", f"--data.train=[\"{synthetic_root}/appearance_train.csv\"]",
            f"--data.val=[\"{synthetic_root}/appearance_val.csv\"]", "--data.num_workers=0", "--data.batch_size=4",
            f"--optimization.epochs={EPOCHS}", f"--logging.folder={folder}", *extra]


def _config(synthetic_root, folder, *extra):
    return load_eval_config(ROOT / "configs" / "eval" / "synthetic_appearance.json",
                            _args(synthetic_root, folder, *extra))


def _run(synthetic_root, tiny_run, folder, *extra, said=None):
    return runner.run_eval(_config(synthetic_root, folder, *extra), str(tiny_run),
                           say=(lambda *a: None) if said is None else said.append)


def _without_times(history):
    return [[{k: v for k, v in row.items() if k != "seconds"} for row in split] for split in history]


def _assert_same_probe(a, b):
    sa, sb = (torch.load(p / "probe-split0.pth.tar", weights_only=True) for p in (a, b))
    assert sa["classifier"].keys() == sb["classifier"].keys()
    for key in sa["classifier"]:
        assert torch.equal(sa["classifier"][key], sb["classifier"][key]), key
    for group_a, group_b in zip(sa["opt"]["state"].values(), sb["opt"]["state"].values(), strict=True):
        for key in group_a:
            assert torch.equal(group_a[key], group_b[key]), key
    assert sa["epoch"] == sb["epoch"] == EPOCHS and sb["progress"]["complete"]


@pytest.fixture(scope="module")
def straight(tiny_run, synthetic_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("straight")
    return folder, _run(synthetic_root, tiny_run, folder)


def _crash_after_the_8th_save(monkeypatch, run):
    """`run()` with logging.checkpoint_every_s tiny (a save after every batch) dies right after its 8th save (epoch 2,
    batch 1: 6 batch saves and the epoch-end save of epoch 1, then one more), as a node crash would stop it."""
    saves = []

    def save_then_crash(*args, **kwargs):
        path = save_probe(*args, **kwargs)
        saves.append(kwargs["progress"])
        if len(saves) == 8:
            raise SystemError("node lost")
        return path

    monkeypatch.setattr(runner, "save_probe", save_then_crash)
    with pytest.raises(SystemError, match="node lost"):
        run()
    assert (saves[-1]["epoch"], saves[-1]["batch"], saves[-1]["step"]) == (1, 1, 7)
    monkeypatch.undo()


def test_a_crash_mid_epoch_continues_from_the_last_save_bit_exactly(tiny_run, synthetic_root, tmp_path,
                                                                   straight, monkeypatch):
    _crash_after_the_8th_save(monkeypatch, lambda: _run(synthetic_root, tiny_run, tmp_path,
                                                        "--logging.checkpoint_every_s=1e-9"))
    said = []
    again = _run(synthetic_root, tiny_run, tmp_path, "--logging.checkpoint_every_s=1e-9", said=said)
    assert "split 0: continuing at epoch 2, batch 1" in " ".join(said)
    assert _without_times(again["history"]) == _without_times(straight[1]["history"])
    assert again["top1"] == straight[1]["top1"]
    _assert_same_probe(straight[0], tmp_path)


def test_ctrl_c_while_validating_keeps_the_epochs_training(tiny_run, synthetic_root, tmp_path, straight,
                                                           monkeypatch):
    # the signal comes while epoch 2 is validated: that epoch's training is saved and only its validation reruns
    calls = []
    original = AttentiveProbe.eval

    def eval_then_interrupt(self):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # handled by the run's guard: a flag only
        return original(self)

    monkeypatch.setattr(AttentiveProbe, "eval", eval_then_interrupt)
    said = []
    with pytest.raises(runner.Stopped) as stopped:
        _run(synthetic_root, tiny_run, tmp_path, said=said)
    assert stopped.value.exit_code == INTERRUPTED_EXIT_CODE
    assert "stopping after Ctrl-C at split 0 epoch 2, validating" in " ".join(said)
    record = torch.load(tmp_path / "probe-split0.pth.tar", weights_only=True)["progress"]
    assert (record["epoch"], record["batch"], record["step"], len(record["history"])) == (1, 6, 12, 1)
    monkeypatch.undo()
    again = _run(synthetic_root, tiny_run, tmp_path)
    assert _without_times(again["history"]) == _without_times(straight[1]["history"])
    _assert_same_probe(straight[0], tmp_path)


def test_a_finished_evaluation_is_not_trained_again(tiny_run, synthetic_root, straight):
    folder, first = straight
    (folder / "results.json").unlink()
    said = []
    again = _run(synthetic_root, tiny_run, folder, said=said)
    text = " ".join(said)
    assert "split 0: trained already" in text and "feature cache" not in text and "epoch 1/" not in text
    assert again["history"] == first["history"] and (folder / "results.json").is_file()


def test_more_splits_later_reuse_the_probes_done(tiny_run, synthetic_root, tmp_path):
    fewer = _run(synthetic_root, tiny_run, tmp_path, "--data.train_per_class=2", "--optimization.epochs=1")
    said = []
    more = _run(synthetic_root, tiny_run, tmp_path, "--data.train_per_class=2", "--optimization.epochs=1",
                "--data.splits=2", said=said)
    assert "split 0: trained already" in " ".join(said) and "split 1 epoch 1/1" in " ".join(said)
    assert more["splits"][0] == fewer["splits"][0] and len(more["splits"]) == 2
    alone = _run(synthetic_root, tiny_run, tmp_path / "alone", "--data.train_per_class=2", "--optimization.epochs=1",
                 "--data.splits=2")
    assert _without_times(alone["history"]) == _without_times(more["history"])  # as if both were trained at once


def test_another_evaluations_probe_is_never_continued(tiny_run, synthetic_root, straight, tmp_path):
    folder = straight[0]
    with pytest.raises(ConfigError, match=r"different evaluation.*optimization\.lr: 0\.001 there, 0\.002 now"):
        _run(synthetic_root, tiny_run, folder, "--optimization.lr=0.002")
    with pytest.raises(ConfigError, match=r"global batch \(ranks x data.batch_size\): 4 there, 8 now"):
        _run(synthetic_root, tiny_run, folder, "--data.batch_size=8")
    with pytest.raises(ConfigError, match=r"encoder weights \(digest\)"):  # the same folder, other weights
        runner.run_eval(_config(synthetic_root, folder), str(tiny_run), random_init=True, say=lambda *a: None)
    # where files go and how fast they come are not part of it
    _run(synthetic_root, tiny_run, folder, "--data.num_workers=1", "--meta.clips_per_forward=3")
    # nor a key that a later version adds, at its default (the file has no such key: it predates it)
    record = torch.load(folder / "probe-split0.pth.tar", weights_only=True)
    del record["progress"]["fingerprint"]["data_aug.reprob"]
    torch.save(record, folder / "probe-split0.pth.tar")
    _run(synthetic_root, tiny_run, folder)
    with pytest.raises(ConfigError, match=r"data_aug\.reprob: absent there \(an older version: 0\.25\), 0\.1 now"):
        _run(synthetic_root, tiny_run, folder, "--data_aug.reprob=0.1")
    index = tmp_path / "train.csv"  # the same index file, edited between runs
    index.write_text((synthetic_root / "appearance_train.csv").read_text())
    _run(synthetic_root, tiny_run, tmp_path / "edited", f"--data.train=[\"{index}\"]", "--optimization.epochs=1")
    index.write_text("".join((synthetic_root / "appearance_train.csv").read_text().splitlines(True)[1:]))
    with pytest.raises(ConfigError, match=r"training entries \(digest\)"):
        _run(synthetic_root, tiny_run, tmp_path / "edited", f"--data.train=[\"{index}\"]", "--optimization.epochs=1")
    v1 = tmp_path / "v1"
    v1.mkdir()
    probe = AttentiveProbe(96, 3, 4)
    save_probe(v1 / "probe-split0.pth.tar", probe, epoch=1)  # V1's file: no record of where its training stands
    with pytest.raises(ConfigError, match="without a record of its training"):
        _run(synthetic_root, tiny_run, v1)


def test_a_failed_probe_save_keeps_the_last_file(tiny_run, synthetic_root, tmp_path, monkeypatch):
    import engine.evaluation.probe

    from engine.checkpoint import CheckpointWriteError

    real_save = torch.save
    calls = []

    def full_disk_at_the_second(state, f):
        calls.append(1)
        if len(calls) == 2:
            real_save({"part": torch.zeros(100)}, f)  # a part written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(state, f)

    monkeypatch.setattr(engine.evaluation.probe.torch, "save", full_disk_at_the_second)
    with pytest.raises(CheckpointWriteError, match=r"probe file .*probe-split0\.pth\.tar failed \(No space left on "
                                                   r"device\); the last one, .* is intact\. Free space in"):
        _run(synthetic_root, tiny_run, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe-split0.pth.tar"]  # no partial file left
    assert torch.load(tmp_path / "probe-split0.pth.tar", weights_only=True)["progress"]["epoch"] == 1


@pytest.mark.parametrize("signum,code,reason", [(signal.SIGTERM, PREEMPTED_EXIT_CODE, "SIGTERM"),
                                                (signal.SIGINT, INTERRUPTED_EXIT_CODE, "Ctrl-C")], ids=["SIGTERM", "Ctrl-C"])
def test_a_stop_signal_to_the_eval_command_saves_and_the_rerun_continues(tiny_run, synthetic_root, tmp_path,
                                                                        straight, signum, code, reason):
    # the whole process tree gets the signal (the launcher's SIGTERM, a terminal's Ctrl-C), loader worker included
    args = [sys.executable, "engine/eval.py", "--config", "configs/eval/synthetic_appearance.json", "--checkpoint",
            str(tiny_run), *_args(synthetic_root, tmp_path), "--data.num_workers=1", "--meta.cache_features=false",
            "--optimization.epochs=40"]
    run = signal_when(args, (tmp_path / "probe-split0.pth.tar").exists, signum, cwd=ROOT)  # after the first epoch
    output = run.stdout
    assert run.returncode == code, output
    assert f"stopping after {reason} at split 0 epoch" in output and "rerun the same command" in output
    assert "Traceback" not in output
    record = torch.load(tmp_path / "probe-split0.pth.tar", weights_only=True)["progress"]
    assert 1 <= record["epoch"] < 40 and not record["complete"]
    rerun = subprocess.run([*args, "--optimization.epochs=41"], cwd=ROOT, capture_output=True, text=True)
    assert rerun.returncode == 2 and "optimization.epochs: 40 there, 41 now" in rerun.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_gpu_evaluation_continues_after_a_crash(tiny_run, synthetic_root, tmp_path, monkeypatch):
    # bf16 autocast features, pinned batches from a worker, the digest of weights on the GPU; the probe's attention
    # backward may use atomics there, so the continued run is compared within a tolerance
    gpu = ("--meta.dtype=bfloat16", "--meta.cache_features=false", "--data.num_workers=1")
    straight = _run(synthetic_root, tiny_run, tmp_path / "straight", *gpu)
    _crash_after_the_8th_save(monkeypatch, lambda: _run(synthetic_root, tiny_run, tmp_path / "crashed", *gpu,
                                                        "--logging.checkpoint_every_s=1e-9"))
    said = []
    again = _run(synthetic_root, tiny_run, tmp_path / "crashed", *gpu, "--logging.checkpoint_every_s=1e-9", said=said)
    assert "on 1 x cuda" in said[0] and "split 0: continuing at epoch 2, batch 1" in " ".join(said)
    for a, b in zip(straight["history"][0], again["history"][0], strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)


def test_ranks_that_pad_the_epoch_differently_are_another_probe():
    """9 training entries: one rank repeats none, two ranks repeat one entry per epoch (DistributedSampler's
    padding), three none: the padding is in the fingerprint, so only the ranks that pad alike continue a probe."""
    from types import SimpleNamespace

    from engine.evaluation.config import EvalConfig
    from engine.evaluation.resume import fingerprint

    key = "training entries repeated per epoch (to a multiple of the ranks)"
    train = SimpleNamespace(paths=[f"{i}.mp4" for i in range(9)], labels=list(range(9)))
    val = SimpleNamespace(paths=["v.mp4"], labels=[0])
    encoder = torch.nn.Linear(2, 2)
    repeated = {w: fingerprint(EvalConfig(), encoder, w, train, val)[key] for w in (1, 2, 3)}
    assert repeated == {1: 0, 2: 1, 3: 0}
