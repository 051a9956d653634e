"""Parity with the reference implementation (facebookresearch/jepa, V-JEPA 1) on golden fixtures.

The fixtures in tests/fixtures/reference/ were produced by running the reference itself
(tests/fixtures/reference/make_fixtures.py, which imports it from a checkout); these tests read only the fixtures.
What is compared:

* the fixed sin-cos position tables of encoder and predictor (ours are computed, not loaded);
* encoder outputs, dense and on the reference's truncated context masks, and predictor outputs, with the
  reference's weights, fp32 on the CPU;
* one training step in truncation mode (spec 4.2) on the reference's clip and masks: the loss, every gradient
  before the optimizer step, the predictor after AdamW (4 parameter groups, one lr / wd) and the target encoder
  after the EMA update;
* the lr / wd / EMA-momentum schedules, every iteration up to the schedule horizon;
* the multiblock3d block sizes per step counter (spec 3.2-3.3: sizes depend only on the counter, so they must be
  identical). Block *locations* come from the reference's global torch RNG and from our per-sample generators by
  design (spec 3.3, engine/masks.py), so they are not compared: only that our sampled masks are unions of boxes of
  the reference's size, and that the lengths either side keeps after the batch-min truncation lie in the range that
  size implies.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.backends import TorchBackend
from engine.build import build_encoder, build_predictor
from engine.config import Config, MaskGeneratorConfig, OptimizationConfig, load_config
from engine.masks import MaskSet, block_size, sample_masks
from engine.packed_masks import StepMasks
from engine.schedules import Schedules
from engine.step import Models, train_step

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "reference"

# fp32 on the CPU, for values of order 1 (outputs, weights); the largest differences seen are listed in
# tests/fixtures/reference/README.md
TOL = {"atol": 1e-6, "rtol": 1e-5}
# Gradients: relative to each tensor's largest element. The encoder's are ~1e-5 at this initialisation (the
# predictor's output projection is small), so a fixed atol would hide any error in them.
GRAD_RTOL = 1e-5


@pytest.fixture(scope="module")
def step() -> dict[str, Any]:
    return torch.load(FIXTURES / "step.pt", weights_only=True)


@pytest.fixture(scope="module")
def outputs() -> dict[str, Any]:
    return torch.load(FIXTURES / "outputs.pt", weights_only=True)


def _config(c: dict[str, int], hyper: dict[str, Any]) -> Config:
    """Our config of the fixture's tiny model (the reference's two paper mask generators are the default)."""
    return load_config(None, [
        f"--data.crop_size={c['crop_size']}", f"--data.patch_size={c['patch_size']}",
        f"--data.num_frames={c['num_frames']}", f"--data.tubelet_size={c['tubelet_size']}",
        f"--data.batch_size={c['batch_size']}", "--model.model_name=vit_tiny", f"--model.embed_dim={c['embed_dim']}",
        f"--model.depth={c['depth']}", f"--model.num_heads={c['num_heads']}",
        f"--model.pred_embed_dim={c['pred_embed_dim']}", f"--model.pred_depth={c['pred_depth']}",
        f"--optimization.betas={list(hyper['betas'])}", f"--optimization.eps={hyper['eps']}",
        "--meta.dtype=float32"])


def _models(step: dict[str, Any]) -> tuple[Models, Config]:
    """Our encoder, predictor and target encoder (a copy of the encoder) with the reference's initial weights."""
    cfg = _config(step["config"], step["hyper"])
    encoder, predictor = build_encoder(cfg), build_predictor(cfg)
    encoder.load_state_dict(step["encoder"])
    predictor.load_state_dict(step["predictor"])
    return Models(encoder, predictor, copy.deepcopy(encoder).requires_grad_(False)), cfg


def _step_masks(context: list[torch.Tensor], target: list[torch.Tensor], num_tokens: int) -> StepMasks:
    """The reference's per-generator (B, K) index tensors as our packed masks: sequence s = g*B + b holds clip b's
    token ids offset by b*N (global ids), in the reference's (ascending) order."""
    batch = context[0].shape[0]
    offset = torch.arange(batch)[:, None] * num_tokens

    def pack(masks: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[int, ...]]:
        lengths = tuple(m.shape[1] for m in masks for _ in range(batch))
        return torch.cat([(m + offset).flatten() for m in masks]), lengths

    context_index, context_lens = pack(context)
    target_index, target_lens = pack(target)
    return StepMasks.from_mask_set(MaskSet(context_index, context_lens, target_index, target_lens,
                                           num_generators=len(context), batch_size=batch, num_tokens=num_tokens))


def _packed(per_generator: list[torch.Tensor]) -> torch.Tensor:
    """The reference's per-generator (B, K, D) outputs in our packed row order (generator, clip, token)."""
    return torch.cat([x.flatten(0, 1) for x in per_generator])


def test_position_tables_match_reference(step):
    """Computed by our constructors (uniform_power, columns beyond D dropped), not loaded."""
    cfg = _config(step["config"], step["hyper"])
    torch.testing.assert_close(build_encoder(cfg).pos_embed.detach(), step["encoder"]["pos_embed"], **TOL)
    torch.testing.assert_close(build_predictor(cfg).predictor_pos_embed.detach(),
                               step["predictor"]["predictor_pos_embed"], **TOL)


def test_encoder_outputs_match_reference(step, outputs):
    models, cfg = _models(step)
    masks = _step_masks(step["context_masks"], step["target_masks"], cfg.num_tokens)
    with torch.no_grad():
        dense = models.encoder.forward_dense(step["clip"])
        context = models.encoder(step["clip"], masks.context_index, masks.context_packing)
    torch.testing.assert_close(dense, outputs["dense"], **TOL)
    torch.testing.assert_close(context, _packed(outputs["context"]), **TOL)


def test_predictor_outputs_match_reference(step, outputs):
    """Fed the reference's context features, so the predictor is compared on its own."""
    models, cfg = _models(step)
    masks = _step_masks(step["context_masks"], step["target_masks"], cfg.num_tokens)
    with torch.no_grad():
        pred = models.predictor(_packed(outputs["context"]), masks.context_index, masks.target_index, masks.predictor)
    torch.testing.assert_close(pred, _packed(outputs["predictions"]), **TOL)


class _GradRecordingBackend(TorchBackend):
    """TorchBackend that keeps a copy of every gradient just before its optimizer step."""

    grads: dict[str, dict[str, torch.Tensor]]

    def clip_and_step(self, clip_grad: float | None, *, boundary_backward: bool = True) -> Any:
        self.grads = {name: {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
                      for name, module in (("encoder", self.encoder), ("predictor", self.predictor))}
        return super().clip_and_step(clip_grad, boundary_backward=boundary_backward)


def _assert_state_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], *,
                        scaled: bool = False) -> None:
    """Same names, and values within TOL (or, `scaled`, within GRAD_RTOL of the tensor's largest element)."""
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        tol = {"atol": GRAD_RTOL * value.abs().max().item(), "rtol": GRAD_RTOL} if scaled else TOL
        torch.testing.assert_close(actual[name], value, **tol, msg=lambda m, name=name: f"{name}: {m}")


def test_train_step_matches_reference(step):
    """Loss, gradients, AdamW step and EMA of one fp32 step in truncation mode (no clipping: inside the warmup)."""
    models, cfg = _models(step)
    backend = _GradRecordingBackend(models.encoder, models.predictor, cfg)
    masks = _step_masks(step["context_masks"], step["target_masks"], cfg.num_tokens)
    hyper = step["hyper"]
    out = train_step(models, backend, [(step["clip"], masks)], lr=hyper["lr"], wd=hyper["wd"],
                     momentum=hyper["momentum"], clip_grad=None, loss_exp=hyper["loss_exp"], dtype="float32")
    torch.testing.assert_close(out.loss, torch.tensor(step["loss"]), **TOL)
    _assert_state_close(backend.grads["encoder"], step["encoder_grads"], scaled=True)
    _assert_state_close(backend.grads["predictor"], step["predictor_grads"], scaled=True)
    _assert_state_close(models.predictor.state_dict(), step["predictor_after_step"])
    _assert_state_close(models.target_encoder.state_dict(), step["target_encoder_after_ema"])


def test_schedules_match_reference():
    ref = torch.load(FIXTURES / "schedules.pt", weights_only=True)
    c = ref["config"]
    schedules = Schedules.from_config(OptimizationConfig(
        ipe=c["ipe"], epochs=c["epochs"], warmup=c["warmup"], ipe_scale=c["ipe_scale"], start_lr=c["start_lr"],
        lr=c["ref_lr"], final_lr=c["final_lr"], weight_decay=c["wd"], final_weight_decay=c["final_wd"],
        ema=list(c["ema"])))
    ours = torch.tensor([schedules.at(i) for i in range(len(ref["lr"]))], dtype=torch.float64)
    expected = torch.stack([ref["lr"], ref["wd"], ref["momentum"]], dim=1)
    torch.testing.assert_close(ours, expected, atol=0.0, rtol=1e-14)


@pytest.fixture(scope="module")
def mask_fixture() -> dict[str, Any]:
    return torch.load(FIXTURES / "masks.pt", weights_only=True)


def _generators(fixture: dict[str, Any], truncate: bool) -> list[MaskGeneratorConfig]:
    return [MaskGeneratorConfig(num_blocks=g["num_blocks"], spatial_scale=list(g["spatial_scale"]),
                                temporal_scale=list(g["temporal_scale"]), aspect_ratio=list(g["aspect_ratio"]),
                                max_temporal_keep=g["max_temporal_keep"], max_keep=g["max_keep"],
                                truncate_to_batch_min=truncate) for g in fixture["generators"]]


def _grid(c: dict[str, int]) -> tuple[int, int, int]:
    return c["num_frames"] // c["tubelet_size"], c["crop_size"] // c["patch_size"], c["crop_size"] // c["patch_size"]


def test_block_sizes_match_reference(mask_fixture):
    grid = _grid(mask_fixture["config"])
    generators = _generators(mask_fixture, truncate=False)
    ours = [[block_size(counter, gen, grid) for gen in generators]
            for counter in range(mask_fixture["config"]["counters"])]
    assert torch.equal(torch.tensor(ours), mask_fixture["block_sizes"])


def _target_length_range(size: torch.Tensor, num_blocks: int, grid: tuple[int, int, int]) -> tuple[int, int]:
    """Fewest and most target tokens of one clip whose boxes of `size` span all tubelets: one box's area up to
    num_blocks disjoint boxes (at most the whole frame), times the tubelets."""
    t, h, w = size.tolist()
    assert t == grid[0]  # temporal scale 1: every box spans the clip
    return t * h * w, t * min(grid[1] * grid[2], num_blocks * h * w)


def _union_of_boxes(spatial: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Per (B, H', W') boolean mask: the union of all h x w boxes lying entirely inside it."""
    box = torch.ones(1, 1, h, w)
    inside = torch.nn.functional.conv2d(spatial[:, None].float(), box) == h * w
    return torch.nn.functional.conv_transpose2d(inside.float(), box)[:, 0] > 0


def test_sampled_masks_use_reference_block_sizes(mask_fixture):
    """Our masks for counter c are unions of boxes of the reference's size for counter c, tiled over time; the
    truncated lengths of both implementations lie in the range that size implies."""
    c = mask_fixture["config"]
    grid, batch = _grid(c), c["batch_size"]
    num_tokens = grid[0] * grid[1] * grid[2]
    full, truncated = _generators(mask_fixture, truncate=False), _generators(mask_fixture, truncate=True)
    for counter in range(c["counters"]):
        kwargs = {"step": counter, "seed": 0, "first_sample_index": counter * batch}
        ours_full = sample_masks(full, grid, batch, **kwargs)
        ours_truncated = sample_masks(truncated, grid, batch, **kwargs)
        for g, gen in enumerate(full):
            size = mask_fixture["block_sizes"][counter, g]
            rows = slice(g * batch, (g + 1) * batch)
            offset = sum(ours_full.target_seqlens[:g * batch])
            ids = ours_full.target_index[offset:offset + sum(ours_full.target_seqlens[rows])]
            target = torch.zeros(batch * num_tokens, dtype=torch.bool)
            target[ids] = True
            target = target.view(batch, *grid)
            assert torch.equal(target, target[:, :1].expand_as(target))  # the same spatial pattern in every tubelet
            assert torch.equal(_union_of_boxes(target[:, 0], *size[1:].tolist()), target[:, 0]), (counter, g)

            lo, hi = _target_length_range(size, gen.num_blocks, grid)
            context_len, target_len = mask_fixture["kept_lengths"][counter, g].tolist()
            ours_context = set(ours_truncated.context_seqlens[rows])
            ours_target = set(ours_truncated.target_seqlens[rows])
            assert len(ours_context) == len(ours_target) == 1  # truncation: one length per generator
            for kept_context, kept_target in ((context_len, target_len), (ours_context.pop(), ours_target.pop())):
                assert lo <= kept_target <= hi and num_tokens - hi <= kept_context <= num_tokens - lo, (counter, g)
