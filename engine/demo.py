"""`python -m engine.demo [--section.key=value ...]`: the README's main command. Pretrains the tiny config on the
synthetic moving-shapes set (generated on first use), then probes the frozen encoder on both synthetic tasks, motion
(8 directions) and appearance (4 shapes), against an encoder of the same shape with random weights, and prints
top-1 beside chance; then linear read-outs of what both encoders' features hold (engine/evaluation/readout.py), which
say why the probes come out as they do. Overrides apply to the pretraining config (e.g. --meta.max_steps=100)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import ConfigError, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("motion", "appearance")
PROBE_SEEDS = 3  # probes per (task, encoder): mean and spread over their seeds
READOUT_CLIPS = (512, 256)  # rendered clips to fit / score the read-outs on: ~10 s per encoder on 2 cores


def _probe(task: str, folder: Path, random_init: bool) -> dict:
    from engine.evaluation.config import load_eval_config
    from engine.evaluation.runner import run_eval

    name = "random" if random_init else "pretrained"
    out = folder / "eval" / task / name
    # probed afresh on every demo run: an earlier demo's probes may belong to other weights (its pretraining went on
    # since, or ran with other overrides), which the evaluation would refuse to continue
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_eval_config(ROOT / "configs" / "eval" / f"synthetic_{task}.json",
                           [f"--logging.folder={out}", f"--data.splits={PROBE_SEEDS}"])
    print(f"\n== probe: {task}, {name} encoder ==", flush=True)
    return run_eval(cfg, str(folder), random_init=random_init)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = load_config(ROOT / "configs" / "tiny_synthetic.json", argv if argv is not None else sys.argv[1:])
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from engine.loop import train

    summary = train(cfg)
    folder = Path(summary["folder"])
    rows = []
    for task in TASKS:
        pretrained, random = _probe(task, folder, False), _probe(task, folder, True)
        rows.append((task, pretrained["num_classes"], pretrained, random))
    print(f"\nFrozen attentive probes on the synthetic validation set ({PROBE_SEEDS} probe seeds, top-1 %, mean +- std)")
    print(f"{'task':<12}{'classes':>8}{'chance':>9}{'random init':>16}{'pretrained':>16}")
    for task, classes, pretrained, random in rows:
        print(f"{task:<12}{classes:>8}{100 / classes:>9.1f}{random['top1']:>10.1f} +- {random['top1_std']:<3.1f}"
              f"{pretrained['top1']:>10.1f} +- {pretrained['top1_std']:<3.1f}")
    print(f"results: {folder / 'eval'}/<task>/<pretrained|random>/results.json")

    from engine.evaluation.readout import encoder_readout, format_table

    train_clips, val_clips = READOUT_CLIPS
    print(f"\nWhat the features hold: linear read-outs on {train_clips} + {val_clips} freshly rendered clips "
          f"(python -m engine.evaluation.readout --checkpoint {folder} --random-init)")
    columns = {name: encoder_readout(folder, random_init=random_init, num_train=train_clips, num_val=val_clips)
               for name, random_init in (("random init", True), ("pretrained", False))}
    print(format_table(columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
