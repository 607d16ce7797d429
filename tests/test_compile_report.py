"""The compile report on its quick cases (one of each launcher family): each kernel compiles for sm_80 and sm_90
through its launcher, fits the target's shared memory, spills no registers where the target holds it to none, and
uses wgmma on sm_90 where a dot has >= 64 rows. Runs the report in a subprocess: this test process has
TRITON_INTERPRET=1, under which triton.jit builds interpreted functions."""
import json

import pytest

pytest.importorskip("triton")
from benchmarks.compile_report import QUICK_CASES, findings, held_to_no_spills, run_in_subprocess  # noqa: E402


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """The main job's quick compile step (benchmarks.report.compile_report_step runs the same)."""
    out = tmp_path_factory.mktemp("compile") / "report.json"
    status, tables = run_in_subprocess(quick=True, out=out, timeout_s=600)
    assert status == 0, tables
    assert "compile report: summary" in tables
    return json.loads(out.read_text())["records"]


def test_every_case_of_the_subset_compiled_for_both_targets(records):
    assert {(r["arch"], r["case"]) for r in records} == {(a, c) for a in (80, 90) for c in QUICK_CASES}
    broken = [(r["arch"], r["case"], r["kernel"], r.get("error")) for r in records if not r["ok"]]
    assert not broken


def test_every_kernel_fits_the_targets_shared_memory(records):
    over = [(r["arch"], r["case"], r["kernel"], r["shared"]) for r in records if not r["fits"]]
    assert not over


def test_no_spills(records):
    spilling = [(r["arch"], r["case"], r["kernel"], r["spill_bytes"]) for r in records
                if r["spill_bytes"] and held_to_no_spills(r)]
    assert not spilling


def test_dots_of_64_rows_use_wgmma_on_sm90(records):
    missing = [(r["case"], r["kernel"]) for r in records if any("wgmma" in f for f in findings(r))]
    assert not missing
