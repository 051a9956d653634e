"""Shared fixtures: a small synthetic video dataset (generated once per session) and tiny configs.

TRITON_INTERPRET=1 is set here, before anything imports `kernels`: Triton reads it when a @triton.jit decorator
runs, so it lets `impl="triton"` run the kernels on the CPU. Ops with impl=None still follow the configured default
(`auto`: the PyTorch references on CPU), so the rest of the suite is unaffected. The interpreter is one per process,
so the tests marked `gpu` (compiled kernels on CUDA tensors) run in their own: `TRITON_INTERPRET=0 pytest tests -m
gpu` (gpu_session.sh's gpu_tests step). Interpreted, they are skipped with that command as the reason: the
interpreter would read the EMA kernel's table of device addresses from host memory.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from engine.config import Config, load_config  # noqa: E402
from engine.data.synthetic import SyntheticSpec, ensure_synthetic_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# the repository first, then whatever the caller's PYTHONPATH holds (the device machine's carried wheels)
PYTHONPATH = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
SMALL_SPEC = SyntheticSpec(num_train=24, num_val=8, num_frames=24, size=64, seed=3)
# Epoch seconds after which the remaining tests skip, naming it (gpu_session.sh sets it a little before its gpu_tests
# step's time limit): pytest then ends normally and writes its junit XML, which a kill at the limit would lose.
DEADLINE = float(os.environ.get("VJEPA_BENCH_DEADLINE", "inf"))
# The GPU tests' order under `-m gpu` (the device's time limit may end the step): the kernels' checks first (seconds
# each, and what every later test builds on), the whole training runs (subprocesses, DeepSpeed builds) last.
GPU_FIRST, GPU_LAST = "test_kernel_", "test_gpu_training.py"


@pytest.fixture(autouse=True)
def _deadline() -> None:
    if time.time() > DEADLINE:
        pytest.skip("time budget of the session spent (VJEPA_BENCH_DEADLINE)")


@pytest.fixture(autouse=True)
def _normal_scheduling():
    """A test that leaves this process under a realtime scheduling policy (SVT-AV1's encoder does so to its caller when
    run as root) fails here, rather than the suite hanging later: subprocesses inherit the policy, and two spinning
    realtime ranks on two cores starve each other."""
    yield
    if hasattr(os, "sched_getscheduler"):
        assert os.sched_getscheduler(0) == os.SCHED_OTHER, "this test left the process under a realtime scheduler"


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), SMALL_SPEC, progress=False)


@pytest.fixture
def tiny_config(synthetic_root, tmp_path):
    """configs/tiny_synthetic.json on the session's small dataset, writing into tmp_path, no workers."""

    def make(*overrides: str) -> Config:
        return load_config(ROOT / "configs" / "tiny_synthetic.json", [
            "--data.synthetic_root=null", f"--data.datasets=[\"{synthetic_root}/motion_train.csv\"]",
            f"--logging.folder={tmp_path}/run", "--data.num_workers=0", "--data.batch_size=4", *overrides])

    return make


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, synthetic_root):
    """A 2-step pretraining run on the synthetic set, to probe."""
    from engine.loop import train

    folder = tmp_path_factory.mktemp("pretrain")
    train(load_config(ROOT / "configs" / "tiny_synthetic.json", [
        "--data.synthetic_root=null", f"--data.datasets=[\"{synthetic_root}/motion_train.csv\"]",
        "--data.num_workers=0", "--data.batch_size=4", "--meta.max_steps=2", f"--logging.folder={folder}"]))
    return folder


def _gpu_priority(item: pytest.Item) -> int:
    name = item.path.name
    return 0 if name.startswith(GPU_FIRST) else 2 if name == GPU_LAST else 1


def pytest_collection_modifyitems(config, items):
    import torch

    from kernels.dispatch import interpreted

    if config.getoption("markexpr") == "gpu":
        items.sort(key=_gpu_priority)  # stable: file order within each group
    if not (interpreted() and torch.cuda.is_available()):
        return
    skip = pytest.mark.skip(reason="GPU tests run compiled kernels, and this process interprets them (TRITON_INTERPRET "
                                   "is set): run TRITON_INTERPRET=0 pytest tests -m gpu")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
