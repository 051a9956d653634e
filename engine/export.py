"""`python -m engine.export RUN_FOLDER OUT.pth.tar`: a run's latest weights in the released V-JEPA layout (spec 8.1),
so that tools written for the official files read ours (`models.load_pretrained` among them).

The output holds `encoder`, `predictor` and `target_encoder` (fp32, keys `module.backbone.<name>`, as a reference
training run writes them), the reference's `epoch`, `loss`, `batch_size`, `world_size`, `lr`, and the run's resolved
`config` (ours; the evaluation reads the architecture from it). It holds weights only: no optimizer state (a run
continues from its own folder). Sources:

* the PyTorch backend's `<write_tag>-latest.pth.tar`;
* a DeepSpeed run's `deepspeed/<latest tag>`: stage 0 stores the whole module; ZeRO-1/2/3 store the fp32 master
  weights partitioned over ranks, consolidated with DeepSpeed's `zero_to_fp32` (this also gives fp32 weights for runs
  with bf16 weights). The EMA target is whole in the client state at stages 0-2; under ZeRO-3 each rank's file holds
  its partition of every parameter (engine/zero3.py), concatenated here in rank order.

Written under a temporary name and renamed, like every checkpoint of the engine.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch

from models.pretrained import add_wrappers, load_strict, read_file

from .build import build_encoder, build_predictor
from .checkpoint import latest_path, load_checkpoint
from .config import Config, load_config

META = ("epoch", "loss", "batch_size", "world_size", "lr")


def run_config(folder: Path) -> Config:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a run folder: no config.json (the training command writes it)")
    return load_config(path)


def export_state(folder: str | Path) -> dict[str, Any]:
    """The run's latest weights and metadata in the released layout."""
    folder = Path(folder)
    cfg = run_config(folder)
    ds_folder = folder / "deepspeed"
    if (ds_folder / "latest").is_file():
        weights, meta = _deepspeed_weights(ds_folder, cfg)
    else:
        path = latest_path(folder, cfg.logging.write_tag)
        if not path.is_file():
            raise FileNotFoundError(f"{folder} holds no checkpoint ({path.name} or deepspeed/latest): train first")
        state = load_checkpoint(path)
        weights = {e: state[e] for e in ("encoder", "predictor", "target_encoder")}
        meta = state
    # rebuilt from the run's config and filled strictly: a key or shape out of place fails here, not in a user's tool
    modules = {"encoder": build_encoder(cfg), "predictor": build_predictor(cfg), "target_encoder": build_encoder(cfg)}
    out: dict[str, Any] = {}
    for entry, module in modules.items():
        load_strict(module, weights[entry], where=f"{folder} [{entry}]")
        out[entry] = add_wrappers({k: v.float() for k, v in module.state_dict().items()})
    out.update({key: meta.get(key) for key in META})
    out["config"] = cfg.to_dict()  # ours: the architecture of a model outside the named variants (tiny configs)
    return out


def _deepspeed_weights(ds_folder: Path, cfg: Config) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    tag = (ds_folder / "latest").read_text().strip()
    tag_folder = ds_folder / tag
    rank_files = sorted(tag_folder.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"), key=_rank)
    whole_file = tag_folder / "mp_rank_00_model_states.pt"
    meta = read_file(rank_files[0] if rank_files else whole_file, weights_only=False)
    optimizer_files = list(tag_folder.glob("zero_pp_rank_*_optim_states.pt"))
    if optimizer_files:  # ZeRO-1/2/3: fp32 master weights from the optimizer partitions
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        online = get_fp32_state_dict_from_zero_checkpoint(str(ds_folder), tag=tag)
    else:  # stage 0: the engine's module, whole
        online = meta["module"]
    weights = {name: {k[len(name) + 1:]: v for k, v in online.items() if k.startswith(name + ".")}
               for name in ("encoder", "predictor")}
    if "target_encoder" in meta:
        weights["target_encoder"] = meta["target_encoder"]
    else:  # ZeRO-3: every rank's partitions
        shards = [read_file(f, weights_only=False)["target_encoder_shards"] for f in rank_files]
        params = {k: p.detach() for k, p in build_encoder(cfg).named_parameters()}  # the order ZeRO-3 saved
        weights["target_encoder"] = _unpartition(params, shards)
    # the frozen position tables are not trained: ZeRO's consolidation may leave them out
    for name, module in (("encoder", build_encoder(cfg)), ("predictor", build_predictor(cfg))):
        for key, value in module.state_dict().items():
            weights[name].setdefault(key, value)
    return weights, meta


def _rank(path: Path) -> int:
    return int(path.name.split("_")[3])


def _unpartition(template: dict[str, torch.Tensor], shards: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Whole tensors from ZeRO-3 partitions: rank r holds elements [r*s, (r+1)*s) of each flattened parameter,
    s = ceil(numel / world), the last one padded."""
    world = len(shards)
    out = {}
    for i, (key, like) in enumerate(template.items()):
        size = math.ceil(like.numel() / world)
        parts = [rank_shards[i].flatten() for rank_shards in shards]
        if any(p.numel() != size for p in parts):
            raise ValueError(f"ZeRO-3 partitions of {key} do not fit its shape {tuple(like.shape)} over {world} ranks")
        out[key] = torch.cat(parts)[:like.numel()].view_as(like).clone()
    return out


def export(folder: str | Path, out: str | Path) -> Path:
    out = Path(out)
    state = export_state(folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_folder", help="a training run's logging.folder")
    parser.add_argument("out", help="output file, e.g. vitl16-ours.pth.tar")
    args = parser.parse_args(argv)
    try:
        path = export(args.run_folder, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    state = read_file(path, weights_only=False)
    params = sum(v.numel() for v in state["target_encoder"].values())
    print(f"wrote {path}: encoder, predictor, target_encoder ({params / 1e6:.2f} M parameters), epoch {state['epoch']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
