"""Write models/attention_table.json (what `model.attention=auto` runs on CUDA) from bench_attention JSON files.

Usage, from the repository root: python -m benchmarks.attention_table bench_attention.json [...] [--out PATH]

Key: (device kind, case, head dim). Each case is timed in the direction training runs it: the target encoder forward
only, the context encoder and the predictor forward+backward. A key can hold several shapes (the V1 predictor's head
dim 24 at ViT-L/224 and at ViT-H/384): the pick is the backend with the smallest worst slowdown over them (slowdown:
its median over the shape's fastest median), so with one shape simply the fastest. A pick more than 5% behind some
shape's fastest is printed as a warning. Candidates are backends auto may default to, measured on every shape of the
key: not the reference, the math kernel or the padded baseline. Interpreted (CPU) results measure nothing and are
ignored. Entries of device kinds absent from the inputs are kept: one session measures one kind of GPU.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from benchmarks.report import rows
from models.attention import CASES, TABLE_PATH, device_kind

TRAINING_DIRECTION = {"dense_predictor": "fwd+bwd", "dense_target": "fwd", "ragged_context": "fwd+bwd"}
NOT_CANDIDATES = ("reference", "sdpa_math", "sdpa_padded")
TOLERANCE = 1.05  # a pick within 5% of the fastest measured backend counts as the fastest


def pick(medians: dict[str, dict[str, float]]) -> tuple[str, float]:
    """{shape: {backend: median s}} -> (backend, its worst slowdown), over backends measured on every shape."""
    common = set.intersection(*(set(m) for m in medians.values()))
    if not common:
        raise ValueError(f"no backend was measured on every shape of {sorted(medians)}")
    worst = {b: max(m[b] / min(m.values()) for m in medians.values()) for b in common}
    best = min(sorted(worst), key=worst.get)  # sorted: ties go to the same name every time
    return best, worst[best]


def build_table(results: Iterable[dict[str, Any]]) -> tuple[dict[str, dict[str, dict[str, str]]], list[str]]:
    """Benchmark rows (extra_info + median_s) -> ({kind: {case: {head dim: backend}}}, warnings)."""
    medians: dict[tuple[str, str, str], dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in results:
        case = r.get("attention_case")
        if (r.get("op") != "attention" or r.get("interpreted") or case not in CASES
                or r["direction"] != TRAINING_DIRECTION[case] or r["provider"] in NOT_CANDIDATES):
            continue
        medians[device_kind(r["device"]), case, str(r["head_dim"])][r["case"]][r["provider"]] = r["median_s"]
    table: dict[str, dict[str, dict[str, str]]] = defaultdict(lambda: defaultdict(dict))
    warnings = []
    for (kind, case, head_dim), by_shape in sorted(medians.items()):
        backend, slowdown = pick(by_shape)
        table[kind][case][head_dim] = backend
        if slowdown > TOLERANCE:
            warnings.append(f"{kind}/{case}/head dim {head_dim}: {backend} is {slowdown:.2f}x the fastest on one of "
                            f"{sorted(by_shape)}; no single backend is within 5% on all of them")
    return {kind: dict(cases) for kind, cases in table.items()}, warnings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="pytest-benchmark JSON of benchmarks/test_bench_attention.py")
    parser.add_argument("--out", type=Path, default=TABLE_PATH, help="table to update (default: %(default)s)")
    args = parser.parse_args(argv)
    measured, warnings = build_table(rows(args.results))
    if not measured:
        raise SystemExit("no measured (non-interpreted) attention results in " + ", ".join(args.results))
    old = json.loads(args.out.read_text()) if args.out.is_file() else {"about": "", "sources": [], "table": {}}
    old["table"].update(measured)  # replaces the measured kinds whole, keeps the others
    old["sources"] = sorted(set(old["sources"]) | set(args.results))
    args.out.write_text(json.dumps(old, indent=2) + "\n")
    for kind, cases in measured.items():
        for case, picks in cases.items():
            print(f"{kind} {case}: " + ", ".join(f"head dim {hd} -> {b}" for hd, b in picks.items()))
    for w in warnings:
        print("warning:", w)


if __name__ == "__main__":
    main()
