"""`python -m engine.plot RUN_FOLDER [--out DIR]`: PNG pictures of a training run's metrics.csv.

Four figures, each a column of panels sharing the step axis: `loss.png` (log scale), `schedules.png` (lr, weight
decay, EMA momentum), `throughput.png` (clips/s, tokens/s, MFU, data-wait fraction) and `collapse.png` (target and
prediction spread, effective rank of the targets). A panel whose column the run did not log (older runs lack some)
is left out; a figure with none of its columns is not written.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only: training machines have no display, and this must precede the pyplot import
import matplotlib.pyplot as plt  # noqa: E402


@dataclass(frozen=True)
class Panel:
    column: str
    label: str
    log: bool = False
    from_zero: bool = False  # y axis starts at 0, so that a fall reads at its true size


@dataclass(frozen=True)
class Figure:
    name: str
    title: str
    panels: tuple[Panel, ...]


FIGURES = (
    Figure("loss.png", "Training loss", (Panel("loss", "L1 loss", log=True),)),
    Figure("schedules.png", "Schedules", (Panel("lr", "learning rate"), Panel("wd", "weight decay"),
                                          Panel("momentum", "EMA momentum"))),
    Figure("throughput.png", "Throughput", (Panel("samples_per_s", "clips / s", from_zero=True),
                                            Panel("tokens_per_s", "tokens / s", from_zero=True),
                                            Panel("mfu", "MFU", from_zero=True),
                                            Panel("data_wait_frac", "data-wait fraction", from_zero=True))),
    Figure("collapse.png", "Collapse diagnostics: a falling spread or rank means the features collapse\n"
                           "(a low loss is then no sign of learning)",
           (Panel("target_std_tokens", "target std\n(tokens)", from_zero=True),
            Panel("target_std_clips", "target std\n(clips)", from_zero=True),
            Panel("pred_std", "prediction std", from_zero=True),
            Panel("target_rank", "target eff. rank", from_zero=True))),
)


def read_metrics(path: Path) -> dict[str, np.ndarray]:
    """Columns of metrics.csv as float arrays; empty cells and "nan" become NaN."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path} has no rows: the run has not reached its first logging step "
                         "(logging.log_every); train further or pass another run folder")
    return {name: np.array([_number(row.get(name)) for row in rows]) for name in rows[0]}


def _number(text: str | None) -> float:
    try:
        return float(text) if text else math.nan
    except ValueError:
        return math.nan


def plot_run(folder: str | Path, out: str | Path | None = None) -> list[Path]:
    """Draw the run's figures into `out` (default FOLDER/plots); returns the paths written."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"run folder {folder} not found: pass a training run's logging.folder")
    path = folder / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: training writes it at its first logging step; pass a run folder "
                                "that has trained")
    metrics = read_metrics(path)
    if "step" not in metrics:
        raise ValueError(f"{path} has no 'step' column: not a metrics.csv written by training")
    out = Path(out) if out is not None else folder / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for figure in FIGURES:
        panels = [p for p in figure.panels if p.column in metrics]
        if panels:
            written.append(_draw(figure, panels, metrics, out / figure.name))
    return written


def _draw(figure: Figure, panels: list[Panel], metrics: dict[str, np.ndarray], path: Path) -> Path:
    fig, axes = plt.subplots(len(panels), 1, sharex=True, squeeze=False, figsize=(7, 1.2 + 2.0 * len(panels)))
    step = metrics["step"]
    for ax, panel in zip(axes[:, 0], panels):
        values = metrics[panel.column]
        finite = np.isfinite(values)
        ax.set_ylabel(panel.label)
        ax.grid(alpha=0.3)
        if not finite.any():  # logged but empty, e.g. MFU on a CPU (no data-sheet peak)
            ax.text(0.5, 0.5, "no values logged", transform=ax.transAxes, ha="center", va="center", color="gray")
            continue
        # markers: a short run logs a handful of rows, and a single row draws no line
        ax.plot(step[finite], values[finite], marker=".", markersize=3, linewidth=1)
        if panel.log and (values[finite] > 0).all():
            ax.set_yscale("log")
        elif panel.from_zero:
            ax.set_ylim(bottom=0)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(figure.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_folder", help="a training run's logging.folder (holds metrics.csv)")
    parser.add_argument("--out", help="folder for the PNGs (default RUN_FOLDER/plots)")
    args = parser.parse_args(argv)
    try:
        paths = plot_run(args.run_folder, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
