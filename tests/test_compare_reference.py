"""benchmarks/compare_reference.py: argument errors, our side on its own, and (with a checkout of
facebookresearch/jepa) the whole comparison on the tiny config, including a cross-check that both sides compute the
same first-step loss from the same weights, clip and masks.

The reference checkout is found at $VJEPA_REFERENCE, else /tmp/jepa_ref (tests/fixtures/reference/README.md says
how to get one); without it only the reference-side test is skipped, with that reason.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import compare_reference as cr
from benchmarks.failed_run import Failed, attempt
from benchmarks.reference_step import ReferenceError, check_reference_path
from engine.config import load_config
from engine.packed_masks import MaskMaker

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_synthetic.json"


def _reference_checkout() -> Path | None:
    for candidate in (os.environ.get("VJEPA_REFERENCE"), "/tmp/jepa_ref"):
        if candidate:
            try:
                return check_reference_path(candidate)
            except ReferenceError:
                continue
    return None


REFERENCE = _reference_checkout()


def _error(capsys, argv: list[str]) -> str:
    assert cr.main(argv) == 2
    return capsys.readouterr().err


def test_missing_reference_path_names_the_problem_and_the_fix(capsys, tmp_path):
    err = _error(capsys, ["--reference", str(tmp_path / "nope"), "--config", str(TINY)])
    assert "no such directory" in err and "git clone https://github.com/facebookresearch/jepa" in err


def test_reference_path_that_is_not_a_jepa_checkout(capsys, tmp_path):
    (tmp_path / "src").mkdir()
    err = _error(capsys, ["--reference", str(tmp_path), "--config", str(TINY)])
    assert "not a facebookresearch/jepa" in err and "app/vjepa/utils.py" in err and "--reference" in err
    file = tmp_path / "file"
    file.write_text("")
    assert "not a directory" in _error(capsys, ["--reference", str(file), "--config", str(TINY)])


def test_config_and_step_errors(capsys, tmp_path):
    """Checked before the reference path (here not a checkout)."""
    ref = str(tmp_path)
    assert "config file not found" in _error(capsys, ["--reference", ref, "--config", str(tmp_path / "x.json")])
    assert "unknown key" in _error(capsys, ["--reference", ref, "--config", str(TINY), "--data.batchsize=2"])
    assert "--steps must be >= 1" in _error(capsys, ["--reference", ref, "--config", str(TINY), "--steps", "0"])
    assert "--warmup must be >= 1" in _error(capsys, ["--reference", ref, "--config", str(TINY), "--warmup", "0"])


def test_required_arguments():
    with pytest.raises(SystemExit) as e:
        cr.parse_args(["--config", str(TINY)])
    assert e.value.code == 2


def test_our_side_runs_truncated_packed_and_eval():
    # on the process's own torch threads: a set_num_threads round trip here changes how later in-process training
    # rounds against a fresh process's, which breaks tests/test_resume.py's bit-exact kill-and-rerun
    """Without the reference: our training step in both modes and the eval forward, timed and accounted."""
    cfg = load_config(TINY, ["--data.batch_size=4"])
    setup = cr.Setup(cfg, torch.device("cpu"), steps=1, warmup=1, clip_grad=cfg.optimization.clip_grad, seed=0,
                     peak_tflops=None)
    b, n, d = 4, cfg.num_tokens, cfg.data
    clips = torch.randn(b, 3, d.num_frames, d.crop_size, d.crop_size, generator=torch.Generator().manual_seed(0))
    memory = cr.PeakMemory(setup.device)
    runs = {}
    for truncate in (True, False):
        mode = dataclasses.replace(cfg, mask=[dataclasses.replace(g, truncate_to_batch_min=truncate)
                                              for g in cfg.mask])
        make = MaskMaker(mode.mask, cfg.grid, 0, cfg.data.mask_type)
        masks = [make(step, step * b, b) for step in range(setup.total_steps)]
        if truncate:  # equal lengths within a generator: what the reference's batch-min truncation gives
            for g in range(len(cfg.mask)):
                assert len(set(masks[1].context_packing.seqlens[g * b:(g + 1) * b])) == 1
        runs[truncate] = cr.run_ours_train(dataclasses.replace(setup, cfg=mode), "ours", clips, masks, None, memory)
    for run in runs.values():
        assert run.samples_per_s > 0 and run.tokens_per_s > 0 and run.flops > 0 and math.isfinite(run.first_loss)
        assert run.mfu is None  # no peak on a CPU
    # packed keeps every context token, so it runs more tokens than the truncated sets of the same clips
    assert runs[False].tokens > runs[True].tokens
    eval_run, features = cr.run_ours_eval(setup, clips, None, memory)
    assert eval_run.samples_per_s > 0 and features.shape == (b, n, cfg.model.embed_dim)


@pytest.mark.skipif(REFERENCE is None, reason="no facebookresearch/jepa checkout: set VJEPA_REFERENCE=PATH or clone it "
                    "to /tmp/jepa_ref (tests/fixtures/reference/README.md)")
def test_compare_against_reference_on_tiny_config(tmp_path):
    out = tmp_path / "compare.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compare_reference.py"), "--reference", str(REFERENCE),
         "--config", str(TINY), "--steps", "1", "--warmup", "1", "--device", "cpu", "--threads", "1",
         "--json", str(out), "--data.batch_size=8"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    for row in ("reference ", "reference + loggers", "ours truncated", "ours packed"):
        assert row in text
    assert text.count("samples/s") >= 2
    for line in ("ratio samples/s ours/ref (truncated):", "ratio peak memory ours/ref (truncated):",
                 "ratio samples/s ours/ref (packed):", "ratio tokens/s ours/ref (packed):",
                 "ratio samples/s ours/ref (eval forward):", "ratio peak memory ours/ref (eval forward):"):
        assert line in text

    result = json.loads(out.read_text())
    for name in ("reference", "reference_loggers", "ours_truncated", "ours_packed"):
        run = result["train"][name]
        for key in ("samples_per_s", "step_ms", "tokens_per_s", "model_tflops_per_s", "flops", "tokens"):
            assert run[key] > 0, (name, key)
    for name in ("reference", "ours"):
        assert result["eval"][name]["samples_per_s"] > 0
    for key in ("samples_per_s_truncated", "samples_per_s_packed", "tokens_per_s_packed", "samples_per_s_eval"):
        assert result["ratios"][key] > 0
    assert result["versions"]["torch"] and result["versions"]["reference_commit"] is not None
    train = result["train"]
    # the same tokens in truncated mode; more in packed mode
    assert train["ours_truncated"]["context_tokens_per_clip"] == train["reference"]["context_tokens_per_clip"]
    assert train["ours_truncated"]["flops"] == train["reference"]["flops"]
    assert train["ours_packed"]["tokens"] > train["reference"]["tokens"]

    # cross-check: same initial weights, clip and masks, fp32 on the CPU -> the same first-step loss on both sides
    check = result["loss_check"]
    assert check["abs_diff"] == abs(check["ours_truncated"] - check["reference"])
    assert check["abs_diff"] < 1e-5, check
    assert check["reference_loggers"] == check["reference"]
    assert result["eval"]["max_abs_diff"] < 1e-4


def _run(name: str, samples_per_s: float, peak_gb: float, loss: float) -> cr.Run:
    """A measured run with `samples_per_s` at batch 4 over 2 steps."""
    return cr.Run(name, batch_size=4, steps=2, seconds=8 / samples_per_s, tokens=1000, flops=10**12,
                  peak_mem_gb=peak_gb, peak_tflops=None, first_loss=loss, context_tokens_per_clip=[10.0],
                  target_tokens_per_clip=[5.0])


def test_a_run_that_raises_is_recorded_and_the_next_one_goes_on(capsys):
    cpu = torch.device("cpu")

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nsecond line")

    def broken():
        raise ValueError("bad shape")

    failed = attempt("reference", oom, cpu)
    assert failed == Failed("reference", "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB", True)
    err = capsys.readouterr().err
    assert "reference: out of memory" in err and "Traceback" not in err  # an OOM is a result, not a bug
    failed = attempt("ours packed", broken, cpu)
    assert failed == Failed("ours packed", "ValueError: bad shape", False)
    assert "Traceback" in capsys.readouterr().err  # an error shows where it came from
    run = _run("ours", 2.0, 1.0, 0.5)
    assert attempt("ours", lambda: run, cpu) is run


def test_results_are_written_after_every_run_and_missing_sides_give_no_ratio(tmp_path):
    out = tmp_path / "sub" / "compare.json"
    comparison = cr.Comparison({"batch_size": 4, "eval_batch_size": 4, "config": "c.json"}, out)
    comparison.add("train", "reference", _run("reference", 2.0, 4.0, 0.75))
    partial = json.loads(out.read_text())
    assert partial["complete"] is False and partial["config"] == "c.json"
    assert partial["train"]["reference"]["samples_per_s"] == pytest.approx(2.0)
    assert partial["ratios"]["samples_per_s_truncated"] is None  # ours has not run yet

    comparison.add("train", "ours_truncated", Failed("ours truncated (same tokens)", "OutOfMemoryError: x", True))
    comparison.add("train", "ours_packed", _run("ours packed (default)", 5.0, 2.0, 0.7))
    comparison.add("eval", "reference", Failed("reference", "RuntimeError: boom", False))
    comparison.add("eval", "ours", _run("ours", 3.0, 1.0, 0.0))
    comparison.write(complete=True)
    result = json.loads(out.read_text())
    assert result["complete"] is True
    assert result["failed"] == ["ours truncated (same tokens)", "reference"]
    assert result["train"]["ours_truncated"] == {"name": "ours truncated (same tokens)",
                                                 "error": "OutOfMemoryError: x", "out_of_memory": True}
    ratios = result["ratios"]
    assert ratios["samples_per_s_packed"] == pytest.approx(2.5) and ratios["peak_memory_packed"] == pytest.approx(0.5)
    assert ratios["samples_per_s_truncated"] is None and ratios["samples_per_s_eval"] is None
    assert result["loss_check"] == {"ours_truncated": None, "reference": 0.75, "reference_loggers": None,
                                    "abs_diff": None}
    assert not list(out.parent.glob("*.tmp"))  # written atomically

    text = "\n".join(comparison.report(n=32, cpu=True, peak_tflops=None))
    assert "ratio samples/s ours/ref (packed): 2.50" in text
    assert "ratio samples/s ours/ref (truncated): n/a" in text
    assert "ours truncated (same tokens)   out of memory" in text
    assert "not measured: reference: RuntimeError: boom" in text
    assert "|diff| n/a" in text


def test_reference_commit_from_its_commit_file_where_git_cannot_tell(tmp_path):
    """A worktree carried to the GPU machine: its .git file names a repository that stayed behind."""
    from benchmarks.reference_step import _git_commit

    (tmp_path / ".git").write_text("gitdir: /nowhere/worktrees/jepa\n")
    assert _git_commit(tmp_path) is None
    (tmp_path / "COMMIT").write_text("51c59d518fc63c08464af6de585f78ba0c2ed1e8\n")
    assert _git_commit(tmp_path) == "51c59d518fc63c08464af6de585f78ba0c2ed1e8"
