"""Train attentive probes on a frozen encoder and write `results.json` (spec 6.2-6.4).

Per split (one, or `data.splits` class-balanced label-efficiency subsets): a fresh probe seeded by (seed, split),
AdamW over V1's two parameter groups (weights decayed, biases and 1-D not), lr cosine from `lr` to `final_lr` and wd
cosine from `weight_decay` to `final_weight_decay` over epochs x iterations, the probe's gradient clipped at 1.0,
cross-entropy averaged over the training views. Validation after every epoch: softmax averaged over the V views,
top-1 over every validation entry exactly once. The probe is saved after every epoch in V1's layout
(`probe-split{k}.pth.tar`, spec 8.2), atomically.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engine.backends import param_groups
from engine.config import ConfigError
from engine.data.index import VideoIndex, read_index
from engine.schedules import cosine_wd, warmup_cosine_lr

from .config import EvalConfig
from .data import EvalClips, balanced_subset, image_folder
from .features import encode_views, frozen_encoder
from .probe import AttentiveProbe, save_probe


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


class _Subset(torch.utils.data.Subset):
    """Entries of an EvalClips dataset, in the order they are read."""

    def entry(self, i: int) -> int:
        return int(self.indices[i])


class FeatureSource:
    """Features of a subset's batches, in the subset's order: encoded on the fly, or (meta.cache_features) encoded
    once and then read from host memory."""

    def __init__(self, encoder: torch.nn.Module, cfg: EvalConfig, device: torch.device, cache: bool) -> None:
        self.encoder, self.cfg, self.device = encoder, cfg, device
        self.cache: dict[int, torch.Tensor] | None = {} if cache else None

    def batches(self, subset: _Subset) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(features (B, V, S*N, D) on the device, labels (B,)) per batch of `data.batch_size` entries."""
        b, labels = self.cfg.data.batch_size, subset.dataset.labels
        entries = [subset.entry(i) for i in range(len(subset))]
        if self.cache is not None and all(e in self.cache for e in entries):
            for i in range(0, len(entries), b):
                chunk = entries[i:i + b]
                yield (torch.stack([self.cache[e] for e in chunk]).to(self.device),
                       torch.tensor([labels[e] for e in chunk], device=self.device))
            return
        workers = self.cfg.data.num_workers
        loader = torch.utils.data.DataLoader(subset, batch_size=b, num_workers=workers,
                                             pin_memory=self.device.type == "cuda")
        for clips, y, batch_entries in loader:
            features = encode_views(self.encoder, clips.to(self.device, non_blocking=True),
                                    dtype=self.cfg.meta.dtype, clips_per_forward=self.cfg.meta.clips_per_forward)
            if self.cache is not None:
                for row, entry in enumerate(batch_entries.tolist()):
                    self.cache[entry] = features[row].cpu()
            yield features, y.to(self.device)


def train_probe(cfg: EvalConfig, features: FeatureSource, val_features: FeatureSource, train: _Subset,
                val: _Subset, *, split: int, dim: int, heads: int, folder: Path,
                say: Any) -> list[dict[str, float]]:
    """Train one probe; its per-epoch history (train loss and accuracy, validation top-1)."""
    o, d = cfg.optimization, cfg.data
    torch.manual_seed(cfg.meta.seed * 1000 + split)
    probe = AttentiveProbe(dim, heads, d.num_classes).to(features.device)
    groups = param_groups(probe, torch.nn.Module())[::2]  # V1: weights (decayed), then biases and 1-D (not)
    opt = torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps)
    ipe = math.ceil(len(train) / d.batch_size)
    total, warmup = o.epochs * ipe, int(o.warmup * ipe)
    history = []
    step = 0
    for epoch in range(o.epochs):
        start = time.perf_counter()
        train.dataset.set_epoch(epoch)
        probe.train()
        loss_sum = correct = seen = 0.0
        order = np.random.default_rng([cfg.meta.seed, split, epoch]).permutation(len(train))
        shuffled = _Subset(train.dataset, [train.entry(int(i)) for i in order])
        for x, y in features.batches(shuffled):
            step += 1
            lr = warmup_cosine_lr(step, start_lr=o.start_lr, ref_lr=o.lr, final_lr=o.final_lr, warmup_steps=warmup,
                                  total_steps=total)
            wd = cosine_wd(step, ref_wd=o.weight_decay, final_wd=o.final_weight_decay, total_steps=total)
            for group in opt.param_groups:
                group["lr"] = lr
                group["weight_decay"] = wd if not group.get("WD_exclude") else 0.0
            logits = [probe(x[:, v].float()) for v in range(x.shape[1])]
            loss = sum(F.cross_entropy(z, y) for z in logits) / len(logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(probe.parameters(), o.clip_grad)
            opt.step()
            loss_sum += loss.item() * len(y)
            correct += float((logits[0].argmax(1) == y).sum())
            seen += len(y)
        top1 = evaluate(probe, val_features, val)
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_top1": 100 * correct / seen,
                        "val_top1": top1, "lr": lr, "wd": wd, "seconds": time.perf_counter() - start})
        save_probe(folder / f"probe-split{split}.pth.tar", probe, opt=opt.state_dict(), epoch=epoch + 1,
                   batch_size=d.batch_size, world_size=1, lr=lr)
        say(f"split {split} epoch {epoch + 1}/{o.epochs} | train loss {loss_sum / seen:.4f} "
            f"acc {100 * correct / seen:.1f}% | val top-1 {top1:.2f}% | {time.perf_counter() - start:.1f} s")
    return history


@torch.no_grad()
def evaluate(probe: AttentiveProbe, features: FeatureSource, val: _Subset) -> float:
    """Top-1 (%) of the softmax averaged over the views, every validation entry once."""
    probe.eval()
    correct = seen = 0
    for x, y in features.batches(val):
        probs = torch.stack([probe(x[:, v].float()).softmax(-1) for v in range(x.shape[1])]).mean(0)
        correct += int((probs.argmax(1) == y).sum())
        seen += len(y)
    return 100.0 * correct / seen


def run_eval(cfg: EvalConfig, checkpoint: str, *, random_init: bool = False, say: Any = print) -> dict[str, Any]:
    """Probe `checkpoint`'s frozen encoder; writes and returns results.json's content."""
    from engine.data.synthetic import SyntheticSpec, ensure_synthetic_dataset

    d = cfg.data
    if d.synthetic_root:
        ensure_synthetic_dataset(d.synthetic_root, SyntheticSpec())
    train_index, val_index = _index(d.train, d.num_classes, "train"), _index(d.val, d.num_classes, "val")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    encoder, source = frozen_encoder(checkpoint, cfg, random_init=random_init)
    encoder.to(device)
    folder = Path(cfg.logging.folder)
    folder.mkdir(parents=True, exist_ok=True)
    train_set = EvalClips(train_index.paths, train_index.labels, d, cfg.data_aug, training=True, seed=cfg.meta.seed)
    val_set = EvalClips(val_index.paths, val_index.labels, d, cfg.data_aug, training=False, seed=cfg.meta.seed)
    val = _Subset(val_set, list(range(len(val_set))))
    # the cache is shared by every split: they read subsets of the same deterministic training clips
    train_features = FeatureSource(encoder, cfg, device, cache=cfg.meta.cache_features)
    val_features = FeatureSource(encoder, cfg, device, cache=cfg.meta.cache_features)
    heads = cfg.model.probe_heads or encoder.num_heads
    say(f"probing {source}: {len(train_set)} train / {len(val_set)} val entries, {d.num_classes} classes, "
        f"{d.frames_per_clip}x{d.num_segments}x{d.num_views} (frames x segments x views), {encoder.num_tokens} "
        f"tokens per segment, probe {encoder.embed_dim} wide with {heads} heads, on {device}")
    efficient = d.train_fraction is not None or d.train_per_class is not None
    splits, histories = [], []
    for k in range(d.splits):
        chosen = (balanced_subset(train_index.labels, fraction=d.train_fraction, per_class=d.train_per_class,
                                  seed=cfg.meta.seed, split=k) if efficient else np.arange(len(train_set)))
        history = train_probe(cfg, train_features, val_features, _Subset(train_set, chosen.tolist()), val, split=k,
                              dim=encoder.embed_dim, heads=heads, folder=folder, say=say)
        histories.append(history)
        splits.append({"split": k, "train_samples": len(chosen), "top1": history[-1]["val_top1"]})
    top1 = [s["top1"] for s in splits]
    results = {
        "top1": float(np.mean(top1)), "top1_std": float(np.std(top1)), "splits": splits,
        "num_classes": d.num_classes,
        "protocol": {"frames": d.frames_per_clip, "segments": d.num_segments, "views": d.num_views,
                     "frame_step": d.frame_step, "crop_size": d.crop_size},
        "history": histories, "checkpoint": source, "random_init": random_init,
        "probe_checkpoints": [str(folder / f"probe-split{k}.pth.tar") for k in range(d.splits)],
        "deviations": _deviations(cfg), "config": cfg.to_dict(),
    }
    tmp = folder / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, folder / "results.json")
    say(f"top-1 {results['top1']:.2f}%" + (f" +- {results['top1_std']:.2f} over {d.splits} splits"
                                           if d.splits > 1 else "") + f"; {folder / 'results.json'}")
    return results


def _deviations(cfg: EvalConfig) -> list[str]:
    """What this run does differently from V1's recipe (spec 6.3-6.4), for the record."""
    aug, out = cfg.data_aug, []
    if not aug.enabled:
        out.append("no training augmentation: one centre view, first-span segments (data_aug.enabled=false)")
    elif not aug.rand_augment or aug.reprob == 0:
        out.append("training augmentation without RandAugment / random erasing")
    if cfg.meta.cache_features:
        out.append("training features cached (encoded once)")
    return out
