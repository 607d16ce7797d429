"""benchmarks.server_load at a tiny size: a real server, concurrent clients, every request answered once, the
memory samples and the checks written, the plot drawn; and its options."""
import json

import pytest

from benchmarks import server_load


def test_a_tiny_run_answers_every_request_once_and_writes_the_results(tmp_path, capsys):
    assert server_load.main(["--requests", "4", "--clients", "2", "--questions", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["requests"] == 4 and result["statuses"] == {"200": 4} and all(result["checks"].values())
    assert result["queue_delta"]["accepted"] == result["queue_delta"]["completed"] == 4
    assert len({r["request_id"] for r in result["records"]}) == 4
    assert {row["method"] for row in result["rows"]} == {"base_rag", "hybrid", "all"}
    assert result["rows"][-1]["p50_s"] <= result["rows"][-1]["p95_s"] <= result["rows"][-1]["p99_s"]
    assert result["memory_samples"] and result["memory"]["peak_mib"] >= result["memory"]["start_mib"] > 0
    assert (tmp_path / "server_load.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "every request answered" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [(["--requests", "0"], "--requests must be >= 1"),
                                           (["--record", "--clients", "4"], "drop --requests, --clients and --questions"),
                                           (["--quick", "--record"], "drop --quick")])
def test_bad_options_are_parser_errors(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit:
        server_load.main([*argv, "--out", str(tmp_path)])
    assert exit.value.code == 2 and message in capsys.readouterr().err
