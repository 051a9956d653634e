"""Regression gate: a run's benchmark medians against the committed baseline of the same device kind.

Usage (from the repository root):
  python benchmarks/gate.py --current RESULTS/bench_*.json [--baseline benchmarks/baselines/KIND.json]
                            [--threshold 0.10]
  python benchmarks/gate.py --refresh --current RESULTS/bench_*.json [--baseline benchmarks/baselines/KIND.json]

`--current` takes pytest-benchmark JSON files (`--benchmark-json`, what benchmarks/gpu_session.sh writes as
bench_<name>.json) or a baseline file. Benchmarks are matched by pytest's full name (file, test, parameters) and
shown by their extra_info (op, case, direction, provider). The table gives each benchmark's baseline and current
median and their ratio; the exit code is 1 when any median is slower than the baseline by more than the threshold
(default 10%), else 0. Benchmarks only in the baseline (skipped, out of memory, out of time) or only in the current
run are listed without failing. Exit 2: no baseline for this device kind, results of two device kinds mixed, or
nothing in common to compare.

The device kind comes from the results' extra_info "device" (`device_kind`: "NVIDIA H100 80GB HBM3" -> "h100", a CPU
-> "cpu"); without --baseline the gate reads benchmarks/baselines/<kind>.json. `--refresh` writes the current run as
that baseline instead of comparing (the medians, spreads and extra_info of every benchmark, the source files and
commit). It refuses interpreted results (a CPU dry run measures the Triton interpreter, and a shared 2-core CPU
machine times nothing reproducibly): baselines exist for GPU kinds, from the raw JSON of a committed GPU session under
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BASELINES = ROOT / "benchmarks" / "baselines"
DEFAULT_THRESHOLD = 0.10
_GPU_VENDORS = ("NVIDIA", "Tesla", "GeForce", "Quadro", "AMD Instinct", "Radeon")


class GateError(Exception):
    """Bad input: the message says what to do (exit 2)."""


def device_kind(device: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100', 'NVIDIA H200' -> 'h200', 'NVIDIA A100-SXM4-80GB' -> 'a100'; any name
    without a GPU vendor in it (the CPU runs record platform.processor()) -> 'cpu'."""
    if not any(v.lower() in device.lower() for v in _GPU_VENDORS):
        return "cpu"
    rest = device
    for vendor in _GPU_VENDORS:
        rest = re.sub(re.escape(vendor), " ", rest, flags=re.IGNORECASE)
    match = re.search(r"\b([A-Za-z]+\d+[A-Za-z]*)\b", rest)
    slug = match.group(1) if match else rest.strip()
    return re.sub(r"[^a-z0-9]+", "-", slug.lower()).strip("-") or "gpu"


def load(paths: list[str | Path]) -> dict[str, dict[str, Any]]:
    """{full name: {"median_s", "min_s", "iqr_s", "rounds", "extra_info", "source"}} from pytest-benchmark JSON files
    and/or baseline files."""
    out: dict[str, dict[str, Any]] = {}
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise GateError(f"cannot read {path}: {e}") from e
        benchmarks = data.get("benchmarks")
        if isinstance(benchmarks, dict):  # a baseline file
            entries = {name: {**entry, "source": entry.get("source", str(path))} for name, entry in benchmarks.items()}
        elif isinstance(benchmarks, list):  # pytest-benchmark
            entries = {}
            for b in benchmarks:
                s = b["stats"]
                entries[b.get("fullname") or b["name"]] = {
                    "median_s": s["median"], "min_s": s["min"], "iqr_s": s.get("iqr"), "rounds": s.get("rounds"),
                    "extra_info": b.get("extra_info", {}), "source": str(path)}
        else:
            raise GateError(f"{path}: neither pytest-benchmark JSON nor a baseline (no 'benchmarks')")
        for name, entry in entries.items():
            if name in out:
                raise GateError(f"{name} is in both {out[name]['source']} and {path}")
            out[name] = entry
    return out


def kind_of(entries: dict[str, dict[str, Any]], what: str) -> str:
    kinds = {device_kind(str(e["extra_info"].get("device", ""))) for e in entries.values()}
    if len(kinds) != 1:
        raise GateError(f"the {what} results mix device kinds {sorted(kinds)}: compare one device at a time")
    return kinds.pop()


def label(name: str, entry: dict[str, Any]) -> str:
    info = entry.get("extra_info", {})
    if "op" in info:
        return " ".join(str(info[k]) for k in ("op", "case", "direction", "provider") if info.get(k) is not None)
    return name


def compare(baseline: dict[str, dict[str, Any]], current: dict[str, dict[str, Any]],
            threshold: float = DEFAULT_THRESHOLD) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """(rows of the common benchmarks, names only in the baseline, names only in the current run); each row has
    name, label, baseline_s, current_s, ratio (current / baseline: > 1 is slower) and status (slower, faster, ok)."""
    rows = []
    for name in sorted(baseline.keys() & current.keys()):
        base, cur = baseline[name]["median_s"], current[name]["median_s"]
        ratio = cur / base if base > 0 else float("inf")
        status = "slower" if ratio > 1 + threshold else "faster" if ratio < 1 / (1 + threshold) else "ok"
        rows.append({"name": name, "label": label(name, current[name]), "baseline_s": base, "current_s": cur,
                     "ratio": ratio, "status": status})
    return rows, sorted(baseline.keys() - current.keys()), sorted(current.keys() - baseline.keys())


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def report(rows: list[dict[str, Any]], missing: list[str], new: list[str], baseline: dict[str, dict[str, Any]],
           current: dict[str, dict[str, Any]], threshold: float) -> str:
    labels = [r["label"] for r in rows]
    for r in rows:  # two benchmarks with the same extra_info: their pytest names tell them apart
        if labels.count(r["label"]) > 1:
            r["label"] += f" [{r['name'].split('::')[-1]}]"
    width = max([len(r["label"]) for r in rows] + [9])
    lines = [f"{'benchmark':{width}s} {'baseline ms':>12s} {'current ms':>12s} {'ratio':>7s}  status"]
    for r in rows:
        flag = f"SLOWER (> {1 + threshold:.2f}x)" if r["status"] == "slower" else r["status"]
        lines.append(f"{r['label']:{width}s} {_ms(r['baseline_s']):>12s} {_ms(r['current_s']):>12s} "
                     f"{r['ratio']:7.3f}  {flag}")
    for name in missing:
        lines.append(f"missing from the current run (not compared): {label(name, baseline[name])}  [{name}]")
    for name in new:
        lines.append(f"new, not in the baseline (not compared): {label(name, current[name])}  [{name}]")
    slower = [r for r in rows if r["status"] == "slower"]
    if slower:
        named = ", ".join(f"{r['label']} ({r['ratio']:.2f}x) [{r['name']}]" for r in slower)
        lines.append(f"FAIL: {len(slower)} of {len(rows)} benchmarks slower than the baseline by more than "
                     f"{threshold:.0%}: {named}")
    else:
        lines.append(f"OK: {len(rows)} benchmarks within {threshold:.0%} of the baseline (or faster)")
    return "\n".join(lines)


def write_baseline(path: Path, entries: dict[str, dict[str, Any]], sources: list[str]) -> dict[str, Any]:
    interpreted = [n for n, e in entries.items() if e["extra_info"].get("interpreted")]
    if interpreted:
        raise GateError(f"{len(interpreted)} results are interpreted (a CPU dry run: it times the Triton interpreter, "
                        f"not the kernels), e.g. {interpreted[0]}: baselines come from GPU sessions only")
    devices = sorted({str(e["extra_info"].get("device")) for e in entries.values()})
    commits = sorted({c for c in (_commit(s) for s in sources) if c})
    baseline = {
        "device_kind": kind_of(entries, "current"), "devices": devices,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "sources": [_relative(s) for s in sources], "commits": commits,
        "benchmarks": {name: {k: v for k, v in e.items() if k != "source"} | {"source": _relative(e["source"])}
                       for name, e in sorted(entries.items())},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(baseline, indent=1, sort_keys=False) + "\n")
    return baseline


def _commit(source: str) -> str | None:
    try:
        data = json.loads(Path(source).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    info = data.get("commit_info") or {}
    return info.get("id")


def _relative(path: str | Path) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--current", nargs="+", required=True, metavar="JSON",
                        help="pytest-benchmark JSON files of the run to check (or a baseline file)")
    parser.add_argument("--baseline", type=Path,
                        help="baseline file (default: benchmarks/baselines/<device kind>.json)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help="fail on a median slower than the baseline by more than this fraction (default 0.10)")
    parser.add_argument("--refresh", action="store_true", help="write the current run as the baseline; no comparison")
    args = parser.parse_args(argv)
    try:
        current = load(args.current)
        if not current:
            raise GateError(f"no benchmarks in {' '.join(args.current)}")
        kind = kind_of(current, "current")
        path = args.baseline or BASELINES / f"{kind}.json"
        if args.refresh:
            written = write_baseline(path, current, args.current)
            print(f"wrote {path}: {len(written['benchmarks'])} benchmarks of {', '.join(written['devices'])} "
                  f"({kind}) from {len(args.current)} file(s)")
            return 0
        if not path.exists():
            raise GateError(f"no baseline {path} for device kind '{kind}': make one from a GPU session's committed "
                            f"results with --refresh (benchmarks/README.md)")
        baseline = load([path])
        base_kind = kind_of(baseline, "baseline")
        if base_kind != kind:
            raise GateError(f"the baseline {path} is of device kind '{base_kind}', the current run of '{kind}'")
        rows, missing, new = compare(baseline, current, args.threshold)
        if not rows:
            raise GateError(f"no benchmark of the current run is in the baseline {path}")
    except GateError as e:
        print(f"gate: {e}", file=sys.stderr)
        return 2
    print(f"gate: {len(current)} current benchmarks ({kind}) against {path}, threshold {args.threshold:.0%}")
    print(report(rows, missing, new, baseline, current, args.threshold))
    return 1 if any(r["status"] == "slower" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
