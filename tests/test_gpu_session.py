"""benchmarks/gpu_session.sh on the CPU (--dry-run): the script a GPU session runs first works before it has one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .test_compare_reference import REFERENCE

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"


def _session(out: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, **(env or {})}
    env.pop("VJEPA_BENCH_DEADLINE", None)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


def test_dry_run_writes_env_report_and_benchmark_json(tmp_path):
    pytest.importorskip("pytest_benchmark")
    # the loss suite is the quickest under the interpreter (seconds); the others run the same code path
    proc = _session(tmp_path, "--dry-run", "--only", "bench_masked_l1_loss")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    env = json.loads((tmp_path / "env.json").read_text())
    assert env["torch"] and env["python"] and env["devices"] == []  # the dry run hides CUDA
    assert env["results_dir"].startswith("benchmarks/results/") and env["results_dir"].endswith("_cpu")

    bench = json.loads((tmp_path / "bench_masked_l1_loss.json").read_text())["benchmarks"]
    infos = [b["extra_info"] for b in bench]
    assert {i["provider"] for i in infos} == {"triton", "torch", "torch_compile", "copy"}
    assert {i["case"] for i in infos} == {"tiny-packed", "tiny-trunc"}
    for info in infos:
        assert info["op"] == "masked_l1_loss" and info["interpreted"] is True and info["dtype"] == "float32"
        assert info["bytes_moved"] > 0 and info["gbps"] > 0 and info["device"]

    log = (tmp_path / "session.log").read_text()
    assert "bench_masked_l1_loss: ok" in log and "gpu_tests" not in log  # --only ran that step alone
    assert not (tmp_path / "bench_ema.json").exists()


def test_unknown_step_is_refused(tmp_path):
    proc = _session(tmp_path, "--only", "bench_nothing")
    assert proc.returncode == 2 and "unknown step 'bench_nothing'" in proc.stderr


def test_train_step_benchmark_is_a_step(tmp_path):
    # no time left for it: the step is known (no exit 2) and recorded as not run, without running the benchmark
    proc = _session(tmp_path, "--dry-run", "--only", "bench_train_step", "--budget", "0")
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "bench_train_step: no-time" in (tmp_path / "session.log").read_text()


def test_compare_reference_step_is_skipped_without_a_checkout(tmp_path):
    proc = _session(tmp_path, "--dry-run", "--only", "compare_reference", env={"VJEPA_REFERENCE": str(tmp_path / "no")})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "compare_reference: skipped: no facebookresearch/jepa checkout" in (tmp_path / "session.log").read_text()


@pytest.mark.skipif(REFERENCE is None, reason="no facebookresearch/jepa checkout: set VJEPA_REFERENCE=PATH or clone it "
                    "to /tmp/jepa_ref (tests/fixtures/reference/README.md)")
def test_compare_reference_step_writes_its_json(tmp_path):
    proc = _session(tmp_path, "--dry-run", "--only", "compare_reference", env={"VJEPA_REFERENCE": str(REFERENCE)})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "compare_tiny_synthetic.json").read_text())
    assert result["ratios"]["samples_per_s_truncated"] > 0 and result["loss_check"]["abs_diff"] < 1e-5
    assert result["complete"] is True and result["failed"] == []
    log = (tmp_path / "session.log").read_text()
    assert "== compare_reference: ok" in log
    assert "Against facebookresearch/jepa" in log and "| tiny_synthetic |" in log  # the summary's table


def test_profile_step_writes_its_summary(tmp_path):
    proc = _session(tmp_path, "--dry-run", "--only", "profile")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((tmp_path / "profile.json").read_text())["results"]
    assert [r["name"] for r in results] == ["tiny_synthetic-packed"] and results[0]["batch"] == 2
    assert "profile: ok" in (tmp_path / "session.log").read_text()


def test_memory_fit_step_writes_one_json_of_every_run(tmp_path):
    proc = _session(tmp_path, "--dry-run", "--only", "memory_fit")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    run, = json.loads((tmp_path / "memory_fit.json").read_text())["runs"]
    assert run["config"] == "configs/tiny_synthetic.json"
    assert [(c["batch"], c["checkpointing"], c["status"]) for c in run["cases"]] == \
        [(1, 0, "ok"), (2, 0, "ok"), (1, 1, "ok"), (2, 1, "ok")]
    assert "memory_fit: ok" in (tmp_path / "session.log").read_text()


def test_gpu_tests_are_skipped_where_triton_is_interpreted_on_a_gpu(monkeypatch):
    """The GPU tests need compiled kernels; a process whose Triton is interpreted (this suite's conftest) skips them
    on a GPU machine with the command that runs them, and leaves everything else alone."""
    from tests.conftest import pytest_collection_modifyitems

    class Item:
        def __init__(self, gpu):
            self.keywords = {"gpu": True} if gpu else {}
            self.markers = []

        def add_marker(self, marker):
            self.markers.append(marker)

    class Config:
        def getoption(self, name):
            return {"markexpr": ""}[name]

    items = [Item(True), Item(False)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest_collection_modifyitems(Config(), items)
    assert [len(i.markers) for i in items] == [1, 0]
    assert "TRITON_INTERPRET=0 pytest tests -m gpu" in items[0].markers[0].kwargs["reason"]
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # compiled: the GPU tests run
    items = [Item(True)]
    pytest_collection_modifyitems(Config(), items)
    assert items[0].markers == []


def test_a_benchmark_run_killed_midway_keeps_the_results_it_finished(tmp_path):
    """pytest-benchmark writes --benchmark-json when the session ends; benchmarks/conftest.py writes it after every
    long test too, so a gpu_session step killed at its limit brings back the cases it finished."""
    pytest.importorskip("pytest_benchmark")
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["benchmarks.conftest"]\n')
    (tmp_path / "test_killed.py").write_text(
        "import os\n"
        "import benchmarks.conftest\n"
        "benchmarks.conftest.SAVE_AFTER_S = 0.0  # every test counts as long here\n\n"
        "def test_finished(benchmark):\n"
        "    benchmark(lambda: sum(range(100)))\n\n"
        "def test_killed():\n"
        "    os._exit(137)  # what the step's timeout does\n")
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "pytest", str(tmp_path), "-q", "-p", "no:cacheprovider",
                           f"--benchmark-json={out}"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 137, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [b["name"] for b in json.loads(out.read_text())["benchmarks"]] == ["test_finished"]


def _pytest(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_gpu_tests_run_the_kernels_first_and_the_training_runs_last():
    """Under `-m gpu` (the gpu_tests step, which a time limit may end) the cheap kernel checks come first."""
    proc = _pytest("tests", "-m", "gpu", "--collect-only", "-q", env={"TRITON_INTERPRET": "0"})
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    files = [i.split("::")[0].removeprefix("tests/") for i in ids]
    assert files and files[0].startswith("test_kernel_") and files[-1] == "test_gpu_training.py", files
    kernel = [f.startswith("test_kernel_") for f in files]
    assert kernel == sorted(kernel, reverse=True)  # every kernel test before any other
    assert len(set(files)) > 3


def test_tests_past_the_session_deadline_skip_naming_it(tmp_path):
    """gpu_session.sh's deadline: the remaining tests skip (pytest ends normally and writes its junit XML)."""
    xml = tmp_path / "junit.xml"
    proc = _pytest("tests/test_schedules.py", "-q", "-rs", f"--junitxml={xml}", env={"VJEPA_BENCH_DEADLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "passed" not in proc.stdout and "time budget of the session spent (VJEPA_BENCH_DEADLINE)" in proc.stdout
    assert 'skipped="' in xml.read_text()


def test_a_test_stopped_at_the_steps_limit_still_writes_the_junit_xml(tmp_path):
    """gpu_session.sh stops a pytest step still running at its limit with SIGINT (`timeout -s INT`): pytest ends the
    session and writes its junit XML, which SIGTERM or SIGKILL would lose. Even where SIGINT comes in ignored (a
    background job of a non-interactive shell): timeout catches it, so its child starts with the default."""
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["tests.conftest"]\n')
    (tmp_path / "test_cut.py").write_text("import time\n\ndef test_done():\n    pass\n\n"
                                          "def test_running_at_the_limit():\n    time.sleep(120)\n")
    xml = tmp_path / "junit.xml"
    command = (f"trap '' INT; timeout -s INT -k 20 10 {sys.executable} -m pytest {tmp_path} -q -p no:cacheprovider "
               f"--junitxml={xml}")
    proc = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "VJEPA_BENCH_DEADLINE": str(time.time() + 600)})
    assert proc.returncode == 124, proc.stdout[-3000:] + proc.stderr[-3000:]  # timeout's: the limit was reached
    report = xml.read_text()
    assert 'tests="1"' in report and "test_done" in report, report


def test_cap_sets_a_steps_limit_and_bad_caps_are_refused(tmp_path):
    proc = _session(tmp_path, "--dry-run", "--only", "gpu_tests", "--cap", "gpu_tests=77")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "== gpu_tests (limit 77s)" in (tmp_path / "session.log").read_text()
    for bad, message in ((["--cap", "bench_nothing=5"], "unknown step 'bench_nothing'"),
                         (["--cap", "gpu_tests"], "--cap needs NAME=SECONDS"),
                         (["--cap=gpu_tests=soon"], "--cap gpu_tests needs whole seconds")):
        proc = _session(tmp_path / "bad", *bad)
        assert proc.returncode == 2 and message in proc.stderr, (bad, proc.stderr)
