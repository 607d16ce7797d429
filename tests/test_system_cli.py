"""The `hybridrag` command line end to end, on the real offline model (SmolLM2-135M-Instruct) and real files: ask
(streamed text, --json, --save then --system), compare, analyze with a heatmap, experiment over a questions file,
and the one-line errors. Short answers (--max-new-tokens 8), two passages and the hashing encoder keep it quick."""
import json
import subprocess
import sys

import pytest

from hybridrag import cli

QUESTION = "What is the capital of France?"
QUICK = ["--encoder", "hashing-256", "--max-new-tokens", "8", "--top-k", "2"]
DOCUMENTS = {
    "paris.md": "# Paris\nParis is the capital of France. The Eiffel Tower stands in Paris.\n",
    "nile.txt": "The Nile is the longest river in Africa. It flows north into the Mediterranean Sea.\n",
    "python.md": "# Python\nPython is a programming language created by Guido van Rossum in 1991.\n",
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """A 135M model on a shared machine: one thread is faster than two spin-waiting ones."""


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("docs")
    for name, text in DOCUMENTS.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def one_error_line(capsys, *fragments):
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("hybridrag: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    assert captured.out == ""
    return err


def test_ask_streams_the_answer_then_saves_and_answers_again_as_json(docs, tmp_path, capsys):
    saved = tmp_path / "system"
    assert cli.main(["ask", QUESTION, "--docs", str(docs), "--save", str(saved), *QUICK]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() and captured.out.endswith("\n")
    assert "passages (hybrid" in captured.err and "paris.md" in captured.err
    assert "timings: retrieve" in captured.err and "tokens/s" in captured.err
    assert (saved / "config.json").is_file()

    assert cli.main(["ask", QUESTION, "--system", str(saved), "--max-new-tokens", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["method"] == "hybrid" and result["success"] and result["response"]  # what it says: the model's
    assert len(result["passages"]) == 2 and {p["id"].split("#")[0] for p in result["passages"]} <= set(DOCUMENTS)
    assert {"id", "text", "score", "attention_mass"} <= set(result["passages"][0])
    assert {"retrieve", "passages", "prefill", "first_token", "decode"} == set(result["timings"])
    assert captured.out.strip() == result["response"]  # the streamed text is the answer


def test_compare_answers_with_the_three_methods(docs, capsys):
    assert cli.main(["compare", QUESTION, "--docs", str(docs), "--json", *QUICK]) == 0
    results = json.loads(capsys.readouterr().out)
    assert set(results) == {"hybrid", "base_rag", "direct"}
    for method, result in results.items():
        assert result["method"] == method and result["response"] and result["tokens_per_second"] > 0
    assert results["direct"]["passages"] == [] and len(results["base_rag"]["passages"]) == 2


def test_analyze_writes_the_heatmap(docs, tmp_path, capsys):
    plot = tmp_path / "attention.png"
    assert cli.main(["analyze", QUESTION, "--docs", str(docs), "--json", "--plot", str(plot), *QUICK]) == 0
    analysis = json.loads(capsys.readouterr().out)
    for name in ("entropy", "focus", "coverage", "attention_quality"):
        assert 0 <= analysis[name] <= 1
    assert len(analysis["per_passage"]) == 2 and sum(analysis["per_passage"]) == pytest.approx(1.0)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


QUESTIONS = [{"id": "paris", "question": QUESTION, "answers": ["Paris"]},
             {"id": "nile", "question": "Which is the longest river in Africa?", "answers": ["the Nile"]},
             {"id": "python", "question": "Who created Python?", "answers": ["Guido van Rossum"]}]


@pytest.fixture
def questions(tmp_path):
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS), encoding="utf-8")
    return path


def test_experiment_writes_results_and_plots(docs, questions, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["experiment", str(questions), "--docs", str(docs), "--out", str(out), "--limit", "2",
                     "--methods", "hybrid,direct", "--sweep", "retriever.top_k=1,2", "--max-new-tokens", "4",
                     "--encoder", "hashing-256", "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["questions"] == 2 and summary["methods"] == ["hybrid", "direct"]
    assert summary["configs"] == ["base", "retriever.top_k=1", "retriever.top_k=2"]
    assert [(row["config"], row["method"]) for row in summary["rows"]] == [
        (config, method) for config in summary["configs"] for method in ("hybrid", "direct")]
    assert all(row["answers"] == 2 for row in summary["rows"])
    names = {"results.json", "method_comparison.png", "configuration_comparison.png", "attention_quality.png",
             "attention_patterns.png"}
    assert {path.name for path in out.iterdir()} == names
    assert json.loads((out / "results.json").read_text())["summary"]["rows"] == summary["rows"]
    assert all(str(out / name) in captured.err for name in names)


def test_experiment_errors_are_one_line(docs, questions, tmp_path, capsys):
    run = ["--docs", str(docs), "--out", str(tmp_path / "run"), "--encoder", "hashing-256"]
    assert cli.main(["experiment", str(tmp_path / "none.jsonl"), *run]) == 2
    one_error_line(capsys, "no such questions file", "none.jsonl")
    assert cli.main(["experiment", str(questions), *run, "--sweep", "retriever.topk=1,2"]) == 2
    one_error_line(capsys, "unknown field 'retriever.topk'", "retriever.top_k")
    assert not (tmp_path / "run").exists()


def test_the_experiment_table(capsys):
    row = {"exact_match": 0.5, "contains_gold": 1.0, "token_f1": 0.75, "success_rate": 1.0, "context_quality": 0.5,
           "attention_quality": 0.25, "first_token_s": 0.125}
    summary = {"rows": [{"config": "base", "method": "hybrid", **row},
                        {"config": "retriever.top_k=1", "method": "direct", **row, "context_quality": None,
                         "attention_quality": None}]}
    cli._experiment_table(summary, sys.stdout)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["config", "method", "exact", "match", "contains", "gold", "token", "F1", "success",
                                "context", "quality", "attention", "quality", "first", "token", "s"]
    assert lines[1].split() == ["base", "hybrid", "0.500", "1.000", "0.750", "1.000", "0.500", "0.250", "0.125"]
    assert lines[2].split() == ["retriever.top_k=1", "direct", "0.500", "1.000", "0.750", "1.000", "-", "-", "0.125"]
    assert lines[1].index("hybrid") == lines[2].index("direct")


class _Answers:
    """A stand-in system with fixed results, to check the text output without running the model."""

    config = type("Config", (), {"attn_implementation": "hybridrag"})()

    def _result(self, method, text="Paris is the capital."):
        return {"response": text, "method": method, "citations": ["paris.md#0"], "tokens_per_second": 12.5,
                "passages": [{"id": "paris.md#0", "score": 0.5, "attention_mass": 0.7},
                             {"id": "nile.txt#0", "score": 0.25, "attention_mass": None}],
                "timings": {"retrieve": 0.01, "passages": 0.2, "prefill": 0.3, "first_token": 0.31, "decode": 0.5},
                "prompt_tokens": 90}

    def generate_response(self, question, method, task_type, labels, on_token=None):
        if task_type == "classification":
            return {**self._result(method, "yes"), "label_scores": {"yes": -0.5, "no": -2.0}}
        for piece in ("Paris", " is the capital."):
            on_token(piece)
        return self._result(method)

    def compare_methods(self, question):
        return {method: self._result(method, "word " * 20) for method in ("hybrid", "base_rag", "direct")}

    def analyze_attention_patterns(self, question, method, plot):
        return {"response": "Paris", "passage_ids": ["paris.md#0", "nile.txt#0"], "per_passage": [0.75, 0.25],
                "entropy": 0.81, "focus": 0.75, "coverage": 1.0, "attention_quality": 0.6}


def test_the_text_output(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_build", lambda args: _Answers())
    assert cli.main(["ask", QUESTION, "--docs", "x"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "Paris is the capital.\n"
    assert "1. paris.md#0  score 0.5000  attention 0.700 *" in captured.err
    assert "2. nile.txt#0  score 0.2500  attention -\n" in captured.err
    assert "first token 0.310 s" in captured.err and "12.5 tokens/s" in captured.err
    assert cli.main(["ask", "Spam?", "--docs", "x", "--task", "classification", "--labels", "yes, no"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "yes\n" and "label scores (mean log-probability): yes -0.500, no -2.000" in captured.err
    assert cli.main(["compare", QUESTION, "--docs", "x"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["method", "answer", "first", "token", "s", "tokens/s"] and len(lines) == 4
    assert lines[1].startswith("hybrid ") and ("word " * 12)[:60] in lines[1] and lines[1].endswith("0.310      12.5")
    assert cli.main(["analyze", QUESTION, "--docs", "x"]) == 0
    out = capsys.readouterr().out
    assert "entropy 0.810  focus 0.750  coverage 1.000  attention quality 0.600" in out and "paris.md#0  0.750" in out


def test_a_missing_docs_path_is_one_line(tmp_path, capsys):
    missing = tmp_path / "no-such-notes"
    assert cli.main(["ask", QUESTION, "--docs", str(missing), *QUICK]) == 2
    one_error_line(capsys, str(missing))


def test_an_empty_question_is_one_line(docs, capsys):
    assert cli.main(["ask", "  ", "--docs", str(docs), *QUICK]) == 2
    one_error_line(capsys, "question is empty")


def test_labels_need_the_classification_task(docs, capsys):
    assert cli.main(["ask", QUESTION, "--docs", str(docs), "--labels", "yes,no", *QUICK]) == 2
    one_error_line(capsys, "--labels", "classification")
    assert cli.main(["ask", QUESTION, "--docs", str(docs), "--task", "classification", *QUICK]) == 2
    one_error_line(capsys, "--labels")


@pytest.mark.parametrize("arguments, fragment", [
    (["ask", QUESTION], "--docs --system is required"),
    (["ask", QUESTION, "--docs", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["ask", QUESTION, "--system", "nowhere", "--config", "c.json"], "--config applies to building from --docs"),
    (["analyze", QUESTION, "--docs", "x", "--plot", "no-such-folder/a.png"], "no such folder no-such-folder"),
    (["explain", QUESTION], "invalid choice"),
    (["experiment", "q.jsonl", "--docs", "x"], "--out"),
    (["experiment", "q.jsonl", "--docs", "x", "--out", "o", "--sweep", "retriever.top_k"],
     "--sweep: 'retriever.top_k' must be FIELD=V1,V2"),
    (["experiment", "q.jsonl", "--docs", "x", "--out", "o", "--sweep", "retriever.top_k=1,,2"], "--sweep"),
    (["experiment", "q.jsonl", "--docs", "x", "--out", "o", "--methods", "hybrid,rag"], "unknown ['rag']"),
    (["experiment", "q.jsonl", "--docs", "x", "--out", "o", "--sweep", "int8=true", "--sweep", "int8=false"],
     "--sweep int8 given more than once"),
])
def test_usage_errors_are_one_line(arguments, fragment, capsys):
    assert cli.main(arguments) == 2
    one_error_line(capsys, fragment)


def test_a_missing_system_is_one_line(tmp_path, capsys):
    assert cli.main(["ask", QUESTION, "--system", str(tmp_path / "none")]) == 2
    one_error_line(capsys, "missing config.json")


def test_interrupt_exits_130_and_a_bug_keeps_its_traceback(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "run", interrupted)
    assert cli.main(["ask", QUESTION, "--docs", "x"]) == 130
    assert "interrupted" in capsys.readouterr().err
    monkeypatch.setattr(cli, "run", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["ask", QUESTION, "--docs", "x"])


@pytest.mark.parametrize("command", ["ask", "compare", "analyze", "experiment"])
def test_every_command_has_help(command, capsys):
    assert cli.main([command, "--help"]) == 0
    assert "--docs" in capsys.readouterr().out


def test_python_m_hybridrag_help():
    done = subprocess.run([sys.executable, "-m", "hybridrag", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for command in ("ask", "compare", "analyze", "experiment", "serve", "train-generator"):
        assert command in done.stdout
    assert "{ask,compare,analyze,experiment,serve,train-generator}" in done.stdout
    assert "hybridrag serve --kb" in done.stdout and "hybridrag train-generator --kb" in done.stdout
