"""engine.evaluation.readout: the variance share of positions, the ridge read-outs, token alignment (an encoder whose
features are its tokens' pixels reads colour back exactly), and the CLI on a tiny run."""

import types

import numpy as np
import pytest
import torch

from engine.evaluation import readout


def test_position_share_of_pure_position_noise_and_a_mix():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(1, 64, 8))
    noise = rng.normal(size=(400, 64, 8))
    assert readout.position_share(np.broadcast_to(table, (400, 64, 8))) == pytest.approx(1.0)
    assert readout.position_share(noise) < 0.01  # per-position means of 400 clips: variance ~1/400
    assert readout.position_share(table + noise) == pytest.approx(0.5, abs=0.1)


def test_ridge_recovers_a_linear_map():
    rng = np.random.default_rng(1)
    x, w = rng.normal(size=(500, 6)), rng.normal(size=(6, 2))
    x_test = rng.normal(size=(50, 6))
    prediction = readout.ridge_predict(x, x @ w + 3.0, x_test, lam=1e-9)
    np.testing.assert_allclose(prediction, x_test @ w + 3.0, atol=1e-6)
    assert readout.r2(x_test @ w, prediction - 3.0) == pytest.approx(1.0)


class _PixelEncoder(torch.nn.Module):
    """Features = each token's mean normalised RGB, in (t, h, w) order: colour reads back with R^2 1 only if the
    read-out's tokens line up with the encoder's."""

    grid = (2, 4, 4)

    def __init__(self):
        super().__init__()
        self.patch_embed = types.SimpleNamespace(patch_size=8, tubelet_size=2)
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, video):
        b = video.shape[0]
        x = video.reshape(b, 3, 2, 2, 4, 8, 4, 8).mean(dim=(3, 5, 7))  # (B, 3, T', H', W')
        return x.flatten(2).transpose(1, 2)


def test_token_alignment_with_an_encoder_of_pixels():
    from engine.data.synthetic import SyntheticSpec
    from engine.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    encoder = _PixelEncoder()
    split = readout._Split(encoder, SyntheticSpec(num_train=8, num_val=8, size=32, num_frames=7), "train", 8, 2)
    # un-normalised features are exactly the colours the read-out attributes to each token
    np.testing.assert_allclose(split.features * IMAGENET_STD + np.array(IMAGENET_MEAN), split.colour, atol=1e-6)
    assert split.coverage.shape == (8, 32) and split.coverage.max() > 0.5
    out = readout.readout(encoder, frame_step=2, num_train=48, num_val=24)
    assert out["colour_r2"] > 0.9 and 0 <= out["position_share"] <= 100 and 0 <= out["motion_top1"] <= 100


def test_cli_reads_out_a_run_and_refuses_a_file_without_config(tiny_run, tmp_path, capsys):
    assert readout.main(["--checkpoint", str(tiny_run), "--random-init", "--num-train", "32", "--num-val", "16"]) == 0
    table = capsys.readouterr().out
    assert "random init" in table and "pretrained" in table and "position share" in table
    bare = tmp_path / "bare.pth.tar"
    torch.save({"target_encoder": {}}, bare)
    assert readout.main(["--checkpoint", str(bare)]) == 2
    assert "needs a run folder" in capsys.readouterr().err
