"""benchmarks/profile_step.py: the trace summary on hand-made events (busy time, idle gaps, per-phase device time, top
kernels), and the command on the tiny config on the CPU."""

import json
import subprocess
import sys

import pytest
import torch

from benchmarks.profile_step import summarize

from .conftest import ROOT


def kernel(name, ts, dur, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def test_summary_of_a_hand_made_trace():
    events = [
        # step 1: two overlapping kernels (count once), a copy, then a 100 us launch gap
        kernel("gemm", 0.0, 50.0), kernel("softmax", 40.0, 20.0), kernel("copy", 60.0, 10.0, cat="gpu_memcpy"),
        kernel("gemm", 170.0, 30.0),
        # step 2: a 10 us gap (a kernel boundary, not counted as over 20 us)
        kernel("gemm", 210.0, 50.0),
        {"ph": "X", "cat": "gpu_user_annotation", "name": "vjepa/backward", "ts": 0.0, "dur": 65.0},
        {"ph": "X", "cat": "gpu_user_annotation", "name": "vjepa/backward", "ts": 205.0, "dur": 100.0},
        {"ph": "X", "cat": "user_annotation", "name": "vjepa/backward", "ts": 0.0, "dur": 30.0},
        {"ph": "X", "cat": "user_annotation", "name": "vjepa/backward", "ts": 200.0, "dur": 10.0},
        {"ph": "X", "cat": "user_annotation", "name": "vjepa/ema", "ts": 150.0, "dur": 4.0},
        {"ph": "X", "cat": "user_annotation", "name": "other/range", "ts": 0.0, "dur": 999.0},  # not a step phase
        {"ph": "i", "cat": "kernel", "name": "instant", "ts": 5.0},  # not a complete event
    ]
    s = summarize(events, steps=2)
    busy = 70.0 + 30.0 + 50.0  # [0, 70) + [170, 200) + [210, 260)
    assert s["gpu"]["span_ms_per_step"] == pytest.approx(260.0 / 2 / 1e3)
    assert s["gpu"]["busy_ms_per_step"] == pytest.approx(busy / 2 / 1e3)
    assert s["gpu"]["busy_fraction"] == pytest.approx(busy / 260.0)
    assert s["gpu"]["idle_gap_ms_per_step"] == pytest.approx((100.0 + 10.0) / 2 / 1e3)
    assert s["gpu"]["gaps_over_20us_per_step"] == 0.5
    assert set(s["phases"]) == {"backward", "ema"}
    backward = s["phases"]["backward"]
    assert backward["cpu_ms_per_step"] == pytest.approx(40.0 / 2 / 1e3)
    assert backward["gpu_busy_ms_per_step"] == pytest.approx((65.0 + 50.0) / 2 / 1e3)  # [0, 65) and [210, 260)
    assert s["phases"]["ema"]["gpu_busy_ms_per_step"] is None  # no GPU-side range
    assert [k["name"] for k in s["top_kernels"]] == ["gemm", "softmax"]  # the copy is no kernel
    assert s["top_kernels"][0]["calls_per_step"] == 1.5
    assert s["top_kernels"][0]["ms_per_step"] == pytest.approx(130.0 / 2 / 1e3)
    assert s["top_kernels"][0]["share_of_busy"] == pytest.approx(130.0 / busy)


def test_a_cpu_trace_has_host_phases_and_no_device_figures():
    s = summarize([{"ph": "X", "cat": "user_annotation", "name": "vjepa/loss", "ts": 1.0, "dur": 3.0}], steps=1)
    assert s["gpu"] is None and s["top_kernels"] == []
    assert s["phases"] == {"loss": {"cpu_ms_per_step": pytest.approx(3e-3), "gpu_busy_ms_per_step": None}}


def test_the_command_profiles_the_tiny_step_on_the_cpu(tmp_path):
    out = tmp_path / "profile.json"
    run = subprocess.run([sys.executable, "benchmarks/profile_step.py", "--config", "configs/tiny_synthetic.json",
                          "--steps", "2", "--warmup", "1", "--json", str(out), "--trace-dir", str(tmp_path),
                          "--data.batch_size=2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "tiny_synthetic-packed: batch 2," in run.stdout
    result = json.loads(out.read_text())["results"][0]
    assert result["gpu"] is None and result["samples_per_s"] > 0 and result["step_ms"] > 0
    step_phases = {"target_forward", "context_predictor_forward", "loss", "backward", "clip_optimizer", "ema"}
    assert step_phases <= set(result["phases"])
    assert all(p["cpu_ms_per_step"] > 0 for p in result["phases"].values())
    assert (tmp_path / "trace_tiny_synthetic-packed.json").is_file()


def test_a_config_that_raises_is_recorded_and_the_next_still_runs(tmp_path, monkeypatch):
    """Out of memory on the first config: recorded, the JSON already written, the second config profiled; exit 1."""
    from benchmarks import profile_step

    out = tmp_path / "profile.json"
    seen = []

    def fake_profile(cfg, name, **kwargs):
        if not seen:
            seen.append(name)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        seen.append(json.loads(out.read_text()))  # what a kill at this point would leave
        return {"name": name, "step_ms": 1.0}

    monkeypatch.setattr(profile_step, "profile_config", fake_profile)
    monkeypatch.setattr(profile_step, "format_result", lambda r: r["name"])
    tiny = str(ROOT / "configs" / "tiny_synthetic.json")
    assert profile_step.main(["--config", tiny, "--config", tiny, "--json", str(out)]) == 1
    partial = seen[1]
    assert partial["complete"] is False
    assert partial["results"] == [{"name": "tiny_synthetic-packed", "out_of_memory": True,
                                   "error": "OutOfMemoryError: CUDA out of memory. Tried to allocate 9.00 GiB"}]
    final = json.loads(out.read_text())
    assert final["complete"] is True and final["results"][1] == {"name": "tiny_synthetic-packed", "step_ms": 1.0}
