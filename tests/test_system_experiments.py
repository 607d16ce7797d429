"""run_research_experiment on the real offline model over a few pydoc topics: files written, summary and per-answer
records, the reuse of the knowledge base across a sweep, and bad input. Six-token answers keep it short."""
import json

import pytest
from pydoc_data.topics import topics

from hybridrag.retrieval import Document
from hybridrag.system import HybridRAGSystem
from hybridrag.system.experiments import ACCURACY, ANALYSIS, run_research_experiment

TOPICS = ["assert", "for", "while", "if", "try", "with", "pass", "global", "nonlocal", "lambda"]
QUESTIONS = [
    {"id": "q1", "question": "Which exception is raised when an assert condition is false?",
     "answers": ["AssertionError"], "topic": "assert"},
    {"id": "q3", "question": "Which statement declares a name as global?", "answers": ["global"]},
]
CONFIG = {"encoder": "hashing-256", "retriever": {"top_k": 3}, "generation": {"max_new_tokens": 6},
          "attention": {"segment_length": 64, "window_overlap": 8}}
PNG = b"\x89PNG\r\n\x1a\n"
PLOTS = ("method_comparison.png", "configuration_comparison.png", "attention_quality.png", "attention_patterns.png")


@pytest.fixture(scope="module")
def documents():
    return [Document(name, topics[name], name) for name in TOPICS]


@pytest.fixture(scope="module")
def experiment(documents, tmp_path_factory):
    out = tmp_path_factory.mktemp("experiment")
    summary = run_research_experiment(CONFIG, QUESTIONS, out_dir=out, documents=documents,
                                      sweeps={"retriever.top_k": [2, 3]},
                                      sweep_methods=("hybrid", "base_rag"), progress=False)
    return summary, json.loads((out / "results.json").read_text()), out


def test_files_are_written(experiment):
    summary, results, out = experiment
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == PNG
    assert {str(out / name) for name in ("results.json", *PLOTS)} == set(summary["files"])
    assert set(results) == {"summary", "configs", "environment", "duration_s", "records"}
    assert results["summary"]["rows"] == summary["rows"]
    env = results["environment"]
    assert {"torch", "transformers", "git_commit", "load_avg_before", "load_avg_after", "own_cpu_share"} <= set(env)
    assert results["configs"]["retriever.top_k=2"]["retriever"]["top_k"] == 2
    assert results["configs"]["base"]["retriever"]["top_k"] == 3


def test_summary_has_a_row_per_config_and_method(experiment):
    summary, _, _ = experiment
    # top_k=3 is the base's value: that sweep point is the base configuration, not run twice
    assert summary["configs"] == ["base", "retriever.top_k=2"]
    assert summary["sweeps"] == {"retriever.top_k": [{"value": 2, "config": "retriever.top_k=2"},
                                                     {"value": 3, "config": "base"}]}
    assert summary["questions"] == 2 and summary["methods"] == ["hybrid", "base_rag", "direct"]
    rows = {(r["config"], r["method"]): r for r in summary["rows"]}
    assert len(rows) == 5 and ("retriever.top_k=2", "direct") not in rows  # the sweep runs sweep_methods only
    for (config, method), row in rows.items():
        assert row["answers"] == 2
        for name in (*ACCURACY, "success_rate"):
            assert 0 <= row[name] <= 1
        assert row["first_token_s"] > 0 and row["total_s"] >= row["first_token_s"]
        if method == "direct":
            assert row["context_quality"] is None and row["attention_quality"] is None
            assert row["attention_measured"] == 0
        else:
            assert 0 <= row["context_quality"] <= 1 and 0 <= row["topic_hit_rate"] <= 1
            assert row["attention_measured"] == 2
            for name in ANALYSIS:
                assert 0 <= row[name] <= 1


def test_each_answer_is_recorded(experiment):
    _, results, _ = experiment
    records = results["records"]
    assert len(records) == 2 * 3 + 2 * 2
    record = next(r for r in records if r["method"] == "hybrid" and r["question_id"] == "q1" and
                  r["config"] == "retriever.top_k=2")
    assert set(record["scores"]) == set(ACCURACY) and record["response"] and record["success"]
    assert {"first_token", "total", "retrieve", "decode"} <= set(record["timings"])
    assert len(record["passages"]) == 2 and sum(p["share"] for p in record["passages"]) == pytest.approx(1.0)
    assert set(record["citations"]) <= {p["id"] for p in record["passages"]}
    assert isinstance(record["context_hit"], bool) and isinstance(record["topic_hit"], bool)
    analysis = record["analysis"]
    assert analysis["per_passage"] == pytest.approx([p["share"] for p in record["passages"]])
    assert analysis["focus"] == pytest.approx(max(analysis["per_passage"]))
    direct = next(r for r in records if r["method"] == "direct" and r["question_id"] == "q3")
    assert direct["passages"] == [] and direct["analysis"] is None and direct["topic_hit"] is None
    assert next(r for r in records if r["method"] == "base_rag" and r["question_id"] == "q3")["topic_hit"] is None


def test_the_knowledge_base_is_rebuilt_only_for_its_fields(documents, tmp_path, monkeypatch):
    builds = []
    original = HybridRAGSystem.create_vectorstore

    def counting(self, docs):
        builds.append(self.config.attention.segment_length)
        return original(self, docs)
    monkeypatch.setattr(HybridRAGSystem, "create_vectorstore", counting)
    summary = run_research_experiment(CONFIG, QUESTIONS[:1], out_dir=tmp_path, documents=documents,
                                      methods=("direct",), progress=False,
                                      sweeps={"attention.window_size": [32], "attention.segment_length": [100]})
    assert summary["configs"] == ["base", "attention.window_size=32", "attention.segment_length=100"]
    assert builds == [64, 100]


def test_bad_input(documents, tmp_path):
    with pytest.raises(ValueError, match="questions must be a non-empty list"):
        run_research_experiment(CONFIG, [], out_dir=tmp_path, documents=documents)
    with pytest.raises(ValueError, match=r"unknown field 'attention\.window'; known fields: .*attention\.window_size"):
        run_research_experiment(CONFIG, QUESTIONS, out_dir=tmp_path, documents=documents,
                                sweeps={"attention.window": [64]})
    with pytest.raises(ValueError, match=r"methods must be distinct names out of .*'rag'"):
        run_research_experiment(CONFIG, QUESTIONS, out_dir=tmp_path, documents=documents, methods=("rag",))
    with pytest.raises(ValueError, match="need a knowledge base.*pass documents="):
        run_research_experiment(CONFIG, QUESTIONS, out_dir=tmp_path)
    with pytest.raises(ValueError, match=r"questions\[1\] \(q1\): duplicate id|questions\[1\]: duplicate id 'q1'"):
        run_research_experiment(CONFIG, [QUESTIONS[0], QUESTIONS[0]], out_dir=tmp_path, documents=documents)
    with pytest.raises(ValueError, match=r"sweeps\['retriever.top_k'\] must be a non-empty list"):
        run_research_experiment(CONFIG, QUESTIONS, out_dir=tmp_path, documents=documents,
                                sweeps={"retriever.top_k": []})
    with pytest.raises(ValueError, match="retriever.top_k must be an int >= 1"):
        run_research_experiment(CONFIG, QUESTIONS, out_dir=tmp_path, documents=documents,
                                sweeps={"retriever.top_k": [0]})
    assert not (tmp_path / "results.json").exists()
