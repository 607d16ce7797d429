"""The main job's runner (benchmarks/report.py, benchmarks/common.py): flagging rows timed under load, target
verdicts, --record, the output folder, the expected time, the summary and the plots' markers. Nothing large is
timed: the runner is driven with a fake suite whose rows are made up."""
import json
import subprocess
import time
from pathlib import Path

import pytest
import torch

from benchmarks import common, report


def _row(label, ms, other_load, target=None, **extra):
    return {"label": label, "peer": "ours", "status": "ok", "reason": None, "ms": ms, "other_load": other_load,
            "target": target, **extra}


def _target(value, limit):
    return {"ratio": "ours / window-only", "value": value, "limit": limit,
            "met": None if limit is None else value <= limit}


class FakeSuite:
    """A suite module's interface with made-up rows: `loads` are the other_load of its rows."""
    SUITE = "fake"
    EXPECTED_S = {"quick": 7, "full": 70}
    CHECK_COLUMNS = [("check", lambda r: r["check"]), ("result", lambda r: "pass" if r["passed"] else "FAIL")]
    BENCH_COLUMNS = [("case", lambda r: r["label"]), ("ms", lambda r: common.fmt_number(r["ms"], ".1f")),
                     ("target", lambda r: "-" if r["target"] is None else common.verdict_text(r["target"]))]

    def __init__(self, loads=(0.02, 0.40, None), passed=True):
        self.loads, self.passed, self.plotted = loads, passed, []

    def bench_dtype(self, device):
        return "float32"

    def check(self, device):
        return [{"check": "the kernel agrees", "passed": self.passed}]

    def benchmark(self, device, quick, ceilings=None, log=print):
        unavailable = {**_row("a peer that cannot run here", None, None), "status": "unavailable"}
        return [_row(f"case {i}", 1.0 + i, load, _target(1.1, 1.15)) for i, load in enumerate(self.loads)] + \
            [unavailable]

    def plot(self, rows, ceilings, env, path):
        self.plotted.append([r["label"] for r in rows])
        path.write_bytes(b"png")
        return path

    def targets_elsewhere(self, device):
        return ["decode >= 80% of copy bandwidth (CUDA)"]


ENV = {"device": "test CPU (2 cores)", "git_commit": "abc123", "torch": "2.13", "triton": "3.9", "flash_attn": None,
       "python": "3.11", "cpu_threads": 2, "date": "2026-12-01T00:00:00+00:00"}


# ----------------------------------------------------------------------------------------------------------------
# Flagging and verdicts
# ----------------------------------------------------------------------------------------------------------------

def test_rows_over_the_limit_are_flagged_and_their_targets_not_counted():
    rows = [_row("idle", 1.0, 0.05, _target(1.1, 1.15)), _row("busy", 1.0, 0.34, _target(0.19, 1.15)),
            _row("missed", 1.0, 0.0, _target(1.9, 1.15)), _row("no load measured", 1.0, None, _target(1.0, 1.15)),
            _row("ratio only", 1.0, 0.01, _target(1.5, None))]
    flagged = common.flag_under_load(rows, 0.15)
    assert [r["label"] for r in flagged] == ["busy"]
    assert rows[1]["flagged"] == "other load 34% (limit 15%)"
    assert [r["target"]["verdict"] for r in rows] == ["met", common.NOT_COUNTED, "missed", "met", None]
    assert rows[1]["target"]["met"] is None  # the contention artefact (0.19 <= 1.15) is not a met target
    assert [common.verdict_text(r["target"]) for r in rows] == ["met", common.NOT_COUNTED, "MISSED", "met", "-"]
    assert [common.load_column(r) for r in rows] == ["5%  ", "34% *", "0%  ", "-  ", "1%  "]
    table = common.format_table("t", rows, [("load", common.load_column), ("case", lambda r: r["label"])])
    assert [line[:6] for line in table.splitlines()[3:]] == [" 5%   ", "34% * ", " 0%   ", "  -   ", " 1%   "]


def test_a_ratio_against_a_row_under_load_is_flagged_too():
    ours, peer = _row("ours", 1.0, 0.60), _row("peer", 2.0, 0.01, _target(2.0, 1.5))
    common.compared_to(peer, ours)
    common.flag_under_load([ours, peer], 0.15)
    assert peer["flagged"] == "compared with a row under other load 60% (limit 15%)"
    assert peer["target"]["verdict"] == common.NOT_COUNTED


def test_verdicts_inside_a_checks_list():
    """int8_matmul's targets hold a list of checks; each gets its verdict."""
    checks = [{"target": "a", "value": 2.0, "limit": 1.7, "met": True},
              {"target": "b", "value": 50.0, "limit": 80.0, "met": False}]
    idle = _row("idle", 1.0, 0.0, {"speedup_vs_torch_matmul": 2.0, "checks": checks})
    busy = _row("busy", 1.0, 0.9, {"speedup_vs_torch_matmul": 2.0, "checks": [dict(c) for c in checks]})
    common.flag_under_load([idle, busy], 0.15)
    assert [c["verdict"] for c in idle["target"]["checks"]] == ["met", "missed"]
    assert [c["verdict"] for c in busy["target"]["checks"]] == [common.NOT_COUNTED] * 2


@pytest.mark.parametrize("limit", [0, -0.1, 1.5])
def test_flag_rejects_a_limit_outside_0_1(limit):
    with pytest.raises(ValueError, match="limit must be a share of the CPU in"):
        common.flag_under_load([], limit)


# ----------------------------------------------------------------------------------------------------------------
# run_suite, --record
# ----------------------------------------------------------------------------------------------------------------

def test_run_suite_writes_every_row_to_the_out_folder_with_flags(tmp_path):
    suite = FakeSuite()
    result = report.run_suite(suite, "cpu", ENV, {}, quick=True, out=tmp_path, load_limit=0.15)
    payload = json.loads((tmp_path / "fake-quick.json").read_text())
    assert payload["size"] == "quick" and payload["load_limit"] == 0.15 and payload["duration_s"] >= 0
    assert [r["flagged"] for r in payload["rows"]] == [None, "other load 40% (limit 15%)", None, None]
    assert result.files == [tmp_path / "fake-quick.json", tmp_path / "fake-quick.png"]
    assert result.verdicts() == {"met": 2, "missed": 0, common.NOT_COUNTED: 1}
    text = "\n".join(report.tables(result, ENV))
    assert "40% *" in text and "1 of 4 rows flagged" in text and common.NOT_COUNTED in text
    assert result.recorded is None


def test_record_keeps_only_the_rows_not_flagged(tmp_path):
    out, recorded = tmp_path / "run", tmp_path / "results"
    suite = FakeSuite()
    result = report.run_suite(suite, "cpu", ENV, {}, quick=False, out=out, load_limit=0.15, record_to=recorded)
    payload = json.loads((recorded / "fake.json").read_text())
    assert [r["label"] for r in payload["rows"]] == ["case 0", "case 2", "a peer that cannot run here"]
    assert payload["left_out"] == [{"label": "case 1", "peer": "ours", "flagged": "other load 40% (limit 15%)"}]
    assert suite.plotted[-1] == ["case 0", "case 2", "a peer that cannot run here"]  # the recorded rows' plot
    assert len(json.loads((out / "fake.json").read_text())["rows"]) == 4  # the run's own files keep every row
    assert result.recorded.startswith("recorded 3 of 4 rows, 1 flagged rows left out") and not result.record_failed


@pytest.mark.parametrize("suite, reason", [(FakeSuite(loads=(0.5, 0.9)), "all 2 measured rows are flagged"),
                                           (FakeSuite(passed=False), "the correctness check failed")])
def test_record_refuses_and_leaves_the_recorded_files_alone(tmp_path, suite, reason):
    recorded = tmp_path / "results"
    recorded.mkdir()
    (recorded / "fake.json").write_text("the previous recorded run")
    result = report.run_suite(suite, "cpu", ENV, {}, quick=False, out=tmp_path / "run", load_limit=0.15,
                              record_to=recorded)
    assert result.record_failed and reason in result.recorded and "unchanged" in result.recorded
    assert (recorded / "fake.json").read_text() == "the previous recorded run"
    assert sorted(p.name for p in recorded.iterdir()) == ["fake.json"]


# ----------------------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------------------

def test_the_default_out_folder_is_outside_the_recorded_results_and_ignored_by_git():
    args = report.parse_args([], common.default_device())
    assert args.out == common.RUNS_ROOT / common.device_slug(common.default_device())
    assert not common.is_inside(args.out, common.RESULTS_ROOT) and not args.full and not args.record
    ignored = subprocess.run(["git", "-C", str(common.REPO_ROOT), "check-ignore", "-q", str(args.out / "x.json")])
    assert ignored.returncode == 0, "benchmarks/runs/ must be ignored by git"


@pytest.mark.parametrize("argv, message", [
    (["--record"], "--record records full runs only: add --full"),
    (["--full", "--out", str(common.RESULTS_ROOT / "some-device")], "lies inside"),
    (["--out", str(common.RESULTS_ROOT)], "lies inside"),
    (["--load-limit", "0"], "expected a percentage in (0, 100], got 0"),
    (["--load-limit", "lots"], "expected a percentage such as 15, got 'lots'"),
    (["--quick", "--full"], "not allowed with argument"),
    (["--suite", "nope"], "invalid choice: 'nope'"),
])
def test_bad_arguments_are_refused_with_a_reason(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        report.parse_args(argv, common.default_device())
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_quick_is_the_default_and_an_accepted_alias():
    device = common.default_device()
    assert not report.parse_args([], device).full and not report.parse_args(["--quick"], device).full
    assert report.parse_args(["--full"], device).full
    assert report.parse_args(["--load-limit", "34"], device).load_limit == 34


@pytest.fixture
def fake_main(monkeypatch, tmp_path):
    """report.main over one fake suite, ceilings stubbed, the recorded folder in tmp_path."""
    def run(suite, *argv):
        monkeypatch.setattr(report, "load_suites", lambda names: [suite])
        monkeypatch.setattr(report, "compile_report_step", lambda device, quick, args: True)  # its own test
        monkeypatch.setattr(report, "measure_ceilings", lambda device, dtype: {"matmul_tflops": 1.0,
                                                                               "matmul": "stub", "copy_gbps": 1.0,
                                                                               "copy": "stub", "int8_tops": None})
        monkeypatch.setattr(report, "RESULTS_ROOT", tmp_path / "results")
        return report.main(["--out", str(tmp_path / "run"), *argv])
    return run


def test_main_prints_the_plan_first_and_the_summary_last(fake_main, tmp_path, capsys):
    assert fake_main(FakeSuite()) == 0
    out, err = capsys.readouterr()
    assert "quick run of 1 suite, expected ~7 s:" in err and "fake" in err.split("expected")[1]
    last = out.rstrip().split("\n\n")[-1]
    assert last.startswith("summary: quick run on")
    assert "pass 1/1" in last and "2 / 0 / 1" in last  # targets met / missed / not counted
    assert "not measurable here: fake: decode >= 80% of copy bandwidth (CUDA)" in last
    assert f"files: {(tmp_path / 'run').resolve()}/" in last and "nothing recorded" in last
    assert not (tmp_path / "results").exists()


def test_main_exit_status(fake_main, tmp_path):
    assert fake_main(FakeSuite(passed=False)) == report.EXIT_CHECK_FAILED
    assert fake_main(FakeSuite(loads=(0.5,)), "--full", "--record") == report.EXIT_NOT_RECORDED
    assert not (tmp_path / "results" / common.device_slug(common.default_device()) / "fake.json").exists()
    assert fake_main(FakeSuite(), "--full", "--record") == 0
    assert (tmp_path / "results" / common.device_slug(common.default_device()) / "fake.json").exists()


def test_expected_time_prefers_the_last_run_here(tmp_path):
    suite, device = FakeSuite(), common.default_device()
    assert report.expected_seconds(suite, True, device, [tmp_path]) == (7, "2-core AMD EPYC")
    (tmp_path / "fake.json").write_text(json.dumps({"duration_s": 123.0}))
    assert report.expected_seconds(suite, False, device, [tmp_path]) == (123.0, f"the last run in {tmp_path}")
    assert report.expected_seconds(suite, True, device, [tmp_path])[0] == 7  # the full run's time is not the quick's


def test_the_plan_on_a_device_without_estimates(tmp_path):
    """On a GPU the 2-core CPU estimates mean nothing: the plan says the time is unknown until a run here."""
    class Cuda:
        type = "cuda"
    text = report.plan_text([FakeSuite()], False, Cuda(), [tmp_path])
    assert text.splitlines() == ["full run of 1 suite, expected unknown (no run of this size here yet):",
                                 "  fake               ~? (no run on this device yet)"]
    (tmp_path / "fake.json").write_text(json.dumps({"duration_s": 30.0}))
    assert "expected ~30 s:" in report.plan_text([FakeSuite()], False, Cuda(), [tmp_path])


def test_every_suite_declares_its_expected_time_and_quick_takes_a_few_minutes():
    suites = report.load_suites()
    for name, suite in zip(report.SUITE_MODULES, suites):
        assert suite.SUITE == name  # --suite takes the module's name
        assert 0 < suite.EXPECTED_S["quick"] < suite.EXPECTED_S["full"], suite.SUITE
    assert sum(suite.EXPECTED_S["quick"] for suite in suites) <= 5 * 60


# ----------------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------------

RECORDED = common.RESULTS_ROOT / "cpu-amd-epyc-2cores"


@pytest.mark.parametrize("suite", report.load_suites(), ids=lambda s: s.SUITE)
def test_plots_draw_flagged_rows(suite, tmp_path):
    """Every suite plots a recorded run with a third of its timed rows flagged, into a folder of the test's own."""
    pytest.importorskip("matplotlib")
    payload = json.loads((RECORDED / f"{suite.SUITE}.json").read_text())
    rows = payload["rows"]
    for i, row in enumerate(rows):
        if row.get("other_load") is not None and i % 3 == 0:
            row["other_load"] = 0.5
    common.flag_under_load(rows, 0.15)
    path = suite.plot(rows, payload["ceilings"], payload["env"], tmp_path / "plot.png")
    assert Path(path).stat().st_size > 10_000


def test_place_labels_keeps_labels_apart():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    points = [(1.0 + 0.02 * i, 1.0 - 0.001 * i) for i in range(8)]  # a crowded cluster, as in the IVF sweep
    ax.plot(*zip(*points), marker="o")
    ax.set_xlim(0, 2)
    ax.set_ylim(0.9, 1.01)
    fig.tight_layout()
    before = len(ax.texts)
    left_out = common.place_labels(ax, [(x, y, str(2 ** i)) for i, (x, y) in enumerate(points)], obstacles=points)
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts[before:]]
    assert len(boxes) + left_out == len(points) and len(boxes) >= 6
    overlapping = [(i, j) for i in range(len(boxes)) for j in range(i) if boxes[i].overlaps(boxes[j])]
    assert not overlapping
    plt.close(fig)


def test_long_steps_say_when_they_start_and_end(capsys):
    """Without a terminal the bar is off, and the log lines still tell what runs and for how long."""
    with common.long_step("HNSW build N=1,000,000", expected_s=213):
        pass
    err = capsys.readouterr().err.splitlines()
    assert err == ["  HNSW build N=1,000,000 (expected ~3.5 min) ...", "  HNSW build N=1,000,000: 0 s"]
    assert [common.format_seconds(s) for s in (45, 192, 5400)] == ["45 s", "3.2 min", "1.5 h"]


def test_ceilings_measured_under_load_are_marked():
    ceilings = {"matmul_tflops": 0.06, "matmul": "m", "copy_gbps": 14.5, "copy": "c", "int8_tops": None,
                "other_load": 0.8}
    assert "measured under other load 80%" in report.ceilings_text(ceilings, ENV, 0.15)
    assert "other load" not in report.ceilings_text({**ceilings, "other_load": 0.05}, ENV, 0.15)


def test_paired_ratio_times_two_calls_in_turn():
    calls = []

    def slow():
        calls.append("slow")
        time.sleep(0.004)

    def fast():
        calls.append("fast")
        time.sleep(0.002)
    paired = common.paired_ratio(slow, fast, torch.device("cpu"), pairs=6, budget_s=1.0)
    assert paired["pairs"] == 6 and 1.5 < paired["ratio"] < 2.5
    assert calls[2:6] == ["slow", "fast", "fast", "slow"]  # after one warm-up call each, the order alternates
