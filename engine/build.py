"""Config -> models: the encoder (context and EMA target share its construction) and the predictor."""

from __future__ import annotations

import dataclasses

from models import VARIANTS, Predictor, Variant, VisionTransformer
from models.blocks import compile_blocks

from .config import Config


def encoder_variant(cfg: Config) -> Variant:
    """The named variant with the config's optional width/depth/heads overrides applied."""
    m = cfg.model
    base = VARIANTS[m.model_name]
    return dataclasses.replace(base, dim=m.embed_dim or base.dim, depth=m.depth or base.depth,
                               heads=m.num_heads or base.heads)


def build_encoder(cfg: Config) -> VisionTransformer:
    d, m = cfg.data, cfg.model
    encoder = VisionTransformer(encoder_variant(cfg), img_size=d.crop_size, num_frames=d.num_frames,
                                patch_size=d.patch_size, tubelet_size=d.tubelet_size, uniform_power=m.uniform_power,
                                rescale_init_by_depth=m.rescale_init_by_depth)
    encoder.checkpoint_every = m.activation_checkpointing  # the target encoder runs without grad: never recomputes
    if m.compile:
        compile_blocks(encoder)
    return encoder


def build_predictor(cfg: Config) -> Predictor:
    m = cfg.model
    variant = encoder_variant(cfg)
    # V1: the predictor uses the encoder's head count (16 -> head dim 24 at width 384); V2 sets pred_num_heads 12
    predictor = Predictor(variant.dim, cfg.grid, pred_dim=m.pred_embed_dim, depth=m.pred_depth,
                          num_heads=m.pred_num_heads or variant.heads, num_mask_tokens=len(cfg.mask),
                          uniform_power=m.uniform_power, zero_init_mask_tokens=m.zero_init_mask_tokens,
                          rescale_init_by_depth=m.rescale_init_by_depth)
    predictor.checkpoint_every = m.activation_checkpointing
    if m.compile:
        compile_blocks(predictor)
    return predictor
