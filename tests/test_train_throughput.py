"""benchmarks/train_throughput.py on the tiny random Llama: every implementation gives a row, the losses agree, the
results and the plot are written, and bad options are refused. No timing is asserted."""
import json

import pytest

from benchmarks import train_throughput


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("train_throughput")
    status = train_throughput.main(["--tiny", "--lengths", "32", "--out", str(out)])
    return status, out


def test_tiny_run_rows_for_every_implementation(tiny_run):
    status, out = tiny_run
    assert status == 0
    payload = json.loads((out / "results.json").read_text())
    rows = payload["rows"]
    assert [r["attn_implementation"] for r in rows] == list(train_throughput.IMPLEMENTATIONS)
    assert {r["tokens"] for r in rows} == {32}
    assert payload["losses_agree"] is True and isinstance(payload["flagged"], bool)
    base = next(r for r in rows if r["attn_implementation"] == "sdpa")
    for row in rows:
        assert row["tokens_per_s"] > 0 and row["step_s"] > 0 and len(row["steps_s"]) == payload["rounds"]
        assert row["loss"] == pytest.approx(base["loss"], rel=1e-4)
        assert row["grad_rel_diff_vs_sdpa"] < 1e-3
    assert base["speedup_vs_sdpa"] == 1.0 and base["grad_rel_diff_vs_sdpa"] == 0.0


def test_tiny_run_writes_the_plot(tiny_run):
    _, out = tiny_run
    assert (out / "train_throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv", [["--tiny", "--record"], ["--quick", "--record"], ["--lengths", "1"],
                                  ["--lengths", "32,abc"]])
def test_refused_options(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        train_throughput.main([*argv, "--out", str(tmp_path)])
    assert error.value.code == 2
    message = capsys.readouterr().err
    assert ("--lengths" in message) if "--lengths" in argv else ("--record" in message)
