"""Gradient accumulation in the loop (deepspeed.gradient_accumulation_steps, honoured by both backends): A micro-batches
of b train as one batch of A*b (the same samples, masks and update; the EMA, schedules and mask counter step once per
optimizer step), resume stays bit-exact, and a non-finite micro-batch drops out of its step alone."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from engine.checkpoint import latest_path, load_checkpoint
from engine.loop import train

from .conftest import PYTHONPATH, ROOT
from .test_faults import poison
from .test_resume import assert_same_checkpoint
from .test_train import _DEEPSPEED_RUN

# random-tube masks keep the same number of tokens in every clip, so the mean of the micro-batch losses (each a mean
# over its target tokens) is the loss of the whole batch
COMMON = ["--data.mask_type=random_tube", "--logging.log_every=1", "--optimization.ipe=2", "--optimization.warmup=1"]
ACCUMULATE = ['--deepspeed={"gradient_accumulation_steps": 2}', "--data.batch_size=2"]


def _rows(folder):
    with open(f"{folder}/metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _weights(folder):
    state = load_checkpoint(latest_path(folder, "jepa"))
    return {f"{net}.{k}": v for net in ("encoder", "predictor", "target_encoder") for k, v in state[net].items()}


def test_two_micro_batches_of_b_train_as_one_batch_of_2b(tiny_config, tmp_path):
    # 4 steps: the last two after warmup, so the per-network clipping runs on the accumulated gradients
    whole = train(tiny_config("--meta.max_steps=4", *COMMON, "--data.batch_size=4", f"--logging.folder={tmp_path}/a"))
    micro = train(tiny_config("--meta.max_steps=4", *COMMON, *ACCUMULATE, f"--logging.folder={tmp_path}/b"))
    assert sorted(micro["losses"]) == [1, 2, 3, 4]
    for step, loss in whole["losses"].items():
        assert micro["losses"][step] == pytest.approx(loss, rel=1e-5), step
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst
    # one optimizer step per 2 micro-batches: AdamW's step count, and the schedules logged once per step
    states = load_checkpoint(latest_path(tmp_path / "b", "jepa"))["opt"]["state"].values()
    assert {int(state["step"]) for state in states} == {4}
    rows_a, rows_b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert [r["lr"] for r in rows_b] == [r["lr"] for r in rows_a] and [r["momentum"] for r in rows_b] == [
        r["momentum"] for r in rows_a]
    # per-clip token counts are averaged over the step's micro-batches
    assert [r["context_tokens_0"] for r in rows_b] == [r["context_tokens_0"] for r in rows_a]


def test_resume_with_accumulation_is_bit_exact(tiny_config, tmp_path):
    args = [*COMMON, *ACCUMULATE, "--logging.checkpoint_every=2"]
    straight = train(tiny_config("--meta.max_steps=4", *args, f"--logging.folder={tmp_path}/a"))
    half = train(tiny_config("--meta.max_steps=2", *args, f"--logging.folder={tmp_path}/b"))
    rest = train(tiny_config("--meta.max_steps=4", *args, f"--logging.folder={tmp_path}/b"))
    assert rest["start_step"] == 2
    assert half["losses"] | rest["losses"] == straight["losses"]  # == on floats: bit-exact
    assert_same_checkpoint(tmp_path / "a", tmp_path / "b")


def test_a_nonfinite_micro_batch_drops_out_of_its_step(tiny_config, tmp_path, monkeypatch):
    # forward calls 1-2 are step 1; 3 (step 2, first micro-batch) and 7-8 (all of step 4) are poisoned
    poison(monkeypatch, {3, 7, 8})
    summary = train(tiny_config("--meta.max_steps=4", *COMMON, *ACCUMULATE, f"--logging.folder={tmp_path}/run"))
    assert summary["skipped_steps"] == 3
    rows = _rows(tmp_path / "run")
    assert [r["skipped_steps"] for r in rows] == ["0", "1", "1", "3"]
    assert rows[1]["loss"] != "nan" and rows[3]["loss"] == "nan"  # step 2 logs its finite micro-batch


def test_deepspeed_accumulation_matches_the_torch_backend(tiny_config, synthetic_root, tmp_path):
    pytest.importorskip("deepspeed")
    args = ["--config", "configs/tiny_synthetic.json", "--data.synthetic_root=null",
            f"--data.datasets=[\"{synthetic_root}/motion_train.csv\"]", "--data.num_workers=0", "--meta.max_steps=4",
            *COMMON, "--meta.backend=deepspeed", "--data.batch_size=2",
            '--deepspeed=' + json.dumps({"gradient_accumulation_steps": 2, "zero_optimization": {"stage": 2}}),
            f"--logging.folder={tmp_path}/ds"]
    ds = subprocess.run([sys.executable, "-c", _DEEPSPEED_RUN, *args], cwd=ROOT, capture_output=True, text=True,
                        env={**os.environ, "PYTHONPATH": PYTHONPATH})
    assert ds.returncode == 0, ds.stderr[-3000:]
    assert "batch 2/rank x 2 micro-batches" in ds.stdout
    ref = train(tiny_config("--meta.max_steps=4", *COMMON, "--data.batch_size=4", f"--logging.folder={tmp_path}/t"))
    losses = [float(r["loss"]) for r in _rows(tmp_path / "ds")]
    assert losses == pytest.approx([ref["losses"][s] for s in range(1, 5)], rel=1e-5)
    assert torch.load(tmp_path / "ds" / "deepspeed" / "step4" / "mp_rank_00_model_states.pt",
                      weights_only=False)["global_steps"] == 4
