"""Config: paper defaults, JSON and CLI overrides, clear errors, resolved round trip."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import Config, ConfigError, load_config, save_resolved

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_paper_recipe():
    c = Config()
    o = c.optimization
    assert (o.ipe, o.epochs, o.ipe_scale, o.warmup, o.clip_grad) == (300, 300, 1.25, 40, 10.0)
    assert (o.start_lr, o.lr, o.final_lr, o.weight_decay, o.final_weight_decay) == (2e-4, 6.25e-4, 1e-6, 0.04, 0.4)
    assert o.ema == [0.998, 1.0]
    assert [m.num_blocks for m in c.mask] == [8, 2]
    assert [m.spatial_scale for m in c.mask] == [[0.15, 0.15], [0.7, 0.7]]
    assert all(m.aspect_ratio == [0.75, 1.5] and not m.truncate_to_batch_min for m in c.mask)
    assert (c.data.num_frames, c.data.tubelet_size, c.data.sampling_rate, c.data.crop_size) == (16, 2, 4, 224)
    assert (c.model.pred_depth, c.model.pred_embed_dim, c.meta.seed, c.meta.dtype) == (12, 384, 234, "bfloat16")
    assert c.data_aug.random_resize_aspect_ratio == [0.75, 1.35] and c.data_aug.random_resize_scale == [0.3, 1.0]
    assert c.num_tokens == 1568


@pytest.mark.parametrize("name, model, batch, tokens, global_batch", [
    ("vitl16", "vit_large", 24, 1568, 3072), ("vith16", "vit_huge", 24, 1568, 3072),
    ("vith16_384", "vit_huge", 10, 4608, 2400), ("tiny_synthetic", "vit_tiny", 16, 256, 16)])
def test_shipped_configs_load(name, model, batch, tokens, global_batch):
    c = load_config(ROOT / "configs" / f"{name}.json")
    assert (c.model.model_name, c.data.batch_size, c.num_tokens) == (model, batch, tokens)
    assert c.nodes * c.tasks_per_node * c.data.batch_size == global_batch


def _write(tmp_path, data):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(data))
    return p


def test_json_then_cli_overrides(tmp_path):
    p = _write(tmp_path, {"data": {"batch_size": 3}, "optimization": {"lr": 1}})
    c = load_config(p, ["--data.datasets=[\"a.csv\", \"b.csv\"]", "--logging.folder=/tmp/run x", "--meta.max_steps=5"])
    assert c.data.batch_size == 3 and c.optimization.lr == 1.0 and isinstance(c.optimization.lr, float)
    assert c.data.datasets == ["a.csv", "b.csv"] and c.logging.folder == "/tmp/run x" and c.meta.max_steps == 5


def test_mask_overrides_all_and_one():
    c = load_config(None, ["--mask.truncate_to_batch_min=true", "--mask.1.num_blocks=3"])
    assert [m.truncate_to_batch_min for m in c.mask] == [True, True]
    assert [m.num_blocks for m in c.mask] == [8, 3]
    with pytest.raises(ConfigError, match="only 2 mask generators"):
        load_config(None, ["--mask.5.num_blocks=3"])


def test_unknown_key_names_key_file_and_accepted(tmp_path):
    p = _write(tmp_path, {"optimization": {"warmpu": 3}})
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "optimization.warmpu" in msg and "Did you mean 'warmup'" in msg and "final_lr" in msg


def test_unknown_section_and_mask_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'optimisation'"):
        load_config(_write(tmp_path, {"optimisation": {}}))
    with pytest.raises(ConfigError, match="mask.0.num_block'"):
        load_config(_write(tmp_path, {"mask": [{"num_block": 3}]}))


@pytest.mark.parametrize("override, fragment", [
    ("--data.batch_size=2.5", "'data.batch_size' must be int"),
    ("--meta.seed=true", "'meta.seed' must be int"),
    ("--data.datasets=3", "'data.datasets' must be a list"),
    ("--model.model_name=vit_enormous", "model.model_name 'vit_enormous' unknown"),
    ("--data.crop_size=100", "multiple of data.patch_size"),
    ("--loss.reg_coeff=0.1", "reg_coeff"),
    ("batch_size=3", "expected --section.key=value"),
    ('--deepspeed={"gradient_accumulation_steps": 0}', "deepspeed.gradient_accumulation_steps must be an integer >= 1"),
    ('--deepspeed={"gradient_accumulation_steps": 1.5}', "gradient_accumulation_steps must be an integer >= 1, got 1.5"),
])
def test_bad_values_are_clear(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.").replace("(", r"\(")):
        load_config(None, [override])


def test_accumulation_steps_come_from_the_deepspeed_section_for_both_backends():
    section = '--deepspeed={"gradient_accumulation_steps": 4}'
    assert load_config(None, []).accumulation_steps == 1
    assert load_config(None, [section]).accumulation_steps == 4
    assert load_config(None, [section, "--meta.backend=torch"]).accumulation_steps == 4
    assert load_config(ROOT / "configs" / "vitl16.json", ["--deepspeed.gradient_accumulation_steps=8"]).accumulation_steps == 8


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"data": {"batch_size": 3,}}')
    with pytest.raises(ConfigError, match="invalid JSON at line 1"):
        load_config(bad)


def test_resolved_round_trip(tmp_path):
    c = load_config(ROOT / "configs" / "tiny_synthetic.json", ["--mask.0.max_keep=7"])
    save_resolved(c, tmp_path / "resolved.json")
    assert load_config(tmp_path / "resolved.json") == c


def test_print_config_cli():
    out = subprocess.run([sys.executable, "engine/train.py", "--config", "configs/vith16_384.json", "--print-config",
                          "--optimization.lr=0.001"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    resolved = json.loads(out)
    assert resolved["data"]["crop_size"] == 384 and resolved["optimization"]["lr"] == 0.001
    assert len(resolved["mask"]) == 2


def test_cli_error_exit_code_and_message():
    r = subprocess.run([sys.executable, "engine/train.py", "--config", "configs/tiny_synthetic.json", "--print-config",
                        "--data.batchsize=3"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "Did you mean 'batch_size'" in r.stderr and "Traceback" not in r.stderr
