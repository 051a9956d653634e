"""The V-JEPA step: packed computation == per-generator dense computation (truncation on), loss weighting, EMA,
parameter groups."""

import copy

import pytest
import torch

import kernels

from engine.backends import TorchBackend, ema_update, param_groups
from engine.build import build_encoder, build_predictor
from engine.config import load_config
from engine.masks import sample_masks
from engine.packed_masks import StepMasks
from engine.step import Models, forward_loss, train_step
from models import Packing

from .conftest import ROOT


def _models(cfg):
    torch.manual_seed(0)
    enc, pred = build_encoder(cfg), build_predictor(cfg)
    with torch.no_grad():
        for tok in pred.mask_tokens:
            tok.normal_()  # distinct mask tokens so a generator mix-up would show
    return Models(enc, pred, copy.deepcopy(enc).requires_grad_(False))


def _cfg(*overrides):
    return load_config(ROOT / "configs" / "tiny_synthetic.json", ["--data.batch_size=3", *overrides])


def _reference_loss(models, video, mask_set, n):
    """The reference's computation: per generator, the encoder on a dense [B, K_e] batch, the predictor on
    [ctx ; mask tokens] per clip, LN(target) gathered at [B, K_p], mean |p - h|, averaged over generators."""
    b = mask_set.batch_size
    h = torch.nn.functional.layer_norm(models.target_encoder.forward_dense(video), (models.encoder.embed_dim,))
    losses, c0, t0 = [], 0, 0
    for g in range(mask_set.num_generators):
        ke, kp = mask_set.context_seqlens[g * b], mask_set.target_seqlens[g * b]
        ctx = mask_set.context_index[c0:c0 + b * ke]
        tgt = mask_set.target_index[t0:t0 + b * kp]
        c0, t0 = c0 + b * ke, t0 + b * kp
        z = models.encoder(video, ctx, Packing.uniform(b, ke)).view(b, ke, -1)
        pred = models.predictor
        pos = pred.predictor_pos_embed[0]
        preds = []
        for i in range(b):
            c_n, t_n = ctx[i * ke:(i + 1) * ke] % n, tgt[i * kp:(i + 1) * kp] % n
            seq = torch.cat([pred.predictor_embed(z[i]) + pos[c_n], pred.mask_tokens[g][0] + pos[t_n]])
            for blk in pred.predictor_blocks:
                seq = blk(seq, Packing.uniform(1, len(seq)))
            preds.append(pred.predictor_proj(pred.predictor_norm(seq))[ke:])
        target = h.flatten(0, 1)[tgt].view(b, kp, -1)
        losses.append((torch.stack(preds) - target).abs().mean())
    return torch.stack(losses).mean()


def test_packed_step_equals_per_generator_dense_with_truncation():
    cfg = _cfg("--mask.truncate_to_batch_min=true")
    models = _models(cfg)
    video = torch.randn(3, 3, cfg.data.num_frames, cfg.data.crop_size, cfg.data.crop_size)
    mask_set = sample_masks(cfg.mask, cfg.grid, 3, step=5, seed=1, first_sample_index=15)
    assert len(set(mask_set.context_seqlens[:3])) == 1  # truncation made each generator's lengths equal
    loss, _, _ = forward_loss(models, video, StepMasks.from_mask_set(mask_set), loss_exp=1.0, dtype="float32")
    ref = _reference_loss(models, video, mask_set, cfg.num_tokens)
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-5)
    params = list(models.encoder.parameters()) + list(models.predictor.parameters())
    params = [p for p in params if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    grads_ref = torch.autograd.grad(ref, params)
    for p, g, r in zip(params, grads, grads_ref):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("every", [1, 3])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(every):
    """Recomputing blocks in backward changes memory, not numbers: bitwise the same on the CPU (same kernels)."""
    cfg, ckpt_cfg = _cfg(), _cfg(f"--model.activation_checkpointing={every}")
    models, ckpt_models = _models(cfg), _models(ckpt_cfg)
    assert ckpt_models.encoder.checkpoint_every == ckpt_models.predictor.checkpoint_every == every
    video = torch.randn(3, 3, cfg.data.num_frames, cfg.data.crop_size, cfg.data.crop_size)
    masks = StepMasks.from_mask_set(sample_masks(cfg.mask, cfg.grid, 3, step=2, seed=1, first_sample_index=6))
    results = []
    for m in (models, ckpt_models):
        loss, _, _ = forward_loss(m, video, masks, loss_exp=1.0, dtype="float32")
        params = [p for p in [*m.encoder.parameters(), *m.predictor.parameters()] if p.requires_grad]
        results.append((loss, torch.autograd.grad(loss, params)))
    (loss, grads), (ckpt_loss, ckpt_grads) = results
    assert torch.equal(loss, ckpt_loss)
    assert all(torch.equal(g, c) for g, c in zip(grads, ckpt_grads, strict=True))


def test_activation_checkpointing_saves_activations(monkeypatch):
    """Fewer tensors are kept for backward: counted with saved-tensor hooks over one forward."""
    cfg = _cfg("--model.activation_checkpointing=1")
    video = torch.randn(3, 3, cfg.data.num_frames, cfg.data.crop_size, cfg.data.crop_size)
    masks = StepMasks.from_mask_set(sample_masks(cfg.mask, cfg.grid, 3, step=2, seed=1, first_sample_index=6))
    saved = {}
    for every in (0, 1):
        models = _models(cfg)
        models.encoder.checkpoint_every = models.predictor.checkpoint_every = every
        numel = [0]

        def pack(t, numel=numel):
            numel[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward_loss(models, video, masks, loss_exp=1.0, dtype="float32")
        saved[every] = numel[0]
    assert saved[1] < 0.5 * saved[0], saved


def test_ema_update_formula():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    expected = [0.9 * p.detach() + 0.1 * q.detach() for p, q in zip(a.parameters(), b.parameters())]
    ema_update(a, b, 0.9)
    for p, e in zip(a.parameters(), expected):
        torch.testing.assert_close(p.detach(), e)


def test_param_groups_follow_the_reference():
    cfg = _cfg()
    models = _models(cfg)
    groups = param_groups(models.encoder, models.predictor)
    assert len(groups) == 4 and [g.get("WD_exclude", False) for g in groups] == [False, False, True, True]
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert id(models.predictor.mask_tokens[0]) in ids(groups[1]["params"])  # 3-D: weight-decayed
    assert id(models.encoder.patch_embed.proj.weight) in ids(groups[0]["params"])
    assert id(models.encoder.blocks[0].norm1.weight) in ids(groups[2]["params"])
    assert id(models.predictor.predictor_proj.bias) in ids(groups[3]["params"])
    total = sum(len(g["params"]) for g in groups)
    assert total == len(list(models.encoder.parameters())) + len(list(models.predictor.parameters()))


def test_train_step_updates_online_and_target():
    cfg = _cfg()
    models = _models(cfg)
    backend = TorchBackend(models.encoder, models.predictor, cfg)
    video = torch.randn(3, 3, cfg.data.num_frames, cfg.data.crop_size, cfg.data.crop_size)
    masks = StepMasks.from_mask_set(sample_masks(cfg.mask, cfg.grid, 3, step=0, seed=0, first_sample_index=0))
    before_online = models.encoder.blocks[0].attn.qkv.weight.detach().clone()
    before_target = models.target_encoder.blocks[0].attn.qkv.weight.detach().clone()
    out = train_step(models, backend, [(video, masks)], lr=1e-3, wd=0.04, momentum=0.5, clip_grad=1.0, loss_exp=1.0,
                     dtype="float32", keep_features=True)
    after_online = models.encoder.blocks[0].attn.qkv.weight.detach()
    assert not torch.equal(before_online, after_online)
    torch.testing.assert_close(models.target_encoder.blocks[0].attn.qkv.weight, 0.5 * before_target + 0.5 * after_online)
    assert out.grad_norms is not None and all(float(n) > 0 for n in out.grad_norms)
    assert backend.optimizer.param_groups[0]["weight_decay"] == 0.04 and backend.optimizer.param_groups[2][
        "weight_decay"] == 0.0
    assert out.target_features.shape == (3, cfg.num_tokens, 96) and out.predictions.shape[0] == masks.target_index.numel()


@pytest.fixture
def kernels_default():
    """Restores the process-wide kernels default a test changes."""
    yield kernels.set_default_impl
    kernels.set_default_impl("auto")


def test_five_steps_with_kernels_on_and_off_give_the_same_losses(kernels_default, monkeypatch):
    """The whole step on the Triton kernels (embedding, loss, EMA; interpreted on CPU) against the references."""
    # the interpreter simulates one program at a time: large tiles keep 5 steps to seconds (the ops' own tests use
    # small ones to cross tile edges)
    monkeypatch.setattr(kernels.tubelet_embed, "INTERPRET_CONFIG", kernels.tubelet_embed.TileConfig(128, 128, 128, 1, 1))
    monkeypatch.setattr(kernels.l1_loss, "INTERPRET_ROWS", 128)
    monkeypatch.setattr(kernels.ema, "INTERPRET_CHUNK", (1 << 20, 1 << 14))
    cfg = _cfg("--data.batch_size=2")
    video = torch.randn(2, 3, cfg.data.num_frames, cfg.data.crop_size, cfg.data.crop_size)
    runs = {}
    for impl in ("torch", "triton"):
        kernels_default(impl)
        models = _models(cfg)
        backend = TorchBackend(models.encoder, models.predictor, cfg)
        launches = sum(kernels.dispatch.launches.values())
        losses = []
        for step in range(5):
            masks = StepMasks.from_mask_set(sample_masks(cfg.mask, cfg.grid, 2, step=step, seed=0,
                                                         first_sample_index=2 * step))
            out = train_step(models, backend, [(video, masks)], lr=1e-3, wd=0.04, momentum=0.99, clip_grad=1.0,
                             loss_exp=1.0, dtype="float32")
            losses.append(out.loss.item())
        # per step: target + context embedding, one weight gradient, the loss, the EMA
        assert sum(kernels.dispatch.launches.values()) - launches == (5 * 5 if impl == "triton" else 0)
        runs[impl] = losses
    assert runs["torch"][0] != runs["torch"][-1]  # the model trained
    torch.testing.assert_close(torch.tensor(runs["triton"]), torch.tensor(runs["torch"]), atol=1e-5, rtol=1e-4)
