"""Choosing an implementation: the config switch, the env override, auto, and clear errors instead of fallbacks."""

import json
import os
import subprocess
import sys

import pytest
import torch

import kernels
from engine.config import ConfigError, load_config
from kernels import dispatch

from .conftest import ROOT


@pytest.fixture(autouse=True)
def _restore_default(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    yield
    kernels.set_default_impl("auto")


def test_auto_runs_the_references_on_cpu():
    assert dispatch.resolve(None, torch.device("cpu")) == "torch"
    before = sum(dispatch.launches.values())
    kernels.masked_l1_loss(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 4]))
    assert sum(dispatch.launches.values()) == before


def test_configured_default_and_env_override(monkeypatch):
    cpu = torch.device("cpu")
    kernels.set_default_impl("triton")
    assert dispatch.resolve(None, cpu) == "triton"
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert dispatch.resolve(None, cpu) == "torch"
    assert dispatch.resolve("triton", cpu) == "triton"  # an explicit impl= wins over both
    monkeypatch.setenv(dispatch.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="VJEPA_KERNELS='fast'"):
        dispatch.resolve(None, cpu)


def test_triton_on_cpu_without_the_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.resolve("triton", torch.device("cpu"))


def test_bad_values_are_rejected():
    with pytest.raises(ValueError, match="one of"):
        kernels.set_default_impl("cuda")
    with pytest.raises(ValueError, match="impl must be"):
        dispatch.resolve("Triton", torch.device("cpu"))
    with pytest.raises(ConfigError, match="model.kernels"):
        load_config(ROOT / "configs" / "tiny_synthetic.json", ["--model.kernels=fused"])


def test_every_kernel_configuration_compiles_for_sm90():
    """Ahead-of-time sm_90 compilation of exactly the launchers' configurations: shared memory fits, no spills.
    The interpreter cannot see either, so this is the CPU machine's only look at the GPU code."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "kernels.aot", "--json"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads(res.stdout)
    names = {k["name"].split()[0] for k in report["kernels"]}
    assert names == {"embed_fwd", "embed_dw", "l1_loss", "l1_loss_scale_rows", "ema", "attn_fwd", "attn_bwd_dkdv",
                     "attn_bwd_dq"}
    for k in report["kernels"]:
        assert k["ok"] and k["spill_bytes"] == 0 and 0 <= k["shared_bytes"] <= report["shared_limit"], k
