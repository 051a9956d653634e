"""Evaluation on several ranks: the work split (every training entry in its global batch, every validation entry
once), and 2 gloo ranks of batch b training the probe that one rank of batch 2b trains, with and without the cache,
also when they continue a probe that one rank began."""

import json
import os
import socket
import subprocess
import sys

import pytest

from engine.evaluation.distributed import Ranks

from .conftest import PYTHONPATH, ROOT


@pytest.mark.parametrize("n,world,b", [(10, 2, 3), (12, 2, 3), (7, 3, 2), (5, 1, 2)])
def test_training_slices_form_the_global_batches_of_one_rank(n, world, b):
    order = list(range(100, 100 + n))
    per_rank = [Ranks(r, world).train_slices(order, b) for r in range(world)]
    steps = len(per_rank[0])
    assert all(len(s) == steps for s in per_rank)  # every rank takes the same number of steps
    padded = order + order[:(-n) % world]
    one = Ranks(0, 1).train_slices(padded, b * world)  # one rank of W*b reads the padded order
    for i in range(steps):
        assert len({len(s[i]) for s in per_rank}) == 1  # equal slices: the mean of means is the global mean
        assert sum((s[i] for s in per_rank), []) == one[i]
    assert set(sum(one, [])) == set(order)


@pytest.mark.parametrize("n,world", [(10, 3), (2, 4), (9, 1)])
def test_validation_shares_read_every_entry_once(n, world):
    shares = [Ranks(r, world).val_share(list(range(n))) for r in range(world)]
    assert sorted(sum(shares, [])) == list(range(n))


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _overrides(world, folder, synthetic_root, *extra):
    return ["--data.synthetic_root=null", f"--data.train=[\"{synthetic_root}/motion_train.csv\"]",
            f"--data.val=[\"{synthetic_root}/motion_val.csv\"]", "--data.num_workers=0", "--optimization.epochs=2",
            f"--data.batch_size={8 // world}", f"--logging.folder={folder}", *extra]


def _eval(world, folder, tiny_run, synthetic_root, *extra):
    args = [sys.executable, "engine/eval.py", "--config", "configs/eval/synthetic_motion.json", "--checkpoint",
            str(tiny_run), *_overrides(world, folder, synthetic_root, *extra)]
    port = _port()
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([*args, f"--local_rank={r}"], cwd=ROOT, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    outputs = [p.communicate(timeout=300)[0] for p in ranks]
    assert [p.returncode for p in ranks] == [0] * world, "\n".join(o[-3000:] for o in outputs)
    return json.loads((folder / "results.json").read_text()), outputs


@pytest.mark.parametrize("cache", ["true", "false"])
def test_two_ranks_of_b_train_the_probe_of_one_rank_of_2b(tiny_run, synthetic_root, tmp_path, cache):
    one, _ = _eval(1, tmp_path / "one", tiny_run, synthetic_root, f"--meta.cache_features={cache}")
    two, outputs = _eval(2, tmp_path / "two", tiny_run, synthetic_root, f"--meta.cache_features={cache}")
    assert two["world_size"] == 2 and one["world_size"] == 1
    for a, b in zip(one["history"][0], two["history"][0], strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["train_top1"] == a["train_top1"] and b["val_top1"] == a["val_top1"]
    assert "epoch 1/2" in outputs[0] and outputs[1].strip() == ""  # rank 0 alone prints


@pytest.mark.parametrize("clean", [True, False])
def test_entry_points_leave_the_process_group(tmp_path, clean):
    # a rank exiting with a live gloo group aborted now and then (exit -6) after its work: the entry points leave it
    import torch.distributed as dist

    from engine.process_group import leave_process_group

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    leave_process_group(clean=clean)
    assert not dist.is_initialized()
    leave_process_group(clean=clean)  # no group: nothing to do


def test_two_ranks_continue_the_probe_one_rank_began(tiny_run, synthetic_root, tmp_path, monkeypatch):
    # the same global batch (1 x 8, 2 x 4) is the same evaluation, so a probe stopped on one rank continues on two;
    # the epoch's partial sums, kept summed over ranks, go on from rank 0
    from engine.evaluation import runner
    from engine.evaluation.config import load_eval_config
    from engine.evaluation.probe import save_probe

    def run_one(folder, *extra):
        cfg = load_eval_config(ROOT / "configs" / "eval" / "synthetic_motion.json",
                               _overrides(1, folder, synthetic_root, "--meta.cache_features=false", *extra))
        return runner.run_eval(cfg, str(tiny_run), say=lambda *a: None)

    straight = run_one(tmp_path / "one")
    saves = []

    def save_then_crash(*args, **kwargs):
        saves.append(save_probe(*args, **kwargs))
        if len(saves) == 2:  # epoch 1, 2 of its 3 global batches done
            raise SystemError("node lost")

    monkeypatch.setattr(runner, "save_probe", save_then_crash)
    with pytest.raises(SystemError):
        run_one(tmp_path / "two", "--logging.checkpoint_every_s=1e-9")
    monkeypatch.undo()
    two, outputs = _eval(2, tmp_path / "two", tiny_run, synthetic_root, "--meta.cache_features=false",
                         "--logging.checkpoint_every_s=1e-9")
    assert "continuing at epoch 1, batch 2" in outputs[0]
    for a, b in zip(straight["history"][0], two["history"][0], strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["train_top1"] == a["train_top1"] and b["val_top1"] == a["val_top1"]


def _gather_rank(rank, world, port, folder):
    import torch
    import torch.distributed as dist

    from engine.evaluation import distributed

    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    distributed.GATHER_CHUNK_BYTES = 2 * 6 * 4  # two fp32 rows of (2, 3) per all-gather: several chunks
    mine = {e: torch.full((2, 3), float(e), dtype=torch.bfloat16) for e in range(rank, 7, world)}  # 4 and 3 rows
    gathered, all_gather = [], dist.all_gather

    def recorded(outputs, tensor, *args, **kwargs):
        gathered.append(tuple(tensor.shape))
        return all_gather(outputs, tensor, *args, **kwargs)

    dist.all_gather = recorded
    out = distributed.Ranks(rank, world).gather_features(mine)
    torch.save({"out": out, "gathered": gathered}, f"{folder}/{rank}.pt")
    dist.destroy_process_group()


def test_the_feature_cache_is_gathered_in_chunks_to_the_host(tmp_path):
    """Uneven shares (7 entries over 2 ranks), several all-gathers of a few rows each: every rank ends with every
    entry's features, in fp32 on the host."""
    import torch
    import torch.multiprocessing as mp

    mp.spawn(_gather_rank, args=(2, _port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        saved = torch.load(tmp_path / f"{rank}.pt")
        out = saved["out"]
        # the ids once, then the 4 rows of the longest share two at a time: never the whole cache on the device
        assert saved["gathered"] == [(4,), (2, 2, 3), (2, 2, 3)]
        assert sorted(out) == list(range(7))
        for entry, feats in out.items():
            assert feats.device.type == "cpu" and feats.dtype == torch.float32
            assert torch.equal(feats, torch.full((2, 3), float(entry)))
