"""Optimizer backends behind one small interface: plain PyTorch, or DeepSpeed when launched by `deepspeed`.

Both use AdamW with the reference's four parameter groups (spec 4.3): weights of the encoder, of the predictor
(weight-decayed; this includes the patch-embed kernel and the 3-D mask tokens), then their biases and 1-D gains
(no weight decay). The reference clips the encoder and the predictor separately at `clip_grad`, only after warmup.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from kernels import ema_

from . import ds_checkpoint, zero3
from .config import Config, ConfigError


T = TypeVar("T")


def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target = m * target + (1 - m) * online for every parameter (the frozen position table included), one
    multi-tensor launch of the Triton kernel."""
    ema_(list(target.parameters()), list(online.parameters()), momentum)


def param_groups(encoder: nn.Module, predictor: nn.Module) -> list[dict[str, Any]]:
    def split(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        decay, no_decay = [], []
        for name, p in module.named_parameters():
            (no_decay if ("bias" in name or p.ndim == 1) else decay).append(p)
        return decay, no_decay

    enc_decay, enc_no = split(encoder)
    pred_decay, pred_no = split(predictor)
    # frozen position tables sit in the decayed groups as in the reference; they never get a gradient
    return [{"params": enc_decay}, {"params": pred_decay},
            {"params": enc_no, "WD_exclude": True, "weight_decay": 0.0},
            {"params": pred_no, "WD_exclude": True, "weight_decay": 0.0}]


def _adamw(encoder: nn.Module, predictor: nn.Module, cfg: Config) -> torch.optim.AdamW:
    o = cfg.optimization
    fused = torch.cuda.is_available() and next(encoder.parameters()).is_cuda  # one kernel per step on GPU
    return torch.optim.AdamW(param_groups(encoder, predictor), lr=o.start_lr, weight_decay=o.weight_decay,
                             betas=tuple(o.betas), eps=o.eps, fused=fused or None)


def keep_optimizer_implementation(optimizer: torch.optim.Optimizer) -> None:
    """After loading optimizer state: the implementation this run chose (`fused`, `foreach`, `capturable`, as built)
    and the step counters where it reads them. torch's `load_state_dict` takes every group setting from the file, so a
    file written on the CPU (not fused) turns a GPU run's fused AdamW into the per-tensor one that reads its counters on
    the host; DeepSpeed's universal load copies the groups' settings but leaves each counter a CPU tensor, which the
    fused kernel refuses at the first step ("Expected all tensors to be on the same device ... state_steps")."""
    chosen = {key: optimizer.defaults[key] for key in ("fused", "foreach", "capturable") if key in optimizer.defaults}
    for group in optimizer.param_groups:
        group.update(chosen)
        if not (group.get("fused") or group.get("capturable")):
            continue  # the per-tensor path keeps its counters on the host, as torch's loader leaves them
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if torch.is_tensor(step):  # where torch's own loader puts it for these paths: fp32, beside the weights
                optimizer.state[p]["step"] = step.to(device=p.device, dtype=torch.float32)


class Backend:
    """What the step needs from an optimizer backend. A step is `accumulation_steps` micro-batches: `backward` on each
    whose loss is finite on every rank (its gradient is the micro-batch loss's over `accumulation_steps`, summed),
    then one `clip_and_step` at the boundary when at least one of them ran."""

    optimizer: torch.optim.Optimizer
    encoder: nn.Module
    predictor: nn.Module
    accumulation_steps: int

    def set_lr_wd(self, lr: float, wd: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if not group.get("WD_exclude", False):
                group["weight_decay"] = wd

    def run_forward(self, forward: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`forward(*args, **kwargs)`: the step's forward pass, through whatever the backend must wrap it in."""
        return forward(*args, **kwargs)

    def ema_update(self, target: nn.Module, online: nn.Module, momentum: float) -> None:
        ema_update(target, online, momentum)

    def backward(self, loss: torch.Tensor, *, boundary: bool = True) -> None:
        """Accumulate one micro-batch's gradient; `boundary`: it is the step's last micro-batch."""
        raise NotImplementedError

    def clip_and_step(self, clip_grad: float | None, *,
                      boundary_backward: bool = True) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Clip (per network, when `clip_grad`) and take the optimizer step; the two norms before clipping, when
        clipped. `boundary_backward=False`: the last micro-batch ran no backward (its loss was not finite)."""
        raise NotImplementedError


class TorchBackend(Backend):
    """AdamW on one process (or DDP-free ranks that never all-reduce: meta.backend=torch is single-GPU).

    Loss scaling: under fp16 autocast (meta.dtype=float16 on a GPU) the reference's GradScaler (initial scale 2^16,
    dynamic): a gradient of ~1e-8 (the loss's per-element weight at paper scale) is below fp16's range unless the
    loss is scaled first. The scale is removed before clipping, and a step whose gradients overflowed is skipped
    while the scale halves. bf16 has fp32's exponent range and needs none (the reference runs a scaler there too,
    which changes no number except skipping steps with non-finite gradients, which engine/faults.py does by the
    loss); fp32 and the CPU run none. `loss_scaling` overrides the choice (tests)."""

    def __init__(self, encoder: nn.Module, predictor: nn.Module, cfg: Config, *,
                 loss_scaling: bool | None = None) -> None:
        self.encoder, self.predictor = encoder, predictor
        self.optimizer = _adamw(encoder, predictor, cfg)
        self.accumulation_steps = cfg.accumulation_steps
        cuda = next(encoder.parameters()).is_cuda
        enabled = cfg.meta.dtype == "float16" and cuda if loss_scaling is None else loss_scaling
        self.scaler = torch.amp.GradScaler("cuda" if cuda else "cpu", enabled=enabled)

    def backward(self, loss: torch.Tensor, *, boundary: bool = True) -> None:
        # the mean over micro-batches, as DeepSpeed's engine.backward scales (exact for 1: no division)
        self.scaler.scale(loss if self.accumulation_steps == 1 else loss / self.accumulation_steps).backward()

    def clip_and_step(self, clip_grad: float | None, *,
                      boundary_backward: bool = True) -> tuple[torch.Tensor, torch.Tensor] | None:
        self.scaler.unscale_(self.optimizer)  # the clipping threshold is in unscaled units (a no-op without scaling)
        norms = None
        if clip_grad:
            norms = (torch.nn.utils.clip_grad_norm_(self.encoder.parameters(), clip_grad),
                     torch.nn.utils.clip_grad_norm_(self.predictor.parameters(), clip_grad))
        self.scaler.step(self.optimizer)  # skipped when a gradient overflowed; optimizer.step() without scaling
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return norms

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)
        keep_optimizer_implementation(self.optimizer)

    def state_dict(self) -> dict[str, Any]:
        state = {"encoder": self.encoder.state_dict(), "predictor": self.predictor.state_dict(),
                 "opt": self.optimizer.state_dict()}
        if self.scaler.is_enabled():  # the reference's key; its scale and growth tracker resume with the run
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.encoder.load_state_dict(state["encoder"])
        self.predictor.load_state_dict(state["predictor"])
        self.load_optimizer_state(state["opt"])
        if self.scaler.is_enabled() and state.get("scaler"):  # a run started in bf16 has none: the initial scale
            self.scaler.load_state_dict(state["scaler"])


BF16_NOTICE = ("notice: deepspeed.bf16.enabled: the encoder and predictor weights are bf16 (fp32 master copies in the "
               "optimizer), a deviation from the reference's fp32 weights under bf16 autocast; the target encoder "
               "stays fp32")


def check_deepspeed_config(ds_config: dict[str, Any]) -> tuple[int, bool]:
    """(ZeRO stage, bf16 weights) of a deepspeed config section, or a ConfigError for what the backend does not run."""
    zero = ds_config.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    if stage == 3 and ds_config.get("bf16", {}).get("enabled"):
        raise ConfigError("deepspeed.bf16 with ZeRO stage 3 would cast the target encoder, which stage 3 partitions "
                          "inside the engine, to bf16: use fp32 weights (the faithful default) or stage 2")
    if stage == 3 and (zero.get("offload_param") or zero.get("offload_optimizer")):
        raise ConfigError("ZeRO-3 offload (offload_param / offload_optimizer) is not supported: the target "
                          "encoder's EMA and the per-network clipping work on partitions in device memory; use stage 3 "
                          "without offload, or stage 1/2 with offload_optimizer")
    if ds_config.get("gradient_clipping"):
        raise ConfigError("deepspeed.gradient_clipping clips one global norm every step; the backend clips the "
                          "encoder and the predictor separately after warmup as the reference: set "
                          "optimization.clip_grad and leave gradient_clipping out (or 0)")
    if ds_config.get("managed_gradient_accumulation", True) is False:
        raise ConfigError("deepspeed.managed_gradient_accumulation=false: the step marks the accumulation boundary "
                          "itself (engine.set_gradient_accumulation_boundary, managed mode only): leave it out")
    if ds_config.get("fp16", {}).get("enabled"):
        raise ConfigError("deepspeed.fp16 is not supported (fp16 weights with loss scaling): use meta.dtype=bfloat16, "
                          "or meta.dtype=float16 with --meta.backend=torch (fp16 autocast over fp32 weights, loss "
                          "scaled)")
    bf16 = bool(ds_config.get("bf16", {}).get("enabled"))
    if bf16 and stage == 0:
        raise ConfigError("deepspeed.bf16 with ZeRO stage 0 runs DeepSpeed's FP16_UnfusedOptimizer, which takes a "
                          "zero-gradient AdamW step when it starts (Adam's step count then starts at 1 and weight decay "
                          "is applied once more): use ZeRO stage 1 or 2 for bf16 weights")
    if ds_config.get("torch_autocast", {}).get("enabled"):
        raise ConfigError("deepspeed.torch_autocast: the step runs its own torch.autocast (meta.dtype), with the "
                          "reference's fp32 exceptions, and DeepSpeed's would all-reduce Linear/Conv gradients in "
                          "bf16: leave it disabled")
    return stage, bf16


def _cast_floating_inputs(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook of the bf16-weight mode: floating tensors in the module's dtype (integer indices untouched)."""
    dtype = next(module.parameters()).dtype
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _gradient_shards(opt: Any) -> tuple[list[list[torch.Tensor]], bool, Any]:
    """Per optimizer param group, the gradient tensors this rank holds at the accumulation boundary (after the
    data-parallel reduction, before the step reads them), whether they are partitions (squared norms summed over
    ranks) and the data-parallel group."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    scale = getattr(opt, "loss_scale", 1.0)
    if scale != 1.0:
        raise RuntimeError(f"gradients carry a loss scale of {scale}: per-network clipping expects none")
    if isinstance(opt, DeepSpeedZeroOptimizer):  # stages 1 and 2: this rank's slice of every flattened group
        if opt.cpu_offload:  # copied into the fp32 partitions' .grad, asynchronously
            opt._wait_for_offload_copies()
            return [[p.grad] for p in opt.single_partition_of_fp32_groups], True, opt.dp_process_group
        groups = []
        for i in range(len(opt.bit16_groups)):
            grads = opt.averaged_gradients.get(i)
            if grads is None:
                raise RuntimeError(f"ZeRO holds no reduced gradients for param group {i}: clip after backward, at an "
                                   "accumulation boundary")
            flat = getattr(grads, "flat_partition", None)  # fp32 accumulation buffer: the slice's tensors view it
            groups.append([flat] if flat is not None else list(grads))
        return groups, True, opt.dp_process_group
    if isinstance(opt, BF16_Optimizer):  # bf16 weights, stage 1 with fp32 accumulation: whole fp32 gradients
        return [list(g) for g in opt.fp32_groups_gradients], False, None
    raise ConfigError(f"per-network clipping does not know DeepSpeed's {type(opt).__name__}")


def _sum_of_squares(grads: list[torch.Tensor], device: torch.device | str) -> torch.Tensor:
    """Sum of the squared elements (fp32) of tensors on one device or several, on `device`."""
    total = torch.zeros((), dtype=torch.float32, device=device)
    for same in _grouped(grads).values():
        norms = torch._foreach_norm([g.float() for g in same])  # no copy for fp32
        total = total + torch.stack(norms).square().sum().to(device)
    return total


def _grouped(tensors: list[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list[torch.Tensor]]:
    out: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        if t.numel():
            out.setdefault((t.device, t.dtype), []).append(t)
    return out


class OnlineModels(nn.Module):
    """The modules DeepSpeed manages, as the one nn.Module deepspeed.initialize takes. Its forward runs the step's
    forward function, so that engine.forward's bookkeeping and DeepSpeed's module hooks (ZeRO-3 gathers parameters
    in them) wrap the whole pass. The target encoder is a submodule under ZeRO-3 only (engine/zero3.py); at stages
    0-2 it stays outside, fp32 whatever the engine's precision, and out of the engine's checkpoint."""

    def __init__(self, encoder: nn.Module, predictor: nn.Module, target_encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder, self.predictor = encoder, predictor
        if target_encoder is not None:
            self.target_encoder = target_encoder

    def forward(self, forward: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return forward(*args, **kwargs)


class DeepSpeedBackend(Backend):
    """DeepSpeed engine over encoder + predictor with a torch AdamW (no fused_adam JIT build needed).

    Clipping, as the reference: the encoder's and the predictor's gradients are clipped separately at `clip_grad`
    (the rule of torch's clip_grad_norm_: scale by min(1, clip / (norm + 1e-6))) on the steps the loop passes
    `clip_grad` (after warmup), at the gradient-accumulation boundary, after the data-parallel reduction and before
    the optimizer step reads the gradients; the two norms are returned. DeepSpeed's own `gradient_clipping` (one
    global norm, every step) stays 0. Where the gradients are at that point, by DeepSpeed optimizer:
      * stage 0, fp32 weights (the torch AdamW itself): whole, in the parameters' .grad: clip_grad_norm_ per network.
      * stages 1 and 2 (DeepSpeedZeroOptimizer): ZeRO flattens every optimizer param group separately and each rank
        holds one contiguous slice of each: `averaged_gradients[group]`, the tensors of this rank's slice (views of
        the reduced .grad; one flat buffer when bf16 weights accumulate in fp32), or with optimizer offload the fp32
        partition's .grad. Squared norms of groups 0 + 2 (encoder: decayed, not decayed) and 1 + 3 (predictor) are
        summed over the slice, all-reduced once (2 floats) over the data-parallel group, and each network's slices
        are scaled in place; DeepSpeed's step then flattens them into the fp32 partition it updates.
      * bf16 weights, stage 1 with fp32 accumulation (BF16_Optimizer): whole fp32 gradients per group on every rank
        (all-reduced whole by the engine): no all-reduce of the norms.
      * stage 3 (DeepSpeedZeroOptimizer_Stage3): each trained parameter's fp32 gradient partition
        (`safe_get_local_grad`, a view of ZeRO's buffer without offload), squared norms summed per network, all-reduced,
        scaled in place. The target encoder is partitioned with the encoder and its EMA runs on the partitions
        (engine/zero3.py); fp32 weights only, no offload (refused otherwise).

    Precision (the reference: fp32 weights, forward under bf16 autocast, fp32 gradients all-reduced by DDP):
      * default, faithful (the recipes state it): `bf16.enabled` and `torch_autocast.enabled` false. Weights,
        gradients, their reduction and the AdamW states are fp32; autocast is engine/step.py's (meta.dtype, on GPU).
        DeepSpeed's `torch_autocast` is refused: the step already runs its own autocast with the reference's fp32
        exceptions, and DeepSpeed's would also all-reduce Linear/Conv weight gradients in bf16.
      * opt-in `bf16.enabled` true, ZeRO stage 1 or 2: DeepSpeed casts the encoder and predictor to bf16 and keeps
        fp32 master weights in its optimizer; gradients are bf16 and reduced in bf16 (accumulated in fp32 with
        `data_types.grad_accum_dtype` fp32). A deviation, announced by a one-line notice on rank 0. Floating inputs of
        the two modules are cast to bf16 (the CPU runs without autocast); the target encoder stays fp32 outside the
        engine and its EMA reads the bf16 weights; the loss is computed in fp32 as always. Stage 0 is refused with
        bf16: DeepSpeed's optimizer there (FP16_UnfusedOptimizer) takes a zero-gradient AdamW step at start.
      * `fp16.enabled` is refused: fp16 weights need loss scaling. So is meta.dtype=float16 (fp16 autocast): its
        gradients need a loss scale removed from the ZeRO partitions before the per-network clipping, which only the
        PyTorch backend (meta.backend=torch, torch.amp.GradScaler) does.
    """

    def __init__(self, encoder: nn.Module, predictor: nn.Module, cfg: Config, target_encoder: nn.Module) -> None:
        if cfg.meta.dtype == "float16":
            raise ConfigError("meta.dtype=float16 under DeepSpeed: fp16 autocast needs loss scaling, which only the "
                              "PyTorch backend applies (the reference's GradScaler); use meta.dtype=bfloat16 (the "
                              "recipes' choice, any GPU since A100) or --meta.backend=torch")
        try:
            import deepspeed
        except ImportError:
            raise ConfigError("the deepspeed backend needs the deepspeed package: pip install -e '.[deepspeed]' "
                              "(or run with plain python: meta.backend=torch)") from None
        self.encoder, self.predictor = encoder, predictor
        ds_config = dict(cfg.deepspeed or {})
        ds_config.setdefault("train_micro_batch_size_per_gpu", cfg.data.batch_size)
        ds_config.setdefault("gradient_accumulation_steps", 1)
        ds_config.pop("train_batch_size", None)  # inferred from the two above and the world size
        self.stage, self.bf16_weights = check_deepspeed_config(ds_config)
        self.accumulation_steps = int(ds_config["gradient_accumulation_steps"])
        ds_config["gradient_clipping"] = 0.0  # the backend clips, per network (see the class doc)
        if self.stage == 3:
            zero3.register_hidden_parameters([encoder, target_encoder], predictor)
        module = OnlineModels(encoder, predictor, target_encoder if self.stage == 3 else None)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=_adamw(encoder, predictor, cfg), config=ds_config)
        if self.bf16_weights:
            for module in (encoder, predictor):
                module.register_forward_pre_hook(_cast_floating_inputs)
            if self.engine.global_rank == 0:
                print(BF16_NOTICE, flush=True)

    def run_forward(self, forward: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self.engine(forward, *args, **kwargs)

    def ema_update(self, target: nn.Module, online: nn.Module, momentum: float) -> None:
        if self.stage == 3:
            zero3.ema_update_shards(target, online, momentum)
        else:
            ema_update(target, online, momentum)

    def backward(self, loss: torch.Tensor, *, boundary: bool = True) -> None:
        # The step sets the boundary itself (DeepSpeed's documented override) rather than letting the engine count
        # micro-steps: a micro-batch skipped for a non-finite loss runs no backward, and the engine's count would
        # then put the boundary (where ZeRO-1 and stage 0 reduce, and ZeRO-2/3 flush their buckets) on the wrong one.
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(loss)  # divides by gradient_accumulation_steps

    def clip_and_step(self, clip_grad: float | None, *,
                      boundary_backward: bool = True) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not boundary_backward:
            # The last micro-batch was skipped, but the reduction happens in the boundary's backward: run one whose
            # gradient is exactly zero for every trained parameter (they are finite), so every rank reduces what
            # the earlier micro-batches accumulated.
            params = [p for p in self.engine.module.parameters() if p.requires_grad]
            with zero3.gathered(params) if self.stage == 3 else contextlib.nullcontext():  # whole, for this rare pass
                zero = self.run_forward(lambda: torch.stack([p.sum() for p in params]).sum() * 0.0)
                self.backward(zero, boundary=True)
        norms = self._clip_per_network(clip_grad) if clip_grad else None
        self.engine.step()  # the optimizer step and zero_grad (the boundary is set)
        return norms

    def _clip_per_network(self, clip_grad: float) -> tuple[torch.Tensor, torch.Tensor]:
        opt = self.engine.optimizer
        if isinstance(opt, torch.optim.Optimizer):  # stage 0, fp32 weights: whole gradients on the parameters
            return (torch.nn.utils.clip_grad_norm_(self.encoder.parameters(), clip_grad),
                    torch.nn.utils.clip_grad_norm_(self.predictor.parameters(), clip_grad))
        import deepspeed.comm as dist
        from deepspeed.accelerator import get_accelerator

        if self.stage == 3:  # per-parameter partitions, all of them on every rank's list
            networks = (zero3.local_gradients(self.encoder), zero3.local_gradients(self.predictor))
            partitioned, dp_group = True, opt.dp_process_group
        else:
            groups, partitioned, dp_group = _gradient_shards(opt)
            if len(groups) != 4:
                raise RuntimeError(f"expected the 4 parameter groups of engine.backends.param_groups, found "
                                   f"{len(groups)}")
            networks = (groups[0] + groups[2], groups[1] + groups[3])  # encoder (decay, no decay), predictor
        device = get_accelerator().current_device_name()  # where the collective runs (offloaded partitions: CPU)
        squares = torch.stack([_sum_of_squares(grads, device) for grads in networks])
        if partitioned:
            dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=dp_group)
        norms = squares.sqrt()
        coefs = (clip_grad / (norms + 1e-6)).clamp(max=1.0)  # torch.nn.utils.clip_grad_norm_'s rule
        for grads, coef in zip(networks, coefs):
            for (where, dtype), same in _grouped(grads).items():
                torch._foreach_mul_(same, coef.to(device=where, dtype=dtype))
        return norms[0], norms[1]

    def save(self, folder: str, tag: str, client_state: dict[str, Any], keep_last: int, target: nn.Module) -> None:
        """Collective. `latest` names the tag only once every rank's files of it are flushed to the disk
        (ds_checkpoint.commit), so a partial tag is never resumed from; rank 0 then deletes all but the newest
        `keep_last` tags. The EMA target travels in the client state: whole
        at stages 0-2, each rank's partition in its own file under ZeRO-3."""
        from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

        targets = zero3.target_state(target) if self.stage == 3 else {"target_encoder": target.state_dict()}
        client_state = {**client_state, **targets, UNIVERSAL_CHECKPOINT_INFO: ds_checkpoint.universal_info()}
        try:
            self.engine.save_checkpoint(folder, tag=tag, client_state=client_state, save_latest=False)
        except OSError as e:  # a full disk, a quota, a lost mount: `latest` still names the last whole tag
            raise ds_checkpoint.write_error(folder, tag, self.engine.global_rank, e) from e
        ds_checkpoint.commit(folder, tag, self.engine.global_rank)  # `latest` once every rank's files are on disk
        if self.engine.global_rank == 0:
            ds_checkpoint.prune_tags(folder, keep_last)

    def load(self, folder: str, target: nn.Module) -> dict[str, Any] | None:
        """Load the latest tag (the EMA target included); its client state, or None without one. Collective. A
        ZeRO-1/2 tag written by another number of ranks goes through DeepSpeed's universal format
        (engine/ds_checkpoint.py); a ZeRO-3 one resumes only on the world size that wrote it."""
        client_state = self._load_engine(folder)
        if client_state is not None:
            keep_optimizer_implementation(self.engine.basic_optimizer)
            if self.stage == 3:
                zero3.load_target_state(target, client_state)
            else:
                target.load_state_dict(client_state["target_encoder"])
        return client_state

    def _load_engine(self, folder: str) -> dict[str, Any] | None:
        tag = ds_checkpoint.resume_tag(folder, self.engine.global_rank, warn=lambda w: print(w, flush=True),
                                       device=self.engine.device)
        if tag is None:
            return None
        saved = ds_checkpoint.saved_world_size(folder, tag)
        world = self.engine.world_size
        if not saved or saved == world:
            _, client_state = self.engine.load_checkpoint(folder, tag=tag)
            return client_state
        if self.stage == 3:
            raise ConfigError(f"the checkpoint {Path(folder) / tag} was written by {saved} ranks under ZeRO-3, which "
                              f"resumes only on the same number of ranks (this run has {world}): rerun with "
                              f"{saved} ranks, or resume on stage 2 from a stage-2 checkpoint")
        if self.engine.global_rank == 0:
            print(f"the checkpoint {tag} was written by {saved} ranks, this run has {world}: converting it to "
                  f"DeepSpeed's universal format", flush=True)
            ds_checkpoint.convert_to_universal(folder, tag)
        ds_checkpoint.barrier()
        # DeepSpeed reads this switch when loading; set for this load only (the saves stay ordinary).
        self.engine._config.load_universal_checkpoint = True
        try:
            _, client_state = self.engine.load_checkpoint(folder)
        finally:
            self.engine._config.load_universal_checkpoint = False
        return client_state
