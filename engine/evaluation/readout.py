"""What a frozen encoder's features hold about the synthetic set, read out linearly: the numbers behind the demo's
probes. `python -m engine.evaluation.readout --checkpoint RUN_FOLDER_OR_FILE [--random-init] [--num-train N]
[--num-val N] [--frame-step S]`.

Clips are rendered straight from the synthetic set's generator (engine/data/synthetic.py, no codec) at the encoder's
crop size, normalised without any resize, so every token's ground truth is known exactly. Ridge regressions (closed
form, float64, standardised features, penalty `lam * n`) fit on the training clips and score on held-out clips:

* position share: the fraction of the features' variance that the token's position alone explains (the variance of
  the per-position means over clips, over the total). A ViT with random weights passes its sin-cos position table
  through and sits near one half; a feature that says where a token is, whatever the clip, adds to it.
* object coverage R^2 and colour R^2: token features -> the fraction of the token's pixels covered by the main
  object, and their mean RGB.
* motion / shape from the object's tokens (top-1 %): per time step, the features averaged over the tokens weighted by
  the main object's coverage (the attention an ideal probe would learn), concatenated over time, then a ridge
  classifier. Direction can only come from where the object's tokens are at each time step, or from a motion
  feature inside each token.
* local direction R^2: on the tokens at least 40% covered by the main object, features -> the unit vector of its
  motion: how much motion each token encodes by itself.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.data.synthetic import APPEARANCE_CLASSES, MOTION_CLASSES, SyntheticSpec, plan_split, render_frames, \
    render_main_coverage
from engine.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from models import VisionTransformer

from .features import checkpoint_config, load_frozen_encoder

LOCAL_COVERAGE = 0.4  # tokens at least this much covered by the main object carry its local motion
METRICS = (("position_share", "position share of the feature variance", "%"),
           ("coverage_r2", "main-object coverage per token, R^2", ""),
           ("colour_r2", "mean colour per token, R^2", ""),
           ("motion_top1", "motion from the object's tokens, top-1", "%"),
           ("shape_top1", "shape from the object's tokens, top-1", "%"),
           ("local_direction_r2", "direction inside each object token, R^2", ""))


def position_share(features: torch.Tensor | np.ndarray) -> float:
    """Features (B, N, D) -> the share of their total variance explained by the token index alone."""
    x = np.asarray(features, dtype=np.float64)
    centred = x - x.mean(axis=(0, 1))
    return float((centred.mean(axis=0) ** 2).sum() * len(x) / (centred ** 2).sum())


def ridge_predict(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, lam: float) -> np.ndarray:
    """Ridge regression of y on standardised x (with an intercept, penalty lam * n), applied to x_test."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    a = np.c_[(x - mu) / sd, np.ones(len(x))]
    w = np.linalg.solve(a.T @ a + lam * len(x) * np.eye(a.shape[1]), a.T @ y)
    return np.c_[(x_test - mu) / sd, np.ones(len(x_test))] @ w


def r2(y: np.ndarray, prediction: np.ndarray) -> float:
    return float(1 - ((y - prediction) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())


def _classify(x: np.ndarray, labels: np.ndarray, x_test: np.ndarray, labels_test: np.ndarray, classes: int) -> float:
    scores = ridge_predict(x, np.eye(classes)[labels], x_test, lam=1.0)
    return float(100 * (scores.argmax(1) == labels_test).mean())


class _Split:
    """Rendered clips of one split: features (B, N, D), per-token coverage (B, N) and colour (B, N, 3), labels."""

    def __init__(self, encoder: VisionTransformer, spec: SyntheticSpec, split: str, count: int, frame_step: int,
                 batch: int = 64) -> None:
        t, h, w = encoder.grid
        tubelet, patch = encoder.patch_embed.tubelet_size, encoder.patch_embed.patch_size
        frames = np.arange(t * tubelet) * frame_step
        clips, self.motion, self.shape = plan_split(spec, split)
        self.motion, self.shape = self.motion[:count], self.shape[:count]
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1)
        device = next(encoder.parameters()).device
        features, coverage, colour = [], [], []

        def per_token(a: np.ndarray) -> np.ndarray:  # (B, F, H, W, ...) -> (B, N, ...): the mean over each tubelet
            a = a.reshape(len(a), t, tubelet, h, patch, w, patch, *a.shape[4:]).mean(axis=(2, 4, 6))
            return a.reshape(len(a), t * h * w, *a.shape[4:])

        for start in range(0, count, batch):
            params = clips[start:start + batch]
            pixels = np.stack([render_frames(p, frames) for p in params])  # (B, F, H, W, 3) uint8
            video = torch.from_numpy(pixels).permute(0, 4, 1, 2, 3).float().div(255)
            with torch.no_grad():
                features.append(encoder(((video - mean) / std).to(device)).float().cpu())
            coverage.append(per_token(np.stack([render_main_coverage(p, frames) for p in params])))
            colour.append(per_token(pixels.astype(np.float64) / 255))
        self.features = torch.cat(features).numpy().astype(np.float64)
        self.coverage, self.colour = np.concatenate(coverage), np.concatenate(colour)
        self.steps = t

    def object_pooled(self) -> np.ndarray:
        """(B, T' * D): per time step, the features weighted by the main object's coverage."""
        b, n, d = self.features.shape
        weights = self.coverage.reshape(b, self.steps, -1)
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-9)
        return np.einsum("btn,btnd->btd", weights, self.features.reshape(b, self.steps, -1, d)).reshape(b, -1)

    def local_direction(self) -> tuple[np.ndarray, np.ndarray]:
        angle = self.motion * np.pi / 4
        target = np.repeat(np.stack([np.cos(angle), np.sin(angle)], 1), self.coverage.shape[1], axis=0)
        chosen = self.coverage.reshape(-1) >= LOCAL_COVERAGE
        return self.features.reshape(-1, self.features.shape[-1])[chosen], target[chosen]


def readout(encoder: VisionTransformer, *, frame_step: int, num_train: int = 1024, num_val: int = 512,
            seed: int = 7) -> dict[str, float]:
    """The read-outs of METRICS for `encoder` on clips of a synthetic set rendered at its crop size."""
    size = encoder.patch_embed.patch_size * encoder.grid[1]
    t = encoder.grid[0] * encoder.patch_embed.tubelet_size
    spec = SyntheticSpec(num_train=num_train, num_val=num_val, size=size, num_frames=(t - 1) * frame_step + 1,
                         seed=seed)
    train, val = (_Split(encoder, spec, s, n, frame_step) for s, n in (("train", num_train), ("val", num_val)))
    d = train.features.shape[-1]
    tokens = (lambda split: split.features.reshape(-1, d))
    out = {"position_share": 100 * position_share(val.features)}
    out["coverage_r2"] = r2(val.coverage.reshape(-1, 1),
                            ridge_predict(tokens(train), train.coverage.reshape(-1, 1), tokens(val), lam=0.1))
    out["colour_r2"] = r2(val.colour.reshape(-1, 3),
                          ridge_predict(tokens(train), train.colour.reshape(-1, 3), tokens(val), lam=0.1))
    out["motion_top1"] = _classify(train.object_pooled(), train.motion, val.object_pooled(), val.motion,
                                   len(MOTION_CLASSES))
    out["shape_top1"] = _classify(train.object_pooled(), train.shape, val.object_pooled(), val.shape,
                                  len(APPEARANCE_CLASSES))
    (x, y), (x_val, y_val) = train.local_direction(), val.local_direction()
    out["local_direction_r2"] = r2(y_val, ridge_predict(x, y, x_val, lam=0.1))
    return out


def format_table(columns: dict[str, dict[str, float]]) -> str:
    """One row per metric, one column per named read-out."""
    lines = [f"{'':<44}" + "".join(f"{name:>14}" for name in columns)]
    for key, label, unit in METRICS:
        cells = "".join(f"{(f'{v[key]:.1f}%' if unit else f'{v[key]:.3f}'):>14}" for v in columns.values())
        lines.append(f"{label:<44}{cells}")
    lines.append(f"{'(chance: motion 12.5%, shape 25%)':<44}")
    return "\n".join(lines)


def encoder_readout(checkpoint: str | Path, *, random_init: bool = False, frame_step: int | None = None,
                    **kwargs: Any) -> dict[str, float]:
    """`readout` of the target encoder of a run folder or a file of ours (random weights with `random_init`), at
    the run's clip shape and frame step."""
    path = Path(checkpoint)
    cfg = checkpoint_config(path)
    if cfg is None:
        raise ValueError(f"{path}: the read-out needs a run folder or a file of ours (the synthetic clip shape)")
    encoder, _ = load_frozen_encoder(path, cfg, key="target_encoder", crop_size=cfg.data.crop_size,
                                     frames=cfg.data.num_frames, random_init=random_init, seed=cfg.meta.seed)
    if torch.cuda.is_available():  # fp32 forward passes over ~1.5k clips: minutes for a ViT-L on a CPU
        encoder = encoder.cuda()
    return readout(encoder, frame_step=frame_step or cfg.data.sampling_rate, **kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.evaluation.readout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a training run folder or a file of ours")
    parser.add_argument("--random-init", action="store_true", help="also read out the same encoder with random weights")
    parser.add_argument("--num-train", type=int, default=1024, help="rendered clips to fit on (default 1024)")
    parser.add_argument("--num-val", type=int, default=512, help="held-out rendered clips (default 512)")
    parser.add_argument("--frame-step", type=int, help="frames between sampled frames (default: the run's)")
    args = parser.parse_args(argv)
    kwargs = {"frame_step": args.frame_step, "num_train": args.num_train, "num_val": args.num_val}
    try:
        columns = {"pretrained": encoder_readout(args.checkpoint, **kwargs)}
        if args.random_init:
            columns = {"random init": encoder_readout(args.checkpoint, random_init=True, **kwargs), **columns}
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
