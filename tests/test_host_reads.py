"""The training step reads nothing back to the host: on a GPU every such read (`.item()`, `bool(t)`, a data-dependent
shape from `nonzero`, boolean indexing, `repeat_interleave` without a size, ...) stalls the host until the GPU has
drained its queue, and the next launches wait. The one read the step takes on purpose is the fault guard's (two
flags per micro-batch, engine/faults.py), outside the model; PyTorch's AdamW reads its step counters, which live on
the host (ours is fused on a GPU and reads none).

The audit is a dispatch mode: every aten op of forward, backward, clipping, optimizer and EMA passes through it, on
the CPU as on a GPU, with the PyTorch references and with the Triton kernels' wrappers (interpreted here).

Copies the other way stall the host too: on a GPU, `.to(device)` without `non_blocking` and `torch.tensor(...,
device=...)` wait for the stream before returning. On the CPU they are no-ops that no dispatch mode sees, so the
second audit records the calls themselves, where this project's code makes them."""

import copy
import traceback
from pathlib import Path
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
from engine.backends import TorchBackend
from engine.build import build_encoder, build_predictor
from engine.config import Config, load_config
from engine.masks import sample_masks
from engine.packed_masks import StepMasks
from engine.step import Models, train_step

from .conftest import ROOT

# ops whose result the host must wait for: a scalar read back, or an output shape that depends on the data
HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "allclose", "unique_dim",
              "_unique", "_unique2", "unique_consecutive", "repeat_interleave", "masked_scatter", "bincount"}


class HostReads(TorchDispatchMode):
    """Counts host reads by the code that made them (the innermost frame outside torch)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        boolean_index = name in ("index", "index_put", "index_put_") and any(
            i is not None and i.dtype == torch.bool for i in args[1])
        if name in HOST_READS or boolean_index:
            frames = [f for f in traceback.extract_stack()[:-1] if "torch/utils/_python_dispatch" not in f.filename]
            caller = next((f for f in reversed(frames) if "/torch/" not in f.filename or "/torch/optim/" in f.filename),
                          frames[-1])
            self.reads[f"{name} at {caller.filename.split('/')[-1]}:{caller.lineno} ({caller.name})"] += 1
        return func(*args, **(kwargs or {}))


class BlockingCopies:
    """Records the project's calls that copy to a device and wait (`Tensor.to` with a device and no non_blocking,
    `torch.tensor` / `torch.as_tensor` with a device) made directly by engine/, models/ or kernels/ (torch's own, in
    clipping and AdamW, move values between tensors already on one device, or to the host on purpose)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: Counter[str] = Counter()
        to, tensor, as_tensor = torch.Tensor.to, torch.tensor, torch.as_tensor

        def checked_to(t, *args, **kwargs):
            device = kwargs.get("device", args[0] if args and isinstance(args[0], (torch.device, str)) else None)
            waits = not (kwargs.get("non_blocking") or any(a is True for a in args[1:]))
            if device is not None and waits:
                self._record("Tensor.to")
            return to(t, *args, **kwargs)

        def made_on(make, name):
            def checked(*args, **kwargs):
                if kwargs.get("device") is not None:
                    self._record(name)
                return make(*args, **kwargs)
            return checked

        monkeypatch.setattr(torch.Tensor, "to", checked_to)
        monkeypatch.setattr(torch, "tensor", made_on(tensor, "torch.tensor"))
        monkeypatch.setattr(torch, "as_tensor", made_on(as_tensor, "torch.as_tensor"))

    def _record(self, what: str) -> None:
        caller = traceback.extract_stack()[-3]  # below this method and the patched function
        path = Path(caller.filename).resolve()
        if path.is_relative_to(ROOT) and path.parts[len(ROOT.parts)] in ("engine", "models", "kernels"):
            self.calls[f"{what} at {path.relative_to(ROOT)}:{caller.lineno}"] += 1


def _tiny_step() -> tuple[Config, Models, TorchBackend, torch.Tensor]:
    """The tiny config's networks, optimizer and a 2-clip batch, as the loop builds them."""
    cfg = load_config(ROOT / "configs" / "tiny_synthetic.json", ["--data.batch_size=2"])
    torch.manual_seed(0)
    encoder, predictor = build_encoder(cfg), build_predictor(cfg)
    models = Models(encoder, predictor, copy.deepcopy(encoder).requires_grad_(False))
    video = torch.randn(2, 3, cfg.data.num_frames, cfg.data.crop_size, cfg.data.crop_size)
    return cfg, models, TorchBackend(encoder, predictor, cfg), video


@pytest.fixture
def kernels_default():
    yield kernels.set_default_impl
    kernels.set_default_impl("auto")


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("clip_grad", [None, 1.0])
def test_the_step_reads_nothing_back_but_adamws_host_counters(kernels_default, monkeypatch, impl, clip_grad):
    monkeypatch.setattr(kernels.tubelet_embed, "INTERPRET_CONFIG", kernels.tubelet_embed.TileConfig(128, 128, 128, 1, 1))
    monkeypatch.setattr(kernels.l1_loss, "INTERPRET_ROWS", 128)
    monkeypatch.setattr(kernels.ema, "INTERPRET_CHUNK", (1 << 20, 1 << 14))
    kernels_default(impl)
    cfg, models, backend, video = _tiny_step()
    masks = StepMasks.from_mask_set(sample_masks(cfg.mask, cfg.grid, 2, step=0, seed=0, first_sample_index=0))
    launches = sum(kernels.dispatch.launches.values())
    audit = HostReads()
    with audit:
        train_step(models, backend, [(video, masks)], lr=1e-3, wd=0.04, momentum=0.99, clip_grad=clip_grad,
                   loss_exp=1.0, dtype="float32", keep_features=True)
    assert (sum(kernels.dispatch.launches.values()) > launches) == (impl == "triton")  # the kernels did run
    counters = {k: n for k, n in audit.reads.items() if "optimizer.py" in k and "_get_value" in k}
    stepped = [state["step"] for state in backend.optimizer.state.values()]
    assert sum(counters.values()) == len(stepped) and all(t.device.type == "cpu" for t in stepped)
    assert {k: n for k, n in audit.reads.items() if k not in counters} == {}


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_the_step_copies_to_the_device_without_waiting(kernels_default, monkeypatch, impl):
    """A step as the loop runs it (the fault guard's check included, masks moved as MicroBatches moves them), after a
    first one that builds what a run builds once (the EMA kernel's pointer table)."""
    from engine.faults import StepGuard

    kernels_default(impl)
    cfg, models, backend, video = _tiny_step()
    guard = StepGuard(distributed=False, max_nonfinite=3, device=torch.device("cpu"))
    for step in range(2):
        if step == 1:
            audit = BlockingCopies(monkeypatch)
        masks = StepMasks.from_mask_set(sample_masks(cfg.mask, cfg.grid, 2, step=step, seed=0, first_sample_index=0))
        train_step(models, backend, [(video, masks.to(torch.device("cpu"), non_blocking=True))], lr=1e-3, wd=0.04,
                   momentum=0.99, clip_grad=1.0, loss_exp=1.0, dtype="float32",
                   proceed=lambda loss: guard.check(loss, step))
    assert dict(audit.calls) == {}
