"""benchmarks/memory_fit.py on the CPU: every (batch, checkpointing) case runs the loop's models for real, an
allocation the cap refuses becomes an "oom" row without ending the run, and runs accumulate in one JSON. The peaks
themselves need CUDA (gpu_session.sh's memory_fit step)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import memory_fit
from engine.config import load_config
from engine.dry_run import MASK_STEPS
from engine.packed_masks import MaskMaker

TINY = "configs/tiny_synthetic.json"


def test_cases_run_every_batch_and_checkpointing_setting(tmp_path, capsys):
    out = tmp_path / "fit.json"
    assert memory_fit.main(["--config", TINY, "--batch", "1,2", "--checkpointing", "0,1", "--steps", "2",
                            "--json", str(out)]) == 0
    run, = json.loads(out.read_text())["runs"]
    cases = {(c["batch"], c["checkpointing"]): c for c in run["cases"]}
    assert list(cases) == [(1, 0), (2, 0), (1, 1), (2, 1)]
    for c in cases.values():
        assert c["status"] == "ok" and c["error"] is None and c["ms_per_step"] > 0
        assert c["peak_allocated_gib"] is None  # no CUDA allocator to read
    # each case's config carries its own batch and checkpointing: the dry run's estimate follows both
    assert cases[(2, 0)]["estimate_gib"] > cases[(1, 0)]["estimate_gib"]
    assert cases[(2, 1)]["estimate_gib"] < cases[(2, 0)]["estimate_gib"]
    assert run["device"] == "cpu" and run["cap_gib"] is None and run["steps"] == 2
    printed = capsys.readouterr().out
    assert "no CUDA device" in printed and "estimate" in printed


def test_out_of_memory_is_a_row_and_the_next_case_runs(tmp_path, monkeypatch):
    real = memory_fit._train

    def train(cfg, steps, device):
        if cfg.data.batch_size == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB\nmore detail")
        return real(cfg, steps, device)

    monkeypatch.setattr(memory_fit, "_train", train)
    out = tmp_path / "fit.json"
    memory_fit.main(["--config", TINY, "--batch", "2,1", "--checkpointing", "0", "--steps", "2", "--json", str(out)])
    oom, ok = json.loads(out.read_text())["runs"][0]["cases"]
    assert oom["status"] == "oom" and oom["error"] == "CUDA out of memory. Tried to allocate 3.00 GiB"
    assert oom["ms_per_step"] is None
    assert ok["status"] == "ok" and ok["batch"] == 1 and ok["ms_per_step"] > 0


def test_append_adds_a_run_and_overrides_reach_every_case(tmp_path):
    out = tmp_path / "fit.json"
    memory_fit.main(["--config", TINY, "--checkpointing", "0", "--steps", "2", "--json", str(out)])
    memory_fit.main(["--config", TINY, "--checkpointing", "1", "--steps", "2", "--json", str(out), "--append",
                     "--data.num_frames=8"])
    first, second = json.loads(out.read_text())["runs"]
    assert first["overrides"] == [] and second["overrides"] == ["--data.num_frames=8"]
    assert [c["checkpointing"] for c in second["cases"]] == [1]
    default_batch = load_config(TINY).data.batch_size
    assert first["cases"][0]["batch"] == second["cases"][0]["batch"] == default_batch
    # fewer frames, fewer tokens: the override reached the case's config
    assert second["cases"][0]["estimate_gib"] < first["cases"][0]["estimate_gib"]


def test_largest_mask_step_keeps_the_most_tokens():
    cfg = load_config(TINY)
    make = MaskMaker(cfg.mask, cfg.grid, cfg.meta.seed, cfg.data.mask_type)
    b = cfg.data.batch_size
    context = [sum(make(s, s * b, b).context_packing.seqlens) for s in range(MASK_STEPS)]
    assert len(set(context)) > 1  # the box sizes change with the step: the choice matters
    assert context[memory_fit.largest_mask_step(cfg)] == max(context)


@pytest.mark.parametrize("argv, message", [
    (["--steps", "1"], "--steps must be >= 2"),
    (["--append"], "--append needs --json"),
    (["--cap-gib", "0"], "--cap-gib must be > 0"),
    (["--batch", "8,x"], "comma-separated whole numbers"),
])
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        memory_fit.main(["--config", TINY, *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_wrong_config_key_fails_before_any_case(tmp_path):
    with pytest.raises(Exception, match="no_such_key"):
        memory_fit.main(["--config", TINY, "--data.no_such_key=1", "--json", str(tmp_path / "fit.json")])
    assert not (tmp_path / "fit.json").exists()
