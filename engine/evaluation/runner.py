"""Train attentive probes on a frozen encoder and write `results.json` (spec 6.2-6.4).

Per split (one, or `data.splits` class-balanced label-efficiency subsets): a fresh probe seeded by (seed, split),
AdamW over V1's two parameter groups (weights decayed, biases and 1-D not), lr cosine from `lr` to `final_lr` and wd
cosine from `weight_decay` to `final_weight_decay` over epochs x iterations, the probe's gradient clipped at 1.0,
cross-entropy averaged over the training views. Validation after every epoch: softmax averaged over the V views,
top-1 over every validation entry exactly once. The probe is saved in V1's layout (`probe-split{k}.pth.tar`, spec
8.2), atomically, after every epoch, every `logging.checkpoint_every_s` inside one and when SIGTERM or Ctrl-C stops
the run; rerunning the same command continues each probe bit for bit where it stands (engine/evaluation/resume.py)
and only writes results.json again when every probe is trained. Under a launcher with several ranks the work is split as
engine/evaluation/distributed.py describes, and W ranks of batch b train the probe one rank of W*b trains.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engine.backends import param_groups
from engine.config import ConfigError
from engine.data.bad_videos import BadVideoReport
from engine.data.index import VideoIndex, read_index
from engine.data.loader import init_worker, start_workers
from engine.durable import write_text_atomic
from engine.faults import StepGuard
from engine.progress import ProgressLine
from engine.schedules import cosine_wd, warmup_cosine_lr

from .config import EvalConfig
from .data import EvalClips, balanced_subset, image_folder
from .distributed import Ranks, init_ranks
from .features import encode_views, frozen_encoder
from .probe import AttentiveProbe, save_probe
from .resume import Progress, fingerprint, read_progress


def _index(files: list[str], num_classes: int, key: str) -> VideoIndex:
    """Index files, or ImageFolder-style directories (`root/<class>/<image>`)."""
    try:
        if all(Path(f).is_dir() for f in files):
            paths, labels = [], []
            for root in files:
                p, lab = image_folder(root)
                paths, labels = paths + p, labels + lab
            index = VideoIndex(paths, labels, list(files), [len(paths)])
        else:
            index = read_index(files)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"data.{key}: {e}") from None
    bad = sorted({label for label in index.labels if not 0 <= label < num_classes})
    if bad:
        raise ConfigError(f"data.{key}: labels {bad[:5]} are outside 0..{num_classes - 1} (data.num_classes)")
    return index


def _batches(entries: list[int], size: int) -> list[list[int]]:
    return [entries[i:i + size] for i in range(0, len(entries), size)]


class FeatureSource:
    """Features of batches of entries of one EvalClips dataset: encoded on the fly, or (meta.cache_features)
    encoded once, a 1/W share on each rank, all-gathered, and then read from host memory."""

    def __init__(self, encoder: torch.nn.Module, dataset: EvalClips, cfg: EvalConfig, ranks: Ranks,
                 cache: bool, report: BadVideoReport) -> None:
        self.encoder, self.dataset, self.cfg, self.ranks, self.report = encoder, dataset, cfg, ranks, report
        self.cache: dict[int, torch.Tensor] | None = {} if cache else None
        # the label that came with each cached entry: a bad entry's replacement brings its own (EvalClips)
        self.cached_labels: dict[int, int] = {}

    @property
    def device(self) -> torch.device:
        return self.ranks.device

    def fill(self, entries: list[int], say: Any) -> None:
        """Encode the entries not cached yet (no-op without the cache)."""
        if self.cache is None:
            return
        missing = self.ranks.val_share(sorted(set(entries) - set(self.cache)))
        batches = _batches(missing, self.cfg.data.batch_size)
        line = ProgressLine("feature cache: batch", len(batches), every_s=self.cfg.logging.progress_every_s, say=say,
                            clips_per_item=self.cfg.data.batch_size * self.ranks.world)
        mine, labels = {}, {}
        for n, (features, y, batch) in enumerate(self._encoded(batches), start=1):
            mine.update(zip(batch, features.cpu()))
            labels.update(zip(batch, y.tolist()))
            line.tick(n)
        self.cache.update(self.ranks.gather_features(mine))
        self.cached_labels.update(self.ranks.merge(labels))

    def batches(self, batches: list[list[int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(features (B, V, S*N, D) on the device, labels (B,)) per batch of entries."""
        if self.cache is not None and all(e in self.cache for batch in batches for e in batch):
            for batch in batches:
                yield (torch.stack([self.cache[e] for e in batch]).to(self.device),
                       torch.tensor([self.cached_labels[e] for e in batch], device=self.device))
            return
        for features, y, batch in self._encoded(batches):
            if self.cache is not None:
                self.cache.update(zip(batch, features.cpu()))
                self.cached_labels.update(zip(batch, y.tolist()))
            yield features, y

    def _encoded(self, batches: list[list[int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[int]]]:
        if not batches:
            return
        workers = self.cfg.data.num_workers
        # the workers ignore SIGTERM and SIGINT (the probe's training stops at a batch boundary, engine/faults.py), so
        # they are stopped here however the iteration ends: the interpreter's exit would terminate, then join them,
        # forever (engine/data/pipeline.py)
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, num_workers=workers,
                                             pin_memory=self.device.type == "cuda",
                                             worker_init_fn=init_worker if workers else None)
        with start_workers():  # a new loader per pass: a SIGTERM must not kill a worker still starting
            batches_out = iter(loader)
        try:
            for clips, y, entries, failures in batches_out:
                # bad entries were replaced in the workers; reported here, and too many stop the run
                bad = [tuple(line.split("\t", 1)) for text in failures if text for line in text.split("\n")]
                self.report.update(bad, samples=len(entries), step=self.dataset.epoch + 1)
                features = encode_views(self.encoder, clips.to(self.device, non_blocking=True),
                                        dtype=self.cfg.meta.dtype, clips_per_forward=self.cfg.meta.clips_per_forward)
                yield features, y.to(self.device), entries.tolist()
        finally:
            shutdown = getattr(batches_out, "_shutdown_workers", None)  # torch's multi-process iterator only
            if shutdown is not None:
                shutdown()


class Stopped(Exception):
    """The run stopped on SIGTERM or Ctrl-C with the probe saved; `exit_code` is 143 or 130."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def probe_path(folder: Path, split: int) -> Path:
    return folder / f"probe-split{split}.pth.tar"


def train_probe(cfg: EvalConfig, features: FeatureSource, val_features: FeatureSource, train: list[int],
                val: list[int], *, split: int, dim: int, heads: int, folder: Path, progress: Progress,
                saved: dict[str, Any] | None, guard: StepGuard, say: Any) -> list[dict[str, float]]:
    """Train one probe on the `train` entries from where `progress` stands (`saved`: its probe file's content, None
    for a fresh start); its per-epoch history (train loss and accuracy, validation top-1). Raises Stopped after
    saving when `guard` was signalled."""
    o, d, ranks = cfg.optimization, cfg.data, features.ranks
    torch.manual_seed(cfg.meta.seed * 1000 + split)  # the same initial probe on every rank
    probe = AttentiveProbe(dim, heads, d.num_classes).to(features.device)
    groups = param_groups(probe, torch.nn.Module())[::2]  # V1: weights (decayed), then biases and 1-D (not)
    opt = torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps)
    if saved is not None:
        probe.load_state_dict({k.removeprefix("module."): v for k, v in saved["classifier"].items()})
        opt.load_state_dict(saved["opt"])
    ipe = math.ceil(len(train) / (d.batch_size * ranks.world))
    total, warmup = o.epochs * ipe, int(o.warmup * ipe)

    def schedule(step: int) -> tuple[float, float]:
        return (warmup_cosine_lr(step, start_lr=o.start_lr, ref_lr=o.lr, final_lr=o.final_lr, warmup_steps=warmup,
                                 total_steps=total),
                cosine_wd(step, ref_wd=o.weight_decay, final_wd=o.final_weight_decay, total_steps=total))

    path = probe_path(folder, split)

    def save() -> None:
        if ranks.main:
            save_probe(path, probe, opt=opt.state_dict(), epoch=progress.epoch, batch_size=d.batch_size,
                       world_size=ranks.world, lr=schedule(progress.step)[0], progress=progress.to_dict())

    def stopped(where: str) -> Stopped:
        say(f"stopping after {guard.stop_reason} at split {split} {where}; probe saved to {path}: rerun the same "
            f"command to continue")
        return Stopped(f"stopped by {guard.stop_reason}", guard.exit_code)

    last_save = time.monotonic()
    for epoch in range(progress.epoch, o.epochs):
        start = time.perf_counter()
        features.dataset.set_epoch(epoch)
        probe.train()
        # the epoch's sums so far are summed over ranks in the record: rank 0 carries them on
        loss_sum, correct, seen = progress.sums if ranks.main else (0.0, 0.0, 0.0)
        order = np.random.default_rng([cfg.meta.seed, split, epoch]).permutation(len(train))
        slices = ranks.train_slices([train[int(i)] for i in order], d.batch_size)
        line = ProgressLine(f"split {split} epoch {epoch + 1}/{o.epochs} batch", len(slices), start=progress.batch,
                            every_s=cfg.logging.progress_every_s, say=say, clips_per_item=d.batch_size * ranks.world)
        for done, (x, y) in enumerate(features.batches(slices[progress.batch:]), start=progress.batch + 1):
            progress.step += 1
            lr, wd = schedule(progress.step)
            for group in opt.param_groups:
                group["lr"] = lr
                group["weight_decay"] = wd if not group.get("WD_exclude") else 0.0
            logits = [probe(x[:, v].float()) for v in range(x.shape[1])]
            loss = sum(F.cross_entropy(z, y) for z in logits) / len(logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            ranks.average_gradients(probe)
            torch.nn.utils.clip_grad_norm_(probe.parameters(), o.clip_grad)
            opt.step()
            loss_sum += loss.item() * len(y)
            correct += float((logits[0].argmax(1) == y).sum())
            seen += len(y)
            line.tick(done, f"train loss {loss_sum / seen:.4f} acc {100 * correct / seen:.1f}% (rank 0)")
            stop, due = guard.poll(time.monotonic() - last_save >= cfg.logging.checkpoint_every_s)
            if stop or due:
                progress.batch, progress.sums = done, ranks.sum(loss_sum, correct, seen)
                save()
                last_save = time.monotonic()
            if stop:
                raise stopped(f"epoch {epoch + 1} batch {done}/{len(slices)}")
        top1 = evaluate(probe, val_features, val, guard, say)
        loss_sum, correct, seen = ranks.sum(loss_sum, correct, seen)
        if top1 is None:  # stopped while validating: the epoch's training is kept, its validation runs again
            progress.batch, progress.sums = len(slices), [loss_sum, correct, seen]
            save()
            raise stopped(f"epoch {epoch + 1}, validating")
        lr, wd = schedule(progress.step)
        progress.history.append({"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_top1": 100 * correct / seen,
                                 "val_top1": top1, "lr": lr, "wd": wd, "seconds": time.perf_counter() - start})
        progress.epoch, progress.batch, progress.sums = epoch + 1, 0, [0.0, 0.0, 0.0]
        progress.complete = progress.epoch == o.epochs
        save()
        last_save = time.monotonic()
        say(f"split {split} epoch {epoch + 1}/{o.epochs} | train loss {loss_sum / seen:.4f} "
            f"acc {100 * correct / seen:.1f}% | val top-1 {top1:.2f}% | {time.perf_counter() - start:.1f} s")
    return progress.history


@torch.no_grad()
def evaluate(probe: AttentiveProbe, features: FeatureSource, val: list[int], guard: StepGuard,
             say: Any) -> float | None:
    """Top-1 (%) of the softmax averaged over the views, every validation entry once (over all ranks); None when
    `guard` was signalled meanwhile (a large validation set takes minutes: longer than a preemption's grace)."""
    probe.eval()
    ranks, b = features.ranks, features.cfg.data.batch_size
    polls = math.ceil(len(val) // ranks.world / b)  # the batch count of the smallest share: every rank polls as often
    correct = seen = 0
    batches = _batches(ranks.val_share(val), b)
    line = ProgressLine("validation: batch", len(batches), every_s=features.cfg.logging.progress_every_s, say=say,
                        clips_per_item=b * ranks.world)
    for i, (x, y) in enumerate(features.batches(batches)):
        probs = torch.stack([probe(x[:, v].float()).softmax(-1) for v in range(x.shape[1])]).mean(0)
        correct += int((probs.argmax(1) == y).sum())
        seen += len(y)
        line.tick(i + 1)
        if i < polls and guard.poll()[0]:
            return None
    correct, seen = ranks.sum(correct, seen)
    return 100.0 * correct / seen


def run_eval(cfg: EvalConfig, checkpoint: str, *, random_init: bool = False, say: Any = print) -> dict[str, Any]:
    """Probe `checkpoint`'s frozen encoder; writes and returns results.json's content."""
    from engine.data.synthetic import SyntheticSpec, ensure_synthetic_dataset

    d = cfg.data
    ranks = init_ranks()
    if not ranks.main:
        say = _silent
    if d.synthetic_root:
        if ranks.main:
            ensure_synthetic_dataset(d.synthetic_root, SyntheticSpec())
        ranks.sum(0)  # the others wait for rank 0 to generate it
    train_index, val_index = _index(d.train, d.num_classes, "train"), _index(d.val, d.num_classes, "val")
    encoder, source = frozen_encoder(checkpoint, cfg, random_init=random_init)
    encoder.to(ranks.device)
    folder = Path(cfg.logging.folder)
    train_set = EvalClips(train_index.paths, train_index.labels, d, cfg.data_aug, training=True, seed=cfg.meta.seed)
    val_set = EvalClips(val_index.paths, val_index.labels, d, cfg.data_aug, training=False, seed=cfg.meta.seed)
    val = list(range(len(val_set)))
    # the cache is shared by every split: they read subsets of the same deterministic training clips
    # one report of bad entries for both sets, kept in the folder (a rerun warns only of new ones)
    folder.mkdir(parents=True, exist_ok=True)
    report = BadVideoReport(folder, ranks.rank, d.max_bad_fraction, min_attempts=min(100, len(train_set)),
                            position="epoch")
    train_features = FeatureSource(encoder, train_set, cfg, ranks, cache=cfg.meta.cache_features, report=report)
    val_features = FeatureSource(encoder, val_set, cfg, ranks, cache=cfg.meta.cache_features, report=report)
    heads = cfg.model.probe_heads or encoder.num_heads
    say(f"probing {source}: {len(train_set)} train / {len(val_set)} val entries, {d.num_classes} classes, "
        f"{d.frames_per_clip}x{d.num_segments}x{d.num_views} (frames x segments x views), {encoder.num_tokens} "
        f"tokens per segment, probe {encoder.embed_dim} wide with {heads} heads, on {ranks.world} x {ranks.device}")
    efficient = d.train_fraction is not None or d.train_per_class is not None
    chosen = [(balanced_subset(train_index.labels, fraction=d.train_fraction, per_class=d.train_per_class,
                               seed=cfg.meta.seed, split=k) if efficient else np.arange(len(train_set))).tolist()
              for k in range(d.splits)]
    expected = fingerprint(cfg, encoder, ranks.world, train_index, val_index)
    found = [read_progress(probe_path(folder, k), expected) for k in range(d.splits)]
    todo = [k for k in range(d.splits) if found[k] is None or not found[k][0].complete]
    if cfg.meta.cache_features and todo:
        start = time.perf_counter()
        train_features.fill(sorted({e for k in todo for e in chosen[k]}), say)
        val_features.fill(val, say)
        say(f"feature cache: {len(train_features.cache)} train + {len(val_features.cache)} val entries encoded in "
            f"{time.perf_counter() - start:.1f} s")
    # SIGTERM and Ctrl-C stop the probe's training at the next batch, saved (engine/faults.py); while the cache is
    # filled they act at once, as nothing there would be kept
    guard = StepGuard(distributed=ranks.world > 1, max_nonfinite=1, device=ranks.device, announce=ranks.main)
    splits, histories = [], []
    for k in guard.watch(range(d.splits)):
        progress, saved = found[k] if found[k] is not None else (Progress(expected), None)
        if progress.complete:
            say(f"split {k}: trained already ({probe_path(folder, k)})")
        elif saved is not None:
            say(f"split {k}: continuing at epoch {progress.epoch + 1}, batch {progress.batch} "
                f"({probe_path(folder, k)})")
        history = progress.history if progress.complete else train_probe(
            cfg, train_features, val_features, chosen[k], val, split=k, dim=encoder.embed_dim, heads=heads,
            folder=folder, progress=progress, saved=saved, guard=guard, say=say)
        histories.append(history)
        splits.append({"split": k, "train_samples": len(chosen[k]), "top1": history[-1]["val_top1"]})
    top1 = [s["top1"] for s in splits]
    bad = ranks.merge(report.reasons)
    results = {
        "top1": float(np.mean(top1)), "top1_std": float(np.std(top1)), "splits": splits,
        "num_classes": d.num_classes,
        "world_size": ranks.world,
        "protocol": {"frames": d.frames_per_clip, "segments": d.num_segments, "views": d.num_views,
                     "frame_step": d.frame_step, "crop_size": d.crop_size},
        "history": histories, "checkpoint": source, "random_init": random_init,
        "probe_checkpoints": [str(probe_path(folder, k)) for k in range(d.splits)],
        "bad_videos": bad, "deviations": _deviations(cfg, len(bad)), "config": cfg.to_dict(),
    }
    if ranks.main:
        write_text_atomic(folder / "results.json", json.dumps(results, indent=2))
    say(f"top-1 {results['top1']:.2f}%" + (f" +- {results['top1_std']:.2f} over {d.splits} splits"
                                           if d.splits > 1 else "") + f"; {folder / 'results.json'}")
    return results


def _silent(*_: Any) -> None:
    pass


def _deviations(cfg: EvalConfig, bad_videos: int) -> list[str]:
    """What this run does differently from V1's recipe (spec 6.3-6.4), or from an exact measurement, for the
    record."""
    aug, out = cfg.data_aug, []
    if bad_videos:
        out.append(f"{bad_videos} bad index entries (bad_videos) were replaced by other entries, as V1 does, in "
                   f"training and validation: top-1 counts the replacements; remove them from the index (python -m "
                   f"engine.data.inspect INDEX --bad-list FILE lists them) for the exact figure")
    if not aug.enabled:
        out.append("no training augmentation: one centre view, first-span segments (data_aug.enabled=false)")
    else:
        if not aug.rand_augment:
            out.append("video training clips without RandAugment rand-m7-n4-mstd0.5-inc1 (data_aug.rand_augment=false)")
        if not aug.auto_augment:
            out.append("image training without AutoAugment 'original' (data_aug.auto_augment=false)")
        if aug.reprob != 0.25:
            out.append(f"random erasing probability {aug.reprob} (V1: 0.25)")
    if cfg.meta.cache_features:
        out.append("training features cached (encoded once)")
    return out
