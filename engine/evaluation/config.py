"""The frozen-evaluation config (`configs/eval/*.json`): defaults are V1's K400 attentive-probe recipe (spec 6.4);
sections and the override syntax are the pretraining config's (engine/config.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from engine.config import ConfigError, build_config


@dataclass
class EvalDataConfig:
    # index files "<path> <label>" (videos or images), or ImageFolder-style directories root/<class>/<image>;
    # an image is a clip of F copies of itself (spec 6.5)
    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    num_classes: int = 400
    frames_per_clip: int = 16  # F
    num_segments: int = 8  # S: clips along the video, attended together (K400 16x8x3; SSv2 16x2x3)
    num_views: int = 3  # V: spatial crops at evaluation, softmax-averaged
    frame_step: int = 4  # V1 reads it from the pretrain section, where it is absent: always 4 (spec 10 #10)
    crop_size: int = 224
    batch_size: int = 4  # per GPU
    num_workers: int = 8
    synthetic_root: str | None = None  # (ours) generate the synthetic dataset here when missing (the demo's probes)
    # (ours) stop when more of the entries opened are bad (missing, corrupt, ...); fewer are replaced, as V1 does
    max_bad_fraction: float = 0.05
    # label efficiency (ours; spec 6.6): each of `splits` probes trains on its own class-balanced subset (disjoint
    # across splits); without a fraction or count, `splits` probes with different seeds on the whole training set
    train_fraction: float | None = None  # e.g. 0.05 / 0.1 / 0.5 of each class
    train_per_class: int | None = None  # or a fixed count per class
    splits: int = 1


@dataclass
class EvalAugConfig:
    """Training-time transform of the probe: videos spec 6.3, images spec 6.5 (engine/evaluation/augment.py)."""

    enabled: bool = True  # (ours) false: the validation transform for training too (no randomness: cacheable)
    random_resize_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # videos and images
    random_resize_aspect_ratio: list[float] = field(default_factory=lambda: [0.75, 4 / 3])  # videos and images
    rand_augment: bool = True  # videos: RandAugment "rand-m7-n4-mstd0.5-inc1" on the raw frames, same ops on all frames
    auto_augment: bool = True  # images: AutoAugment "original" (ImageNet policy) after the crop and flip (timm)
    image_hflip_prob: float = 0.5  # images: timm's horizontal flip (videos are never flipped: V1 disables it)
    reprob: float = 0.25  # random erasing after normalising: pixel mode (N(0, 1) noise), one box, on all frames


@dataclass
class EvalOptimizationConfig:
    epochs: int = 20
    start_lr: float = 1e-3
    lr: float = 1e-3
    final_lr: float = 0.0
    warmup: float = 0.0  # epochs
    weight_decay: float = 0.01
    final_weight_decay: float = 1e-6  # V1's default: the wd decays (spec 10 #11)
    clip_grad: float = 1.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


@dataclass
class EvalModelConfig:
    checkpoint_key: str = "target_encoder"  # or "encoder"
    probe_heads: int | None = None  # None: the encoder's heads (V1: 16)


@dataclass
class EvalLoggingConfig:
    folder: str = "runs/eval"  # results.json and the probe files; rerunning the same command continues a probe here
    checkpoint_every_s: float = 600.0  # (ours) also save the probe this often inside an epoch (V1: once per epoch)
    progress_every_s: float = 30.0  # (ours) a progress line this often inside an epoch, the cache and validation


@dataclass
class EvalMetaConfig:
    seed: int = 0
    dtype: str = "bfloat16"  # autocast on GPU (V1: float16 + GradScaler, spec 10 #10); the CPU runs float32
    cache_features: bool = False  # (ours) encode each training clip once: only without augmentation
    clips_per_forward: int = 32  # (ours) frozen-encoder batch: bounds inference memory, not the result


@dataclass
class EvalConfig:
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    data_aug: EvalAugConfig = field(default_factory=EvalAugConfig)
    optimization: EvalOptimizationConfig = field(default_factory=EvalOptimizationConfig)
    model: EvalModelConfig = field(default_factory=EvalModelConfig)
    logging: EvalLoggingConfig = field(default_factory=EvalLoggingConfig)
    meta: EvalMetaConfig = field(default_factory=EvalMetaConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_eval_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> EvalConfig:
    cfg = build_config(EvalConfig, path, overrides)
    d, aug, m = cfg.data, cfg.data_aug, cfg.meta
    checks = [
        (bool(d.train) and bool(d.val) or d.synthetic_root is not None,
         "data.train and data.val must list index files ('<path> <label>' per line)"),
        (d.num_classes >= 2, "data.num_classes must be >= 2"),
        (min(d.frames_per_clip, d.num_segments, d.num_views, d.frame_step, d.batch_size) >= 1,
         "data.frames_per_clip, num_segments, num_views, frame_step and batch_size must be >= 1"),
        (d.train_fraction is None or 0 < d.train_fraction <= 1, "data.train_fraction must be in (0, 1]"),
        (d.train_fraction is None or d.train_per_class is None, "set at most one of data.train_fraction and "
                                                                 "data.train_per_class"),
        (d.splits >= 1, "data.splits must be >= 1"),
        (0 <= d.max_bad_fraction <= 1, "data.max_bad_fraction must be in [0, 1]"),
        (0 <= aug.reprob <= 1, "data_aug.reprob (random erasing probability) must be in [0, 1]"),
        (0 <= aug.image_hflip_prob <= 1, "data_aug.image_hflip_prob must be in [0, 1]"),
        (len(aug.random_resize_scale) == 2 and 0 < aug.random_resize_scale[0] <= aug.random_resize_scale[1] <= 1,
         "data_aug.random_resize_scale must be [min, max] with 0 < min <= max <= 1"),
        (len(aug.random_resize_aspect_ratio) == 2
         and 0 < aug.random_resize_aspect_ratio[0] <= aug.random_resize_aspect_ratio[1],
         "data_aug.random_resize_aspect_ratio must be [min, max] with 0 < min <= max"),
        (not (m.cache_features and aug.enabled), "meta.cache_features needs data_aug.enabled=false: augmented clips "
                                                 "differ every epoch, so their features cannot be reused"),
        (cfg.model.checkpoint_key in ("target_encoder", "encoder"), "model.checkpoint_key: target_encoder or encoder"),
        (m.dtype in ("bfloat16", "float16", "float32"), "meta.dtype must be bfloat16, float16 or float32"),
        (cfg.logging.checkpoint_every_s > 0, "logging.checkpoint_every_s must be > 0 (seconds)"),
        (cfg.logging.progress_every_s > 0, "logging.progress_every_s must be > 0 (seconds)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    return cfg
