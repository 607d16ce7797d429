"""benchmarks/gpu_check.sh, the prepared check for a lent GPU, and its two helpers (benchmarks/autotune_sweep.py,
benchmarks/gpu_check_summary.py), checked without a GPU: the script is valid bash, its time boxes fit the budget, its
dry run passes, the sweep's patched configs reach the launchers and match the default config's output (the worker
pool included), and the summary reads what the steps write."""
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from benchmarks import autotune_sweep as sweep
from benchmarks import gpu_check_summary as summary

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
LEASE_S = 9 * 60  # the script's whole run, within a 15-minute device lease


def _bash(*args, env=None, timeout=60):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


def test_script_is_valid_bash():
    check = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_time_boxes_fit_the_budget():
    out = _bash("--print-budget")
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()[1:-1]]
    budget, kept = map(int, re.search(r"budget: (\d+) s \((\d+) s kept back\)", out.stdout).groups())
    caps = {name: (int(cap), int(most), int(least)) for name, cap, most, least in rows}
    assert budget <= LEASE_S
    assert sum(cap for cap, _, _ in caps.values()) <= budget - kept
    assert all(cap <= most and least <= most for cap, most, least in caps.values())
    assert {"install", "env", "tests_gpu", "tests_kernels", "autotune", "summary"} <= set(caps)
    # every step runs under the one `timeout` of run_step, which takes the deadline into account
    calls = [line for line in SCRIPT.read_text().splitlines() if re.search(r"(^|\s)timeout -k", line)]
    assert len(calls) == 1 and "STEP_TIMEOUT=$t" in calls[0]


def test_help_and_bad_arguments():
    out = _bash("--help")
    assert out.returncode == 0
    for word in ("--dry-run", "--steps", "--print-budget", "tests_kernels", "autotune", "record_<suite>", "$OUT"):
        assert word in out.stdout
    bad = _bash("--steps", "nonsense")
    assert bad.returncode == 2 and "no step nor group" in bad.stderr
    assert _bash("--frobnicate").returncode == 2


def test_dry_run(tmp_path):
    """The dry run without the CPU benchmark: every step passes, $OUT holds a few files, the kernel tests it would
    run on the GPU are the CUDA ones, and the sweep's tiny patched runs match the default config."""
    out_dir = tmp_path / "out"
    run = _bash("--dry-run", "--steps", "install,env,tests,autotune,summary", timeout=240,
                env={"OUT": str(out_dir), "TMPDIR": str(tmp_path)})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "steps: 6 of 6 passed" in run.stdout
    files = sorted(p.name for p in out_dir.iterdir())
    assert {"gpu_check.log", "env.txt", "summary.txt", "logs.tar.gz", "autotune_sweep.json"} <= set(files)
    assert len(files) <= 8  # what the device tool returns

    with tarfile.open(out_dir / "logs.tar.gz") as tar:
        log = tar.extractfile("logs/tests_kernels.log").read().decode()
    would_run = next(line for line in log.splitlines() if line.startswith("would run:"))
    assert "tests/test_sliding_window_kernel.py" in would_run and "tests/test_int8_kernel.py" in would_run
    assert "_gpu.py" not in would_run and "test_readme" not in would_run and "test_gpu_check" not in would_run

    payload = json.loads((out_dir / "autotune_sweep.json").read_text())
    assert payload["dry_run"] and len(payload["problems"]) == len(sweep.problems())
    for problem in payload["problems"]:
        assert len(problem["configs"]) >= 4 and len({tuple(c) for c in problem["configs"]}) == len(problem["configs"])
    d128 = next(p for p in payload["problems"] if p["name"] == "window_fwd D128 bf16")
    from hybridrag.kernels.triton_common import _FWD_CONFIGS
    assert tuple(d128["configs"][0]) == _FWD_CONFIGS[90]["d128"]  # the current H100/H200 table entry comes first
    assert sorted(t["kernel"] for t in payload["tiny"]) == sorted(sweep.KERNELS)
    assert all(t["reached_launcher"] and t["matches"] and t["rel_err"] <= 1e-3 for t in payload["tiny"])


def test_sweep_times_candidates_through_a_worker_pool():
    """The GPU path on CPU tensors under the interpreter: one spawned worker compiles (runs) every candidate, then
    each is timed here against the current config's output."""
    problems = [sweep.Problem("window_fwd", 32, "float16"), sweep.Problem("int8_tiled", 0, "float16")]
    records = sweep.sweep(problems, torch.device("cpu"), budget_s=120, jobs=1, limit=2, shapes=sweep.TINY_SHAPES)
    for record in records:
        current, other = record["results"]
        assert current["config"] == record["current"] and current["status"] == "ok" and current["rel_err"] == 0
        assert other["status"] == "ok" and other["calls"] > 0 and other["rel_err"] <= 1e-3
        assert current["precompile"] == other["precompile"] == "ok"  # the worker ran both
        assert record["timed"] == "2/2" and record["best"] is not None
    entries = sweep.suggestions(records)
    assert {e["entry"] for e in entries} == {r["table_entry"] for r in records}
    assert all(e["suggested"] in [r["config"] for rec in records for r in rec["results"]] for e in entries)
    payload = json.loads(json.dumps({"dry_run": False, "device": "cpu", "arch": 90, "budget_s": 120, "elapsed_s": 9,
                                     "problems": records, "suggestions": entries}))  # what the GPU run writes
    lines = sweep.summary_lines(payload)
    assert "window_fwd D32 fp16" in lines[0] and any(s["entry"] in line for s in entries for line in lines[1:])


def test_patched_configs_that_break_are_reported_not_raised():
    problem = sweep.Problem("int8_tiled", 0, "float16")
    run, _ = sweep.build(problem, torch.device("cpu"), sweep.TINY_SHAPES)
    result, _ = sweep.try_config(problem, run, (16, 16, 0, 1, 1, 4, 1), run(), torch.device("cpu"))
    assert result["status"].startswith("error: ") and result["ms"] is None  # BLOCK_R 0 cannot run


def test_summary_reads_the_runs_the_tests_and_a_stopped_log(tmp_path):
    lines = summary.bench_lines([REPO / "benchmarks" / "results" / "cpu-amd-epyc-2cores"])
    text = "\n".join(lines)
    for suite in ("sliding_window", "hybrid", "int8_matmul", "streaming"):
        assert f"\n{suite} (" in text
    assert "targets:" in text and "ours / window-only (limit 1.15)" in text and "ceilings measured per suite" in text

    (tmp_path / "done.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1" time="2.5">'
        '<testcase classname="tests.test_a" name="test_ok"/><testcase classname="tests.test_a" name="test_bad">'
        '<failure message="no"/></testcase><testcase classname="tests.test_a" name="test_skip"><skipped/>'
        '</testcase></testsuite></testsuites>')
    (tmp_path / "stopped.log").write_text(
        "[gw0] [ 10%] PASSED tests/test_a.py::test_one[x]\n"
        "tests/test_b.py::test_two FAILED                [ 20%]\n"
        "[gw1] [ 30%] SKIPPED tests/test_b.py::test_three\n")
    lines = summary.test_lines([tmp_path / "done.xml", tmp_path / "stopped.xml", tmp_path / "absent.xml"])
    assert "done: 1 passed, 1 failed, 0 errors, 1 skipped in 2 s" in lines[1]
    assert "    FAILED tests.test_a::test_bad" in lines
    assert any("stopped: stopped before the end" in line and "1 passed, 1 failed, 0 errors, 1 skipped" in line
               for line in lines)
    assert "    FAILED tests/test_b.py::test_two" in lines
    assert any("absent: no junit XML and no log" in x for x in lines)


@pytest.mark.parametrize("argv, message", [(["--kernels", "window_fwd,nope"], "--kernels must be among"),
                                           (["--budget-s", "0"], "--budget-s must be positive")])
def test_sweep_refuses_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep.parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
