"""The training loop: build, resume, iterate steps, log, checkpoint. The step itself is engine/step.py."""

from __future__ import annotations

import copy
import math
import os
import random
import socket
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

import kernels
from models import attention

from .backends import DeepSpeedBackend, TorchBackend
from .build import build_encoder, build_predictor, encoder_variant
from . import ds_checkpoint
from .checkpoint import load_resumable, load_start_weights, rng_state, save_checkpoint, set_rng_state, step_files
from .config import Config, ConfigError, save_resolved
from .data.loader import Batch, start_workers
from .data.pipeline import TrainingData, build_training_data, read_run_index
from .data.synthetic import SyntheticSpec, ensure_synthetic_dataset
from .disk_space import checkpoint_bytes, space_warning
from .faults import StepGuard
from .flops import TransformerDims, step_flops
from .progress import format_duration
from .metrics import MetricsCSV, collapse_diagnostics
from .packed_masks import MaskMaker, StepMasks
from .rerun import check_rerun
from .profiling import StepProfiler, phase
from .schedules import Schedules
from .throughput import DataBoundHint, ThroughputWindow, step_tokens
from .step import Models, train_step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(use_deepspeed: bool, device: torch.device) -> tuple[int, int]:
    """(rank, world size). DeepSpeed's launcher sets RANK/WORLD_SIZE/...; plain python gets a 1-rank group."""
    if not use_deepspeed:
        return 0, 1
    import deepspeed

    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def flop_dims(cfg: Config) -> tuple[TransformerDims, TransformerDims, int]:
    v, m, d = encoder_variant(cfg), cfg.model, cfg.data
    pred = TransformerDims(m.pred_embed_dim, m.pred_depth, int(m.pred_embed_dim * 4))
    return TransformerDims(v.dim, v.depth, v.mlp_hidden), pred, 3 * d.tubelet_size * d.patch_size ** 2


def _mfu(row: dict[str, Any]) -> str:
    return "" if math.isnan(row["mfu"]) else f" (MFU {row['mfu']:.0%}, peak {row['peak_mem_gb']:.1f} GB)"


def attention_line(cfg: Config, device: torch.device) -> str:
    """The attention backend each of this model's cases runs (auto decides per case, head dim and dtype)."""
    v, m = encoder_variant(cfg), cfg.model
    dtype = getattr(torch, cfg.meta.dtype) if device.type == "cuda" else torch.float32  # the autocast dtype
    head_dims = {"ragged_context": v.dim // v.heads, "dense_target": v.dim // v.heads,
                 "dense_predictor": m.pred_embed_dim // (m.pred_num_heads or v.heads)}
    return attention.describe(device, dtype, head_dims)


def micro_batch_cost(cfg: Config, masks: StepMasks,
                     dims: tuple[TransformerDims, TransformerDims, int] | None = None) -> tuple[int, int]:
    """(model FLOPs, tokens run) of one micro-batch with these masks: engine/flops.py's count from the real sequence
    lengths, and the tokens the three networks ran (engine/throughput.py `step_tokens`)."""
    enc_dims, pred_dims, patch_features = dims or flop_dims(cfg)
    b, n = cfg.data.batch_size, cfg.num_tokens
    ctx_lens, tgt_lens = masks.context_packing.seqlens, masks.target_packing.seqlens
    return (step_flops(n, b, ctx_lens, tgt_lens, enc_dims, pred_dims, patch_features).total,
            step_tokens(b, n, ctx_lens, tgt_lens))


def token_counts(masks: list[StepMasks], b: int, num_gen: int) -> dict[str, float]:
    """Mean kept context and target tokens per clip of each generator, over a step's micro-batches."""
    clips = b * len(masks)
    row = {}
    for g in range(num_gen):
        row[f"context_tokens_{g}"] = sum(sum(m.context_packing.seqlens[g * b:(g + 1) * b]) for m in masks) / clips
        row[f"target_tokens_{g}"] = sum(m.targets_per_generator[g] for m in masks) / clips
    return row


class MicroBatches:
    """One step's micro-batches from the loader as the (video, masks) pairs `train_step` consumes, loaded one at a
    time as the step asks; keeps their host masks and the time spent waiting for them."""

    def __init__(self, batches: Iterator[Batch], data: TrainingData, device: torch.device, step: int, count: int):
        self.batches, self.data, self.device, self.step, self.count = batches, data, device, step, count
        self.masks: list[StepMasks] = []
        self.data_wait = 0.0  # host seconds spent getting the batches and starting their device-side finish

    def __iter__(self) -> Iterator[tuple[torch.Tensor, StepMasks]]:
        for micro in range(self.count):
            with phase("data"):
                wait_start = time.perf_counter()
                batch = next(self.batches, None)
                if batch is None or (batch.step, batch.micro) != (self.step, micro):
                    got = "the end of the data" if batch is None else f"step {batch.step} micro-batch {batch.micro}"
                    raise RuntimeError(f"the loader gave {got} where step {self.step} micro-batch {micro} was due")
                video = self.data.finish(batch)
                self.data_wait += time.perf_counter() - wait_start
                self.data.account(batch)
            with phase("masks"):  # built by the loader (in its workers; inside "data" with num_workers=0): the copy
                self.masks.append(batch.masks)
                masks = batch.masks.to(self.device, non_blocking=True)
            yield video, masks


def _count(module: torch.nn.Module, trained: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trained)


def build_models(cfg: Config, device: torch.device) -> Models:
    """Context encoder and predictor from the config, on `device`; the target encoder starts as an exact copy of the
    context encoder. (Seeding is the caller's.)"""
    encoder, predictor = build_encoder(cfg).to(device), build_predictor(cfg).to(device)
    return Models(encoder, predictor, copy.deepcopy(encoder).requires_grad_(False))


def train(cfg: Config, local_rank: int | None = None) -> dict[str, Any]:
    """Pretrain; returns a summary (steps run, first and last logged loss, every logged loss by step, run folder)."""
    use_ds = cfg.meta.backend == "deepspeed" or (cfg.meta.backend == "auto" and local_rank is not None)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if not use_ds and launched > 1:  # every process would train alone, on the same GPU and into the same folder
        raise ConfigError(f"meta.backend=torch trains in one process, but a launcher started {launched} (WORLD_SIZE): "
                          "train under DeepSpeed (meta.backend=deepspeed or auto; ZeRO stage 0 is plain data "
                          "parallelism), or start one process with python engine/train.py")
    device = torch.device("cuda", local_rank or 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rank, world = init_distributed(use_ds, device)
    kernels.set_default_impl(cfg.model.kernels)  # before any model runs; env VJEPA_KERNELS still wins
    attention.set_backend(cfg.model.attention)  # the same: once, before any model runs; env VJEPA_ATTENTION wins
    main = rank == 0
    say = print if main else (lambda *a, **k: None)
    folder = Path(cfg.logging.folder)
    for line in check_rerun(cfg, folder, use_ds):  # before anything is built: a refused change fails in a second
        say(line)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"logging.folder {folder}: cannot create it ({e.strerror}); choose a writable folder") from e
    if main and cfg.data.synthetic_root:  # generated once, by rank 0, when missing
        ensure_synthetic_dataset(cfg.data.synthetic_root, SyntheticSpec())
    if use_ds and world > 1:
        torch.distributed.barrier()
    index = read_run_index(cfg)  # before any model is built, so a wrong index path fails in a second

    # models: the target encoder starts as an exact copy of the context encoder
    torch.manual_seed(cfg.meta.seed)  # the global RNGs too, so that checkpoints of any two runs compare bit for bit
    np.random.seed(cfg.meta.seed)
    random.seed(cfg.meta.seed)
    models = build_models(cfg, device)
    encoder, predictor, target_encoder = models.encoder, models.predictor, models.target_encoder
    if main:  # before the first save, which may come hours after the start
        present = len(ds_checkpoint.step_tags(folder / "deepspeed") if use_ds
                      else step_files(folder, cfg.logging.write_tag))
        each = checkpoint_bytes(_count(encoder), _count(predictor),
                                _count(encoder, trained=True) + _count(predictor, trained=True), use_ds)
        warning = space_warning(folder, each, cfg.logging.keep_last, present)
        if warning:
            say(warning)

    # resume: the run folder's latest checkpoint, else an explicit starting file (its weights go in before the
    # backend exists: ZeRO-3 partitions them)
    opt = cfg.optimization
    ds_folder = str(folder / "deepspeed")
    # torch backend: the newest step file that loads (one that does not is named and passed over)
    resumed = None if use_ds else load_resumable(folder, cfg.logging.write_tag, warn=lambda w: print(w, flush=True))
    resumable = ds_checkpoint.latest_tag(ds_folder) if use_ds else resumed
    start = None
    if resumable is None and cfg.meta.load_checkpoint:
        start = load_start_weights(cfg.meta.read_checkpoint, encoder, predictor, target_encoder)
    backend = (DeepSpeedBackend(encoder, predictor, cfg, target_encoder) if use_ds
               else TorchBackend(encoder, predictor, cfg))
    state = None
    if use_ds:
        state = backend.load(ds_folder, target_encoder)
    elif resumed is not None:
        state = resumed[1]
        backend.load_state_dict(state)
        target_encoder.load_state_dict(state["target_encoder"])
    elif start is not None:
        state = start
        if not use_ds and isinstance(start.get("opt"), dict):  # the reference's layout is ours: 4 groups, same order
            backend.load_optimizer_state(start["opt"])
    start_step = 0
    if state is not None:
        # a released or exported file continues at its epoch, as the reference's load_checkpoint does
        start_step = state.get("step", int(state.get("epoch") or 0) * opt.ipe)
        if "rng" in state:  # absent from released files
            set_rng_state(state["rng"])
    total_steps = opt.ipe * opt.epochs
    stop = total_steps if cfg.meta.max_steps is None else min(total_steps, cfg.meta.max_steps)
    if main:
        save_resolved(cfg, folder / "config.json")
    if start_step:
        say(f"resuming {folder} at step {start_step}")
    if start_step >= stop:
        say(f"nothing to do: step {start_step} >= stop {stop}")
        return {"steps": 0, "start_step": start_step, "first_loss": None, "last_loss": None, "losses": {},
                "skipped_steps": 0, "preempted": False, "exit_code": 0, "folder": str(folder)}

    # data: masks are built in the loader, so the step never waits on host work
    b, accumulation = cfg.data.batch_size, cfg.accumulation_steps
    make_masks = MaskMaker(cfg.mask, cfg.grid, cfg.meta.seed, cfg.data.mask_type)
    data = build_training_data(cfg, index, rank=rank, world=world, device=device, folder=folder, start_step=start_step,
                               num_steps=stop - start_step, make_masks=make_masks)
    schedules = Schedules.from_config(opt)
    dims = flop_dims(cfg)
    metrics = MetricsCSV(folder / "metrics.csv") if main else None
    if metrics is not None and start_step:
        metrics.drop_after(start_step)  # rows a killed run logged past its last checkpoint are logged again
    num_gen = len(cfg.mask)
    micro = f" x {accumulation} micro-batches" if accumulation > 1 else ""
    say(f"training {stop - start_step} steps ({start_step} -> {stop}) on {device}, world size {world}, "
        f"batch {b}/rank{micro}, {cfg.num_tokens} tokens/clip, backend {'deepspeed' if use_ds else 'torch'}, "
        f"kernels {kernels.dispatch.resolve(None, device)}, attention {attention_line(cfg, device)}, "
        f"{data.describe()}; logs: {folder}")

    window_losses: list[torch.Tensor] = []
    window = ThroughputWindow(device, world, b * accumulation)
    data_hint = DataBoundHint(cfg.data.num_workers, data.decoder, device.type == "cuda")
    run_start = time.perf_counter()
    first_loss = last_loss = None
    logged: dict[int, float] = {}  # step -> mean loss of the window it ends, at full precision (for callers, tests)
    guard = StepGuard(distributed=use_ds and world > 1, max_nonfinite=cfg.meta.max_nonfinite_steps, device=device,
                      announce=main)
    last_save_s: float | None = None
    preempted = False
    with start_workers():  # a SIGTERM meanwhile must not kill a worker still starting
        batches = iter(data.loader)
    profiler = StepProfiler(cfg.meta.profile_steps, folder, available=stop - start_step, device=device, rank=rank,
                            say=print)
    if profiler.enabled:
        print(f"rank {rank}: {profiler.describe()}" if world > 1 else profiler.describe(), flush=True)
    try:
        # SIGTERM / Ctrl-C handled while the loop runs; the profiler stopped and the handlers restored however it ends
        for step in guard.watch(profiler.steps(range(start_step, stop))):
            lr, wd, momentum = schedules.at(step)
            clip = opt.clip_grad if step // opt.ipe > opt.warmup else None  # the reference clips after warmup epochs
            log_now = step == start_step or (step + 1) % cfg.logging.log_every == 0 or step == stop - 1
            feed = MicroBatches(batches, data, device, step, accumulation)
            out = train_step(models, backend, feed, lr=lr, wd=wd, momentum=momentum, clip_grad=clip,
                             loss_exp=cfg.loss.loss_exp, dtype=cfg.meta.dtype, keep_features=log_now,
                             proceed=lambda loss: guard.check(loss, step))
            window_losses.extend(out.finite_losses)
            with phase("logging"):  # throughput accounting; on logging steps the host sync, metrics row and line
                flops = ran_tokens = 0
                for masks in feed.masks:
                    micro_flops, micro_tokens = micro_batch_cost(cfg, masks, dims)
                    flops, ran_tokens = flops + micro_flops, ran_tokens + micro_tokens
                window.add(flops, ran_tokens, feed.data_wait)

                if log_now:
                    # skipped micro-batches do not count (all ranks skip together: windows of equal lengths)
                    losses = []
                    if window_losses:
                        stacked = torch.stack(window_losses)
                        if use_ds and world > 1:  # the logged loss is the mean over ranks of their batch losses
                            torch.distributed.all_reduce(stacked)
                            stacked /= world
                        losses = stacked.tolist()
                    row: dict[str, Any] = {
                        "step": step + 1, "epoch": step // opt.ipe,
                        "loss": sum(losses) / len(losses) if losses else math.nan,
                        "lr": lr, "wd": wd, "momentum": momentum, "skipped_steps": guard.skipped,
                        **token_counts(feed.masks, b, num_gen),
                        **window.row(),
                        "enc_grad_norm": float(out.grad_norms[0]) if out.grad_norms else 0.0,
                        "pred_grad_norm": float(out.grad_norms[1]) if out.grad_norms else 0.0,
                        **collapse_diagnostics(out.target_features, out.predictions),
                        "elapsed_s": time.perf_counter() - run_start,
                    }
                    if losses:  # a window of skipped micro-batches only has no loss
                        guard.record(step, row["loss"])
                        first_loss = row["loss"] if first_loss is None else first_loss
                        last_loss = logged[step + 1] = row["loss"]
                    if metrics is not None:
                        metrics.write(row)
                    done = step + 1 - start_step
                    eta = (time.perf_counter() - run_start) / done * (stop - step - 1)
                    tokens = "/".join(f"{row[f'context_tokens_{g}']:.0f}" for g in range(num_gen))
                    say(f"step {step + 1}/{stop} | loss {row['loss']:.4f} | lr {lr:.2e} wd {wd:.3f} m {momentum:.5f} | "
                        f"ctx tokens/clip {tokens} of {cfg.num_tokens} | {row['samples_per_s']:.1f} clips/s "
                        f"{row['model_tflops_per_s'] * 1e3:.1f} GFLOP/s{_mfu(row)} | "
                        f"data wait {row['data_wait_frac']:.0%} | target std {row['target_std_tokens']:.3f} "
                        f"rank {row['target_rank']:.1f} | eta {format_duration(eta)}", flush=True)
                    window_losses = []
                    hint = data_hint.check(row["data_wait_frac"], cfg.logging.log_every)
                    if hint:
                        say(hint, flush=True)

            saved = (step + 1) % cfg.logging.checkpoint_every == 0 or step == stop - 1
            if guard.stop:  # preempted or interrupted: all ranks agreed at this step's check
                saved = saved or guard.agree_to_save(cfg.meta.preempt_grace_s, last_save_s)
                preempted = step < stop - 1
            if saved:
                with phase("checkpoint"):
                    save_start = time.perf_counter()
                    data.save_probes()
                    _save(cfg, folder, ds_folder, backend, models, step + 1, world, lr, last_loss, use_ds, main)
                    last_save_s = time.perf_counter() - save_start
            if preempted:
                where = f"saved step {step + 1}" if saved else "no time to save: the last periodic checkpoint stands"
                say(f"stopping after {guard.stop_reason} at step {step + 1} ({where}); rerun the same command to "
                    "continue", flush=True)
                break
    finally:  # however the loop ends: after an error, exit would otherwise wait forever for the workers
        data.stop_workers(batches)

    steps_run = step + 1 - start_step
    if not preempted:
        say(f"done: {steps_run} steps in {format_duration(time.perf_counter() - run_start)}, "
            f"loss {first_loss:.4f} -> {last_loss:.4f}, {guard.skipped} skipped (non-finite); checkpoint {folder}")
    return {"steps": steps_run, "start_step": start_step, "first_loss": first_loss, "last_loss": last_loss,
            "losses": logged, "skipped_steps": guard.skipped, "preempted": preempted,
            "exit_code": guard.exit_code if preempted else 0, "folder": str(folder)}


def _save(cfg: Config, folder: Path, ds_folder: str, backend: Any, models: Models, next_step: int, world: int,
          lr: float, loss: float | None, use_ds: bool, main: bool) -> None:
    meta = {"step": next_step, "epoch": next_step // cfg.optimization.ipe, "loss": loss,
            "batch_size": cfg.data.batch_size, "world_size": world, "lr": lr, "config": cfg.to_dict(),
            "rng": rng_state()}
    if use_ds:  # collective: every rank writes its partition
        backend.save(ds_folder, f"step{next_step}", meta, keep_last=cfg.logging.keep_last, target=models.target_encoder)
    elif main:
        save_checkpoint(folder, cfg.logging.write_tag, next_step,
                        {**backend.state_dict(), "target_encoder": models.target_encoder.state_dict(), **meta},
                        keep_last=cfg.logging.keep_last)
