"""`model.compile`: the compiled per-token functions of a block (models/blocks.py) against the eager block, forward and
every gradient, over packed sets whose token count changes without recompiling; one training run against eager."""

import copy

import pytest
import torch

from engine.build import build_encoder, build_predictor
from engine.config import ConfigError
from engine.loop import train
from models import Packing
from models.blocks import Block, compile_blocks


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters()}


def test_compiled_block_equals_eager_forward_and_gradients():
    torch.manual_seed(0)
    eager = Block(48, 3, 100)  # odd MLP width, head dim 16
    for p in eager.parameters():  # non-trivial norms and biases, so every weight's gradient is exercised
        p.data.add_(0.1 * torch.randn_like(p))
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled)
    assert compiled.compiled and not eager.compiled
    # the first set compiles; the others have other token counts and sequence splits and must reuse the same graphs
    for i, lens in enumerate(([5, 20, 12], [29], [3, 3, 7, 11, 1])):
        packing = Packing.from_seqlens(lens)
        x = torch.randn(sum(lens), 48)
        xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            ye, yc = eager(xe, packing), compiled(xc, packing)
            grad_out = torch.randn_like(ye)
            ye.backward(grad_out)
            yc.backward(grad_out)
        torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-5)
        ge, gc = _grads(eager), _grads(compiled)
        assert ge.keys() == gc.keys() and len(ge) == 12  # norm1, qkv, proj, norm2, fc1, fc2: weights and biases
        for name in ge:  # sums over the tokens: tolerance relative to each gradient's largest element
            scale = ge[name].abs().max().item()
            torch.testing.assert_close(gc[name], ge[name], rtol=0, atol=2e-6 * max(scale, 1.0), msg=name)
        eager.zero_grad()
        compiled.zero_grad()


def test_compiled_training_matches_eager(tiny_config, tmp_path):
    """A few optimizer steps of the whole model (context encoder, predictor, no-grad target, EMA) both ways."""
    steps = ["--meta.max_steps=3", "--logging.log_every=1", "--data.batch_size=2"]
    eager_cfg = tiny_config(*steps, f"--logging.folder={tmp_path}/eager")
    compiled_cfg = tiny_config(*steps, "--model.compile=true", f"--logging.folder={tmp_path}/compiled")
    for cfg in (eager_cfg, compiled_cfg):  # the switch reaches every block of both networks, and only with it
        flags = [b.compiled for net in (build_encoder(cfg), build_predictor(cfg)) for b in net.modules()
                 if isinstance(b, Block)]
        assert len(flags) == cfg.model.depth + cfg.model.pred_depth and set(flags) == {cfg.model.compile}
    eager, compiled = train(eager_cfg), train(compiled_cfg)
    assert eager["losses"].keys() == compiled["losses"].keys() == {1, 2, 3}
    for step, loss in eager["losses"].items():
        assert compiled["losses"][step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step


def test_compile_is_refused_with_zero3(tiny_config):
    with pytest.raises(ConfigError, match="model.compile with ZeRO stage 3"):
        tiny_config("--model.compile=true", '--deepspeed={"zero_optimization": {"stage": 3}}')
