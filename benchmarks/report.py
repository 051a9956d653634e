"""One table from pytest-benchmark JSON files: each provider's rate, and the Triton op against its targets.

Usage: python benchmarks/report.py bench_*.json. The targets are the kernels issue's: the embed at >= 60% of the
bare GEMM's TFLOP/s, the loss >= 3x the reference and >= 70% of copy bandwidth, the EMA >= 80% of copy bandwidth.
Attention (the backends issue's): the Triton kernel at least as fast as the best SDPA backend on the predictor's
dense head dims 24 and 32, within 10% of it at head dim 80, and >= 1.3x the padded SDPA on the ragged context sets.
The loader (median: seconds per batch): clips/s and frames/s of every decoder, against what the step consumes.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from typing import Any

# op -> (baseline provider, rate compared, fraction to reach); and the ops with a speed-up target over "torch"
TARGETS = {"tubelet_embed": ("cublas_mm", "tflops", 0.60), "masked_l1_loss": ("copy", "gbps", 0.70),
           "ema": ("copy", "gbps", 0.80)}
SPEEDUP_TARGETS = {"masked_l1_loss": 3.0}
# attention: head dim -> fraction of the best SDPA backend's TFLOP/s to reach; ragged sets: speed-up over padded SDPA
ATTENTION_VS_SDPA = {24: 1.0, 32: 1.0, 80: 0.9}
ATTENTION_VS_PADDED = 1.3


def rows(paths: list[str]) -> list[dict[str, Any]]:
    out = []
    for path in paths:
        for b in json.load(open(path))["benchmarks"]:
            out.append({**b["extra_info"], "median_s": b["stats"]["median"]})
    return out


def main(paths: list[str]) -> None:
    groups: dict[tuple, dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in rows(paths):
        groups[r["op"], r["case"], r["direction"]][r["provider"]] = r
    print(f"{'op':15s} {'case':36s} {'dir':8s} {'provider':15s} {'median us':>11s} {'GB/s':>8s} {'TFLOP/s':>8s}  vs")
    for (op, case, direction), providers in groups.items():
        for name, r in providers.items():
            tflops = f"{r['tflops']:8.1f}" if r.get("tflops") is not None else " " * 8
            print(f"{op:15s} {case:36s} {direction:8s} {name:15s} {r['median_s'] * 1e6:11.1f} {r['gbps']:8.1f} "
                  f"{tflops}  {_verdict(op, name, r, providers)}")


def _attention_verdict(r: dict[str, Any], providers: dict[str, dict[str, Any]]) -> str:
    notes = []
    sdpa = {n: p for n, p in providers.items() if n.startswith("sdpa") and n != "sdpa_padded"}
    if sdpa:
        best = min(sdpa, key=lambda n: sdpa[n]["median_s"])
        goal = ATTENTION_VS_SDPA.get(r["head_dim"]) if r["attention_case"] != "ragged_context" else None
        notes.append(f"{sdpa[best]['median_s'] / r['median_s']:.2f}x best sdpa ({best})"
                     + (f" (target >= {goal:g}x)" if goal else ""))
    if r["attention_case"] == "ragged_context" and "sdpa_padded" in providers:
        speedup = providers["sdpa_padded"]["median_s"] / r["median_s"]
        notes.append(f"{speedup:.2f}x sdpa_padded (target >= {ATTENTION_VS_PADDED:g}x)")
    if r.get("tile_waste") is not None:
        notes.append(f"{r['tile_waste']:.0%} of tile work is padding")
    return "; ".join(notes)


def _loader_verdict(r: dict[str, Any]) -> str:
    if r.get("clips_per_s") is None:
        return ""
    clips, need = r["clips_per_s"], r["step_needs_clips_per_s"]
    return (f"{clips:.1f} clips/s, {r['frames_per_s']:.0f} frames/s ({r['decoded_frames_per_s']:.0f} decoded); "
            f"{clips / need:.2f}x the step's {need:g} clips/s")


def _verdict(op: str, name: str, r: dict[str, Any], providers: dict[str, dict[str, Any]]) -> str:
    if op == "loader":
        return _loader_verdict(r)
    if name != "triton":
        return ""
    if op == "attention":
        return _attention_verdict(r, providers)
    notes = []
    base, rate, goal = TARGETS.get(op, (None, None, None))
    if base in providers:
        frac = r[rate] / providers[base][rate]
        notes.append(f"{frac:.0%} of {base} (target {goal:.0%})")
    if "torch" in providers:
        speedup = providers["torch"]["median_s"] / r["median_s"]
        goal = SPEEDUP_TARGETS.get(op)
        notes.append(f"{speedup:.2f}x torch" + (f" (target {goal:g}x)" if goal else ""))
    return "; ".join(notes)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
