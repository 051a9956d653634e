"""Frozen evaluation: the attentive probe (V1 names, weight round trip), views and multi-segment aggregation against
a direct computation, label-efficiency splits, and a tiny end-to-end probe run with and without the feature cache."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from engine.config import ConfigError
from engine.evaluation.config import load_eval_config
from engine.evaluation.data import balanced_subset
from engine.evaluation.features import encode_views
from engine.evaluation.probe import AttentiveProbe, load_probe_state, save_probe
from engine.evaluation.views import eval_views

from .conftest import ROOT

V1_PROBE_KEYS = {  # spec 8.2, without DDP's module. prefix
    "pooler.query_tokens", "linear.weight", "linear.bias",
    *(f"pooler.cross_attention_block.{m}.{p}" for m in ("norm1", "xattn.q", "xattn.kv", "xattn.proj", "norm2",
                                                         "mlp.fc1", "mlp.fc2") for p in ("weight", "bias")),
}


def test_probe_has_v1_names_and_round_trips(tmp_path):
    torch.manual_seed(0)
    probe = AttentiveProbe(dim=48, num_heads=4, num_classes=7)
    assert set(probe.state_dict()) == V1_PROBE_KEYS
    assert probe.state_dict()["pooler.cross_attention_block.xattn.kv.weight"].shape == (96, 48)
    x = torch.randn(3, 11, 48)
    logits = probe(x)
    assert logits.shape == (3, 7)
    logits.sum().backward()
    assert probe.pooler.cross_attention_block.xattn.proj.weight.grad is None  # V1's unused projection
    path = save_probe(tmp_path / "probe.pth.tar", probe, epoch=3)
    saved = torch.load(path, weights_only=True)
    assert all(k.startswith("module.") for k in saved["classifier"]) and saved["epoch"] == 3
    again = AttentiveProbe(dim=48, num_heads=4, num_classes=7)
    again.load_state_dict(load_probe_state(path))  # strict
    torch.testing.assert_close(again(x), logits.detach())


def test_probe_query_is_not_normalised_but_tokens_are():
    """Scaling the tokens changes nothing (LayerNorm on keys/values); the query enters un-normalised."""
    torch.manual_seed(0)
    probe = AttentiveProbe(dim=16, num_heads=2, num_classes=3).eval()
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(probe(3 * x + 1), probe(x), atol=1e-5, rtol=1e-5)
    before = probe(x)
    with torch.no_grad():
        probe.pooler.query_tokens.mul_(3)
    assert not torch.allclose(probe(x), before)


def test_views_crop_along_the_long_side():
    frames = torch.randint(0, 256, (4, 32, 64, 3), dtype=torch.uint8)  # landscape, short side = crop: no resize
    views = eval_views(frames, crop=32, num_views=3)
    assert views.shape == (3, 3, 4, 32, 32)
    direct = eval_views(frames[:, :, 16:48], crop=32, num_views=3)[0]  # the centre view is columns 16..47
    torch.testing.assert_close(views[1], direct)
    one = eval_views(frames, crop=28, num_views=1)  # resize the short side to 32, then the centre crop
    assert one.shape == (1, 3, 4, 28, 28)


class _PerClipEncoder(torch.nn.Module):
    """A stand-in encoder: token n of a clip is (clip mean, n), so where each output came from is visible."""

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        b = video.shape[0]
        mean = video.flatten(1).mean(1)
        return torch.stack([mean[:, None].expand(b, 5), torch.arange(5.0).expand(b, 5)], dim=-1)


def test_segments_are_concatenated_per_view():
    clips = torch.randn(2, 3, 4, 3, 2, 4, 4)  # (B, S, V, 3, F, H, W)
    out = encode_views(_PerClipEncoder(), clips, dtype="float32", clips_per_forward=5)  # chunks cross clips
    assert out.shape == (2, 4, 3 * 5, 2)
    for b in range(2):
        for v in range(4):
            for s in range(3):
                rows = out[b, v, s * 5:(s + 1) * 5]
                assert torch.allclose(rows[:, 0], clips[b, s, v].mean().expand(5))
                assert torch.equal(rows[:, 1], torch.arange(5.0))


def test_label_efficiency_splits_are_disjoint_seeded_and_balanced():
    labels = np.repeat(np.arange(4), [10, 20, 30, 40])
    splits = [balanced_subset(labels, fraction=0.1, per_class=None, seed=3, split=k) for k in range(3)]
    for k, chosen in enumerate(splits):
        assert np.bincount(labels[chosen]).tolist() == [1, 2, 3, 4]
        assert np.array_equal(chosen, balanced_subset(labels, fraction=0.1, per_class=None, seed=3, split=k))
    assert not set(splits[0]) & set(splits[1]) and not set(splits[1]) & set(splits[2])
    other = balanced_subset(labels, fraction=0.1, per_class=None, seed=4, split=0)
    assert not np.array_equal(other, splits[0])
    fixed = balanced_subset(labels, fraction=None, per_class=5, seed=0, split=1)
    assert np.bincount(labels[fixed]).tolist() == [5, 5, 5, 5]
    with pytest.raises(ValueError, match="too few for 3 disjoint splits"):
        balanced_subset(labels, fraction=None, per_class=5, seed=0, split=2)


def test_augmentation_config_errors():
    data = ['--data.train=["a.csv"]', '--data.val=["b.csv"]']
    cfg = load_eval_config(None, data)  # V1's recipe is the default, and implemented
    assert (cfg.data_aug.rand_augment, cfg.data_aug.auto_augment, cfg.data_aug.reprob) == (True, True, 0.25)
    with pytest.raises(ConfigError, match=r"data_aug.reprob .* must be in \[0, 1\]"):
        load_eval_config(None, [*data, "--data_aug.reprob=1.5"])
    with pytest.raises(ConfigError, match="random_resize_scale must be"):
        load_eval_config(None, [*data, "--data_aug.random_resize_scale=[0.5, 0.1]"])
    with pytest.raises(ConfigError, match="cache_features needs data_aug.enabled=false"):
        load_eval_config(None, [*data, "--meta.cache_features=true", "--data_aug.rand_augment=false",
                                "--data_aug.reprob=0"])


def _eval_config(synthetic_root, folder, *extra):
    return load_eval_config(ROOT / "configs" / "eval" / "synthetic_appearance.json", [
        "--data.synthetic_root=null", f"--data.train=[\"{synthetic_root}/appearance_train.csv\"]",
        f"--data.val=[\"{synthetic_root}/appearance_val.csv\"]", "--data.num_workers=0", "--optimization.epochs=2",
        f"--logging.folder={folder}", *extra])


def test_tiny_eval_end_to_end_with_and_without_the_cache(tiny_run, synthetic_root, tmp_path):
    from engine.evaluation.runner import run_eval

    cached = run_eval(_eval_config(synthetic_root, tmp_path / "cached"), str(tiny_run), say=lambda *a: None)
    plain = run_eval(_eval_config(synthetic_root, tmp_path / "plain", "--meta.cache_features=false"), str(tiny_run),
                     say=lambda *a: None)
    for a, b in zip(cached["history"][0], plain["history"][0]):  # the cache changes no number
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6) and a["val_top1"] == b["val_top1"]
    results = json.loads((tmp_path / "cached" / "results.json").read_text())
    assert results["num_classes"] == 4 and len(results["history"][0]) == 2 and 0 <= results["top1"] <= 100
    assert results["protocol"] == {"frames": 8, "segments": 1, "views": 1, "frame_step": 2, "crop_size": 64}
    assert str(tiny_run) in results["checkpoint"] and results["deviations"]
    assert (tmp_path / "cached" / "probe-split0.pth.tar").is_file()


def test_long_work_shows_progress_lines(tiny_run, synthetic_root, tmp_path):
    from engine.evaluation.runner import run_eval

    said = []
    run_eval(_eval_config(synthetic_root, tmp_path / "chatty", "--data.batch_size=8",
                          "--logging.progress_every_s=1e-9"), str(tiny_run), say=said.append)
    text = "\n".join(said)
    for expected in (r"feature cache: batch 3/3 \| [\d.]+ clips/s \| eta 0m00s",
                     r"split 0 epoch 2/2 batch 2/3 \| train loss [\d.]+ acc [\d.]+% \(rank 0\) \| [\d.]+ clips/s "
                     r"\| eta",
                     r"validation: batch 1/1 \|"):
        assert re.search(expected, text), (expected, text)
    quiet = []  # the default (30 s): a short run prints its epochs only
    run_eval(_eval_config(synthetic_root, tmp_path / "quiet", "--data.batch_size=8"), str(tiny_run),
             say=quiet.append)
    assert not any("batch" in line for line in quiet) and any("epoch 2/2" in line for line in quiet)


def test_eval_cli_random_init_and_errors(tiny_run, synthetic_root, tmp_path):
    base = [sys.executable, "engine/eval.py", "--config", "configs/eval/synthetic_appearance.json",
            "--data.synthetic_root=null", f"--data.train=[\"{synthetic_root}/appearance_train.csv\"]",
            f"--data.val=[\"{synthetic_root}/appearance_val.csv\"]", "--data.num_workers=0",
            "--optimization.epochs=1", f"--logging.folder={tmp_path}/r"]
    ok = subprocess.run([*base, "--checkpoint", str(tiny_run), "--random-init"], cwd=ROOT, capture_output=True,
                        text=True)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "random init (seed 0)" in json.loads((tmp_path / "r" / "results.json").read_text())["checkpoint"]
    bad = subprocess.run([*base, "--checkpoint", str(tiny_run), "--optimisation.epochs=1"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown key 'optimisation'" in bad.stderr
    missing = subprocess.run([*base, "--checkpoint", str(tmp_path / "nope")], cwd=ROOT, capture_output=True,
                             text=True)
    assert missing.returncode == 2 and "checkpoint not found" in missing.stderr
    cut = tmp_path / "cut.pth.tar"
    cut.write_bytes((tiny_run / "jepa-latest.pth.tar").read_bytes()[:50_000])  # a copy cut short
    damaged = subprocess.run([*base, "--checkpoint", str(cut)], cwd=ROOT, capture_output=True, text=True)
    assert damaged.returncode == 2 and f"error: {cut} does not load as a checkpoint" in damaged.stderr
    assert "Traceback" not in damaged.stderr


def test_bad_videos_are_replaced_reported_and_too_many_stop_the_run(tiny_run, synthetic_root, tmp_path):
    from engine.data.bad_videos import TooManyBadVideos
    from engine.evaluation.runner import run_eval

    (tmp_path / "corrupt.webm").write_bytes(b"\x1aE\xdf\xa3" + bytes(range(256)) * 8)
    index = tmp_path / "train.csv"
    index.write_text((synthetic_root / "appearance_train.csv").read_text() + f"{tmp_path / 'corrupt.webm'} 1\n"
                     f"{tmp_path / 'missing.webm'} 2\n")
    cfg = _eval_config(synthetic_root, tmp_path / "out", f"--data.train=[\"{index}\"]",
                       "--data.max_bad_fraction=0.2")
    results = run_eval(cfg, str(tiny_run), say=lambda *a: None)
    assert sorted(results["bad_videos"]) == [str(tmp_path / "corrupt.webm"), str(tmp_path / "missing.webm")]
    assert "missing" in results["bad_videos"][str(tmp_path / "missing.webm")]
    assert any("2 bad index entries (bad_videos) were replaced" in d for d in results["deviations"])
    plain = run_eval(_eval_config(synthetic_root, tmp_path / "plain", f"--data.train=[\"{index}\"]",
                                  "--data.max_bad_fraction=0.2", "--meta.cache_features=false"), str(tiny_run),
                     say=lambda *a: None)
    # the cache keeps the replacements' labels
    for a, b in zip(results["history"][0], plain["history"][0], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6) and a["train_top1"] == b["train_top1"]
    rows = (tmp_path / "out" / "bad_videos.csv").read_text().splitlines()
    assert rows[0] == "path,reason,epoch" and len(rows) == 3
    run = subprocess.run([sys.executable, "engine/eval.py", "--config", "configs/eval/synthetic_appearance.json",
                          "--checkpoint", str(tiny_run), "--data.synthetic_root=null", f"--data.train=[\"{index}\"]",
                          f"--data.val=[\"{synthetic_root}/appearance_val.csv\"]", "--data.num_workers=1",
                          "--data.max_bad_fraction=0.01", f"--logging.folder={tmp_path / 'strict'}"], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 1, run.stderr[-2000:]
    assert "error: 2 of " in run.stderr and "data.max_bad_fraction = 1.0%" in run.stderr
    assert "Traceback" not in run.stderr
    assert TooManyBadVideos.__name__ not in run.stderr.splitlines()[-1]


def test_image_folder_probe_repeats_each_image_along_time(tiny_run, tmp_path):
    """Spec 6.5: ImageFolder-style data, every image a clip of F copies of itself."""
    from engine.evaluation.runner import run_eval

    from .video_faults import write_image

    for split in ("train", "val"):
        for c, name in enumerate(("cat", "dog")):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(3):
                write_image(tmp_path / split / name / f"{i}.png", seed=10 * c + i)
    cfg = load_eval_config(ROOT / "configs" / "eval" / "in1k.json", [
        f"--data.train=[\"{tmp_path / 'train'}\"]", f"--data.val=[\"{tmp_path / 'val'}\"]", "--data.num_classes=2",
        "--data.frames_per_clip=8", "--data.crop_size=64", "--data.num_workers=0", "--data.batch_size=4",
        "--data_aug.enabled=false", "--optimization.epochs=1", "--meta.dtype=float32",
        f"--logging.folder={tmp_path / 'out'}"])
    results = run_eval(cfg, str(tiny_run), say=lambda *a: None)
    assert results["num_classes"] == 2 and results["splits"][0]["train_samples"] == 6


@pytest.mark.parametrize("recipe", ["k400_16x8x3", "ssv2_16x2x3", "in1k"])
def test_recipe_configs_state_v1s_protocol(recipe):
    cfg = load_eval_config(ROOT / "configs" / "eval" / f"{recipe}.json")
    expected = {"k400_16x8x3": (400, 16, 8, 3), "ssv2_16x2x3": (174, 16, 2, 3), "in1k": (1000, 16, 1, 1)}[recipe]
    d, aug = cfg.data, cfg.data_aug
    assert (d.num_classes, d.frames_per_clip, d.num_segments, d.num_views) == expected
    # V1's training augmentation (spec 6.3 videos, 6.5 images), in full
    assert aug.enabled and aug.rand_augment and aug.auto_augment and aug.reprob == 0.25
    assert aug.random_resize_scale == [0.08, 1.0] and aug.random_resize_aspect_ratio == pytest.approx([3 / 4, 4 / 3])
    assert (cfg.optimization.epochs, cfg.optimization.lr, cfg.optimization.final_weight_decay) == (20, 1e-3, 1e-6)
