"""`train.py --profile N` (meta.profile_steps): a Chrome trace of N steps after warm-up with every phase of the step."""

import json
from pathlib import Path

import torch

from engine.loop import train
from engine.profiling import PHASES, PREFIX, StepProfiler, phase
from engine.train import main


def test_profile_writes_a_chrome_trace_with_every_phase(tiny_config, capsys):
    cfg = tiny_config("--meta.max_steps=4", "--meta.profile_steps=2", "--logging.log_every=2", "--data.batch_size=2")
    summary = train(cfg)
    trace = Path(summary["folder"]) / "trace.json"
    out = capsys.readouterr().out
    assert f"-> {trace}" in out and f"wrote the Chrome trace of 2 steps to {trace}" in out

    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {PREFIX + p for p in PHASES} <= names, sorted(n for n in names if n and n.startswith(PREFIX))
    # steps 1 (skipped) and 2 (the profiler's warm-up) are not in it: the two recorded are steps 3 and 4
    steps = sorted(n for n in names if n and n.startswith("ProfilerStep#"))
    assert steps == ["ProfilerStep#2", "ProfilerStep#3"]  # the profiler counts from 0
    assert not torch.autograd._profiler_enabled()  # stopped with the loop


def test_profile_flag_sets_the_config_key(capsys):
    assert main(["--config", "configs/tiny_synthetic.json", "--profile", "3", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["meta"]["profile_steps"] == 3


def test_phase_is_a_range_only_while_a_profiler_records():
    with phase("data") as ctx:
        assert ctx is None  # the shared no-op
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with phase("ema"):
            torch.ones(2).add_(1)
    assert any(e.name == PREFIX + "ema" for e in prof.events())


def test_short_runs_give_up_the_warm_up_first(tmp_path):
    def window(steps, available):
        p = StepProfiler(steps, tmp_path, available=available, device=torch.device("cpu"))
        return p.skip, p.warmup, p.active

    assert window(3, 10) == (1, 1, 3)
    assert window(3, 4) == (0, 1, 3)
    assert window(3, 2) == (0, 0, 2)
    assert not StepProfiler(0, tmp_path, available=5, device=torch.device("cpu")).enabled
