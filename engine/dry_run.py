"""`train.py --config X.json --dry-run`: what a config costs, before any data, GPU or process group is touched.

Parameters come from the real modules built on the meta device (no storage); FLOPs per clip from the real mask
sampler fed to engine/flops.py; the memory figures are an estimate per GPU; the global batch is checked against
the recipe the config describes (`nodes * tasks_per_node * batch_size`, spec 4.1). The launch's world size is 1 with
meta.backend=torch, else WORLD_SIZE (set by the deepspeed launcher) or, without it, the recipe's
`nodes * tasks_per_node`.

Saved activations per token of one block (models/blocks.py, pre-LN) under bf16 autocast with flash/varlen attention
(no L^2 term), width d, MLP hidden h, heads a. Autocast runs LayerNorm in fp32, so each LN saves an fp32 copy of
its input whatever the residual's dtype, and the next Linear saves the bf16 cast of its output:
    LN1 input (fp32) 4d | qkv input (bf16) 2d | q, k, v (bf16) 6d | attention output (bf16) 2d, which proj's input
    is a view of | logsumexp (fp32) 4a | LN2 input (fp32) 4d | fc1 input (bf16) 2d | GELU input (bf16) 2h |
    fc2 input (bf16) 2h | mean + rstd of both LNs (fp32) 16
    => 20d + 4h + 4a + 16 bytes; h = 4d gives 36d + 4a + 16: Megatron's 34d ("Reducing Activation Recomputation")
       less its two dropout masks (2d; dropout is 0 here) plus 4d because the LN inputs are fp32, not 16-bit.
With every block checkpointed only block inputs stay (the encoder's bf16 residual 2d, the predictor's fp32 one 4d)
plus one block's full set while it is recomputed.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
from torch import nn

from .build import build_encoder, build_predictor
from .config import Config
from .disk_space import checkpoint_bytes
from .flops import TransformerDims, step_flops
from .packed_masks import MaskMaker

PEAK_FLOPS = 790e12  # performance_anchors.md (header and section 0): measured dense bf16 GEMM peak of one H100
MFU = 0.5
GPU_BYTES = 81559 * 2**20  # H100 80GB HBM3 as nvidia-smi reports it
MASK_STEPS = 20  # the box size changes with the step (spec 3.2): average the sampler over this many steps
GIB = 2**30


@dataclass(frozen=True)
class MaskMode:
    """One mask mode averaged over MASK_STEPS sampled steps; FLOPs per clip in engine/flops.py's convention."""

    flops: tuple[float, float, float]  # target forward, context encoder fwd+bwd, predictor fwd+bwd, per clip
    context_tokens: tuple[float, ...]  # mean context tokens per clip, one per mask generator

    @property
    def flops_per_clip(self) -> float:
        return sum(self.flops)

    @property
    def clips_per_s(self) -> float:
        """Per GPU at MFU of PEAK_FLOPS."""
        return MFU * PEAK_FLOPS / self.flops_per_clip


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU. Model states follow the ZeRO stage; the rest is one micro-batch in packed mode."""

    weights: int  # fp32 encoder + predictor (ZeRO-3: / world)
    target: int  # fp32 target encoder: outside the DeepSpeed engine, so ZeRO never partitions it
    grads: int  # fp32 (ZeRO-2/3: / world)
    optimizer: int  # AdamW exp_avg + exp_avg_sq in fp32 (ZeRO-1/2/3: / world)
    zero_buffers: int  # ZeRO-1/2: DeepSpeed's fp32 master-partition clone (even of fp32 models) + reduce bucket
    weight_casts: int  # bf16 copies of the trained weights made by autocast and saved for backward
    other: int  # clips, target features, encoder final norm, predictor in/out projections
    blocks: int  # saved block activations, no checkpointing
    blocks_checkpointed: int  # every block checkpointed: block inputs + one block being recomputed
    blocks_configured: int  # the config's model.activation_checkpointing = k: blocks 0, k, 2k, ... checkpointed
    target_transient: int  # target encoder's no-grad peak, before anything is saved: not added to the others

    @property
    def model_states(self) -> int:
        return self.weights + self.target + self.grads + self.optimizer

    def total(self, checkpointed: bool | None = False) -> int:
        """Without checkpointing, with every block checkpointed (True), or as configured (None)."""
        saved = {False: self.blocks, True: self.blocks_checkpointed, None: self.blocks_configured}[checkpointed]
        return self.model_states + max(self.target_transient, self.zero_buffers + self.weight_casts + self.other
                                       + saved)


@dataclass(frozen=True)
class ModelShape:
    """The built modules' shapes and parameter counts (trainable; `*_total` adds the frozen position tables)."""

    name: str
    encoder: TransformerDims
    encoder_heads: int
    predictor: TransformerDims
    predictor_heads: int
    encoder_params: int  # the published counts (spec 1.1) leave the frozen position table out
    encoder_total: int
    predictor_params: int
    predictor_total: int
    patch_features: int  # inputs per tubelet, C * t * p * p

    @property
    def trained_params(self) -> int:
        return self.encoder_params + self.predictor_params


@dataclass(frozen=True)
class DryRun:
    model: ModelShape
    grid: tuple[int, int, int]
    batch_size: int  # clips per GPU
    packed: MaskMode  # every kept token (this engine's default)
    truncated: MaskMode  # truncate_to_batch_min on every generator (the reference)
    world_size: int
    zero_stage: int
    memory: Memory
    recipe_batch: int  # nodes * tasks_per_node * batch_size: what the recipe's lr was tuned for
    global_batch: int  # world_size * batch_size * accumulation: what this launch trains with
    accumulation: int
    warnings: tuple[str, ...]
    activation_checkpointing: int = 0  # the config's model.activation_checkpointing
    checkpoint_bytes: int = 0  # one checkpoint on the disk (engine/disk_space.py)
    keep_last: int = 2  # the config's logging.keep_last
    deepspeed: bool = False  # the launch trains under DeepSpeed

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


def block_activation_bytes(dim: int, hidden: int, heads: int) -> int:
    """Saved bytes per token of one block, bf16 autocast, flash attention (derivation in the module doc)."""
    return 20 * dim + 4 * hidden + 4 * heads + 16


def uses_deepspeed(cfg: Config) -> bool:
    """The deepspeed section applies unless the torch backend is forced (auto: what a deepspeed launch runs)."""
    return cfg.deepspeed is not None and cfg.meta.backend != "torch"


def zero_stage(cfg: Config) -> int:
    return int((cfg.deepspeed or {}).get("zero_optimization", {}).get("stage", 0)) if uses_deepspeed(cfg) else 0


def launch_world_size(cfg: Config) -> int:
    """1 for the torch backend (one process); else the launcher's WORLD_SIZE, or the recipe's GPUs without one."""
    if cfg.meta.backend == "torch":
        return 1
    return int(os.environ.get("WORLD_SIZE") or cfg.nodes * cfg.tasks_per_node)


def model_shape(cfg: Config) -> ModelShape:
    with torch.device("meta"):  # shapes without storage: ViT-H/384 allocates nothing
        encoder, predictor = build_encoder(cfg), build_predictor(cfg)

    def dims(blocks: nn.ModuleList) -> TransformerDims:
        fc1 = blocks[0].mlp.fc1  # read from the built module, so the report follows models/, not a copy of its rules
        return TransformerDims(fc1.in_features, len(blocks), fc1.out_features)

    def count(module: nn.Module, trainable: bool) -> int:
        return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)

    return ModelShape(cfg.model.model_name, dims(encoder.blocks), encoder.blocks[0].attn.num_heads,
                      dims(predictor.predictor_blocks), predictor.predictor_blocks[0].attn.num_heads,
                      count(encoder, True), count(encoder, False), count(predictor, True), count(predictor, False),
                      encoder.patch_embed.proj.weight[0].numel())


def _sample(cfg: Config, truncate: bool, m: ModelShape) -> tuple[MaskMode, tuple[int, int, int]]:
    """Mean FLOPs and tokens per clip, and the largest step's (context, predictor, target) token totals."""
    gens = [dataclasses.replace(g, truncate_to_batch_min=truncate) for g in cfg.mask]
    make = MaskMaker(gens, cfg.grid, cfg.meta.seed, cfg.data.mask_type)
    b, n = cfg.data.batch_size, len(gens)
    parts, ctx, peak = [0, 0, 0], [0] * n, (0, 0, 0)
    for step in range(MASK_STEPS):
        masks = make(step, step * b, b)
        c, t = masks.context_packing.seqlens, masks.target_packing.seqlens
        f = step_flops(cfg.num_tokens, b, c, t, m.encoder, m.predictor, m.patch_features)
        parts = [parts[0] + f.target, parts[1] + f.context, parts[2] + f.predictor]
        ctx = [ctx[g] + sum(c[g * b:(g + 1) * b]) for g in range(n)]
        peak = max(peak, (sum(c), sum(c) + sum(t), sum(t)))
    clips = MASK_STEPS * b
    return MaskMode(tuple(p / clips for p in parts), tuple(x / clips for x in ctx)), peak


def memory_estimate(cfg: Config, m: ModelShape, world: int, stage: int, tokens: tuple[int, int, int]) -> Memory:
    """Per-GPU bytes for `tokens` = (context, predictor, target) token totals of one micro-batch."""
    enc, pred, d, trained = m.encoder, m.predictor, cfg.data, m.trained_params
    zero = (cfg.deepspeed or {}).get("zero_optimization", {})
    buffers = 0
    if stage in (1, 2):  # DeepSpeed's defaults: a 5e8-element bucket, contiguous_gradients on, overlap_comm off
        bucket = int(zero.get("reduce_bucket_size", 5e8)) * (2 if zero.get("overlap_comm", False) else 1)
        buffers = 4 * trained // world + (4 * bucket if zero.get("contiguous_gradients", True) else 0)
    elif stage == 3:  # fp32 master partitions, the reduce bucket and the prefetched (gathered) parameters
        buffers = 4 * trained // world + 4 * int(zero.get("reduce_bucket_size", 5e8)) + 4 * int(
            zero.get("stage3_prefetch_bucket_size", 5e7))
    ctx, pred_tokens, tgt = tokens
    per_enc = block_activation_bytes(enc.dim, enc.mlp_hidden, m.encoder_heads)
    per_pred = block_activation_bytes(pred.dim, pred.mlp_hidden, m.predictor_heads)
    b, n = d.batch_size, cfg.num_tokens
    return Memory(
        weights=4 * (m.encoder_total + m.predictor_total) // (world if stage >= 3 else 1),
        target=4 * m.encoder_total // (world if stage >= 3 else 1),  # ZeRO-3 partitions it with the encoder
        grads=4 * trained // (world if stage >= 2 else 1),
        optimizer=8 * trained // (world if stage >= 1 else 1),
        zero_buffers=buffers,
        weight_casts=2 * trained,
        # fp32 clips; bf16 target features (B, N, D) kept for the loss; per context token the encoder's final LN
        # input (fp32) and the predictor embedding's bf16 input; per target token the predictor's norm and
        # projection inputs and the prediction
        other=4 * b * 3 * d.num_frames * d.crop_size ** 2 + 2 * b * n * enc.dim + 6 * ctx * enc.dim
        + tgt * (6 * pred.dim + 2 * enc.dim),
        blocks=enc.depth * ctx * per_enc + pred.depth * pred_tokens * per_pred,
        blocks_checkpointed=enc.depth * ctx * 2 * enc.dim + pred.depth * pred_tokens * 4 * pred.dim
        + max(ctx * per_enc, pred_tokens * per_pred),
        blocks_configured=_configured_blocks(cfg.model.activation_checkpointing,
                                             (enc.depth, ctx, 2 * enc.dim, per_enc),
                                             (pred.depth, pred_tokens, 4 * pred.dim, per_pred)),
        # no grad: at the peak only the bf16 residual and the MLP hidden before and after GELU are alive
        target_transient=b * n * (2 * enc.dim + 4 * enc.mlp_hidden),
    )


def _configured_blocks(every: int, enc: tuple[int, int, int, int], pred: tuple[int, int, int, int]) -> int:
    """Saved block bytes of encoder and predictor, each `(depth, tokens, input bytes, block bytes)` per token, when
    blocks 0, k, 2k, ... keep only their input (models.blocks.run_blocks); plus one checkpointed block's activations
    while backward recomputes it (one at a time)."""
    if every == 0:
        return sum(depth * tokens * block for depth, tokens, _, block in (enc, pred))
    saved = recompute = 0
    for depth, tokens, inputs, block in (enc, pred):
        checkpointed = -(-depth // every)
        saved += tokens * (checkpointed * inputs + (depth - checkpointed) * block)
        recompute = max(recompute, tokens * block)
    return saved + recompute


def dry_run_report(cfg: Config, world_size: int | None = None) -> DryRun:
    world = launch_world_size(cfg) if world_size is None else world_size
    m, stage, b = model_shape(cfg), zero_stage(cfg), cfg.data.batch_size
    packed, peak = _sample(cfg, False, m)
    truncated, _ = _sample(cfg, True, m)
    ds = cfg.deepspeed or {}
    accum = cfg.accumulation_steps
    recipe, actual = cfg.nodes * cfg.tasks_per_node * b, world * b * accum
    warnings = []
    if actual != recipe:
        o, ratio = cfg.optimization, actual / recipe
        warnings.append(
            f"global batch {actual} (world {world} x {b}/GPU x accumulation {accum}) differs from the recipe's "
            f"{recipe} (nodes {cfg.nodes} x tasks_per_node {cfg.tasks_per_node} x {b}); linear lr scaling "
            f"(x{ratio:.4g}) would give --optimization.lr={o.lr * ratio:.4g} "
            f"--optimization.start_lr={o.start_lr * ratio:.4g} --optimization.final_lr={o.final_lr * ratio:.4g}. "
            "The engine does not rescale the lr automatically.")
    if uses_deepspeed(cfg) and ds.get("train_micro_batch_size_per_gpu", b) != b:
        warnings.append(f"deepspeed.train_micro_batch_size_per_gpu {ds['train_micro_batch_size_per_gpu']} != "
                        f"data.batch_size {b}: the loader uses data.batch_size")
    return DryRun(m, cfg.grid, b, packed, truncated, world, stage, memory_estimate(cfg, m, world, stage, peak),
                  recipe, actual, accum, tuple(warnings), cfg.model.activation_checkpointing,
                  checkpoint_bytes(m.encoder_total, m.predictor_total, m.trained_params, uses_deepspeed(cfg)),
                  cfg.logging.keep_last, uses_deepspeed(cfg))


def format_report(r: DryRun) -> str:
    m, mem, stage = r.model, r.memory, r.zero_stage
    enc, pred, (t, h, w) = m.encoder, m.predictor, r.grid
    per_world = {s: "/ world" if stage >= s else "" for s in (1, 2, 3)}

    def gib(x: float, note: str = "") -> str:
        return f"{x / GIB:8.2f} GiB{'  ' + note if note else ''}"

    def params(trained: int, total: int) -> str:
        return f"{trained / 1e6:9.2f} M  (+{(total - trained) / 1e6:.2f} M frozen position table)"

    lines = [
        "Model",
        f"  encoder          {m.name}: width {enc.dim}, depth {enc.depth}, heads {m.encoder_heads}, "
        f"MLP {enc.mlp_hidden}",
        f"  predictor        width {pred.dim}, depth {pred.depth}, heads {m.predictor_heads}, MLP {pred.mlp_hidden}",
        f"  tokens per clip  {r.num_tokens} (grid {t} x {h} x {w}), {r.batch_size} clips per GPU",
        "Parameters (trained)",
        f"  encoder          {params(m.encoder_params, m.encoder_total)}",
        f"  predictor        {params(m.predictor_params, m.predictor_total)}",
        f"  target encoder   {params(m.encoder_params, m.encoder_total)}, EMA of the encoder: not trained",
        f"  trained total    {m.trained_params / 1e6:9.2f} M",
        f"Model FLOPs per clip (fwd + bwd = 3 x fwd, engine/flops.py; mean of {MASK_STEPS} steps of the mask sampler)",
        f"  {'mode':<16}{'TFLOP/clip':>11}{'target':>8}{'context':>9}{'predictor':>10}{'clips/s/GPU':>13}"
        "   context tokens per clip, per generator",
    ]
    for name, mode in (("packed (ours)", r.packed), ("truncated (ref)", r.truncated)):
        tf = [x / 1e12 for x in (mode.flops_per_clip, *mode.flops)]
        ctx = " / ".join(f"{v:.0f} ({v / r.num_tokens:.0%})" for v in mode.context_tokens)
        lines.append(f"  {name:<16}{tf[0]:11.2f}{tf[1]:8.2f}{tf[2]:9.2f}{tf[3]:10.2f}{mode.clips_per_s:13.1f}   {ctx}")
    fits = ["fits" if mem.total(c) <= GPU_BYTES else "does NOT fit" for c in (False, True)]
    lines += [
        f"  clips/s/GPU at {MFU:.0%} MFU of {PEAK_FLOPS / 1e12:.0f} TFLOP/s (measured H100 dense bf16, "
        "performance_anchors.md)",
        f"Memory per GPU, world {r.world_size}, ZeRO stage {stage} (estimate: no fragmentation, workspaces, NCCL)",
        f"  fp32 weights, encoder + predictor   {gib(mem.weights, per_world[3])}",
        f"  fp32 target encoder                 "
        f"{gib(mem.target, per_world[3] + ', partitioned with the encoder' if stage >= 3 else 'whole on every GPU')}",
        f"  fp32 gradients                      {gib(mem.grads, per_world[2])}",
        f"  AdamW exp_avg + exp_avg_sq, fp32    {gib(mem.optimizer, per_world[1])}",
        f"  model states                        {gib(mem.model_states)}",
        f"  ZeRO fp32 master clone, buckets     {gib(mem.zero_buffers)}",
        f"  bf16 weight copies (autocast)       {gib(mem.weight_casts)}",
        f"  clips, target features, heads       {gib(mem.other)}",
        f"  block activations                   {gib(mem.blocks)}   every block checkpointed "
        f"{gib(mem.blocks_checkpointed)}",
        f"  target encoder no-grad peak         {gib(mem.target_transient, 'before the context pass: not added')}",
        f"  total                               {gib(mem.total())}   every block checkpointed {gib(mem.total(True))}",
        f"  total as configured                 {gib(mem.total(None))}   (model.activation_checkpointing="
        f"{r.activation_checkpointing})",
        f"  blocks: (20d + 4h + 4 heads + 16) B per token and block = "
        f"{block_activation_bytes(enc.dim, enc.mlp_hidden, m.encoder_heads)} encoder, "
        f"{block_activation_bytes(pred.dim, pred.mlp_hidden, m.predictor_heads)} predictor,",
        f"  over the packed tokens of the largest of {MASK_STEPS} sampled steps (truncation only removes tokens)",
        f"  80 GB H100 ({GPU_BYTES / GIB:.1f} GiB): {fits[0]} without checkpointing, {fits[1]} with every block "
        "checkpointed",
        f"Checkpoints ({'DeepSpeed' if r.deepspeed else 'PyTorch backend'}: fp32 weights of encoder, "
        "predictor and target, AdamW state; engine/disk_space.py)",
        f"  each {r.checkpoint_bytes / 1e9:.1f} GB; logging.keep_last={r.keep_last} plus the one being written: "
        f"{(r.keep_last + 1) * r.checkpoint_bytes / 1e9:.1f} GB in the run folder at a save",
        "Global batch",
        f"  recipe (nodes x tasks_per_node x batch)      {r.recipe_batch}",
        f"  this launch (world x batch x accumulation)   {r.world_size} x {r.batch_size} x {r.accumulation} = "
        f"{r.global_batch}",
        *(f"  warning: {w}" for w in r.warnings),
    ]
    return "\n".join(lines)


def main(cfg: Config, config_path: str | None = None) -> int:
    """Print the report once per launch: rank 0 only under the deepspeed launcher."""
    report = format_report(dry_run_report(cfg))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"V-JEPA dry run of {config_path or 'the defaults'}: no data, no GPU, no process group\n{report}")
    return 0
