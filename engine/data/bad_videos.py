"""Bad index entries met during training: reported once each, recorded in the run folder, and a stop when too many.

The loader replaces every failing entry with another one (`engine.data.dataset`), so a corrupt file never kills a long
run; this report makes sure it is not silent either. Each path is warned about once per run (resumed runs read the
file back) and appended to `bad_videos.csv` (rank r > 0: `bad_videos_rank{r}.csv`, so ranks never write one file).
When the share of failed attempts among all attempts exceeds `data.max_bad_fraction` (checked once at least
`min_attempts` have been made, so a few early failures do not stop a run), training stops with an error naming the
files and reasons: at that rate the data is wrong (a missing mount, a wrong index), not a few damaged files.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


class TooManyBadVideos(RuntimeError):
    """More than `data.max_bad_fraction` of the entries opened were bad."""


class BadVideoReport:
    def __init__(self, folder: str | Path, rank: int, max_fraction: float, min_attempts: int = 100,
                 position: str = "step"):
        name = "bad_videos.csv" if rank == 0 else f"bad_videos_rank{rank}.csv"
        self.path = Path(folder) / name
        self.max_fraction = max_fraction
        self.min_attempts = min_attempts
        self.position = position  # what `update`'s step counts (the evaluation's: epochs), the CSV's third column
        self.reasons: dict[str, str] = {}  # every bad path met in this run (or an earlier part of it)
        self.failed_attempts = 0
        self.attempts = 0
        if self.path.is_file():
            with open(self.path, newline="") as f:
                self.reasons = {row["path"]: row["reason"] for row in csv.DictReader(f)}

    def update(self, failures: list[tuple[str, str]], samples: int, step: int) -> None:
        """Account for one batch of `step`: `samples` samples loaded, after `failures` replaced entries (path,
        reason)."""
        self.failed_attempts += len(failures)
        self.attempts += samples + len(failures)
        new = {path: reason for path, reason in failures if path not in self.reasons}
        if new:
            fresh_file = not self.path.is_file()
            with open(self.path, "a", newline="") as f:
                writer = csv.writer(f)
                if fresh_file:
                    writer.writerow(["path", "reason", self.position])
                writer.writerows([path, reason, step] for path, reason in new.items())
            for path, reason in new.items():
                logger.warning("bad video skipped (another sample replaces it): %s: %s", path, reason)
            self.reasons.update(new)
        fraction = self.failed_attempts / max(self.attempts, 1)
        if self.attempts >= self.min_attempts and fraction > self.max_fraction:
            listed = "\n".join(f"  {path}: {reason}" for path, reason in list(self.reasons.items())[:20])
            more = f"\n  ... {len(self.reasons) - 20} more" if len(self.reasons) > 20 else ""
            raise TooManyBadVideos(
                f"{self.failed_attempts} of {self.attempts} index entries opened were bad ({fraction:.1%} > "
                f"data.max_bad_fraction = {self.max_fraction:.1%}); {len(self.reasons)} distinct files, all listed "
                f"in {self.path}:\n{listed}{more}\nCheck the data with `python -m engine.data.inspect INDEX.csv "
                f"--bad-list bad.tsv`, remove the bad entries from the index, or raise data.max_bad_fraction.")
