"""Machine report of a benchmark session, as JSON: which GPU, driver and versions the numbers beside it came from.

Usage: python benchmarks/env_report.py OUT.json. The git commit comes from `git` when the checkout has its .git, else
from the env GIT_COMMIT (the device machine receives a copy of the working tree without it).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SMI_QUERY = ("name,driver_version,memory.total,clocks.max.sm,clocks.max.memory,power.limit,persistence_mode,"
             "mig.mode.current")


ENV_KEYS = ("CUDA_VISIBLE_DEVICES", "TRITON_INTERPRET", "VJEPA_KERNELS")  # switches that change what ran


def _run(*cmd: str) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def _devices() -> list[dict[str, Any]]:
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append({"name": p.name, "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count,
                    "memory_gib": round(p.total_memory / 2**30, 1),
                    "l2_cache_mib": round(getattr(p, "L2_cache_size", 0) / 2**20, 1)})
    return out


def _slug(devices: list[dict[str, Any]]) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; no GPU -> 'cpu'."""
    if not devices:
        return "cpu"
    match = re.search(r"\b([A-Z]+\d+[A-Za-z]*)\b", devices[0]["name"].replace("NVIDIA", ""))
    return (match.group(1) if match else devices[0]["name"]).lower().replace(" ", "-")


def report() -> dict[str, Any]:
    now = datetime.datetime.now(datetime.timezone.utc)
    devices = _devices()
    commit = _run("git", "rev-parse", "HEAD") or os.environ.get("GIT_COMMIT")
    status = _run("git", "status", "--porcelain")
    return {
        "date": now.isoformat(timespec="seconds"),
        "results_dir": f"benchmarks/results/{now:%Y-%m-%d}_{_slug(devices)}",
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "pytest_benchmark": _version("pytest_benchmark"),
        "devices": devices,
        "nvidia_smi": _run("nvidia-smi", f"--query-gpu={SMI_QUERY}", "--format=csv"),
        "env": {k: os.environ[k] for k in ENV_KEYS if k in os.environ},
    }


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    info = report()
    Path(sys.argv[1]).write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps({k: info[k] for k in ("date", "git_commit", "torch", "triton", "devices", "results_dir")}))
