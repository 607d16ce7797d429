"""The compile report on a representative subset: each kernel compiles for sm_80 and sm_90 through its launcher,
fits the target's shared memory, and spills no registers, except the kernels whose spills are still owed (listed
below; what each spills is in the full report, benchmarks/results/compile/compile_report.json). Runs the report
in a subprocess: this test process has TRITON_INTERPRET=1, under which triton.jit builds interpreted functions."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
from benchmarks.compile_report import findings, held_to_no_spills  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# One case of each launcher family, under 2 minutes on 2 cores: the window forward and backward, the hybrid forward and
# backward with every extra (landmarks, memory, global rows, kv_start), streaming decode, int8 tiled and split-K.
SUBSET = ["window fp16 D64", "hybrid bf16 D128", "stream decode fp16 D100", "int8 W8A16 bf16 g128 M512",
          "int8 W8A8 fp16 M1"]
# (arch, case, kernel) that still spill (issue 14, at c65f364): the dk/dv kernels hold two accumulators (split
# them), dq at D 64 on sm_80, the hybrid forward with global rows and memory at D 128, streaming decode at a padded
# D, int8 on sm_90. A new spill fails the test; a fixed one is taken off this list.
SPILLS_OWED = {
    (80, "window fp16 D64", "_dkdv_kernel"), (80, "window fp16 D64", "_dq_kernel"),
    (80, "hybrid bf16 D128", "_fwd_kernel"), (80, "hybrid bf16 D128", "_dkdv_extra_kernel"),
    (80, "hybrid bf16 D128", "_dkdv_kernel"), (80, "stream decode fp16 D100", "_stream_fwd_kernel"),
    (90, "window fp16 D64", "_dkdv_kernel"), (90, "hybrid bf16 D128", "_fwd_kernel"),
    (90, "hybrid bf16 D128", "_dkdv_extra_kernel"), (90, "hybrid bf16 D128", "_dkdv_kernel"),
    (90, "stream decode fp16 D100", "_stream_fwd_kernel"), (90, "int8 W8A8 fp16 M1", "_int8_mm_kernel"),
    (90, "int8 W8A16 bf16 g128 M512", "_int8_mm_kernel"),
}


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "benchmarks.compile_report", "--only", "|".join(SUBSET),
                          "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(out.read_text())["records"]


def test_every_case_of_the_subset_compiled_for_both_targets(records):
    assert {(r["arch"], r["case"]) for r in records} == {(a, c) for a in (80, 90) for c in SUBSET}
    broken = [(r["arch"], r["case"], r["kernel"], r.get("error")) for r in records if not r["ok"]]
    assert not broken


def test_every_kernel_fits_the_targets_shared_memory(records):
    over = [(r["arch"], r["case"], r["kernel"], r["shared"]) for r in records if not r["fits"]]
    assert not over


def test_no_spills_but_the_owed_ones(records):
    spilling = [(r["arch"], r["case"], r["kernel"], r["spill_bytes"]) for r in records if r["spill_bytes"]
                and held_to_no_spills(r) and (r["arch"], r["case"], r["kernel"]) not in SPILLS_OWED]
    assert not spilling


def test_dots_of_64_rows_use_wgmma_on_sm90(records):
    missing = [(r["case"], r["kernel"]) for r in records if any("wgmma" in f for f in findings(r))]
    assert not missing
