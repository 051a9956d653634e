"""Throughput accounting: tokens per step, MFU against the device's peak, the window's rates; the hint when the loader
sets the pace."""

import itertools
import math

import pytest
import torch

from engine import throughput
from engine.loop import train
from engine.throughput import DataBoundHint, ThroughputWindow, peak_tflops, step_tokens


def test_step_tokens_counts_each_network():
    # 2 clips of 10 tokens; context 3 + 4 tokens, targets 7 + 6: target encoder 20, context 7, predictor 7 + 13.
    assert step_tokens(2, 10, [3, 4], [7, 6]) == 20 + 7 + 20


def test_peak_by_device_name(monkeypatch):
    assert peak_tflops(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_tflops(torch.device("cuda", 0)) == 989.4
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert peak_tflops(torch.device("cuda", 0)) is None


def test_window_rates(monkeypatch):
    window = ThroughputWindow(torch.device("cpu"), world_size=2, batch_size=4)
    window.peak = 100.0  # TFLOP/s, as if on a known GPU
    clock = itertools.chain([10.0, 12.0], itertools.repeat(13.0))  # start, row (2 s later), then later calls
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(clock))
    window._reset()
    window.add(flops=50 * 10**12, tokens=1000, data_wait_s=0.5)
    window.add(flops=50 * 10**12, tokens=1000, data_wait_s=0.1)
    row = window.row()
    assert row["samples_per_s"] == 2 * 4 * 2 / 2.0 and row["tokens_per_s"] == 2000 * 2 / 2.0
    assert row["model_tflops_per_s"] == pytest.approx(100.0)  # 50 TFLOP/s per GPU, 2 GPUs
    assert row["mfu"] == pytest.approx(0.5)
    assert row["data_wait_s"] == pytest.approx(0.3) and row["data_wait_frac"] == pytest.approx(0.3)
    assert row["peak_mem_gb"] > 0 and window.steps == 0  # reset for the next window
    assert math.isnan(ThroughputWindow(torch.device("cpu"), 1, 1).row()["mfu"])


def test_data_bound_hint_once_after_the_first_window():
    hint = DataBoundHint(num_workers=4, decoder="pyav", on_gpu=True)
    assert hint.check(0.9, steps=10) is None  # the first window holds the workers' start-up
    assert hint.check(0.2, steps=10) is None  # at the threshold: not yet
    said = hint.check(0.35, steps=10)
    assert said.startswith("hint: the last 10 steps waited for their batches 35% of the time: the loader sets the pace")
    assert "data.num_workers=4 per rank" in said and "data.decoder=dali" in said
    assert hint.check(0.9, steps=10) is None  # once per run
    on_cpu = DataBoundHint(num_workers=0, decoder="pyav", on_gpu=False)
    on_cpu.check(0.0, steps=5)
    assert "dali" not in on_cpu.check(0.5, steps=5)


def test_a_slow_loader_is_named_in_the_training_log(tiny_config, monkeypatch, capsys):
    import time

    import engine.data.dataset

    decode = engine.data.dataset.decode_frames

    def slow_decode(*args, **kwargs):
        time.sleep(0.05)  # four clips a step: at least 0.2 s of waiting against a few ms of tiny model
        return decode(*args, **kwargs)

    monkeypatch.setattr(engine.data.dataset, "decode_frames", slow_decode)
    train(tiny_config("--meta.max_steps=6", "--logging.log_every=2"))  # num_workers=0: decoding is the wait
    hints = [line for line in capsys.readouterr().out.splitlines() if line.startswith("hint: ")]
    assert len(hints) == 1 and "the loader sets the pace" in hints[0]
