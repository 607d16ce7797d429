"""The reader adapter on the real offline model: reader-finetune lowers the distillation loss and writes a file;
a system with reader_adapter runs its adapters on the hybrid method's question-side rows only (passages, base RAG
and direct stay the base model's, the shared model is untouched); a reader sweep runs the hybrid method only; bad
input. Three training questions, six-token answers."""
import json
import subprocess
import sys

import pytest
import torch
from pydoc_data.topics import topics

from hybridrag.nn.lora import LoRALinear, lora_modules
from hybridrag.retrieval import Document
from hybridrag.system import create_hybrid_rag_system, load_language_model
from hybridrag.system.experiments import run_research_experiment
from hybridrag.system.reader import load_reader, save_reader
from hybridrag.train.__main__ import main as train_main
from hybridrag.train.reader_finetune import (ReaderConfig, read_questions, reader_finetune, teacher_examples,
                                             train_reader)

TOPICS = ["assert", "for", "while", "if", "try", "with", "pass", "global", "nonlocal", "lambda"]
TRAIN = ["Which exception does a failing assert raise?", "What does a pass statement do?",
         "Which statement makes a name global?"]
QUESTION = "What does the nonlocal statement do?"
CONFIG = {"encoder": "hashing-256", "retriever": {"top_k": 3}, "generation": {"max_new_tokens": 6},
          "attention": {"segment_length": 64, "window_overlap": 8}}


@pytest.fixture(scope="module")
def documents():
    return [Document(name, topics[name], name) for name in TOPICS]


@pytest.fixture(scope="module")
def trained(documents, tmp_path_factory):
    """(summary, reader file): reader_finetune on a system with a model copy of its own."""
    system = create_hybrid_rag_system(CONFIG, language_model=load_language_model(fresh=True))
    system.create_vectorstore(documents)
    path = tmp_path_factory.mktemp("reader") / "reader.pt"
    summary = reader_finetune(system, TRAIN, path, ReaderConfig(epochs=1, learning_rate=3e-3, warmup_steps=0),
                              held_out=[QUESTION], progress=False)
    return summary, path


@pytest.fixture(scope="module")
def plain(documents):
    system = create_hybrid_rag_system(CONFIG)
    system.create_vectorstore(documents)
    return system


@pytest.fixture(scope="module")
def reader_system(trained, documents):
    system = create_hybrid_rag_system({**CONFIG, "reader_adapter": str(trained[1])})
    system.create_vectorstore(documents)
    return system


def test_training_lowers_the_loss_and_writes_the_reader(trained, plain):
    summary, path = trained
    assert summary["steps"] == 3 and len(summary["losses"]) == 3 and summary["examples"] == 3
    assert summary["loss_after"] < summary["loss_before"]
    assert {"held_out_loss_before", "held_out_loss_after", "teacher_seconds", "seconds"} <= set(summary)
    assert summary["passage_store"]["evictions"] == 0 and summary["notes"] == {}
    reader = load_reader(path)
    assert reader.rank == 8 and reader.trained_for["recompute_tokens"] == 48
    assert reader.summary["loss_after"] == summary["loss_after"]
    assert any(name.endswith("lora_b") and tensor.abs().max() > 0 for name, tensor in reader.state.items())
    assert not lora_modules(plain.language_model.model)  # the shared model never got adapters


def test_adapters_run_on_the_hybrid_question_rows_only(reader_system, plain):
    model = reader_system.language_model.model
    assert model is not plain.language_model.model
    probe = next(m for m in lora_modules(model).values() if isinstance(m, LoRALinear))
    calls = []
    handle = probe.register_forward_pre_hook(lambda module, args: calls.append((module.enabled, args[0].shape[1])))
    try:
        reader_system.passages.clear()
        hybrid = reader_system.generate_response(QUESTION, method="hybrid", measure_attention=False)
        hybrid_calls, calls[:] = list(calls), []
        for method in ("base_rag", "direct"):
            reader_system.generate_response(QUESTION, method=method, measure_attention=False)
    finally:
        handle.remove()
    encodes = [rows for enabled, rows in hybrid_calls if not enabled]
    reads = [rows for enabled, rows in hybrid_calls if enabled]
    assert len(encodes) == 4  # the prefix and three passages, encoded by the base model
    assert reads and reads[0] > 1 and set(reads[1:]) == {1}  # the question rows, then one row a token
    assert not any(enabled for enabled, _ in calls)  # base RAG and direct: adapters off throughout
    assert not any(m.enabled for m in lora_modules(model).values())
    # the passages are the base model's: the same keys as the plain system's store
    plain.passages.clear()
    plain.generate_response(QUESTION, method="hybrid", measure_attention=False)
    mine, theirs = reader_system.passages._entries, plain.passages._entries
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert torch.allclose(mine[key].part().keys[-1], theirs[key].part().keys[-1], atol=1e-5)
    assert hybrid["success"]


def test_base_rag_answers_are_unchanged(reader_system, plain):
    for method in ("base_rag", "direct"):
        assert (reader_system.generate_response(QUESTION, method=method, measure_attention=False)["response"]
                == plain.generate_response(QUESTION, method=method, measure_attention=False)["response"])


def test_a_reader_sweep_runs_the_hybrid_method_only(trained, plain, tmp_path):
    summary = run_research_experiment(None, [{"id": "q", "question": QUESTION, "answers": ["nonlocal"]}],
                                      out_dir=tmp_path, system=plain, sweeps={"reader_adapter": [str(trained[1])]},
                                      sweep_methods=("hybrid",), progress=False)
    assert [(r["config"], r["method"]) for r in summary["rows"]] == [
        ("base", "hybrid"), ("base", "base_rag"), ("base", "direct"), (f"reader_adapter={trained[1]}", "hybrid")]
    assert (tmp_path / "configuration_comparison.png").is_file()
    with pytest.raises(ValueError, match="sweep_methods must be distinct names"):
        run_research_experiment(None, [{"id": "q", "question": QUESTION, "answers": ["x"]}], out_dir=tmp_path,
                                system=plain, methods=("hybrid",), sweep_methods=("hybrid", "hybrid"),
                                progress=False)


def test_bad_input(trained, plain, documents, tmp_path):
    path = trained[1]
    with pytest.raises(ValueError, match="reader_adapter must be None or a reader adapter file"):
        create_hybrid_rag_system({**CONFIG, "reader_adapter": str(tmp_path / "missing.pt")})
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable reader adapter"):
        load_reader(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.save({"format": "something else"}, foreign)
    with pytest.raises(ValueError, match="is not a reader adapter"):
        load_reader(foreign)
    other = tmp_path / "other.pt"
    reader = load_reader(path)
    reader.model = "another-model"
    model = load_language_model(fresh=True).model
    from hybridrag.nn.lora import apply_lora, load_lora_state_dict

    apply_lora(model, rank=reader.rank, alpha=reader.alpha, targets=reader.targets)
    load_lora_state_dict(model, reader.state)
    save_reader(other, model, reader)
    with pytest.raises(ValueError, match="trained on another-model"):
        create_hybrid_rag_system({**CONFIG, "reader_adapter": str(other)}).language_model
    with pytest.raises(ValueError, match="holds no reader"):
        create_hybrid_rag_system({**CONFIG, "reader_adapter": str(path)}, language_model=plain.language_model)
    with pytest.raises(ValueError, match="process-wide shared"):
        train_reader(plain, teacher_examples(plain, TRAIN[:1], progress=False), progress=False)
    with pytest.raises(ValueError, match="non-empty list of strings"):
        teacher_examples(plain, [], progress=False)
    with pytest.raises(ValueError, match="epochs must be an int > 0"):
        ReaderConfig(epochs=0)
    with pytest.raises(ValueError, match="store_passages must be an int >= 1, got 0"):
        reader_finetune(plain, TRAIN, tmp_path / "never.pt", store_passages=0)
    assert not (tmp_path / "never.pt").exists()
    bad = tmp_path / "questions.jsonl"
    bad.write_text('{"question": "fine"}\n{"answer": "no question"}\n')
    with pytest.raises(ValueError, match="questions.jsonl:2"):
        read_questions(bad)


def test_command_line(documents, tmp_path, capsys):
    folder = tmp_path / "docs"
    folder.mkdir()
    for name in TOPICS[:3]:
        (folder / f"{name}.txt").write_text(topics[name], encoding="utf-8")
    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"query": TRAIN[0]}) + "\n", encoding="utf-8")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(CONFIG), encoding="utf-8")
    out = tmp_path / "reader.pt"
    done = subprocess.run([sys.executable, "-m", "hybridrag.train", "reader-finetune", "--documents", str(folder),
                           "--questions", str(questions), "--config", str(config), "--output", str(out),
                           "--epochs", "1", "--no-progress"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    printed = json.loads(done.stdout[done.stdout.index("{"):])
    assert printed["steps"] == 1 and printed["output"] == str(out) and load_reader(out).summary["steps"] == 1
    with pytest.raises(SystemExit) as refused:  # in-process: the refusal comes before any model loads
        train_main(["reader-finetune", "--documents", str(folder), "--questions", str(questions),
                    "--output", str(out), "--epochs", "0"])
    assert refused.value.code == 2 and "epochs must be an int > 0" in capsys.readouterr().err
