"""fp16 autocast's loss scaling on the PyTorch backend (the reference's GradScaler): scaled steps equal unscaled ones
exactly (the scale is a power of two and leaves before clipping), an overflowed step is skipped while the scale
halves, and the scaler resumes with the run. On the CPU the scaler is forced on (autocast, hence fp16, is GPU-only);
tests/test_gpu_training.py runs meta.dtype=float16 on a GPU."""

import copy

import pytest
import torch

from engine.backends import DeepSpeedBackend, TorchBackend
from engine.config import ConfigError
from engine.masks import sample_masks
from engine.packed_masks import StepMasks
from engine.step import forward_loss

from .test_step import _cfg, _models


def _batch(cfg, step):
    video = torch.randn(3, 3, cfg.data.num_frames, cfg.data.crop_size, cfg.data.crop_size,
                        generator=torch.Generator().manual_seed(step))
    return video, StepMasks.from_mask_set(sample_masks(cfg.mask, cfg.grid, 3, step=step, seed=0,
                                                       first_sample_index=3 * step))


def _step(models, backend, cfg, step, clip=1e-4):
    video, masks = _batch(cfg, step)
    loss, _, _ = forward_loss(models, video, masks, loss_exp=1.0, dtype="float32")
    backend.backward(loss)
    return backend.clip_and_step(clip)


def _adam_steps(backend):
    return [float(s["step"]) for s in backend.optimizer.state_dict()["state"].values()]


def _params(models):
    return [p.detach().clone() for p in [*models.encoder.parameters(), *models.predictor.parameters()]]


def test_scaled_steps_equal_unscaled_steps_bitwise():
    cfg = _cfg("--meta.dtype=float16", "--deepspeed.gradient_accumulation_steps=1")
    plain = _models(cfg)
    scaled = copy.deepcopy(plain)
    runs = []
    for models, scaling in ((plain, False), (scaled, True)):
        backend = TorchBackend(models.encoder, models.predictor, cfg, loss_scaling=scaling)
        assert backend.scaler.is_enabled() == scaling
        norms = [_step(models, backend, cfg, step) for step in range(3)]
        runs.append((norms, _params(models)))
    (norms_plain, params_plain), (norms_scaled, params_scaled) = runs
    # clipping at 1e-4 is active on both networks: had it seen the scaled gradients (x65536), it would have clipped them differently
    assert all(float(n) > 1e-4 for pair in norms_plain for n in pair), norms_plain
    assert [[float(n) for n in pair] for pair in norms_scaled] == [[float(n) for n in pair] for pair in norms_plain]
    assert all(torch.equal(a, b) for a, b in zip(params_plain, params_scaled))


def test_an_overflowed_step_is_skipped_and_the_scale_halves():
    cfg = _cfg()
    models = _models(cfg)
    backend = TorchBackend(models.encoder, models.predictor, cfg, loss_scaling=True)
    _step(models, backend, cfg, 0)
    before, adam_steps = _params(models), _adam_steps(backend)
    video, masks = _batch(cfg, 1)
    loss, _, _ = forward_loss(models, video, masks, loss_exp=1.0, dtype="float32")
    backend.backward(loss)
    trained = next(p for p in models.predictor.parameters() if p.grad is not None)
    trained.grad.view(-1)[0] = float("inf")  # an fp16 gradient overflow
    backend.clip_and_step(1e-4)
    assert all(torch.equal(a, b) for a, b in zip(before, _params(models)))
    assert _adam_steps(backend) == adam_steps
    assert backend.scaler.get_scale() == 2.0 ** 15
    assert trained.grad is None  # zeroed for the next step
    _step(models, backend, cfg, 2)  # and training goes on at the lower scale
    assert not all(torch.equal(a, b) for a, b in zip(before, _params(models)))


def test_the_scaler_resumes_with_the_run():
    cfg = _cfg()
    models = _models(cfg)
    backend = TorchBackend(models.encoder, models.predictor, cfg, loss_scaling=True)
    _step(models, backend, cfg, 0)
    backend.scaler.update(1024.0)
    state = backend.state_dict()
    assert state["scaler"]["scale"] == 1024.0
    again = TorchBackend(models.encoder, models.predictor, cfg, loss_scaling=True)
    again.load_state_dict(state)
    assert again.scaler.get_scale() == 1024.0
    # without scaling (bf16, fp32, the CPU) nothing is saved, and a file without it loads
    unscaled = TorchBackend(models.encoder, models.predictor, cfg)
    assert "scaler" not in unscaled.state_dict()
    again.load_state_dict(unscaled.state_dict())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_the_cpu_never_scales_the_loss(dtype):
    cfg = _cfg(f"--meta.dtype={dtype}")
    models = _models(cfg)
    # the models are on the CPU, which runs fp32 whatever meta.dtype says: never scaled here
    assert not TorchBackend(models.encoder, models.predictor, cfg).scaler.is_enabled()


def test_float16_under_deepspeed_is_refused_with_the_way_out():
    cfg = _cfg("--meta.dtype=float16")
    models = _models(cfg)
    with pytest.raises(ConfigError, match=r"meta.dtype=float16 under DeepSpeed.*--meta.backend=torch"):
        DeepSpeedBackend(models.encoder, models.predictor, cfg, models.target_encoder)
