"""Released-checkpoint loading (`models.load_pretrained`) and export (`python -m engine.export`): the reference's
layout in and out, strict keys, variants read from shapes, and a round trip through a training run."""

import subprocess
import sys

import pytest
import torch

from engine.build import build_encoder, build_predictor
from engine.checkpoint import latest_path, load_checkpoint, load_start_weights
from engine.export import export
from engine.loop import train
from models import VARIANTS, CheckpointMismatch, Predictor, VisionTransformer, load_pretrained
from models.pretrained import add_wrappers, encoder_shape, infer_variant

from .conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "reference"


@pytest.fixture(scope="module")
def reference():
    """The reference's tiny model (tests/fixtures/reference) as a released file would hold it."""
    return torch.load(FIXTURES / "step.pt", weights_only=True), torch.load(FIXTURES / "outputs.pt", weights_only=True)


def _released(tmp_path, encoder, predictor, **extra):
    """A file in the released layout: DDP + wrapper prefixes, the reference's top-level keys."""
    path = tmp_path / "released.pth.tar"
    torch.save({"encoder": add_wrappers(encoder), "predictor": add_wrappers(predictor),
                "target_encoder": add_wrappers(encoder), "opt": None, "scaler": None, "epoch": 300, "loss": 0.1,
                "batch_size": 24, "world_size": 128, "lr": 1e-6, **extra}, path)
    return path


def test_loaded_encoder_reproduces_the_reference_outputs(reference, tmp_path):
    step, outputs = reference
    c = step["config"]
    path = _released(tmp_path, step["encoder"], step["predictor"])
    encoder = load_pretrained(path, img_size=c["crop_size"], num_frames=c["num_frames"], num_heads=c["num_heads"])
    assert isinstance(encoder, VisionTransformer) and not encoder.training
    with torch.no_grad():
        features = encoder(step["clip"])  # (B, 3, F, H, W) -> (B, N, D)
    assert features.shape == outputs["dense"].shape
    torch.testing.assert_close(features, outputs["dense"], atol=1e-5, rtol=1e-4)
    predictor = load_pretrained(path, which="predictor", img_size=c["crop_size"], num_frames=c["num_frames"],
                                num_heads=c["num_heads"])
    assert isinstance(predictor, Predictor)
    assert all(torch.equal(predictor.state_dict()[k], v) for k, v in step["predictor"].items())


def test_another_clip_size_keeps_the_models_own_position_table(reference, tmp_path):
    step, _ = reference
    c = step["config"]
    path = _released(tmp_path, step["encoder"], step["predictor"])
    encoder = load_pretrained(path, img_size=2 * c["crop_size"], num_frames=c["num_frames"], num_heads=c["num_heads"])
    video = torch.randn(1, 3, c["num_frames"], 2 * c["crop_size"], 2 * c["crop_size"])
    with torch.no_grad():
        assert encoder(video).shape == (1, 4 * step["encoder"]["pos_embed"].shape[1], c["embed_dim"])
    assert torch.equal(encoder.blocks[0].attn.qkv.weight, step["encoder"]["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_is_read_from_the_shapes(name):
    with torch.device("meta"):  # shapes only: ViT-g allocates nothing
        state = VisionTransformer(VARIANTS[name]).state_dict()
    assert infer_variant(encoder_shape(state)) == name


def test_strict_loading_names_every_key_out_of_place(reference, tmp_path):
    step, _ = reference
    c = step["config"]
    kwargs = {"img_size": c["crop_size"], "num_frames": c["num_frames"], "num_heads": c["num_heads"]}
    extra = {**step["encoder"], "blocks.0.attn.rope": torch.zeros(1)}
    with pytest.raises(CheckpointMismatch, match=r"1 keys the model lacks: blocks\.0\.attn\.rope"):
        load_pretrained(_released(tmp_path, extra, step["predictor"]), **kwargs)
    missing = {k: v for k, v in step["encoder"].items() if k != "norm.bias"}
    with pytest.raises(CheckpointMismatch, match=r"1 keys missing from the file: norm\.bias"):
        load_pretrained(_released(tmp_path, missing, step["predictor"]), **kwargs)
    with pytest.raises(CheckpointMismatch, match="model_name 'vit_large' is 1024 wide"):
        load_pretrained(_released(tmp_path, step["encoder"], step["predictor"]), model_name="vit_large")
    with pytest.raises(CheckpointMismatch, match="no variant has width 32, depth 2"):
        load_pretrained(_released(tmp_path, step["encoder"], step["predictor"]))
    not_jepa = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, not_jepa)
    with pytest.raises(CheckpointMismatch, match="not a V-JEPA pretraining checkpoint"):
        load_pretrained(not_jepa)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_pretrained(tmp_path / "nope.pth.tar")


def test_export_round_trip_through_a_training_run(tiny_config, tmp_path):
    cfg = tiny_config("--meta.max_steps=2", f"--logging.folder={tmp_path}/run")
    train(cfg)
    out = export(tmp_path / "run", tmp_path / "ours.pth.tar")
    exported = torch.load(out, weights_only=False)
    assert {"encoder", "predictor", "target_encoder", "epoch", "loss", "batch_size", "world_size", "lr"} <= set(exported)
    assert "opt" not in exported and all(k.startswith("module.backbone.") for k in exported["target_encoder"])
    saved = load_checkpoint(latest_path(tmp_path / "run", "jepa"))
    d = cfg.data
    for which in ("target_encoder", "encoder", "predictor"):
        module = load_pretrained(out, which=which, img_size=d.crop_size, num_frames=d.num_frames,
                                 num_heads=cfg.model.num_heads, pred_num_heads=cfg.model.pred_num_heads)
        assert all(torch.equal(module.state_dict()[k], v) for k, v in saved[which].items()), which


def test_export_cli_names_a_missing_run(tmp_path):
    result = subprocess.run([sys.executable, "-m", "engine.export", str(tmp_path / "nope"), str(tmp_path / "o.pt")],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1 and "is not a run folder: no config.json" in result.stderr


def test_pretraining_starts_from_an_exported_or_released_file(tiny_config, tmp_path):
    train(tiny_config("--meta.max_steps=2", "--optimization.ipe=1", f"--logging.folder={tmp_path}/run"))
    out = export(tmp_path / "run", tmp_path / "ours.pth.tar")
    cfg = tiny_config("--meta.max_steps=3", "--optimization.ipe=1", "--meta.load_checkpoint=true",
                      f"--meta.read_checkpoint={out}", f"--logging.folder={tmp_path}/next")
    encoder, predictor, target = build_encoder(cfg), build_predictor(cfg), build_encoder(cfg)
    state = load_start_weights(out, encoder, predictor, target)
    saved = load_checkpoint(latest_path(tmp_path / "run", "jepa"))
    for module, entry in ((encoder, "encoder"), (predictor, "predictor"), (target, "target_encoder")):
        assert all(torch.equal(module.state_dict()[k], v) for k, v in saved[entry].items()), entry
    assert state["epoch"] == 2
    summary = train(cfg)  # continues at the file's epoch (2 x ipe 1), as the reference's load_checkpoint
    assert (summary["start_step"], summary["steps"]) == (2, 1)
    with pytest.raises(CheckpointMismatch, match="keys the model lacks"):  # another model's file: named, not ignored
        load_start_weights(out, build_encoder(cfg), build_predictor(cfg), build_encoder(
            tiny_config("--model.depth=2")))
