"""Writes that survive a node crash, not only a process crash: data flushed to the disk before the rename that
publishes it. A rename is atomic, but a file renamed while its data is still in the page cache can come back empty
after a power loss or kernel panic; and the rename itself lives in the folder, which needs its own flush."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_file(path: str | Path) -> None:
    """Flush a file already written (by another library) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (the renames into it). Some network file systems cannot open a folder: skipped."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str) -> None:
    """`path` holds `text`, or what it held before: never a part of it, even after a node crash."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
