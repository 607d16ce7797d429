"""benchmarks/cascade_quality.py at a tiny size (one chunk per topic, 24 questions, a student trained 3 steps, one
timed pass): the cascade's kept share, its quality against the student's and the teacher's, the timing rows, the
results and the plot, and bad options refused. No timing is asserted."""
import json

import pytest

from benchmarks import cascade_quality as cascade
from benchmarks.common import RESULTS_ROOT

TINY = {**cascade.SIZES["quick"], "chunks_per_topic": 1, "questions": 24, "steps": 3, "batch_size": 8,
        "passages": 96, "warmup": 1, "eval_every": 3, "repeats": 1}
METRICS = ("recall@1", "recall@5", "recall@10", "mrr", "ndcg@10")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("cascade_quality")
    result, png = cascade.run("quick", out, spec=TINY, log=lambda message: None)
    return result, png, out


def test_tiny_run_writes_the_results_and_the_plot(tiny_run):
    result, png, out = tiny_run
    payload = json.loads((out / "cascade_quality-quick.json").read_text())
    for key in ("suite", "size", "target_agreement", "data", "teacher", "students", "training", "quality", "timing",
                "curves", "load_limit", "flagged", "seconds", "environment"):
        assert key in payload, key
    assert payload["students"] == ["hybrid-encoder", "bm25"] and payload["data"]["topics"] == 79
    assert payload["data"]["validation"] + payload["data"]["test"] == 24
    assert "load_avg_1m" in payload["environment"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "minilm (teacher) alone" in cascade.tables(result)


def test_cascade_rows_keep_a_share_and_lie_between_student_and_teacher(tiny_run):
    result, _, _ = tiny_run
    rows = {r["method"]: r for r in result["quality"]}
    teacher = rows["minilm (teacher) alone"]
    for student in result["students"]:
        alone = rows[f"{student} alone"]
        for measure in cascade.MEASURES:
            row = rows[f"{student} -> minilm, {measure}"]
            assert 0.0 <= row["kept_share"] <= 1.0
            assert row["kept_share"] == pytest.approx(row["evaluate"]["kept_share"])  # run() and evaluate() agree
            assert row["agreement_with_teacher"] == pytest.approx(row["evaluate"]["agreement_with_teacher"])
            worst, best = row["recall@1_bounds"]
            assert worst - 1e-9 <= row["recall@1"] <= best + 1e-9
            assert worst <= min(alone["recall@1"], teacher["recall@1"]) + 1e-9
            assert best >= max(alone["recall@1"], teacher["recall@1"]) - 1e-9
            if row["kept_share"] == 0.0:
                assert all(row[m] == pytest.approx(teacher[m]) for m in METRICS)
            if row["kept_share"] == 1.0:
                assert all(row[m] == pytest.approx(alone[m]) for m in METRICS)
            points = result["curves"][student][measure]["points"]
            assert all(0.0 <= kept <= 1.0 for kept, _, _ in points)
            assert min(points)[1] == pytest.approx(teacher["recall@1"])  # everything escalated
            assert max(points)[1] == pytest.approx(alone["recall@1"])  # everything kept


def test_timing_rows(tiny_run):
    result, _, _ = tiny_run
    timing = result["timing"]
    teacher = next(r for r in timing if r["student"] is None)
    assert len(timing) == 1 + len(result["students"]) * (1 + len(cascade.MEASURES))
    for row in timing:
        assert row["ms_per_query"] > 0 and len(row["pass_seconds"]) == TINY["repeats"]
        assert row["vs_teacher"] == pytest.approx(row["ms_per_query"] / teacher["ms_per_query"])
        assert "flagged" in row and 0.0 <= row["other_load"] <= 1.0
        if row is not teacher:
            assert row["time_saved"] == pytest.approx(1 - row["vs_teacher"])
        if row["measure"] is not None:
            assert row["time_saved_evaluate"] is not None


def test_select_and_split_are_seeded_and_disjoint():
    queries = [{"id": f"q{i}", "query": f"question {i}", "relevant": ["t"]} for i in range(11)]
    validation, test = cascade.split(queries, seed=3)
    assert len(validation) == 6 and len(test) == 5
    assert sorted(q["id"] for q in validation + test) == sorted(q["id"] for q in queries)
    assert cascade.split(queries, seed=3) == (validation, test)
    _, sample = cascade.select([], queries, None, 4, seed=0)
    assert len(sample) == 4 and cascade.select([], queries, None, 4, seed=0)[1] == sample


def test_recorded_answers_each_query_once_with_its_seconds():
    calls = []

    def model(query):
        calls.append(query)
        return {"result": [query], "scores": [1.0, 0.5]}
    recorded = cascade.Recorded(model)
    first = recorded("a")
    assert recorded("a") is first and calls == ["a"] and first["seconds"] >= 0


@pytest.mark.parametrize("argv, message", [
    (["--threads", "0"], "--threads must be >= 1"), (["--target", "0"], "--target must be in (0, 1]"),
    (["--target", "1.5"], "--target must be in (0, 1]"), (["--target", "nan"], "--target must be in (0, 1]"),
    (["--seed", "-1"], "--seed must be >= 0"), (["--checkpoint", "/nonexistent.pt"], "no such file"),
    (["--quick", "--record"], "drop --quick"), (["--out", str(RESULTS_ROOT / "x")], "lies inside"),
    (["--threads", "two"], "invalid int value")])
def test_refused_options(argv, message, capsys):
    with pytest.raises(SystemExit) as error:
        cascade.main(argv)
    assert error.value.code == 2 and message in capsys.readouterr().err


def test_help(capsys):
    with pytest.raises(SystemExit) as error:
        cascade.main(["--help"])
    assert error.value.code == 0 and "--quick" in capsys.readouterr().out
