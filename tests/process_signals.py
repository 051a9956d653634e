"""Signalling a command the way a launcher or a terminal does: the whole process tree (loader workers included)."""

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def signal_when(args: list[str], ready: Callable[[], bool], signum: int, *, cwd: Path | None = None,
                timeout: float = 120) -> subprocess.CompletedProcess:
    """Start `args` in its own session, send `signum` to its process group once `ready()` holds, and wait for it to
    end; fails if it ends first or `ready()` never holds within `timeout` seconds."""
    process = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
        time.sleep(0.02)
    os.killpg(process.pid, signum)
    output = process.communicate(timeout=timeout)[0]
    return subprocess.CompletedProcess(args, process.returncode, output)
