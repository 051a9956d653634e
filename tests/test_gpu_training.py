"""The training loop end to end on a GPU (marked `gpu`: skipped on the CPU, run by gpu_session.sh's gpu_tests step):
the loader's pinned batches finished on the device, bf16 autocast, the Triton kernels compiled (not interpreted), the
fused AdamW, checkpoints and resume, under both backends. The unit tests cover each piece against its reference on the
CPU; these catch what only the assembled GPU run can (device placement, dtypes, launches, the DeepSpeed engine on
NCCL)."""

import csv
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from engine.loop import train

from .conftest import DEADLINE, PYTHONPATH, ROOT
from .test_resume import assert_same_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]
GPU = ("--meta.dtype=bfloat16", "--data.num_workers=1", "--data.pin_mem=true", "--logging.log_every=1",
       "--logging.checkpoint_every=3")


def _rows(folder):
    with open(folder / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_training_runs_the_compiled_kernels_and_resumes(tiny_config, tmp_path, capsys):
    straight = train(tiny_config(*GPU, "--meta.max_steps=6", f"--logging.folder={tmp_path}/a"))
    out = capsys.readouterr().out
    assert "on cuda" in out and "kernels triton" in out and "backend torch" in out
    assert all(math.isfinite(v) for v in straight["losses"].values()) and len(straight["losses"]) == 6
    row = _rows(tmp_path / "a")[-1]
    assert float(row["peak_mem_gb"]) > 0 and float(row["samples_per_s"]) > 0
    train(tiny_config(*GPU, "--meta.max_steps=3", f"--logging.folder={tmp_path}/b"))
    rest = train(tiny_config(*GPU, "--meta.max_steps=6", f"--logging.folder={tmp_path}/b"))
    assert rest["start_step"] == 3
    # the same weights, optimizer state and batches: equal up to summation order (the default attention may run an
    # SDPA or cuDNN backward that adds atomically; the next test pins the Triton one and expects ==)
    for step in (4, 5, 6):
        assert rest["losses"][step] == pytest.approx(straight["losses"][step], rel=1e-2)


def test_resume_is_bit_exact_with_the_triton_attention(tiny_config, tmp_path):
    """With the Triton attention every sum of the step runs in a fixed order: our kernels use no atomics, every gather
    of the packing writes each gradient row once (tests/test_models.py), and cuBLAS repeats its results on one GPU.
    So 3 + 3 steps must equal 6 straight bit for bit, as on the CPU (the default attention may pick an SDPA or cuDNN
    kernel whose backward adds atomically). A failure names the first differing tensors."""
    fixed = (*GPU, "--model.attention=triton")
    straight = train(tiny_config(*fixed, "--meta.max_steps=6", f"--logging.folder={tmp_path}/a"))
    train(tiny_config(*fixed, "--meta.max_steps=3", f"--logging.folder={tmp_path}/b"))
    rest = train(tiny_config(*fixed, "--meta.max_steps=6", f"--logging.folder={tmp_path}/b"))
    assert rest["start_step"] == 3
    assert {s: straight["losses"][s] for s in (4, 5, 6)} == rest["losses"]
    assert_same_checkpoint(tmp_path / "a", tmp_path / "b")


def test_float16_autocast_trains_with_loss_scaling_and_resumes(tiny_config, tmp_path):
    # warmup -1: clipping, hence the gradient norms in metrics.csv, from the first step (the loop clips once
    # step // ipe > warmup, so warmup 0 would start clipping in the second epoch)
    fp16 = (*GPU, "--meta.dtype=float16", "--optimization.warmup=-1")
    straight = train(tiny_config(*fp16, "--meta.max_steps=6", f"--logging.folder={tmp_path}/a"))
    rows = _rows(tmp_path / "a")
    assert all(math.isfinite(v) for v in straight["losses"].values())
    # fp16's smallest gradients survive only if the loss is scaled before backward: the norms must be finite, > 0
    assert all(0 < float(r["enc_grad_norm"]) < math.inf and 0 < float(r["pred_grad_norm"]) < math.inf for r in rows)
    train(tiny_config(*fp16, "--meta.max_steps=3", f"--logging.folder={tmp_path}/b"))
    assert "scaler" in torch.load(sorted((tmp_path / "b").glob("*-step*.pth.tar"))[-1], weights_only=False)
    rest = train(tiny_config(*fp16, "--meta.max_steps=6", f"--logging.folder={tmp_path}/b"))
    assert rest["start_step"] == 3
    for step in (4, 5, 6):
        assert rest["losses"][step] == pytest.approx(straight["losses"][step], rel=1e-2)


@pytest.mark.parametrize("bf16_weights", [False, True], ids=["fp32-weights", "bf16-weights"])
def test_deepspeed_zero2_on_one_gpu(synthetic_root, tmp_path, bf16_weights):
    run = ("import sys\n"
           "sys.argv = ['train.py'] + sys.argv[1:]\n"
           "from engine.train import main\n"
           "sys.exit(main())\n")
    args = ["--config", "configs/tiny_synthetic.json", "--data.synthetic_root=null",
            f"--data.datasets=[\"{synthetic_root}/motion_train.csv\"]", "--data.batch_size=4", *GPU,
            "--meta.backend=deepspeed", "--deepspeed.zero_optimization.stage=2",
            f"--deepspeed.bf16.enabled={str(bf16_weights).lower()}", f"--logging.folder={tmp_path}/ds"]
    for steps in (3, 5):  # the second run resumes: the checkpoint tags are agreed on over NCCL
        left = min(600.0, DEADLINE - time.time())  # within gpu_session's step: a timeout here, not its SIGINT
        if left < 60:
            pytest.skip("time budget of the session spent (VJEPA_BENCH_DEADLINE)")
        done = subprocess.run([sys.executable, "-c", run, *args, f"--meta.max_steps={steps}"], cwd=ROOT,
                              capture_output=True, text=True, timeout=left,
                              env={**os.environ, "PYTHONPATH": PYTHONPATH})
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        assert "on cuda:0" in done.stdout and "backend deepspeed" in done.stdout
        assert ("resuming" in done.stdout) == (steps == 5)
        losses = [float(r["loss"]) for r in _rows(tmp_path / "ds")]
        assert len(losses) == steps and all(math.isfinite(v) for v in losses)
        assert (tmp_path / "ds" / "deepspeed" / "latest").read_text().strip() == f"step{steps}"
