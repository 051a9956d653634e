"""Shared fixtures: a small synthetic video dataset (generated once per session) and tiny configs."""

from pathlib import Path

import pytest

from engine.config import Config, load_config
from engine.data.synthetic import SyntheticSpec, ensure_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]
SMALL_SPEC = SyntheticSpec(num_train=24, num_val=8, num_frames=24, size=64, seed=3)


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
