"""Typed configuration: dataclass defaults, JSON overrides, `--section.key=value` CLI overrides.

The sections and key names mirror the reference's YAML (facebookresearch/jepa `configs/pretrain/*.yaml`, spec
section 4.1) so a ported recipe is a mechanical YAML -> JSON conversion. The defaults *are* the paper's ViT-L/16
recipe; a JSON file holds only what differs. Keys this engine adds are marked "(ours)".

`mask` is a list of generators, as in the reference. On the command line `--mask.0.num_blocks=4` sets one
generator and `--mask.truncate_to_batch_min=true` (no index) sets the key in every generator.

Errors name the offending key, the file it came from and the accepted keys: a typo in a 1000-GPU launch should fail
in the first second, not after the data loader has started.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, TypeVar

from .durable import write_text_atomic

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the fix."""


@dataclass
class DataConfig:
    dataset_type: str = "VideoDataset"  # the only type the engine reads (reference key)
    datasets: list[str] = field(default_factory=list)  # index files, "<path> <label>" per line (reference format)
    datasets_weights: list[float] | None = None  # per-dataset sampling weights (reference key; V2's sampler)
    decode_one_clip: bool = True  # reference key, accepted for YAML ports; one clip per video is always decoded
    batch_size: int = 24  # clips per GPU per step
    num_clips: int = 1  # clips sampled per video
    num_frames: int = 16  # frames per clip
    tubelet_size: int = 2  # frames per tubelet (temporal patch)
    sampling_rate: int = 4  # frame step between sampled frames
    crop_size: int = 224  # square crop side in pixels
    patch_size: int = 16  # spatial patch side in pixels
    pin_mem: bool = True  # pin host memory of batches
    num_workers: int = 12  # DataLoader worker processes per GPU
    filter_short_videos: bool = False  # reference key: skip videos shorter than a clip (else padded, last frame)
    clip_duration: float | None = None  # reference key: seconds per clip instead of sampling_rate
    fps: int | None = None  # (V2 key) target frame rate instead of sampling_rate: step = ceil(video fps) // fps
    decoder: str = "auto"  # (ours) pyav (CPU workers) | dali (NVDEC on GPU, DALI's CPU ops otherwise) | auto
    max_bad_fraction: float = 0.05  # (ours) stop when more of the entries opened are bad (missing, corrupt, ...)
    min_video_bytes: int = 1024  # reference rule: smaller files are skipped as bad
    max_video_bytes: int = 1_000_000_000  # reference rule (filter_long_videos): larger files are skipped as bad
    mask_type: str = "multiblock3d"  # multiblock3d (also the causal variant via max_temporal_keep) | random_tube
    synthetic_root: str | None = None  # (ours) generate the synthetic dataset here when missing; see engine/data


@dataclass
class DataAugConfig:
    auto_augment: bool = False  # RandAugment (off in every pretraining recipe; not supported)
    motion_shift: bool = False  # reference key (off in every recipe; not supported)
    random_resize_aspect_ratio: list[float] = field(default_factory=lambda: [0.75, 1.35])  # crop aspect range
    random_resize_scale: list[float] = field(default_factory=lambda: [0.3, 1.0])  # crop area range
    reprob: float = 0.0  # random erasing probability (0 in every recipe; not supported)


@dataclass
class MaskGeneratorConfig:
    aspect_ratio: list[float] = field(default_factory=lambda: [0.75, 1.5])  # block aspect ratio range
    num_blocks: int = 8  # blocks whose union is the target
    spatial_scale: list[float] = field(default_factory=lambda: [0.15, 0.15])  # block area / frame area range
    temporal_scale: list[float] = field(default_factory=lambda: [1.0, 1.0])  # block duration / clip duration
    max_temporal_keep: float = 1.0  # < 1: context only in the first tubelets (causal multi-block)
    max_keep: int | None = None  # cap on context tokens per clip
    ratio: float = 0.9  # random_tube only: fraction of spatial positions masked
    truncate_to_batch_min: bool = False  # (ours) cut every set to the batch minimum as the reference does


def _short_range() -> MaskGeneratorConfig:
    return MaskGeneratorConfig(num_blocks=8, spatial_scale=[0.15, 0.15])


def _long_range() -> MaskGeneratorConfig:
    return MaskGeneratorConfig(num_blocks=2, spatial_scale=[0.7, 0.7])


@dataclass
class ModelConfig:
    model_name: str = "vit_large"  # encoder variant, see models.VARIANTS
    embed_dim: int | None = None  # (ours) override the variant's width (tiny CPU configs)
    depth: int | None = None  # (ours) override the variant's depth
    num_heads: int | None = None  # (ours) override the variant's head count
    pred_depth: int = 12  # predictor blocks
    pred_embed_dim: int = 384  # predictor width
    pred_num_heads: int | None = None  # (V2 key) None: the encoder's head count, as V1
    uniform_power: bool = True  # sin-cos split of the position table (spec 1.3)
    use_mask_tokens: bool = True  # learned mask tokens (the only supported mode)
    zero_init_mask_tokens: bool = True  # mask tokens start at zero
    rescale_init_by_depth: bool = False  # (ours) V2 init: divide attn.proj / mlp.fc2 by sqrt(2*layer); V1 re-inits
    kernels: str = "auto"  # (ours) fused ops: auto (Triton on GPU) | triton | torch (the references); env VJEPA_KERNELS wins
    attention: str = "auto"  # (ours) backend of models/attention.py (auto: measured per GPU); env VJEPA_ATTENTION wins
    activation_checkpointing: int = 0  # (ours) k > 0: every k-th block of encoder and predictor recomputes in backward
    compile: bool = False  # (ours) torch.compile the per-token work of every block (models/blocks.py); not with ZeRO-3


@dataclass
class OptimizationConfig:
    ipe: int = 300  # iterations per "epoch" (a schedule unit, not a pass over the data)
    ipe_scale: float = 1.25  # schedules span ipe_scale * epochs * ipe iterations
    clip_grad: float = 10.0  # max grad norm, encoder and predictor separately, after warmup
    weight_decay: float = 0.04  # start of the cosine weight-decay schedule
    final_weight_decay: float = 0.4  # end of the cosine weight-decay schedule
    epochs: int = 300  # training length in epochs of ipe iterations
    warmup: int = 40  # warmup epochs (linear lr from start_lr to lr)
    start_lr: float = 2.0e-4  # lr at step 1
    lr: float = 6.25e-4  # peak lr
    final_lr: float = 1.0e-6  # floor of the cosine lr schedule
    ema: list[float] = field(default_factory=lambda: [0.998, 1.0])  # EMA momentum, linear from first to second
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # (ours) AdamW betas, reference defaults
    eps: float = 1.0e-8  # (ours) AdamW eps, reference default


@dataclass
class LossConfig:
    loss_exp: float = 1.0  # loss = mean(|p - h|^loss_exp) / loss_exp
    reg_coeff: float = 0.0  # variance regulariser weight (0 in every recipe; not supported)


@dataclass
class LoggingConfig:
    folder: str = "runs/vjepa"  # run folder: checkpoints, metrics.csv, resolved config
    write_tag: str = "jepa"  # checkpoint file prefix (reference key)
    log_every: int = 10  # (ours) console line every N steps
    checkpoint_every: int = 300  # (ours) checkpoint every N steps (the reference saves every epoch = ipe steps)
    keep_last: int = 2  # (ours) step checkpoints kept ({write_tag}-step{N}; {write_tag}-latest is the newest)


@dataclass
class MetaConfig:
    load_checkpoint: bool = False  # start from read_checkpoint (reference key)
    read_checkpoint: str | None = None  # checkpoint file to start from
    seed: int = 234  # seed of masks, sampling and augmentation
    eval_freq: int = 100  # reference key, unused by pretraining
    use_sdpa: bool = True  # reference key; attention always uses fused kernels
    dtype: str = "bfloat16"  # autocast dtype on GPU: bfloat16 | float16 | float32 (CPU always runs float32)
    max_steps: int | None = None  # (ours) stop after this many steps without changing any schedule
    backend: str = "auto"  # (ours) torch | deepspeed | auto (deepspeed when started by its launcher)
    max_nonfinite_steps: int = 10  # (ours) non-finite losses in a row (each step skipped) before the run stops
    preempt_grace_s: float = 30.0  # (ours) seconds from SIGTERM to SIGKILL (deepspeed launcher, SLURM KillWait: 30)
    profile_steps: int = 0  # (ours) > 0: torch.profiler trace of N steps after warm-up in logging.folder/trace.json


@dataclass
class Config:
    app: str = "vjepa"  # reference key
    nodes: int = 16  # the recipe's node count (global batch = nodes * tasks_per_node * batch_size)
    tasks_per_node: int = 8  # the recipe's GPUs per node
    data: DataConfig = field(default_factory=DataConfig)
    data_aug: DataAugConfig = field(default_factory=DataAugConfig)
    mask: list[MaskGeneratorConfig] = field(default_factory=lambda: [_short_range(), _long_range()])
    model: ModelConfig = field(default_factory=ModelConfig)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    deepspeed: dict[str, Any] | None = None  # passed to deepspeed.initialize as its config dict

    @property
    def grid(self) -> tuple[int, int, int]:
        """Token grid (T', H', W')."""
        d = self.data
        return d.num_frames // d.tubelet_size, d.crop_size // d.patch_size, d.crop_size // d.patch_size

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step: the deepspeed section's `gradient_accumulation_steps`, honoured by both
        backends (meta.backend=torch included), so that a config means one global batch however it is launched."""
        return (self.deepspeed or {}).get("gradient_accumulation_steps", 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------------------------
# building a dataclass tree from plain JSON data, with type checks


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp` and convert it (dicts to dataclasses, ints to floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{source}: '{key}': {value!r} is not {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be an object with keys {_field_names(tp)}, got {value!r}")
        return _build(tp, value, key, source)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}.{i}", source) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be an object, got {value!r}")
        return value
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{source}: '{key}' must be {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _unknown_key(cls: type, key: str, name: str, source: str) -> ConfigError:
    accepted = _field_names(cls)
    close = difflib.get_close_matches(name, accepted, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"{source}: unknown key '{key}'.{hint} Accepted keys here: {', '.join(accepted)}")


def _build(cls: type, data: dict[str, Any], prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in hints:
            raise _unknown_key(cls, key, name, source)
        kwargs[name] = _coerce(value, hints[name], key, source)
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------------------------------
# overrides


def _parse_value(text: str) -> Any:
    """JSON first (numbers, booleans, null, lists, objects); anything else is a plain string (paths)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _set_override(tree: dict[str, Any], dotted: str, value: Any, defaults: dict[str, Any]) -> None:
    parts = dotted.split(".")
    if parts[0] == "mask":
        masks = tree.setdefault("mask", [dict(m) for m in defaults["mask"]])
        if len(parts) == 3 and parts[1].isdigit():
            index = int(parts[1])
            if index >= len(masks):
                raise ConfigError(f"--{dotted}: there are only {len(masks)} mask generators (0..{len(masks) - 1})")
            masks[index][parts[2]] = value
        elif len(parts) == 2:  # no index: the key applies to every generator
            for m in masks:
                m[parts[1]] = value
        else:
            raise ConfigError(f"--{dotted}: use --mask.KEY=V (every generator) or --mask.I.KEY=V (generator I)")
        return
    node = tree
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--{dotted}: '{p}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(args: Sequence[str]) -> list[tuple[str, Any]]:
    """`--section.key=value` strings -> (dotted key, parsed value) pairs."""
    out = []
    for a in args:
        if not a.startswith("--") or "=" not in a:
            raise ConfigError(f"cannot parse override '{a}': expected --section.key=value (value in JSON, or a string)")
        key, text = a[2:].split("=", 1)
        out.append((key, _parse_value(text)))
    return out


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- JSON file <- CLI overrides, type-checked and validated."""
    cfg = build_config(Config, path, overrides)
    validate(cfg)
    return cfg


def config_from_dict(tree: dict[str, Any], source: str) -> Config:
    """A Config from a resolved tree (a checkpoint's `config` entry), type-checked and validated."""
    cfg = _build(Config, tree, "", source)
    validate(cfg)
    return cfg


def build_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """A dataclass tree `cls` from defaults <- JSON file <- CLI overrides, type-checked (not validated)."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be an object of sections")
        source = str(path)
    cfg = _build(cls, tree, "", source)  # check the file alone first so its errors name the file
    if overrides:
        defaults = dataclasses.asdict(cls())
        for key, value in parse_overrides(overrides):
            _set_override(tree, key, value, defaults)
        cfg = _build(cls, tree, "", "command line")
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks, with the key to change in each message."""
    from models import VARIANTS  # local import: engine -> models is the allowed direction, but keep config light
    from models.attention import NAMES as ATTENTION_BACKENDS

    d, m = cfg.data, cfg.model
    checks = [
        (d.crop_size % d.patch_size == 0, f"data.crop_size ({d.crop_size}) must be a multiple of data.patch_size"),
        (d.num_frames % d.tubelet_size == 0, f"data.num_frames ({d.num_frames}) must be a multiple of tubelet_size"),
        (d.batch_size >= 1, "data.batch_size must be >= 1"),
        (d.decoder in ("auto", "pyav", "dali"), f"data.decoder '{d.decoder}': use auto, pyav or dali"),
        (d.clip_duration is None or d.fps is None, "set at most one of data.clip_duration and data.fps"),
        ((d.clip_duration is None or d.clip_duration > 0) and (d.fps is None or d.fps > 0) and d.sampling_rate >= 1,
         "data.sampling_rate, clip_duration and fps must be positive"),
        (0.0 <= d.max_bad_fraction <= 1.0, "data.max_bad_fraction must be in [0, 1]"),
        (d.datasets_weights is None or len(d.datasets_weights) == len(d.datasets),
         "data.datasets_weights needs one weight per entry of data.datasets"),
        (d.mask_type in ("multiblock3d", "random_tube"), f"data.mask_type '{d.mask_type}': use multiblock3d or random_tube"),
        (m.model_name in VARIANTS, f"model.model_name '{m.model_name}' unknown; variants: {', '.join(VARIANTS)}"),
        (m.kernels in ("auto", "triton", "torch"), f"model.kernels '{m.kernels}': use auto, triton or torch"),
        (m.attention in ATTENTION_BACKENDS,
         f"model.attention '{m.attention}': use one of {', '.join(ATTENTION_BACKENDS)}"),
        (m.activation_checkpointing >= 0, "model.activation_checkpointing must be 0 (off) or k >= 1 (every k-th block)"),
        (not (m.compile and cfg.meta.backend != "torch"
              and int(((cfg.deepspeed or {}).get("zero_optimization") or {}).get("stage", 0)) == 3),
         "model.compile with ZeRO stage 3: the compiled blocks read their weights directly, and stage 3 gathers "
         "them only when a submodule is called; use stage 1/2 or --model.compile=false"),
        (m.use_mask_tokens, "model.use_mask_tokens=false (the reference's unused diffusion branch) is not supported"),
        (cfg.meta.dtype in ("bfloat16", "float16", "float32"), "meta.dtype must be bfloat16, float16 or float32"),
        (len(cfg.optimization.ema) == 2, "optimization.ema must be [start, end]"),
        (len(cfg.optimization.betas) == 2, "optimization.betas must be [beta1, beta2]"),
        (len(cfg.mask) >= 1, "mask must list at least one generator"),
        (cfg.loss.reg_coeff == 0.0, "loss.reg_coeff != 0 is not supported (every recipe uses 0)"),
        (not cfg.data_aug.auto_augment and not cfg.data_aug.motion_shift and cfg.data_aug.reprob == 0.0,
         "data_aug.auto_augment / motion_shift / reprob are not supported in pretraining (every recipe turns them off)"),
        (cfg.meta.max_steps is None or cfg.meta.max_steps >= 0, "meta.max_steps must be >= 0 or null"),
        (cfg.meta.backend in ("auto", "torch", "deepspeed"), "meta.backend must be auto, torch or deepspeed"),
        (cfg.meta.max_nonfinite_steps >= 1, "meta.max_nonfinite_steps must be >= 1"),
        (cfg.meta.profile_steps >= 0, "meta.profile_steps must be >= 0 (0: no profiling)"),
        (not cfg.meta.load_checkpoint or bool(cfg.meta.read_checkpoint),
         "meta.load_checkpoint=true needs meta.read_checkpoint (the file to start from)"),
        (type(cfg.accumulation_steps) is int and cfg.accumulation_steps >= 1,
         f"deepspeed.gradient_accumulation_steps must be an integer >= 1, got {cfg.accumulation_steps!r}"),
        (cfg.logging.log_every >= 1 and cfg.logging.checkpoint_every >= 1 and cfg.logging.keep_last >= 1,
         "logging.log_every, logging.checkpoint_every and logging.keep_last must be >= 1"),
    ]
    if m.model_name in VARIANTS:
        heads = m.pred_num_heads or m.num_heads or VARIANTS[m.model_name].heads
        dim = m.embed_dim or VARIANTS[m.model_name].dim
        checks.append((dim % (m.num_heads or VARIANTS[m.model_name].heads) == 0,
                       f"model.embed_dim ({dim}) must be divisible by model.num_heads"))
        checks.append((m.pred_embed_dim % heads == 0,
                       f"model.pred_embed_dim ({m.pred_embed_dim}) must be divisible by the predictor heads ({heads})"))
    for i, g in enumerate(cfg.mask):
        for name in ("aspect_ratio", "spatial_scale", "temporal_scale"):
            checks.append((len(getattr(g, name)) == 2, f"mask.{i}.{name} must be [min, max]"))
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def save_resolved(cfg: Config, path: str | Path) -> None:
    """Write the fully resolved config (every key) so a run folder says exactly what ran; a rerun is checked against
    it (engine/rerun.py), so it is never left half-written."""
    write_text_atomic(path, json.dumps(cfg.to_dict(), indent=2) + "\n")
