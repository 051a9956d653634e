"""The training loop end to end on the synthetic set: learning without collapse, metrics, resume, DeepSpeed."""

import csv
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from engine.config import ConfigError
from engine.export import export
from engine.loop import train

from .conftest import PYTHONPATH, ROOT
from .deepspeed_cpu import RANK_PRELUDE


def _rows(folder):
    with open(f"{folder}/metrics.csv") as f:
        return list(csv.DictReader(f))


def test_loss_falls_without_collapse(tiny_config):
    cfg = tiny_config("--meta.max_steps=30", "--logging.log_every=5", "--optimization.ipe=10",
                      "--optimization.warmup=0")
    summary = train(cfg)
    rows = _rows(summary["folder"])
    assert summary["steps"] == 30 and len(rows) == 7  # step 1, then every 5
    losses = [float(r["loss"]) for r in rows]
    assert losses[-1] < 0.9 * losses[0], losses
    # collapse would drive the target features' spread and effective rank towards 0 / 1 (the predictor's own spread
    # first shrinks: early on it learns the mean target, which is not collapse of the representation)
    for r in rows:
        assert float(r["target_std_tokens"]) > 0.2 and float(r["target_rank"]) > 10 and float(r["pred_std"]) > 0
    assert float(rows[-1]["target_rank"]) > 0.8 * float(rows[0]["target_rank"])
    assert {"step", "loss", "lr", "wd", "momentum", "context_tokens_0", "context_tokens_1", "samples_per_s",
            "tokens_per_s", "model_tflops_per_s", "mfu", "peak_mem_gb", "data_wait_s", "data_wait_frac",
            "target_std_clips"} <= set(rows[0])
    last = rows[-1]
    assert float(last["tokens_per_s"]) > 256 * float(last["samples_per_s"])  # target encoder alone runs 256 a clip
    assert last["mfu"] == "nan" and float(last["peak_mem_gb"]) > 0.1 and 0 <= float(last["data_wait_frac"]) < 1
    assert 0 < float(rows[-1]["context_tokens_1"]) < float(rows[-1]["context_tokens_0"]) < cfg.num_tokens
    resolved = json.loads((ROOT / summary["folder"] / "config.json").read_text())
    assert resolved["meta"]["max_steps"] == 30


def test_resume_continues_at_the_right_step(tiny_config, tmp_path):
    straight = train(tiny_config("--meta.max_steps=6", "--logging.log_every=1", f"--logging.folder={tmp_path}/a"))
    first = train(tiny_config("--meta.max_steps=4", "--logging.log_every=1", "--logging.checkpoint_every=2",
                              f"--logging.folder={tmp_path}/b"))
    again = train(tiny_config("--meta.max_steps=6", "--logging.log_every=1", f"--logging.folder={tmp_path}/b"))
    assert (first["steps"], again["start_step"], again["steps"]) == (4, 4, 2)
    a, b = _rows(straight["folder"]), _rows(again["folder"])
    assert [r["step"] for r in b] == [str(i) for i in range(1, 7)]
    for ra, rb in zip(a, b):  # same data, masks and optimizer state: the same losses
        assert float(ra["loss"]) == pytest.approx(float(rb["loss"]), rel=1e-5, abs=1e-6)
    done = train(tiny_config("--meta.max_steps=6", f"--logging.folder={tmp_path}/b"))
    assert done["steps"] == 0 and done["start_step"] == 6


def test_missing_index_file_is_a_clear_error(tiny_config, tmp_path):
    from engine.config import ConfigError

    with pytest.raises(ConfigError, match="data.datasets: index file not found: .*nope.csv"):
        train(tiny_config(f"--data.datasets=[\"{tmp_path}/nope.csv\"]"))


_DEEPSPEED_RUN = RANK_PRELUDE + """
import sys
sys.argv = ["train.py"] + sys.argv[1:]
from engine.train import main
sys.exit(main())
"""


def test_deepspeed_backend_matches_torch_first_step(tiny_config, synthetic_root, tmp_path):
    pytest.importorskip("deepspeed")
    args = ["--config", "configs/tiny_synthetic.json", "--data.synthetic_root=null",
            f"--data.datasets=[\"{synthetic_root}/motion_train.csv\"]", "--data.num_workers=0", "--data.batch_size=4",
            "--meta.max_steps=3", "--logging.log_every=1"]
    env = {**os.environ, "PYTHONPATH": PYTHONPATH}
    ds = subprocess.run([sys.executable, "-c", _DEEPSPEED_RUN, *args, "--meta.backend=deepspeed",
                         f"--logging.folder={tmp_path}/ds"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert ds.returncode == 0, ds.stderr[-3000:]
    ref = train(tiny_config("--meta.max_steps=3", "--logging.log_every=1", f"--logging.folder={tmp_path}/torch"))
    ds_rows, ref_rows = _rows(f"{tmp_path}/ds"), _rows(ref["folder"])
    assert len(ds_rows) == 3
    assert float(ds_rows[0]["loss"]) == pytest.approx(float(ref_rows[0]["loss"]), rel=1e-5)
    assert float(ds_rows[2]["loss"]) == pytest.approx(float(ref_rows[2]["loss"]), rel=1e-3)
    assert os.path.isfile(f"{tmp_path}/ds/deepspeed/latest")


def test_a_deepspeed_save_that_fails_stops_with_one_line_and_the_rerun_resumes(synthetic_root, tmp_path):
    pytest.importorskip("deepspeed")
    # the disk fills up while the second checkpoint (step 4) is written
    full_disk = ("import errno, torch\n"
                 "real_save = torch.save\n"
                 "def save(obj, f, *args, **kwargs):\n"
                 "    if 'step4' in str(f):\n"
                 "        real_save({'part': torch.zeros(10)}, f)\n"
                 "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
                 "    return real_save(obj, f, *args, **kwargs)\n"
                 "torch.save = save\n")
    args = [*_ds_args(synthetic_root, "--logging.checkpoint_every=2", f"--logging.folder={tmp_path}/run"),
            "--meta.max_steps=6"]
    env = {**os.environ, "PYTHONPATH": PYTHONPATH}
    failed = subprocess.run([sys.executable, "-c", full_disk + _DEEPSPEED_RUN, *args], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert re.search(r"error: rank 0: writing the DeepSpeed checkpoint .*step4 failed \(No space left on device\); "
                     r"the last checkpoint, tag 'step2', is intact\. Free space in", failed.stderr), failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr
    rerun = subprocess.run([sys.executable, "-c", _DEEPSPEED_RUN, *args], cwd=ROOT, env=env, capture_output=True,
                           text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming" in rerun.stdout and "at step 2" in rerun.stdout
    assert (tmp_path / "run" / "deepspeed" / "latest").read_text().strip() == "step6"


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_of_b_give_the_losses_of_one_rank_of_2b(tiny_config, synthetic_root, tmp_path):
    """Equal token counts everywhere (random-tube masks keep the same number of tokens in every clip), so the mean
    over ranks of their batch losses is the loss of the whole batch, and DeepSpeed's gradient average its gradient."""
    pytest.importorskip("deepspeed")
    common = ["--data.synthetic_root=null", f"--data.datasets=[\"{synthetic_root}/motion_train.csv\"]",
              "--data.num_workers=0", "--meta.max_steps=3", "--logging.log_every=1", "--data.mask_type=random_tube"]
    args = ["--config", "configs/tiny_synthetic.json", *common, "--data.batch_size=2", "--meta.backend=deepspeed",
            f"--logging.folder={tmp_path}/ds"]
    ranks = _start_ranks(2, args)
    outputs = [p.communicate(timeout=300)[0] for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "step 1/3" in outputs[0] and "step 1/3" not in outputs[1]  # rank 0 alone logs
    one = train(tiny_config(*common, "--data.batch_size=4", f"--logging.folder={tmp_path}/one"))
    two = [float(r["loss"]) for r in _rows(f"{tmp_path}/ds")]
    assert two == pytest.approx([one["losses"][s] for s in (1, 2, 3)], rel=2e-5)


def _start_ranks(world, args, launcher="deepspeed"):
    """`world` rank processes of the training command, as the deepspeed launcher starts them (gloo on the CPU), or
    as torchrun does (the same variables, no --local_rank argument)."""
    port = str(_free_port())
    argument = ["--local_rank={r}"] if launcher == "deepspeed" else []
    return [subprocess.Popen([sys.executable, "-c", _DEEPSPEED_RUN, *args, *(a.format(r=r) for a in argument)],
                             cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": PYTHONPATH, "RANK": str(r), "LOCAL_RANK": str(r),
                                  "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]


def test_torchrun_ranks_train_together_under_deepspeed(synthetic_root, tmp_path):
    """torchrun passes no --local_rank: its LOCAL_RANK / WORLD_SIZE still make the processes ranks of one run (with
    meta.backend auto, as under the deepspeed launcher), not independent runs writing one folder."""
    pytest.importorskip("deepspeed")
    args = [a for a in _ds_args(synthetic_root, "--meta.max_steps=2", f"--logging.folder={tmp_path}/run")
            if a != "--meta.backend=deepspeed"]
    ranks = _start_ranks(2, args, launcher="torchrun")
    outputs = [p.communicate(timeout=300)[0] for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "world size 2" in outputs[0] and "backend deepspeed" in outputs[0] and "step 1/2" not in outputs[1]
    assert (tmp_path / "run" / "deepspeed" / "latest").read_text().strip() == "step2"


def test_the_torch_backend_refuses_a_launch_of_several_processes(tiny_config, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"meta.backend=torch trains in one process, but a launcher started 2"):
        train(tiny_config("--meta.backend=torch"))


def _launch(world, args, tmp_path):
    ranks = _start_ranks(world, args)
    outputs = [p.communicate(timeout=300)[0] for p in ranks]
    assert [p.returncode for p in ranks] == [0] * world, "\n".join(o[-3000:] for o in outputs)
    return outputs[0]


def _ds_args(synthetic_root, *extra):
    """The tiny config on the synthetic set under DeepSpeed: 2 clips per rank, a metrics row every step."""
    return ["--config", "configs/tiny_synthetic.json", "--data.synthetic_root=null",
            f"--data.datasets=[\"{synthetic_root}/motion_train.csv\"]", "--data.num_workers=0", "--data.batch_size=2",
            "--logging.log_every=1", "--meta.backend=deepspeed", *extra]


def test_zero2_checkpoint_resumes_on_another_world_size(synthetic_root, tmp_path):
    """2 ranks write ZeRO-2 partitions; 1 rank resumes through DeepSpeed's universal format, optimizer state included."""
    pytest.importorskip("deepspeed")
    args = _ds_args(synthetic_root, '--deepspeed={"zero_optimization": {"stage": 2}}', "--logging.keep_last=1",
                    f"--logging.folder={tmp_path}/run")
    _launch(2, [*args, "--meta.max_steps=2"], tmp_path)
    output = _launch(1, [*args, "--meta.max_steps=3"], tmp_path)
    assert "written by 2 ranks, this run has 1: converting" in output and "resuming" in output
    folder = tmp_path / "run" / "deepspeed"
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["step3"]  # keep_last=1 took step2 and its copy
    state = torch.load(folder / "step3" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
    assert float(state["optimizer_state_dict"]["base_optimizer_state"]["state"][0]["step"]) == 3  # 2 loaded + 1


def test_zero3_resume_is_bit_exact_and_needs_the_same_world_size(synthetic_root, tmp_path):
    """ZeRO-3 partitions the EMA target with the encoder: each rank saves and reloads its own partitions, so 2 + 2
    steps equal 4 straight; another number of ranks is refused with the way out."""
    pytest.importorskip("deepspeed")
    args = _ds_args(synthetic_root, "--logging.checkpoint_every=2",
                    # 0: every parameter partitioned (none kept whole), so the checkpoint holds real partitions
                    '--deepspeed={"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}')
    _launch(2, [*args, "--meta.max_steps=4", f"--logging.folder={tmp_path}/a"], tmp_path)
    _launch(2, [*args, "--meta.max_steps=2", f"--logging.folder={tmp_path}/b"], tmp_path)
    output = _launch(2, [*args, "--meta.max_steps=4", f"--logging.folder={tmp_path}/b"], tmp_path)
    assert "resuming" in output
    assert [r["loss"] for r in _rows(tmp_path / "b")] == [r["loss"] for r in _rows(tmp_path / "a")]  # as printed
    shards = [torch.load(tmp_path / run / "deepspeed" / "step4" / "zero_pp_rank_1_mp_rank_00_model_states.pt",
                         weights_only=False)["target_encoder_shards"] for run in ("a", "b")]
    assert all(torch.equal(x, y) for x, y in zip(*shards)) and sum(x.numel() for x in shards[0]) > 0
    # exported (consolidated from the partitions), the run equals the same run under ZeRO-2
    stage2 = [a.replace('"stage": 3, "stage3_param_persistence_threshold": 0', '"stage": 2') for a in args]
    _launch(2, [*stage2, "--meta.max_steps=4", f"--logging.folder={tmp_path}/c"], tmp_path)
    zero3, zero2 = (torch.load(export(tmp_path / run, tmp_path / f"{run}.pth.tar")) for run in ("a", "c"))
    for entry in ("encoder", "predictor", "target_encoder"):
        assert zero3[entry].keys() == zero2[entry].keys()
        worst = max((zero3[entry][k] - zero2[entry][k]).abs().max().item() for k in zero2[entry])
        assert worst < 1e-5, (entry, worst)
    one_rank = subprocess.run([sys.executable, "-c", _DEEPSPEED_RUN, *args, "--meta.max_steps=6",
                               f"--logging.folder={tmp_path}/b"], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": PYTHONPATH})
    assert one_rank.returncode != 0
    assert "written by 2 ranks under ZeRO-3, which resumes only on the same number of ranks" in one_rank.stderr


def test_zero2_resume_passes_over_a_tag_with_a_damaged_partition(synthetic_root, tmp_path):
    """`latest` is published only after every rank's files (ds_checkpoint.commit); a partition damaged later, here
    rank 1's optimizer state cut short, is found by its own rank, and both ranks resume from the tag before it."""
    pytest.importorskip("deepspeed")
    args = _ds_args(synthetic_root, "--logging.checkpoint_every=2", '--deepspeed={"zero_optimization": {"stage": 2}}',
                    f"--logging.folder={tmp_path}/run")
    _launch(2, [*args, "--meta.max_steps=4"], tmp_path)
    folder = tmp_path / "run" / "deepspeed"
    assert (folder / "latest").read_text() == "step4" and not list(folder.glob("*.tmp"))
    straight = [r["loss"] for r in _rows(tmp_path / "run")]
    partition = folder / "step4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    partition.write_bytes(partition.read_bytes()[:4096])
    output = _launch(2, [*args, "--meta.max_steps=4"], tmp_path)
    assert f"warning: DeepSpeed checkpoint {folder / 'step4'} is damaged" in output
    assert "resuming" in output and "at step 2" in output
    assert [r["loss"] for r in _rows(tmp_path / "run")] == straight  # steps 3-4 again, as printed
    assert (folder / "latest").read_text() == "step4" and torch.load(partition, weights_only=False)  # rewritten whole


def test_sigterm_to_one_of_two_ranks_stops_both_at_one_step_and_the_rerun_continues(synthetic_root, tmp_path):
    """Preemption under DeepSpeed: the signalled rank's flag reaches the other through the step's all-reduce, both
    stop after the same step, save collectively and exit 143; the rerun continues with the straight run's losses."""
    pytest.importorskip("deepspeed")
    import signal
    import time

    args = _ds_args(synthetic_root, "--logging.checkpoint_every=100", "--meta.max_steps=16",
                    '--deepspeed={"zero_optimization": {"stage": 2}}')
    _launch(2, [*args, f"--logging.folder={tmp_path}/a"], tmp_path)
    folder = tmp_path / "b"
    ranks = _start_ranks(2, [*args, f"--logging.folder={folder}"])
    deadline = time.monotonic() + 120
    while not ((folder / "metrics.csv").exists() and len(_rows(folder)) >= 3):
        assert all(p.poll() is None for p in ranks) and time.monotonic() < deadline, "no 3 steps logged in time"
        time.sleep(0.02)
    ranks[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=120)[0] for p in ranks]
    assert [p.returncode for p in ranks] == [143, 143], "\n".join(o[-3000:] for o in outputs)
    assert "stopping after a signal to another rank at step" in outputs[0] and "(saved step" in outputs[0]
    stopped_at = int((folder / "deepspeed" / "latest").read_text().removeprefix("step"))
    assert 3 <= stopped_at < 16
    output = _launch(2, [*args, f"--logging.folder={folder}"], tmp_path)
    assert f"resuming {folder} at step {stopped_at}" in output
    assert [r["loss"] for r in _rows(folder)] == [r["loss"] for r in _rows(tmp_path / "a")]  # as printed
