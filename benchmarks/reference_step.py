"""The reference's training step (facebookresearch/jepa, V-JEPA 1), rebuilt around its own modules for timing.

The reference's step is the closure `train_step` inside `main()` of its `app/vjepa/train.py`, and that module
imports its data pipeline (decord, pandas, ...) at the top, so it cannot be imported to run one step. Everything
here calls the reference's modules, imported at run time from the user's checkout (`--reference`, through
`tests/fixtures/reference/make_fixtures.py`'s `import_reference`, which puts the checkout on `sys.path`): nothing of
the reference is copied into this project.

Called from the checkout, unchanged:
    * models: `app.vjepa.utils.init_video_model` (its encoder constructor by name, `MultiMaskWrapper`,
      `vit_predictor`, `PredictorMultiMaskWrapper` and its second initialisation pass), `use_sdpa` from the config;
    * masks: `src.masks.multiblock3d.MaskCollator` (or `src.masks.random_tube.MaskCollator`) built from the config's
      generators, one call per step, locations from the global torch RNG as in its loader workers;
    * optimizer: `app.vjepa.utils.init_opt` (torch AdamW with its 4 parameter groups, `WarmupCosineSchedule`,
      `CosineWDSchedule`, and a `torch.cuda.amp.GradScaler` when the dtype is not float32 on a GPU);
    * frozen evaluation: its bare encoder (the `VisionTransformer` init_video_model wraps) called on a clip batch
      under no_grad, dense (all tokens), as evals/video_classification_frozen runs it (that one autocasts to
      float16 whatever the config; here both sides use the config's meta.dtype);
    * `src.masks.utils.apply_masks`; the loggers `src.utils.logging.grad_logger`, `adamw_logger`, `gpu_timer` and
      `src.utils.distributed.AllReduce`.

Rebuilt here from `train.py`'s `main()` (its per-iteration algorithm, spec section 4.2):
    * the EMA-momentum generator (`make_fixtures.momentum_values`, the same values as train.py's generator);
    * the start: `init_video_model`, `target_encoder = copy.deepcopy(encoder)` with requires_grad off, `init_opt`;
      the caller loads one initial state (the reference's own initialisation) into every run, ours included;
    * the body of `train_step`: `lr_sched.step()`, `wd_sched.step()`; under autocast (`torch.autocast("cuda")`,
      what its `torch.cuda.amp.autocast` is, enabled when mixed precision): target forward under no_grad, parameter-
      free layer norm, `apply_masks(h, masks_pred, concat=False)`; `encoder(clips, masks_enc)` (one call per
      generator); `predictor(z, h, masks_enc, masks_pred)`; `loss_fn` (mean |z - h|^loss_exp / loss_exp per
      generator, averaged over generators); `reg_fn` and its relu term (computed every step, weighted by
      `reg_coeff`); scaled backward + `unscale_` (or plain backward in fp32); per-network `clip_grad_norm_` when
      `clip` (the reference clips after the warmup epochs); `scaler.step` + `scaler.update` (or `optimizer.step`);
      `optimizer.zero_grad()`; the EMA loop `param_k.data.mul_(m).add_((1.-m) * param_q.detach().data)`;
    * with `loggers=True`, also what `main()` does per iteration around the step: `gpu_timer(train_step)` (a CUDA
      synchronize), `grad_logger` of encoder and predictor (one `float(norm)` per weight matrix), `float` of the two
      clip norms, `adamw_logger` (`optimizer.state_dict()` and two `float`s per parameter), `float` of the three
      losses and the two input-variance floats (`AllReduce`, an identity at world size 1). These are the host syncs
      the issue refers to. Without loggers the step keeps the loss on the device; `GradScaler.step`'s own
      inf-check sync (bf16/fp16 on GPU) is part of the reference's step and stays in both variants.

Left out: data loading (decord decoding, transforms, the DataLoader; the step gets a ready clip tensor already on
the device and its masks, which are moved to the device with `non_blocking` inside the timed step as `load_clips`
does), `repeat_interleave_batch` (a no-op at num_clips 1), torch.distributed and the DistributedDataParallel
wrappers (one process, no process group; DDP at world size 1 would only add work to the reference's side),
checkpoint save/load, CSV logging and `logger.info` lines, meters, the NaN assert, and the loader-refresh `try`.
`torch.backends.cudnn.benchmark = True` (set by train.py at import) is set by the caller for both sides.

Model arguments the reference's V1 constructors cannot express are mapped as follows: an encoder width/depth/heads
override (tiny configs) registers one more constructor, built like its own `vit_*` constructors
(make_fixtures does the same); `model.pred_num_heads` (a V2 key) overrides the head count `init_video_model` passes
to `vit_predictor` (V1 always uses the encoder's), only while the models are built.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib.util
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
MAKE_FIXTURES = ROOT / "tests" / "fixtures" / "reference" / "make_fixtures.py"
# files of a facebookresearch/jepa checkout this module imports (checked before anything is imported)
REQUIRED_FILES = ("app/vjepa/utils.py", "src/masks/multiblock3d.py", "src/masks/utils.py",
                  "src/models/vision_transformer.py", "src/models/predictor.py", "src/utils/logging.py",
                  "src/utils/distributed.py")
REFERENCE_URL = "https://github.com/facebookresearch/jepa"
CUSTOM_ENCODER = "vit_compare_reference"  # the constructor registered for width/depth/heads overrides


class ReferenceError(RuntimeError):
    """The --reference path is not a usable facebookresearch/jepa checkout; the message says how to fix it."""


def check_reference_path(path: str | Path) -> Path:
    """The checkout's resolved path, or a ReferenceError naming what is missing and the fix."""
    fix = (f"pass --reference PATH_TO_JEPA_CHECKOUT, a checkout of {REFERENCE_URL} (tested at commit 51c59d5): "
           f"git clone {REFERENCE_URL} /tmp/jepa_ref")
    p = Path(path).expanduser()
    if not p.exists():
        raise ReferenceError(f"--reference {path}: no such directory; {fix}")
    if not p.is_dir():
        raise ReferenceError(f"--reference {path}: not a directory; {fix}")
    missing = [f for f in REQUIRED_FILES if not (p / f).is_file()]
    if missing:
        raise ReferenceError(f"--reference {path}: not a facebookresearch/jepa (V-JEPA 1) checkout, missing "
                             f"{', '.join(missing)}; {fix}")
    return p.resolve()


def _make_fixtures() -> ModuleType:
    """tests/fixtures/reference/make_fixtures.py, the repository's one place that imports the reference."""
    module = sys.modules.get("vjepa_make_fixtures")
    if module is None:
        spec = importlib.util.spec_from_file_location("vjepa_make_fixtures", MAKE_FIXTURES)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


def import_reference(path: str | Path) -> SimpleNamespace:
    """The reference's modules, imported from the checkout at `path` (make_fixtures' helper plus the loggers, the
    predictor module and the random-tube collator)."""
    path = check_reference_path(path)
    try:
        ref = _make_fixtures().import_reference(path)
        import src.masks.random_tube as random_tube
        import src.models.predictor as predictor
        import src.utils.distributed as distributed
        import src.utils.logging as ref_logging
    except ImportError as e:
        raise ReferenceError(f"importing the reference from {path} failed: {e}. Its modules need torch, numpy and "
                             f"pyyaml (the project's .venv has them); pip install the missing package") from None
    ref.predictor = predictor
    ref.random_tube = random_tube
    ref.logging = ref_logging
    ref.distributed = distributed
    ref.path = path
    ref.commit = _git_commit(path)
    ref.momentum_values = _make_fixtures().momentum_values
    return ref


def _git_commit(path: Path) -> str | None:
    """The checkout's commit; where git cannot tell (a worktree carried to the GPU machine without the repository its
    .git file names), the first line of `COMMIT` beside the code (gpu_session.sh's usage writes it)."""
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        out = None
    if out is not None and out.returncode == 0:
        return out.stdout.strip()
    written = path / "COMMIT"
    if not written.is_file():
        return None
    return written.read_text().split("\n", 1)[0].strip() or None


# --------------------------------------------------------------------------------------------------------------------
# config -> the reference's arguments


def reference_mask_configs(cfg: Any) -> list[dict[str, Any]]:
    """The config's mask generators as the reference's `cfgs_mask` dicts (it reads only the keys it knows)."""
    return [dataclasses.asdict(g) for g in cfg.mask]


def reference_dtype(cfg: Any, device: torch.device) -> tuple[torch.dtype, bool]:
    """(autocast dtype, mixed_precision) as train.py derives them from meta.dtype; float32 on a CPU (our engine's
    CPU rule, so both sides compute the same thing)."""
    if device.type != "cuda" or cfg.meta.dtype == "float32":
        return torch.float32, False
    return getattr(torch, cfg.meta.dtype), True


def autocast(dtype: torch.dtype, mixed_precision: bool) -> contextlib.AbstractContextManager:
    """train.py's `torch.cuda.amp.autocast(dtype=dtype, enabled=mixed_precision)` (the same as torch.autocast on
    "cuda"); nothing when disabled, so that a CPU-only torch does not warn."""
    return torch.autocast("cuda", dtype=dtype) if mixed_precision else contextlib.nullcontext()


@contextlib.contextmanager
def _predictor_heads(ref: SimpleNamespace, heads: int | None) -> Iterator[None]:
    """While building: `vit_predictor` with `heads` instead of the encoder's head count (V2's pred_num_heads)."""
    original = ref.predictor.vit_predictor
    if heads is not None:
        ref.predictor.vit_predictor = lambda **kw: original(**{**kw, "num_heads": heads})
    try:
        yield
    finally:
        ref.predictor.vit_predictor = original


def build_reference_models(ref: SimpleNamespace, cfg: Any, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """The reference's (wrapped) encoder and predictor for `cfg`, by its own `init_video_model`, on `device`. Seed
    the global torch RNG first for reproducible weights."""
    from engine.build import encoder_variant

    m, d = cfg.model, cfg.data
    name = m.model_name
    if any(v is not None for v in (m.embed_dim, m.depth, m.num_heads)):
        v = encoder_variant(cfg)
        setattr(ref.vit, CUSTOM_ENCODER, functools.partial(
            ref.vit.VisionTransformer, embed_dim=v.dim, depth=v.depth, num_heads=v.heads, mlp_ratio=v.mlp_ratio,
            qkv_bias=True, norm_layer=functools.partial(nn.LayerNorm, eps=1e-6)))
        name = CUSTOM_ENCODER
    elif not hasattr(ref.vit, name):
        raise ReferenceError(f"model.model_name '{name}' has no constructor in the reference's "
                             f"src/models/vision_transformer.py")
    with _predictor_heads(ref, m.pred_num_heads):
        return ref.utils.init_video_model(
            device=device, patch_size=d.patch_size, num_frames=d.num_frames, tubelet_size=d.tubelet_size,
            model_name=name, crop_size=d.crop_size, pred_depth=m.pred_depth, pred_embed_dim=m.pred_embed_dim,
            uniform_power=m.uniform_power, use_mask_tokens=m.use_mask_tokens, num_mask_tokens=len(cfg.mask),
            zero_init_mask_tokens=m.zero_init_mask_tokens, use_sdpa=cfg.meta.use_sdpa)


def mask_collator(ref: SimpleNamespace, cfg: Any) -> Any:
    """The reference's collator for the config's mask type and generators."""
    d = cfg.data
    module = ref.multiblock3d if d.mask_type == "multiblock3d" else ref.random_tube
    return module.MaskCollator(cfgs_mask=reference_mask_configs(cfg), crop_size=d.crop_size, num_frames=d.num_frames,
                               patch_size=d.patch_size, tubelet_size=d.tubelet_size)


def reference_masks(ref: SimpleNamespace, cfg: Any, batch_size: int, steps: int,
                    seed: int) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """(masks_enc, masks_pred) of the reference's collator for `steps` consecutive batches (counters 0, 1, ...),
    each a list over generators of (B, K) int64 tensors truncated to the batch minimum. Box locations come from the
    global torch RNG (its loader workers'), seeded here with `seed`. The collator is called on placeholders: what
    it collates besides the masks is never used (the clip tensor is given to the step directly)."""
    torch.manual_seed(seed)
    collator = mask_collator(ref, cfg)
    out = []
    for _ in range(steps):
        _, masks_enc, masks_pred = collator([torch.zeros(1)] * batch_size)
        out.append((list(masks_enc), list(masks_pred)))
    return out


def to_step_masks(masks_enc: list[torch.Tensor], masks_pred: list[torch.Tensor], num_tokens: int) -> Any:
    """The reference's per-generator (B, K) index tensors as our packed StepMasks (sequence s = g*B + b, global ids
    b*N + n in the reference's ascending order): the same token sets, for our side and for the FLOP count."""
    from engine.masks import MaskSet
    from engine.packed_masks import StepMasks

    batch = masks_enc[0].shape[0]
    offset = torch.arange(batch)[:, None] * num_tokens

    def pack(masks: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[int, ...]]:
        return (torch.cat([(m.cpu() + offset).flatten() for m in masks]),
                tuple(m.shape[1] for m in masks for _ in range(batch)))

    ctx, ctx_lens = pack(masks_enc)
    tgt, tgt_lens = pack(masks_pred)
    return StepMasks.from_mask_set(MaskSet(ctx, ctx_lens, tgt, tgt_lens, num_generators=len(masks_enc),
                                           batch_size=batch, num_tokens=num_tokens))


def stripped_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict without the wrappers' `backbone.` / DDP's `module.` prefixes, as CPU copies (ours
    loads it strictly: the parity tests pin that the layouts agree)."""
    return {k: v.detach().cpu().clone() for k, v in _make_fixtures().stripped(module.state_dict().items()).items()}


# --------------------------------------------------------------------------------------------------------------------
# the step


class ReferenceTrainer:
    """The reference's models, optimizer, schedulers, scaler and momentum generator for `cfg` on `device`, and its
    per-iteration step (see the module docstring for what is rebuilt)."""

    def __init__(self, ref: SimpleNamespace, cfg: Any, device: torch.device, *, seed: int,
                 initial_state: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None) -> None:
        self.ref, self.cfg, self.device = ref, cfg, device
        torch.manual_seed(seed)
        self.encoder, self.predictor = build_reference_models(ref, cfg, device)
        if initial_state is not None:  # the same start for every run of a comparison
            self.encoder.backbone.load_state_dict(initial_state[0])
            self.predictor.backbone.load_state_dict(initial_state[1])
        self.target_encoder = copy.deepcopy(self.encoder)
        for p in self.target_encoder.parameters():
            p.requires_grad = False
        self.dtype, self.mixed_precision = reference_dtype(cfg, device)
        o = cfg.optimization
        self.optimizer, self.scaler, self.lr_sched, self.wd_sched = ref.utils.init_opt(
            encoder=self.encoder, predictor=self.predictor, wd=o.weight_decay, final_wd=o.final_weight_decay,
            start_lr=o.start_lr, ref_lr=o.lr, final_lr=o.final_lr, iterations_per_epoch=o.ipe, warmup=o.warmup,
            num_epochs=o.epochs, ipe_scale=o.ipe_scale, mixed_precision=self.mixed_precision, betas=tuple(o.betas),
            eps=o.eps)
        self.momentum = iter(ref.momentum_values(o.ema, o.ipe, o.epochs, o.ipe_scale))
        self.loss_exp, self.reg_coeff = cfg.loss.loss_exp, cfg.loss.reg_coeff
        self.last_stats: dict[str, Any] | None = None

    def _train_step(self, clips: torch.Tensor, masks_enc: list[torch.Tensor], masks_pred: list[torch.Tensor],
                    clip_grad: float | None, loggers: bool) -> tuple:
        """One iteration of the reference's algorithm on its modules, in the order its closure runs it (the module
        docstring lists each part); with `loggers`, also its gradient / optimizer loggers and the host reads of the
        losses. Returns (loss, prediction loss, regulariser, lr, wd, encoder grad stats, predictor grad stats,
        optimizer stats): floats with `loggers`, else the loss stays a device tensor."""
        ref = self.ref
        lr, wd = self.lr_sched.step(), self.wd_sched.step()
        generators = len(masks_pred)

        with autocast(self.dtype, self.mixed_precision):
            # targets: the EMA encoder on the whole clip, layer norm without affine, then each generator's rows
            with torch.no_grad():
                full = self.target_encoder(clips)
                targets = ref.apply_masks(F.layer_norm(full, (full.size(-1),)), masks_pred, concat=False)
            # predictions: the context encoder once per generator (inside its wrapper), then the predictor
            predictions = self.predictor(self.encoder(clips, masks_enc), targets, masks_enc, masks_pred)
            # prediction loss: per generator mean |p - t|^e / e, summed from 0. and divided by the generator count
            per_generator = [torch.mean(torch.abs(p - t) ** self.loss_exp) / self.loss_exp
                             for p, t in zip(predictions, targets)]
            prediction_loss = sum(per_generator, 0.) / generators
            # the variance regulariser, computed every step whatever its weight
            spread = sum([torch.sqrt(p.var(dim=1) + 0.0001) for p in predictions]) / len(predictions)
            regulariser = torch.mean(F.relu(1. - spread))
        loss = prediction_loss + self.reg_coeff * regulariser

        # backward (scaled under mixed precision, then unscaled for clipping), per-network clipping, optimizer step
        if self.mixed_precision:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        norms = (0., 0.)
        if clip_grad is not None:  # the reference clips after its warmup epochs; the caller decides
            norms = tuple(torch.nn.utils.clip_grad_norm_(net.parameters(), clip_grad)
                          for net in (self.encoder, self.predictor))
        if self.mixed_precision:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        stats = [None, None, None]
        if loggers:  # one host read per weight matrix and per clip norm
            for i, (net, norm) in enumerate(zip((self.encoder, self.predictor), norms)):
                stats[i] = ref.logging.grad_logger(net.named_parameters())
                stats[i].global_norm = float(norm)
        self.optimizer.zero_grad()
        if loggers:  # the optimizer's state dict and two host reads per parameter
            stats[2] = ref.logging.adamw_logger(self.optimizer)

        # EMA of the target, one parameter at a time with a temporary for (1 - m) * online, as the reference
        m = next(self.momentum)
        with torch.no_grad():
            for online, target in zip(self.encoder.parameters(), self.target_encoder.parameters()):
                target.data.mul_(m).add_(online.detach().data * (1. - m))

        if loggers:
            return (float(loss), float(prediction_loss), float(regulariser), lr, wd, *stats)
        return loss.detach(), prediction_loss, regulariser, lr, wd, None, None, None

    def step(self, clips: torch.Tensor, masks_enc: list[torch.Tensor], masks_pred: list[torch.Tensor], *,
             clip_grad: float | None, loggers: bool) -> Any:
        """One iteration: masks to the device (non_blocking, as load_clips), the step, and with `loggers` the
        per-iteration reads train.py's loop does around it. Returns the loss (a float with loggers, else a device
        tensor: no host sync)."""
        masks_enc = [m.to(self.device, non_blocking=True) for m in masks_enc]
        masks_pred = [m.to(self.device, non_blocking=True) for m in masks_pred]
        if not loggers:
            return self._train_step(clips, masks_enc, masks_pred, clip_grad, False)[0]
        with warnings.catch_warnings():  # its float(loss) of a tensor that requires grad warns on every step
            warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
            result, gpu_ms = self.ref.logging.gpu_timer(
                lambda: self._train_step(clips, masks_enc, masks_pred, clip_grad, True))
        all_reduce = self.ref.distributed.AllReduce
        input_var = float(all_reduce.apply(clips.view(clips.shape[0], -1).var(dim=1).mean(dim=0)))
        input_var_min = float(all_reduce.apply(torch.min(clips.view(clips.shape[0], -1).var(dim=1))))
        self.last_stats = {"gpu_ms": gpu_ms, "input_var": input_var, "input_var_min": input_var_min}
        return result[0]



def reference_eval_encoder(ref: SimpleNamespace, cfg: Any, device: torch.device, *, seed: int,
                           state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The reference's bare encoder (its VisionTransformer, as its frozen evaluation builds it by name) for `cfg`,
    frozen, on `device`, with `state` when given. Built by `init_video_model` so that its weights and
    initialisation are the training ones; the predictor is dropped."""
    torch.manual_seed(seed)
    encoder, predictor = build_reference_models(ref, cfg, device)
    del predictor
    encoder = encoder.backbone
    if state is not None:
        encoder.load_state_dict(state)
    return encoder.requires_grad_(False).eval()


@torch.no_grad()
def reference_eval_forward(encoder: nn.Module, clips: torch.Tensor, cfg: Any) -> torch.Tensor:
    """The frozen encoder's dense forward as the reference's evaluation runs it: no grad, all N tokens of every
    clip, under autocast in the config's dtype on a GPU (float32 on a CPU): (B, N, D)."""
    with autocast(*reference_dtype(cfg, clips.device)):
        return encoder(clips)
