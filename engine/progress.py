"""Progress on long work: durations as the console shows them, and a line at most every few seconds.

A probe epoch on K400 at V1's protocol (16x8x3 views) or its feature cache takes hours; a run that prints nothing
for that long looks hung. `ProgressLine` prints where the work stands, its rate and the time left, throttled by
wall-clock time rather than by a count, so a fast CPU smoke run and a slow real one both get a readable log.
"""

from __future__ import annotations

import time
from typing import Any


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class ProgressLine:
    """`tick(done)` says "<label> <done>/<total> | <extra> | <rate> clips/s | eta ..." when `every_s` seconds have
    passed since the last line (the first after `every_s` too: short work prints nothing). `start`: the items done
    before this process began (a resumed epoch), which the rate leaves out."""

    def __init__(self, label: str, total: int, *, every_s: float, say: Any, clips_per_item: int = 1,
                 start: int = 0) -> None:
        self.label, self.total, self.every_s, self.say = label, total, every_s, say
        self.clips_per_item, self.start = clips_per_item, start
        self.began = self.last = time.monotonic()

    def tick(self, done: int, extra: str = "") -> None:
        now = time.monotonic()
        if now - self.last < self.every_s:
            return
        self.last = now
        rate = (done - self.start) / max(now - self.began, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else 0.0
        self.say(f"{self.label} {done}/{self.total}" + (f" | {extra}" if extra else "")
                 + f" | {rate * self.clips_per_item:.1f} clips/s | eta {format_duration(eta)}")
