"""Faults a long run survives: non-finite losses (skipped, counted, K in a row stop the run), SIGTERM (stop at a
step boundary, save, exit 143, and the rerun continues bit for bit) and Ctrl-C (the same, exit 130; twice: at once)."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import engine.step
from engine.checkpoint import load_resumable
from engine.faults import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE, NonFiniteLoss, StepGuard
from engine.loop import train

from .conftest import ROOT
from .process_signals import signal_when

STEPS = ["--logging.log_every=1", "--optimization.ipe=4", "--optimization.warmup=1"]


def poison(monkeypatch, bad_calls):
    """forward_loss returns NaN on the given (1-based) calls, with its graph intact."""
    real, calls = engine.step.forward_loss, [0]

    def forward_loss(*args, **kwargs):
        calls[0] += 1
        loss, h, pred = real(*args, **kwargs)
        return (loss * float("nan") if calls[0] in bad_calls else loss), h, pred

    monkeypatch.setattr(engine.step, "forward_loss", forward_loss)


def test_nonfinite_steps_are_skipped_and_counted(tiny_config, tmp_path, monkeypatch):
    poison(monkeypatch, {3, 4})
    summary = train(tiny_config("--meta.max_steps=6", *STEPS, f"--logging.folder={tmp_path}/run"))
    assert summary["steps"] == 6 and summary["skipped_steps"] == 2
    assert sorted(summary["losses"]) == [1, 2, 5, 6]  # the skipped steps log no loss (their windows are empty)
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["skipped_steps"] for r in rows] == ["0", "0", "1", "2", "2", "2"]
    assert [r["loss"] for r in rows][2:4] == ["nan", "nan"]


def test_nonfinite_in_a_row_stop_the_run_with_the_last_finite_loss(tiny_config, tmp_path, monkeypatch):
    poison(monkeypatch, set(range(3, 100)))
    with pytest.raises(NonFiniteLoss, match=r"3 non-finite losses in a row .* at step 5; the last finite loss was "
                                            r"[0-9.]+ at step 2\. The last checkpoint is intact"):
        train(tiny_config("--meta.max_steps=8", "--meta.max_nonfinite_steps=3", "--logging.checkpoint_every=2",
                          *STEPS, f"--logging.folder={tmp_path}/run"))
    assert load_resumable(tmp_path / "run", "jepa", pytest.fail)[1]["step"] == 4  # steps 3-4 skipped, saved intact


def test_a_skipped_step_leaves_the_weights_and_moves_the_ema():
    from engine.backends import TorchBackend
    from engine.step import train_step
    from tests.test_step import _cfg, _models
    from engine.masks import sample_masks
    from engine.packed_masks import StepMasks

    cfg = _cfg()
    models = _models(cfg)
    with torch.no_grad():
        for p in models.target_encoder.parameters():
            p.add_(1.0)  # target != online, so an EMA step shows
    backend = TorchBackend(models.encoder, models.predictor, cfg)
    video = torch.randn(3, 3, cfg.data.num_frames, cfg.data.crop_size, cfg.data.crop_size)
    masks = StepMasks.from_mask_set(sample_masks(cfg.mask, cfg.grid, 3, step=0, seed=1, first_sample_index=0))
    online = [p.clone() for p in models.encoder.parameters()]
    target = [p.clone() for p in models.target_encoder.parameters()]
    out = train_step(models, backend, [(video, masks)], lr=1e-3, wd=0.04, momentum=0.5, clip_grad=None,
                     loss_exp=1.0, dtype="float32", proceed=lambda loss: False)
    assert out.skipped == 1 and not out.updated and out.grad_norms is None and not backend.optimizer.state
    assert all(torch.equal(a, b) for a, b in zip(online, models.encoder.parameters()))
    assert all(p.grad is None for p in models.encoder.parameters())
    moved = [torch.allclose(t, 0.5 * t0 + 0.5 * o) for t, t0, o in
             zip(models.target_encoder.parameters(), target, online)]
    assert all(moved)


def test_save_after_sigterm_only_if_it_fits_the_grace_period():
    guard = StepGuard(distributed=False, max_nonfinite=3, device=torch.device("cpu"))
    assert guard.agree_to_save(30.0, 5.0)  # not signalled
    guard.signals[signal.SIGINT] = time.monotonic() - 60.0
    assert guard.agree_to_save(30.0, 15.0)  # Ctrl-C alone sets no deadline
    guard.signals[signal.SIGTERM] = time.monotonic() - 20.0
    assert guard.agree_to_save(30.0, 5.0) and not guard.agree_to_save(30.0, 15.0)
    guard.check(torch.tensor(1.0), step=0)
    assert guard.stop  # the flag reached the step's check
    assert (guard.stop_reason, guard.exit_code) == ("SIGTERM", PREEMPTED_EXIT_CODE)


def test_the_guards_handlers_live_as_long_as_its_loop():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    guard = StepGuard(distributed=False, max_nonfinite=3, device=torch.device("cpu"), announce=False)
    steps = []
    for step in guard.watch(range(3)):
        assert signal.getsignal(signal.SIGINT) == guard._on_signal
        steps.append(step)
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C only asks
            time.sleep(0.01)  # Python runs the handler at the next bytecode boundary
            break
    assert steps == [0, 1] and {s: signal.getsignal(s) for s in before} == before  # restored after the break
    assert guard.check(torch.tensor(1.0), step=1) and guard.stop
    assert (guard.stop_reason, guard.exit_code) == ("Ctrl-C", INTERRUPTED_EXIT_CODE)
    with pytest.raises(KeyboardInterrupt):
        for _ in guard.watch(range(3)):
            guard._on_signal(signal.SIGINT, None)  # the second Ctrl-C stops at once
    assert {s: signal.getsignal(s) for s in before} == before  # restored after the raise


@pytest.mark.parametrize("signum,code,reason", [(signal.SIGTERM, PREEMPTED_EXIT_CODE, "SIGTERM"),
                                                (signal.SIGINT, INTERRUPTED_EXIT_CODE, "Ctrl-C")], ids=["SIGTERM", "Ctrl-C"])
def test_a_stop_signal_saves_at_the_next_step_and_the_rerun_continues_bit_exactly(tiny_config, synthetic_root,
                                                                                   tmp_path, signum, code, reason):
    straight = train(tiny_config("--meta.max_steps=24", *STEPS, f"--logging.folder={tmp_path}/a"))
    folder = tmp_path / "b"
    args = [sys.executable, str(ROOT / "engine" / "train.py"), "--config", str(ROOT / "configs" / "tiny_synthetic.json"),
            "--data.synthetic_root=null", f"--data.datasets=[\"{synthetic_root}/motion_train.csv\"]",
            "--data.num_workers=1", "--data.batch_size=4", "--meta.max_steps=24", *STEPS,
            "--logging.checkpoint_every=100", f"--logging.folder={folder}"]
    # to the whole process tree (loader worker included), as the launcher sends SIGTERM and a terminal Ctrl-C
    metrics = folder / "metrics.csv"
    run = signal_when(args, lambda: metrics.exists() and len(metrics.read_text().splitlines()) > 4, signum)  # 4 steps
    output = run.stdout
    assert run.returncode == code, output
    assert f"stopping after {reason} at step" in output and "(saved step" in output
    assert ("press Ctrl-C again" in output) == (signum == signal.SIGINT)
    assert "Traceback" not in output  # the loader's worker too left Ctrl-C to the main process
    stopped_at = load_resumable(folder, "jepa", pytest.fail)[1]["step"]
    assert 4 <= stopped_at < 24
    rerun = train(tiny_config("--meta.max_steps=24", *STEPS, f"--logging.folder={folder}"))
    assert rerun["start_step"] == stopped_at
    assert rerun["losses"] == {s: v for s, v in straight["losses"].items() if s > stopped_at}


def test_a_second_ctrl_c_stops_at_once_with_one_line(synthetic_root, tmp_path):
    # steps of 16 clips (a few hundred ms here): the second Ctrl-C comes while the step the first one lets finish runs
    args = [sys.executable, str(ROOT / "engine" / "train.py"), "--config", str(ROOT / "configs" / "tiny_synthetic.json"),
            "--data.synthetic_root=null", f"--data.datasets=[\"{synthetic_root}/motion_train.csv\"]",
            "--data.num_workers=1", "--meta.max_steps=400", *STEPS, f"--logging.folder={tmp_path / 'run'}"]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("step 2/"):
            os.killpg(process.pid, signal.SIGINT)
        elif "press Ctrl-C again" in line:  # the first one was handled: the second stops at once
            os.killpg(process.pid, signal.SIGINT)
            break
    output = "".join(lines) + process.communicate(timeout=120)[0]
    assert process.returncode == INTERRUPTED_EXIT_CODE, output
    assert "interrupted: stopped at once; the last checkpoint stands" in output and "stopping after Ctrl-C at step" not in output
    assert "Traceback" not in output


def _run_to_the_end(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs a training process in its own session; a process still alive after `timeout` (hung) is killed, with its
    loader workers, and fails the test."""
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output = process.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"the run did not exit within {timeout} s:\n{process.communicate()[0][-3000:]}")
    return subprocess.CompletedProcess(args, process.returncode, output)


def test_an_unreadable_dataset_stops_with_one_clear_error(tmp_path):
    index = tmp_path / "index.csv"
    index.write_text(f"{tmp_path / 'not_mounted' / 'a.mp4'} 0\n")
    run = _run_to_the_end([sys.executable, "engine/train.py", "--config", "configs/tiny_synthetic.json",
                           "--data.synthetic_root=null", f"--data.datasets=[\"{index}\"]", "--data.num_workers=1",
                           f"--logging.folder={tmp_path / 'run'}"])
    assert run.returncode == 1, run.stdout
    assert "error: sample 0: " in run.stdout and "a.mp4: missing: no such file (" in run.stdout
    assert "Traceback" not in run.stdout and run.stdout.count("a.mp4") == 1  # one line per failing file


def test_a_crash_with_loader_workers_running_exits(tmp_path, synthetic_root):
    # the workers ignore SIGTERM (a preemption's last step needs them), so an error that left them running would
    # keep the interpreter's exit waiting for them forever
    crash = ("import sys, engine.step, engine.train\n"
             "def forward_loss(*args, **kwargs):\n"
             "    raise RuntimeError('boom in the step')\n"
             "engine.step.forward_loss = forward_loss\n"
             "sys.exit(engine.train.main(sys.argv[1:]))\n")
    run = _run_to_the_end([sys.executable, "-c", crash, "--config", "configs/tiny_synthetic.json",
                           "--data.synthetic_root=null", f"--data.datasets=[\"{synthetic_root}/motion_train.csv\"]",
                           "--data.num_workers=2", "--data.batch_size=4", f"--logging.folder={tmp_path}"])
    assert run.returncode == 1 and "RuntimeError: boom in the step" in run.stdout, run.stdout
