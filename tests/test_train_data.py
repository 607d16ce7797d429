"""hybridrag.train.RAGDataset and RAGCollator: item checks, JSONL loading, padding, label masking (loss only on
answer tokens) and the retrieved passages' tensors."""
import json

import pytest
import torch

from hybridrag.train import RAGCollator, RAGDataset, collate_rag


def item(query=(5, 6), context=(7,), answer=(8, 9), docs=(), task="qa"):
    return {"query_ids": list(query), "context_ids": list(context), "answer_ids": list(answer),
            "retrieved_docs": [list(d) for d in docs], "task_type": task}


def test_collate_pads_and_puts_labels_only_on_answer_tokens():
    batch = collate_rag([item(), item(query=(5,), context=(), answer=(4, 3, 2), docs=[(1, 2, 3), (4,)])])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 4, 3, 2, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 8, 9], [-100, 4, 3, 2, -100]]
    assert batch["retrieved"].shape == (2, 2, 3) and batch["retrieved_mask"].dtype == torch.bool
    assert batch["retrieved"][1].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["retrieved_mask"][0].sum() == 0 and batch["retrieved_mask"][1].sum() == 4
    assert batch["task_type"] == ["qa", "qa"]


def test_collate_without_passages_has_no_retrieved_keys_and_parts_layout():
    batch = RAGCollator(pad_id=1)([item(context=()), item(query=(5, 6, 7), context=(), answer=(2,))])
    assert "retrieved" not in batch and batch["input_ids"][1].tolist() == [5, 6, 7, 2]
    assert batch["input_ids"][0].tolist() == [5, 6, 8, 9]
    parts = RAGCollator(layout="parts")([item(context=()), item(query=(5, 6, 7), context=(), answer=(2,))])
    assert set(parts) == {"query_ids", "query_mask", "answer_ids", "answer_mask", "task_type"}
    assert parts["query_ids"].tolist() == [[5, 6, 0], [5, 6, 7]] and parts["answer_mask"].tolist() == [[1, 1], [1, 0]]
    with pytest.raises(ValueError, match=r"batch\[0\].context_ids is not empty, but layout='parts'"):
        RAGCollator(layout="parts")([item()])


@pytest.mark.parametrize("bad, message", [
    ({"query_ids": [1]}, r"items\[0\] must have exactly the keys .* missing \['context_ids'"),
    ({**item(), "extra": 1}, r"unknown \['extra'\]"),
    ({**item(), "query_ids": []}, r"items\[0\].query_ids must hold at least one token id"),
    ({**item(), "answer_ids": [1.5]}, r"items\[0\].answer_ids must be a list of int token ids >= 0"),
    ({**item(), "answer_ids": [-1]}, r"items\[0\].answer_ids must be a list of int token ids >= 0"),
    ({**item(), "retrieved_docs": [[]]}, r"items\[0\].retrieved_docs\[0\] must hold at least one token id"),
    ({**item(), "retrieved_docs": "doc"}, r"items\[0\].retrieved_docs must be a list of passages"),
    ({**item(), "task_type": ""}, r"items\[0\].task_type must be a non-empty str"),
])
def test_bad_items_are_refused_naming_the_item_and_key(bad, message):
    with pytest.raises(ValueError, match=message):
        RAGDataset([bad])


def test_empty_dataset_vocabulary_and_types_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="the dataset is empty"):
        RAGDataset([])
    with pytest.raises(TypeError, match="items must be a list of dicts"):
        RAGDataset("train.jsonl")
    with pytest.raises(TypeError, match=r"items\[0\] must be a dict"):
        RAGDataset([[1, 2]])
    with pytest.raises(ValueError, match=r"items\[0\].answer_ids holds token id 9, outside the vocabulary \[0, 9\)"):
        RAGDataset([item()], vocab_size=9)
    with pytest.raises(ValueError, match="collate needs a non-empty list of items"):
        collate_rag([])
    with pytest.raises(ValueError, match="layout must be 'joined' or 'parts'"):
        RAGCollator(layout="flat")


def test_jsonl_loading_names_the_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(item()) + "\n\n" + json.dumps(item(task="multihop")) + "\n")
    data = RAGDataset.from_jsonl(path)
    assert len(data) == 2 and data[1]["task_type"] == "multihop"
    path.write_text(json.dumps(item()) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"train.jsonl line 2: not valid JSON"):
        RAGDataset.from_jsonl(path)
    path.write_text("\n")
    with pytest.raises(ValueError, match=r"the dataset is empty: .*train.jsonl holds no items"):
        RAGDataset.from_jsonl(path)
    path.write_text(json.dumps({**item(), "answer_ids": []}) + "\n")
    with pytest.raises(ValueError, match=r"train.jsonl: items\[0\].answer_ids must hold at least one"):
        RAGDataset.from_jsonl(path)
    with pytest.raises(FileNotFoundError, match="no such dataset file"):
        RAGDataset.from_jsonl(tmp_path / "missing.jsonl")
