"""One table from pytest-benchmark JSON files: each provider's rate, and the Triton op against its targets.

Usage: python benchmarks/report.py [--markdown | --update-readme [--readme PATH]] bench_*.json [compare_*.json]
  (no flag)        the text table below, with every provider of every benchmark (gpu_session.sh prints it)
  --markdown       the README table: per device kind, each fused op against its reference (and torch.compile of the
                   reference where a benchmark has that provider), the training step end to end, the frozen-eval
                   forward, the loader
  --update-readme  rewrite that device kind's part of the marker-delimited section of benchmarks/README.md (other
                   devices' parts stay). Only committed raw JSON of a GPU session counts: the files must lie under
                   benchmarks/results/, and interpreted results (CPU dry runs) are refused.

The targets are the kernels issue's: the embed at >= 60% of the bare GEMM's TFLOP/s, the loss >= 3x the reference and
>= 70% of copy bandwidth, the EMA >= 80% of copy bandwidth. Attention (the backends issue's): the Triton kernel at
least as fast as the best SDPA backend on the predictor's dense head dims 24 and 32, within 10% of it at head dim 80,
and >= 1.3x the padded SDPA on the ragged context sets.
The loader (median: seconds per batch): clips/s and frames/s of every decoder, against what the step consumes.
The training step and the eval forward (benchmarks/test_bench_train_step.py): clips/s, tokens/s, model TFLOP/s and MFU
against the GEMM measured in the same run and the data-sheet peak.
compare_<config>.json (benchmarks/compare_reference.py --json) adds the end-to-end table against facebookresearch/jepa:
both sides' clips/s, ours/reference ratios like for like (truncated) and packed, peak memory, packed MFU, the eval
forward and the first-step loss cross-check, beside the issue's targets (>= 2x clips/s at <= 0.7x peak memory like for
like; packed MFU >= 45% on ViT-H/16-384). profile.json (profile_step.py) adds where the step's time goes, and
memory_fit.json (memory_fit.py) which batches fit a capped allocator.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: the repository root on the path, for benchmarks.gate
    sys.path.insert(0, str(ROOT))

from benchmarks.gate import device_kind  # noqa: E402

# op -> (baseline provider, rate compared, fraction to reach); and the ops with a speed-up target over "torch"
TARGETS = {"tubelet_embed": ("cublas_mm", "tflops", 0.60), "masked_l1_loss": ("copy", "gbps", 0.70),
           "ema": ("copy", "gbps", 0.80)}
SPEEDUP_TARGETS = {"masked_l1_loss": 3.0}
# attention: head dim -> fraction of the best SDPA backend's TFLOP/s to reach; ragged sets: speed-up over padded SDPA
ATTENTION_VS_SDPA = {24: 1.0, 32: 1.0, 80: 0.9}
ATTENTION_VS_PADDED = 1.3


# ops of the rows that are no pytest-benchmark result: each has its own table
SCRIPT_OPS = ("compare_reference", "profile", "memory_fit")


def _script_row(op: str, case: str, device: str, path: str, **fields: Any) -> dict[str, Any]:
    return {"op": op, "case": case, "direction": "step", "provider": "ours", "device": device,
            "interpreted": device_kind(device) == "cpu", "source": path, **fields}


def rows(paths: list[str]) -> list[dict[str, Any]]:
    """One row per benchmark of pytest-benchmark files; one per benchmarks/compare_reference.py file (op
    "compare_reference", its whole JSON under "compare"); one per config of a profile_step.py file (op "profile")
    and one per case of a memory_fit.py file (op "memory_fit"). A CPU run of a script counts as interpreted."""
    out = []
    for path in map(str, paths):
        data = json.load(open(path))
        if "benchmarks" in data:
            for b in data["benchmarks"]:
                out.append({**b["extra_info"], "median_s": b["stats"]["median"], "source": path})
        elif "train" in data and "ratios" in data:
            out.append(_script_row("compare_reference", Path(data["config"]).stem, data["device_name"], path,
                                   versions=data.get("versions"), compare=data))
        elif "results" in data and "device" in data:
            out += [_script_row("profile", r["name"], data["device"], path, versions=data.get("versions"), profile=r)
                    for r in data["results"]]
        elif "runs" in data:
            out += [_script_row("memory_fit", f"{Path(run['config']).stem}-b{c['batch']}-ckpt{c['checkpointing']}",
                                run["device"], path, versions=data.get("versions"), fit=c,
                                run={k: run[k] for k in ("config", "cap_gib", "device_gib")})
                    for run in data["runs"] for c in run["cases"]]
        else:
            raise SystemExit(f"{path}: neither pytest-benchmark JSON nor the --json of benchmarks/compare_reference.py"
                             ", profile_step.py or memory_fit.py")
    return out


def _groups(rows_: list[dict[str, Any]]) -> dict[tuple, dict[str, dict[str, Any]]]:
    groups: dict[tuple, dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in rows_:
        groups[r["op"], r["case"], r["direction"]][r["provider"]] = r
    return groups


def _rate(r: dict[str, Any], key: str) -> str:
    return f"{r[key]:8.1f}" if r.get(key) is not None else " " * 8


def main(paths: list[str]) -> None:
    rows_ = rows(paths)
    scripts = [r for r in rows_ if r["op"] in SCRIPT_OPS]
    rows_ = [r for r in rows_ if r["op"] not in SCRIPT_OPS]
    if rows_:
        print(f"{'op':15s} {'case':36s} {'dir':8s} {'provider':15s} {'median us':>11s} {'GB/s':>8s} "
              f"{'TFLOP/s':>8s}  vs")
    for (op, case, direction), providers in _groups(rows_).items():
        for name, r in providers.items():
            print(f"{op:15s} {case:36s} {direction:8s} {name:15s} {r['median_s'] * 1e6:11.1f} {_rate(r, 'gbps')} "
                  f"{_rate(r, 'tflops' if 'tflops' in r else 'model_tflops')}  {_verdict(op, name, r, providers)}")
    for title, table in _script_tables(scripts):
        print(f"\n{title}\n" + "\n".join(table))


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


def _step_verdict(r: dict[str, Any]) -> str:
    if r.get("samples_per_s") is None:
        return ""
    sheet = f", {r['mfu_datasheet']:.0%} of the data sheet" if r.get("mfu_datasheet") is not None else ""
    return (f"{r['samples_per_s']:.1f} clips/s, {r['tokens_per_s']:,.0f} tokens/s, MFU {r['mfu_measured_peak']:.0%} of "
            f"the measured GEMM's {r['gemm_tflops']:.3g} TFLOP/s{sheet}, peak {r['peak_memory_gb']:.1f} GB")


def _verdict(op: str, name: str, r: dict[str, Any], providers: dict[str, dict[str, Any]]) -> str:
    if op == "loader":
        return _loader_verdict(r)
    if op in ("train_step", "eval_forward"):
        return _step_verdict(r)
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


# --------------------------------------------------------------------------------------------------------------------
# markdown: the README's table

START, END = "<!-- benchmark-tables:start -->", "<!-- benchmark-tables:end -->"
NO_RESULTS = ("No GPU results are committed yet, so no numbers are given here: a table appears only with the raw "
              "JSON of a GPU session behind it (benchmarks/results/).")
_DEVICE_SECTION = re.compile(r"<!-- device:(?P<kind>[a-z0-9-]+) -->\n.*?<!-- /device:(?P=kind) -->\n?", re.S)
OURS = "triton"  # the fused ops' provider
REFERENCE = "torch"  # their pure-PyTorch reference
COMPILED = ("torch_compile", "compile")  # torch.compile(reference), where a benchmark has it


def _us(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:.1f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _num(value: float | None, fmt: str = ".1f") -> str:
    return "-" if value is None else format(value, fmt)


def _reference(op: str, providers: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]] | None:
    """The provider an op is compared with: the PyTorch reference, for attention the fastest SDPA backend (what the
    reference implementation calls)."""
    if REFERENCE in providers:
        return REFERENCE, providers[REFERENCE]
    sdpa = {n: p for n, p in providers.items() if n.startswith("sdpa") and n != "sdpa_padded"}
    if sdpa:
        best = min(sdpa, key=lambda n: sdpa[n]["median_s"])
        return best, sdpa[best]
    return ("reference", providers["reference"]) if "reference" in providers else None


def _ops_table(groups: dict[tuple, dict[str, dict[str, Any]]]) -> list[str]:
    lines = ["| op | case | direction | ours us | reference us | torch.compile us | vs reference | vs compile | "
             "ours GB/s | ours TFLOP/s | reference provider | targets |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (op, case, direction), providers in groups.items():
        if OURS not in providers:
            continue
        ours = providers[OURS]
        ref = _reference(op, providers)
        compiled = next((providers[n] for n in COMPILED if n in providers), None)
        lines.append(
            f"| {op} | {case} | {direction} | {_us(ours['median_s'])} | {_us(ref[1]['median_s'] if ref else None)} | "
            f"{_us(compiled['median_s'] if compiled else None)} | "
            f"{_x(ref[1]['median_s'] / ours['median_s'] if ref else None)} | "
            f"{_x(compiled['median_s'] / ours['median_s'] if compiled else None)} | {_num(ours.get('gbps'))} | "
            f"{_num(ours.get('tflops'))} | {ref[0] if ref else '-'} | {_verdict(op, OURS, ours, providers)} |")
    return lines if len(lines) > 2 else []


def _step_table(rows_: list[dict[str, Any]], unit: str = "step", context: bool = True) -> list[str]:
    lines = [f"| case | provider | ms/{unit} | clips/s | tokens/s | model TFLOP/s | MFU (measured GEMM) | "
             "MFU (data sheet) | peak GB |" + (" context tokens/clip |" if context else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if context else "")]
    for r in rows_:
        ctx = "/".join(f"{t:.0f}" for t in r.get("context_tokens_per_clip") or []) or "-"
        lines.append(f"| {r['case']} | {r['provider']} | {r['median_s'] * 1e3:.1f} | {_num(r.get('samples_per_s'))} | "
                     f"{_num(r.get('tokens_per_s'), ',.0f')} | {_num(r.get('model_tflops'))} | "
                     f"{_pct(r.get('mfu_measured_peak'))} | {_pct(r.get('mfu_datasheet'))} | "
                     f"{_num(r.get('peak_memory_gb'))} |" + (f" {ctx} |" if context else ""))
    return lines


def _loader_table(rows_: list[dict[str, Any]]) -> list[str]:
    lines = ["| case | decoder | clips/s | frames/s | decoded frames/s | workers | the step needs clips/s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows_:
        lines.append(f"| {r['case']} | {r['provider']} | {_num(r.get('clips_per_s'))} | "
                     f"{_num(r.get('frames_per_s'), '.0f')} | {_num(r.get('decoded_frames_per_s'), '.0f')} | "
                     f"{r.get('workers', '-')} | {r.get('step_needs_clips_per_s', '-')} |")
    return lines


# the issue's end-to-end targets against the reference on the same GPU: like for like (truncated) >= 2x its clips/s
# at <= 0.7x its peak memory; packed MFU >= 45% of the data sheet on ViT-H/16-384
VS_REFERENCE_SPEEDUP = 2.0
VS_REFERENCE_MEMORY = 0.7
PACKED_MFU = {"vith16_384": 0.45}


def _head(*columns: str) -> list[str]:
    """A markdown table's header and separator lines."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def _measured(run: dict[str, Any] | None, key: str, fmt: str) -> str:
    """A run's figure, or why it has none (out of memory, failed, not run: a session cut short)."""
    if run is None:
        return "not run"
    if "error" in run:
        return "OOM" if run.get("out_of_memory") else "failed"
    return _num(run.get(key), fmt)


def _comparison_targets(case: str, c: dict[str, Any]) -> str:
    ratios, notes = c["ratios"], []
    speed, memory = ratios.get("samples_per_s_truncated"), ratios.get("peak_memory_truncated")
    if speed is not None:
        notes.append(f"{speed:.2f}x {'>=' if speed >= VS_REFERENCE_SPEEDUP else '<'} {VS_REFERENCE_SPEEDUP:g}x")
    if memory is not None:
        notes.append(f"mem {memory:.2f}x {'<=' if memory <= VS_REFERENCE_MEMORY else '>'} {VS_REFERENCE_MEMORY:g}x")
    mfu, goal = (c["train"].get("ours_packed") or {}).get("mfu"), PACKED_MFU.get(case)
    if goal is not None and mfu is not None:
        notes.append(f"MFU {mfu:.0%} {'>=' if mfu >= goal else '<'} {goal:.0%}")
    return ", ".join(notes) or "-"


def _comparison_table(rows_: list[dict[str, Any]]) -> list[str]:
    """One line per config: the reference's clips/s (without and with its per-step loggers), ours like for like
    (truncated: the same tokens) and packed (every context token), their ratios, the eval forward and the first-step
    loss cross-check."""
    lines = _head("config", "batch", "dtype", "reference clips/s", "ref + loggers", "ours truncated clips/s", "x ref",
                  "peak mem ours/ref", "ours packed clips/s", "x ref", "tokens/s x ref", "packed MFU (data sheet)",
                  "eval forward x ref", "loss@1 diff", "targets")
    for r in rows_:
        c = r["compare"]
        t, ratios = c["train"], c["ratios"]
        packed = t.get("ours_packed")
        lines.append(
            f"| {r['case']} | {c['batch_size']} | {c['dtype']} | {_measured(t.get('reference'), 'samples_per_s', '.1f')}"
            f" | {_measured(t.get('reference_loggers'), 'samples_per_s', '.1f')} | "
            f"{_measured(t.get('ours_truncated'), 'samples_per_s', '.1f')} | "
            f"{_x(ratios.get('samples_per_s_truncated'))} | {_x(ratios.get('peak_memory_truncated'))} | "
            f"{_measured(packed, 'samples_per_s', '.1f')} | {_x(ratios.get('samples_per_s_packed'))} | "
            f"{_x(ratios.get('tokens_per_s_packed'))} | "
            f"{_measured(packed, 'mfu', '.0%')} | "
            f"{_x(ratios.get('samples_per_s_eval'))} | {_num((c.get('loss_check') or {}).get('abs_diff'), '.1e')} | "
            f"{_comparison_targets(r['case'], c)}{'' if c.get('complete', True) else ' (cut short)'} |")
    return lines


def _profile_table(rows_: list[dict[str, Any]]) -> list[str]:
    lines = _head("config", "batch", "ms/step", "clips/s", "model TFLOP/s", "MFU (data sheet)", "device busy",
                  "idle gaps ms/step", "gaps > 20 us per step", "top kernels (share of busy time)")
    for r in rows_:
        p = r["profile"]
        if "error" in p:
            lines.append(f"| {r['case']} | {'out of memory' if p.get('out_of_memory') else 'failed: ' + p['error']} |"
                         + " |" * (len(lines[0].split("|")) - 4))
            continue
        g = p.get("gpu") or {}
        top = ", ".join(f"{k['name'][:48]} {k['share_of_busy']:.0%}" for k in p["top_kernels"][:3]) or "-"
        lines.append(f"| {r['case']} | {p['batch']} | {p['step_ms']:.1f} | {p['samples_per_s']:.1f} | "
                     f"{p['model_tflops']:.1f} | {_pct(p.get('mfu_datasheet'))} | {_pct(g.get('busy_fraction'))} | "
                     f"{_num(g.get('idle_gap_ms_per_step'), '.2f')} | {_num(g.get('gaps_over_20us_per_step'), '.0f')} | "
                     f"{top} |")
    return lines


def _memory_fit_table(rows_: list[dict[str, Any]]) -> list[str]:
    lines = _head("config", "allocator cap GiB", "batch", "checkpointing", "fits", "peak allocated GiB",
                  "peak reserved GiB", "dry-run estimate GiB", "ms/step")
    for r in rows_:
        c, run = r["fit"], r["run"]
        cap = run["cap_gib"] if run["cap_gib"] is not None else _num(run["device_gib"])
        lines.append(f"| {Path(run['config']).stem} | {cap} | {c['batch']} | {c['checkpointing']} | "
                     f"{'yes' if c['status'] == 'ok' else 'no (out of memory)'} | "
                     f"{_num(c['peak_allocated_gib'], '.2f')} | {_num(c['peak_reserved_gib'], '.2f')} | "
                     f"{_num(c['estimate_gib'], '.2f')} | {_num(c['ms_per_step'], '.0f')} |")
    return lines


def _script_tables(rows_: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """(title, markdown table) of each script's rows present: the reference comparison, the profile, memory fit."""
    tables = []
    for op, title, table in (
            ("compare_reference", "Against facebookresearch/jepa on the same GPU (benchmarks/compare_reference.py: "
             "same config, batch, dtype, clips and initial weights; ours truncated runs the reference collator's own "
             "masks, ours packed keeps every context token; x ref = ours / reference):", _comparison_table),
            ("profile", "Where a step's time goes (benchmarks/profile_step.py: device-busy fraction of the step's "
             "span, idle gaps between device activities, the top kernels):", _profile_table),
            ("memory_fit", "What fits (benchmarks/memory_fit.py: real training steps on the masks of the sampler's "
             "largest step, the CUDA allocator capped at the given GiB):", _memory_fit_table)):
        selected = [r for r in rows_ if r["op"] == op]
        if selected:
            tables.append((title, table(selected)))
    return tables


def _env(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "env.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def device_section(rows_: list[dict[str, Any]], kind: str) -> str:
    """One device kind's tables, with the raw files they come from."""
    devices = sorted({str(r.get("device")) for r in rows_})
    sources = sorted({Path(r["source"]) for r in rows_})
    folders = sorted({p.parent for p in sources})
    shown = [str(p.relative_to(ROOT)) if p.resolve().is_relative_to(ROOT) else str(p) for p in folders]
    env = _env(folders[0]) if len(folders) == 1 else {}
    versions = next((r["versions"] for r in rows_ if r.get("versions")), {})
    lines = [f"### {kind}", "",
             f"{', '.join(devices)}. Raw JSON: {', '.join(f'`{s}/`' for s in shown)} "
             f"({', '.join(sorted({p.name for p in sources}))})"
             + (f"; commit {env['git_commit'][:12]}" if env.get("git_commit") else "")
             + (f", {env['date']}" if env.get("date") else "")
             + (f"; torch {versions.get('torch')}, triton {versions.get('triton')}, CUDA {versions.get('cuda')}"
                if versions else "") + ".", ""]
    groups = _groups(rows_)
    ops = _ops_table(groups)
    if ops:
        lines += ["Fused ops against their reference (median of the benchmark's rounds; x = reference time / ours):",
                  "", *ops, ""]
    steps = [r for r in rows_ if r["op"] == "train_step"]
    if steps:
        lines += ["Training step end to end (engine.step.train_step, synthetic on-device batch; ours-truncated is "
                  "like for like with the reference's batch-minimum truncation):", "", *_step_table(steps), ""]
    evals = [r for r in rows_ if r["op"] == "eval_forward"]
    if evals:
        lines += ["Frozen-evaluation forward (target encoder, all tokens; ours-dense: no grad, the config's autocast; "
                  "fp32-grad: the same forward as facebookresearch/vjepa2#71 calls it, fp32 trainable weights in grad "
                  "mode):", "",
                  *_step_table(evals, "forward", context=False), ""]
    gemm = [r for r in rows_ if r["op"] == "gemm" and r.get("tflops") is not None]
    if gemm:
        gemms = ", ".join(f"{r['case']} {r['dtype']} {r['tflops']:.3g} TFLOP/s" for r in gemm)
        lines += [f"Bare GEMM of the same run (the measured peak of the MFU column): {gemms}.", ""]
    for title, table in _script_tables(rows_):
        lines += [title, "", *table, ""]
    loader = [r for r in rows_ if r["op"] == "loader"]
    if loader:
        lines += ["Data loader (frames/s the step receives; decoded counts the frames decoded to reach them):", "",
                  *_loader_table(loader), ""]
    return "\n".join(lines).rstrip() + "\n"


def markdown(rows_: list[dict[str, Any]]) -> str:
    """Every device kind's section, in name order."""
    kinds: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows_:
        kinds[device_kind(str(r.get("device", "")))].append(r)
    return "\n".join(device_section(kinds[k], k) for k in sorted(kinds))


def update_readme(readme: Path, paths: list[str], results_root: Path = ROOT / "benchmarks" / "results") -> str:
    """Rewrite the results' device kind's part of README's marker section; returns the kind."""
    rows_ = rows(paths)
    if not rows_:
        raise SystemExit("no benchmarks in " + " ".join(paths))
    interpreted = sorted({r["source"] for r in rows_ if r.get("interpreted")})
    if interpreted:
        raise SystemExit(f"interpreted results (a CPU dry run measures the Triton interpreter) do not go into the "
                         f"README: {', '.join(interpreted)}")
    outside = [p for p in paths if not Path(p).resolve().is_relative_to(Path(results_root).resolve())]
    if outside:
        raise SystemExit("only committed raw JSON counts: copy the session's files to "
                         f"benchmarks/results/<date>_<device>/ and report from there, not from {', '.join(outside)}")
    kinds = {device_kind(str(r.get("device", ""))) for r in rows_}
    if len(kinds) != 1:
        raise SystemExit(f"one device kind at a time, got {sorted(kinds)}")
    kind = kinds.pop()
    text = readme.read_text()
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise SystemExit(f"{readme}: expected one {START} ... {END} section")
    head, rest = text.split(START, 1)
    body, tail = rest.split(END, 1)
    sections = {m["kind"]: m[0].rstrip("\n") + "\n" for m in _DEVICE_SECTION.finditer(body)}
    sections[kind] = f"<!-- device:{kind} -->\n{device_section(rows_, kind)}\n<!-- /device:{kind} -->\n"
    inner = "\n".join(sections[k] for k in sorted(sections))
    readme.write_text(f"{head}{START}\n{inner}{END}{tail}")
    return kind


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", metavar="JSON",
                        help="pytest-benchmark JSON files and/or the --json files of compare_reference.py, "
                             "profile_step.py, memory_fit.py")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--markdown", action="store_true", help="print the README's tables")
    mode.add_argument("--update-readme", action="store_true", help="rewrite this device's tables in the README")
    parser.add_argument("--readme", type=Path, default=ROOT / "benchmarks" / "README.md")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(rows(args.paths)), end="")
    elif args.update_readme:
        print(f"{args.readme}: updated the {update_readme(args.readme, args.paths)} tables")
    else:
        main(args.paths)
