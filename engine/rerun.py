"""What a rerun of a run folder may change. Rerunning a command continues the folder's latest checkpoint, bit for bit
only with the same config; this module compares the rerun's config with the one the folder's run last started with
(`config.json`), before anything is built, and sorts the differences:

- refused: keys that shape the networks (a checkpoint of another width or depth fails deep inside torch or DeepSpeed
  with a size mismatch; another grid or head count would load and silently compute something else) or name the
  checkpoints (another `write_tag` would start over in a folder that has a run);
- silent: keys that only say how the run is executed, logged or stopped (workers, logging and checkpoint intervals,
  `max_steps`, grace periods, profiling);
- announced, key by key: every other change (schedules, masks, batch, data, precision, seed). The run continues with
  the new values, which is how a run is extended or re-tuned, and no longer matches an uninterrupted one.

A folder whose checkpoint was written by the other backend is refused too: the rerun would find nothing to resume and
start over at step 0 in it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import ds_checkpoint
from .checkpoint import latest_path, step_files
from .config import Config, ConfigError

# The networks' shapes and functions: resuming across them is not resuming (a new folder can start from the weights
# with meta.load_checkpoint, which maps position tables across grids).
STRUCTURAL = ("model.model_name", "model.embed_dim", "model.depth", "model.num_heads", "model.pred_depth",
              "model.pred_embed_dim", "model.pred_num_heads", "model.uniform_power", "model.use_mask_tokens",
              "data.num_frames", "data.tubelet_size", "data.crop_size", "data.patch_size", "logging.write_tag")
# How the run executes, logs and stops; none of them changes a step's result (the loader's randomness is a function of
# (seed, step, sample), not of the workers; init-only keys do nothing on resume).
SILENT = ("app", "nodes", "tasks_per_node", "logging.folder", "logging.log_every", "logging.checkpoint_every",
          "logging.keep_last", "data.num_workers", "data.pin_mem", "data.synthetic_root", "data.dataset_type",
          "data.decode_one_clip", "meta.max_steps", "meta.profile_steps", "meta.preempt_grace_s",
          "meta.max_nonfinite_steps", "meta.eval_freq", "meta.use_sdpa", "meta.backend", "meta.load_checkpoint",
          "meta.read_checkpoint", "model.rescale_init_by_depth", "model.zero_init_mask_tokens")


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a resolved config (nested sections, the mask list by index: `mask.1.num_blocks`)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif key == "mask" and not prefix and isinstance(value, list):
            flat["mask"] = len(value)  # the generator count is a network shape: one mask token each
            for i, generator in enumerate(value):
                flat.update(flatten(generator, f"mask.{i}."))
        else:
            flat[name] = value
    return flat


def changes(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(refused, announced) differences between two resolved configs, as `key: old -> new` lines. A key that only one
    side has (a config.json from an older version of the engine) is not a difference."""
    old, new = flatten(saved), flatten(current)
    refused, announced = [], []
    for key in sorted(old.keys() & new.keys()):
        if old[key] == new[key] or key in SILENT:
            continue
        line = f"{key}: {json.dumps(old[key])} -> {json.dumps(new[key])}"
        (refused if key in STRUCTURAL or key == "mask" else announced).append(line)
    return refused, announced


def check_rerun(cfg: Config, folder: Path, use_ds: bool) -> list[str]:
    """Lines announcing the allowed changes since the run in `folder` last started ([] for a new folder or the same
    config); ConfigError for a refused change or a checkpoint of the other backend. Reads files only: every rank can
    call it, before any model or process-group work."""
    resolved = folder / "config.json"
    saved, unreadable = None, False
    if resolved.is_file():
        try:
            saved = json.loads(resolved.read_text())
        except (OSError, ValueError):
            unreadable = True
    # the checkpoints are looked for under the run's own tag, so that a changed write_tag is refused, not a new start
    tag = ((saved or {}).get("logging") or {}).get("write_tag", cfg.logging.write_tag)
    torch_ckpt = _torch_checkpoint(folder, tag)
    ds_tag = ds_checkpoint.latest_tag(folder / "deepspeed")
    if use_ds and ds_tag is None and torch_ckpt is not None:
        raise ConfigError(
            f"logging.folder {folder} holds a checkpoint of the PyTorch backend ({torch_ckpt.name}) and none of "
            "DeepSpeed's: this DeepSpeed run would start over at step 0 in it. Continue it with the backend that "
            "wrote it (python engine/train.py ... --meta.backend=torch), or start a DeepSpeed run in a new folder from "
            f"its weights: --logging.folder=NEW --meta.load_checkpoint=true "
            f"--meta.read_checkpoint={latest_path(folder, tag)}")
    if not use_ds and torch_ckpt is None and ds_tag is not None:
        raise ConfigError(
            f"logging.folder {folder} holds a DeepSpeed checkpoint (deepspeed/{ds_tag}) and none of the PyTorch "
            "backend's: this run would start over at step 0 in it. Continue it under DeepSpeed (deepspeed "
            f"engine/train.py ... or --meta.backend=deepspeed), or export its weights (python -m engine.export "
            f"{folder} start.pth.tar) and start a new folder from them: --logging.folder=NEW "
            "--meta.load_checkpoint=true --meta.read_checkpoint=start.pth.tar")
    if (ds_tag if use_ds else torch_ckpt) is None:
        return []  # nothing to resume: a fresh start
    if saved is None:  # no record to compare with
        return [f"warning: {resolved} cannot be read; the rerun's config is not checked against the run's"] * unreadable
    refused, announced = changes(saved, cfg.to_dict())
    if refused:
        listed = "\n  ".join(refused)
        raise ConfigError(
            f"logging.folder {folder} holds a run whose networks or checkpoint names differ from this config's, so it "
            f"cannot be continued:\n  {listed}\nUse the run's values to continue it; or start a new folder "
            f"(--logging.folder=NEW), from the run's weights with --meta.load_checkpoint=true "
            f"--meta.read_checkpoint=FILE (position tables follow the new grid)")
    if not announced:
        return []
    return [f"resuming {folder} with {len(announced)} setting(s) changed since its run last started; it continues "
            "with the new values, so it will not match an uninterrupted run:",
            *(f"  {line}" for line in announced)]


def _torch_checkpoint(folder: Path, write_tag: str) -> Path | None:
    if not folder.is_dir():
        return None
    files = step_files(folder, write_tag)
    if files:
        return files[-1]
    latest = latest_path(folder, write_tag)
    return latest if latest.is_file() else None
