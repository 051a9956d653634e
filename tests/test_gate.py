"""benchmarks/gate.py on synthetic pytest-benchmark JSON, and benchmarks/report.py's README table from the same."""

import json

import pytest

from benchmarks import gate, report

H100 = "NVIDIA H100 80GB HBM3"


def _bench(name, median, *, device=H100, interpreted=False, **info):
    info = {"op": "ema", "case": "vitl16_224", "direction": "update", "provider": name.rstrip("]").split("-")[-1],
            "device": device, "interpreted": interpreted, **info}
    return {"name": name.split("::")[-1], "fullname": name, "group": None, "extra_info": info,
            "stats": {"median": median, "min": median * 0.98, "iqr": median * 0.01, "rounds": 25}}


def _write(path, *benchmarks):
    path.write_text(json.dumps({"machine_info": {}, "commit_info": {"id": "abc123"}, "benchmarks": list(benchmarks)}))
    return str(path)


EMA = "benchmarks/test_bench_ema.py::test_ema[vitl16_224-triton]"
LOSS = "benchmarks/test_bench_masked_l1_loss.py::test_masked_l1_loss[vitl16_224-packed-triton]"
STEP = "benchmarks/test_bench_train_step.py::test_train_step[vitl16_224-packed]"


@pytest.fixture
def baseline(tmp_path):
    return _write(tmp_path / "baseline.json", _bench(EMA, 1.0e-3), _bench(LOSS, 2.0e-3, op="masked_l1_loss"))


def _gate(capsys, *argv):
    code = gate.main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.mark.parametrize("factor", [1.05, 0.5, 1.0])
def test_within_threshold_or_faster_passes(tmp_path, capsys, baseline, factor):
    current = _write(tmp_path / "current.json", _bench(EMA, 1.0e-3 * factor),
                     _bench(LOSS, 2.0e-3, op="masked_l1_loss"))
    code, out = _gate(capsys, "--baseline", baseline, "--current", current)
    assert code == 0, out
    assert "OK: 2 benchmarks" in out and ("  faster\n" in out) == (factor == 0.5)


def test_slowdown_beyond_threshold_fails_naming_the_benchmark(tmp_path, capsys, baseline):
    current = _write(tmp_path / "current.json", _bench(EMA, 1.0e-3), _bench(LOSS, 2.3e-3, op="masked_l1_loss"))
    code, out = _gate(capsys, "--baseline", baseline, "--current", current)
    assert code == 1
    assert "FAIL: 1 of 2" in out and LOSS in out and "1.15x" in out and "SLOWER" in out
    # a looser threshold lets the same run pass
    assert _gate(capsys, "--baseline", baseline, "--current", current, "--threshold", "0.2")[0] == 0


def test_missing_and_new_benchmarks_are_listed_without_failing(tmp_path, capsys, baseline):
    current = _write(tmp_path / "current.json", _bench(EMA, 1.0e-3), _bench(STEP, 0.3, op="train_step"))
    code, out = _gate(capsys, "--baseline", baseline, "--current", current)
    assert code == 0, out
    assert "missing from the current run (not compared): masked_l1_loss vitl16_224 update" in out and LOSS in out
    assert "new, not in the baseline (not compared): train_step" in out and STEP in out


def test_refresh_writes_the_baseline_of_the_device_kind(tmp_path, capsys):
    first = _write(tmp_path / "bench_ema.json", _bench(EMA, 1.0e-3))
    second = _write(tmp_path / "bench_loss.json", _bench(LOSS, 2.0e-3))
    target = tmp_path / "baselines" / "h100.json"
    code, out = _gate(capsys, "--refresh", "--current", first, second, "--baseline", str(target))
    assert code == 0 and "2 benchmarks" in out
    written = json.loads(target.read_text())
    assert written["device_kind"] == "h100" and written["commits"] == ["abc123"]
    assert written["benchmarks"][EMA]["median_s"] == 1.0e-3
    # the baseline reads back as one, and a current run may be given as several files
    assert _gate(capsys, "--baseline", str(target), "--current", first, second)[0] == 0


def test_refresh_refuses_interpreted_results(tmp_path, capsys):
    current = _write(tmp_path / "cpu.json", _bench(EMA, 1.0, device="x86_64", interpreted=True))
    code, out = _gate(capsys, "--refresh", "--current", current, "--baseline", str(tmp_path / "cpu_base.json"))
    assert code == 2 and "interpreted" in out and not (tmp_path / "cpu_base.json").exists()


def test_device_kinds_must_match(tmp_path, capsys, baseline):
    current = _write(tmp_path / "h200.json", _bench(EMA, 1.0e-3, device="NVIDIA H200"))
    code, out = _gate(capsys, "--baseline", baseline, "--current", current)
    assert code == 2 and "'h100'" in out and "'h200'" in out
    code, out = _gate(capsys, "--current", current)  # no baseline given: benchmarks/baselines/h200.json is absent
    assert code == 2 and "h200.json" in out and "--refresh" in out


def test_device_kind_names():
    assert gate.device_kind("NVIDIA H100 80GB HBM3") == "h100"
    assert gate.device_kind("NVIDIA H200") == "h200"
    assert gate.device_kind("NVIDIA A100-SXM4-80GB") == "a100"
    assert gate.device_kind("x86_64") == "cpu" and gate.device_kind("") == "cpu"


# report.py: the README's table, generated from the raw JSON

def _results(folder, device=H100, interpreted=False):
    folder.mkdir(parents=True)
    ops = _write(folder / "bench_ema.json", _bench(EMA, 1.0e-3, device=device, interpreted=interpreted, gbps=900.0),
                 _bench(EMA.replace("triton", "torch"), 3.0e-3, device=device, interpreted=interpreted, gbps=300.0))
    step_info = dict(op="train_step", case="vitl16_224-b24", direction="step", device=device,
                     interpreted=interpreted, samples_per_s=80.0, tokens_per_s=4.0e5, model_tflops=300.0,
                     mfu_measured_peak=0.4, mfu_datasheet=0.3, gemm_tflops=750.0, peak_memory_gb=40.0,
                     context_tokens_per_clip=[580.0, 300.0])
    step = _write(folder / "bench_train_step.json",
                  _bench(STEP, 0.3, **{**step_info, "provider": "ours-packed"}),
                  _bench(STEP.replace("packed", "truncated"), 0.25, **{**step_info, "provider": "ours-truncated"}))
    return [ops, step]


def test_markdown_table_has_ops_against_reference_and_the_train_step(tmp_path):
    table = report.markdown(report.rows(_results(tmp_path / "2026-11-21_h100")))
    assert "### h100" in table and "NVIDIA H100 80GB HBM3" in table
    assert "| ema | vitl16_224 | update | 1000.0 | 3000.0 | - | 3.00x | - | 900.0 |" in table
    assert "| vitl16_224-b24 | ours-packed | 300.0 | 80.0 |" in table and "40%" in table


def test_update_readme_rewrites_one_device_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Benchmarks\n\nintro\n\n{report.START}\n{report.NO_RESULTS}\n{report.END}\n\nafter\n")
    h100 = _results(tmp_path / "results" / "2026-11-21_h100")
    h200 = _results(tmp_path / "results" / "2026-11-22_h200", device="NVIDIA H200")
    report.update_readme(readme, h100, results_root=tmp_path / "results")
    report.update_readme(readme, h200, results_root=tmp_path / "results")
    text = readme.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n") and text.endswith("\n\nafter\n")
    assert "### h100" in text and "### h200" in text and report.NO_RESULTS not in text
    again = _results(tmp_path / "results" / "2026-11-23_h100")  # a newer h100 run replaces its section only
    report.update_readme(readme, again, results_root=tmp_path / "results")
    text = readme.read_text()
    assert text.count("### h100") == 1 and "2026-11-23_h100" in text and "2026-11-21_h100" not in text
    assert "### h200" in text


def test_update_readme_refuses_dry_runs_and_uncommitted_files(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"{report.START}\n{report.NO_RESULTS}\n{report.END}\n")
    cpu = _results(tmp_path / "results" / "2026-11-21_cpu", device="x86_64", interpreted=True)
    with pytest.raises(SystemExit, match="interpreted"):
        report.update_readme(readme, cpu, results_root=tmp_path / "results")
    elsewhere = _results(tmp_path / "elsewhere")
    with pytest.raises(SystemExit, match="benchmarks/results"):
        report.update_readme(readme, elsewhere, results_root=tmp_path / "results")


def test_benchmarks_readme_has_the_generated_section():
    text = (report.ROOT / "benchmarks" / "README.md").read_text()
    assert text.count(report.START) == 1 and text.count(report.END) == 1
    section = text.split(report.START)[1].split(report.END)[0]
    # numbers only with committed raw JSON: until a GPU session's results are in benchmarks/results/, none
    committed = list((report.ROOT / "benchmarks" / "results").glob("*/bench_*.json"))
    assert (report.NO_RESULTS in section) == (not committed)


def _comparison(folder, device=H100, *, packed_oom=False, complete=True, config="configs/vith16_384.json"):
    """A compare_<config>.json as benchmarks/compare_reference.py writes it (its own Comparison class)."""
    from benchmarks import compare_reference as cr
    from benchmarks.failed_run import Failed

    def run(name, samples_per_s, peak_gb, mfu):
        # batch 10, one step: seconds from clips/s; FLOPs from the MFU over a 1000 TFLOP/s peak
        seconds = 10 / samples_per_s
        return cr.Run(name, 10, 1, seconds, tokens=10_000, flops=int(mfu * 1000e12 * seconds), peak_mem_gb=peak_gb,
                      peak_tflops=1000.0, first_loss=0.5, context_tokens_per_clip=[1000.0], target_tokens_per_clip=[9.0])

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"compare_{config.split('/')[-1].removesuffix('.json')}.json"
    header = {"config": config, "device": "cpu" if device == "x86_64" else "cuda:0", "device_name": device,
              "dtype": "bfloat16", "batch_size": 10, "eval_batch_size": 10, "versions": {"torch": "2.11.0"}}
    c = cr.Comparison(header, path)
    c.add("train", "reference", run("reference", 4.0, 60.0, 0.2))
    c.add("train", "reference_loggers", run("reference + loggers", 3.5, 60.0, 0.18))
    c.add("train", "ours_truncated", run("ours truncated (same tokens)", 9.0, 36.0, 0.45))
    c.add("train", "ours_packed", Failed("ours packed (default)", "OutOfMemoryError: x", True) if packed_oom
          else run("ours packed (default)", 6.0, 50.0, 0.40))
    if complete:
        c.add("eval", "reference", run("reference", 20.0, 5.0, 0.3))
        c.add("eval", "ours", run("ours", 30.0, 4.0, 0.45))
    c.write(complete=complete)
    return str(path)


def test_markdown_has_the_comparison_with_the_reference_and_its_targets(tmp_path, capsys):
    folder = tmp_path / "2026-11-21_h100"
    table = report.markdown(report.rows([*_results(folder), _comparison(folder)]))
    assert "Against facebookresearch/jepa on the same GPU" in table
    row = next(line for line in table.splitlines() if line.startswith("| vith16_384 |"))
    assert row == ("| vith16_384 | 10 | bfloat16 | 4.0 | 3.5 | 9.0 | 2.25x | 0.60x | 6.0 | 1.50x | 1.50x | 40% | "
                   "1.50x | 0.0e+00 | 2.25x >= 2x, mem 0.60x <= 0.7x, MFU 40% < 45% |")
    # a run that did not fit, and a session cut short before the eval forward
    other = report.markdown(report.rows([_comparison(tmp_path / "b", packed_oom=True, complete=False)]))
    row = next(line for line in other.splitlines() if line.startswith("| vith16_384 |"))
    assert "| OOM | - |" in row and row.endswith("(cut short) |")
    report.main([_comparison(tmp_path / "c", config="configs/vitl16.json")])
    out = capsys.readouterr().out
    assert "Against facebookresearch/jepa" in out and "| vitl16 |" in out and "MFU" not in out.splitlines()[-1]


def test_update_readme_takes_comparisons_and_refuses_cpu_ones(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"{report.START}\n{report.NO_RESULTS}\n{report.END}\n")
    folder = tmp_path / "results" / "2026-11-21_h100"
    report.update_readme(readme, [_comparison(folder)], results_root=tmp_path / "results")
    assert "| vith16_384 | 10 | bfloat16 |" in readme.read_text()
    cpu = _comparison(tmp_path / "results" / "2026-11-21_cpu", device="x86_64")
    with pytest.raises(SystemExit, match="interpreted"):
        report.update_readme(readme, [cpu], results_root=tmp_path / "results")


def test_report_names_a_file_it_cannot_read(tmp_path):
    other = tmp_path / "aot.json"
    other.write_text(json.dumps({"configs": []}))
    with pytest.raises(SystemExit, match="aot.json: neither pytest-benchmark JSON nor"):
        report.rows([str(other)])


def test_markdown_has_the_profile_and_memory_fit_tables(tmp_path):
    folder = tmp_path / "2026-11-21_h100"
    folder.mkdir()
    profile = {"step_ms": 500.0, "samples_per_s": 20.0, "model_tflops": 400.0, "mfu_datasheet": 0.404, "batch": 10,
               "gpu": {"busy_fraction": 0.93, "idle_gap_ms_per_step": 12.5, "gaps_over_20us_per_step": 40.0},
               "top_kernels": [{"name": "sm90_xmma_gemm_bf16", "share_of_busy": 0.61},
                               {"name": "_attn_fwd", "share_of_busy": 0.2}]}
    (folder / "profile.json").write_text(json.dumps({"device": H100, "versions": {}, "complete": True, "results": [
        {"name": "vith16_384-packed", **profile},
        {"name": "vitl16-packed", "error": "OutOfMemoryError: x", "out_of_memory": True}]}))
    case = {"batch": 16, "checkpointing": 1, "status": "ok", "error": None, "ms_per_step": 812.4, "estimate_gib": 20.1,
            "peak_allocated_gib": 19.5, "peak_reserved_gib": 21.0}
    (folder / "memory_fit.json").write_text(json.dumps({"versions": {}, "runs": [
        {"config": "configs/vitl16.json", "overrides": [], "cap_gib": 24.0, "device_gib": 79.1, "device": H100,
         "steps": 3, "cases": [case, {**case, "batch": 24, "status": "oom", "ms_per_step": None}]}]}))
    table = report.markdown(report.rows([str(folder / "profile.json"), str(folder / "memory_fit.json")]))
    assert "### h100" in table
    assert ("| vith16_384-packed | 10 | 500.0 | 20.0 | 400.0 | 40% | 93% | 12.50 | 40 | sm90_xmma_gemm_bf16 61%, "
            "_attn_fwd 20% |") in table
    assert "| vitl16-packed | out of memory |" in table
    assert "| vitl16 | 24.0 | 16 | 1 | yes | 19.50 | 21.00 | 20.10 | 812 |" in table
    assert "| vitl16 | 24.0 | 24 | 1 | no (out of memory) |" in table


def test_every_row_of_a_generated_table_has_its_headers_cell_count(tmp_path):
    folder = tmp_path / "2026-11-21_h100"
    paths = [*_results(folder), _comparison(folder), _comparison(folder, packed_oom=True, complete=False,
                                                                 config="configs/vitl16.json")]
    (folder / "profile.json").write_text(json.dumps({"device": H100, "versions": {}, "results": [
        {"name": "vitl16-packed", "error": "RuntimeError: boom", "out_of_memory": False}]}))
    table = report.markdown(report.rows([*paths, str(folder / "profile.json")]))
    tables, current = [], []
    for line in [*table.splitlines(), ""]:
        if line.startswith("|"):
            current.append(line.count("|"))
        elif current:
            tables.append(current)
            current = []
    assert len(tables) >= 4
    for counts in tables:
        assert len(set(counts)) == 1, counts
