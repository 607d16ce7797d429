"""RAGDataset (token-id examples for retrieval-augmented training) and RAGCollator (padding into model inputs).

An item is a dict with exactly these keys:
    query_ids: list of int token ids (>= 1), the question.
    context_ids: list of int token ids (may be empty), what sits between question and answer (an instruction, the
        retrieved text already formatted, ...).
    answer_ids: list of int token ids (>= 1), the target: the only tokens the loss is taken on.
    retrieved_docs: list of passages, each a list of int token ids (>= 1); may be empty (the model retrieves).
    task_type: a non-empty str ("qa", "multihop", ...).
"""
import json
from pathlib import Path

import torch
from torch.utils.data import Dataset

KEYS = ("query_ids", "context_ids", "answer_ids", "retrieved_docs", "task_type")
IGNORE_INDEX = -100


def _check_ids(where, ids, *, allow_empty):
    if not isinstance(ids, (list, tuple)) or any(isinstance(t, bool) or not isinstance(t, int) or t < 0
                                                 for t in ids):
        raise ValueError(f"{where} must be a list of int token ids >= 0, got {ids!r}"[:300])
    if not ids and not allow_empty:
        raise ValueError(f"{where} must hold at least one token id, got an empty list")
    return list(ids)


def check_item(item, where="item"):
    """The item as a plain dict of lists, or ValueError/TypeError naming `where` and the key."""
    if not isinstance(item, dict):
        raise TypeError(f"{where} must be a dict with keys {list(KEYS)}, got {type(item).__name__}")
    missing = [key for key in KEYS if key not in item]
    unknown = sorted(str(key) for key in item if key not in KEYS)
    if missing or unknown:
        raise ValueError(f"{where} must have exactly the keys {list(KEYS)}; missing {missing}, unknown {unknown}")
    docs = item["retrieved_docs"]
    if not isinstance(docs, (list, tuple)):
        raise ValueError(f"{where}.retrieved_docs must be a list of passages (lists of token ids), got "
                         f"{type(docs).__name__}")
    task = item["task_type"]
    if not isinstance(task, str) or not task:
        raise ValueError(f"{where}.task_type must be a non-empty str, got {task!r}")
    return {"query_ids": _check_ids(f"{where}.query_ids", item["query_ids"], allow_empty=False),
            "context_ids": _check_ids(f"{where}.context_ids", item["context_ids"], allow_empty=True),
            "answer_ids": _check_ids(f"{where}.answer_ids", item["answer_ids"], allow_empty=False),
            "retrieved_docs": [_check_ids(f"{where}.retrieved_docs[{i}]", doc, allow_empty=False)
                               for i, doc in enumerate(docs)],
            "task_type": task}


class RAGDataset(Dataset):
    """A list of checked items (see the module docstring). RAGDataset(items) or RAGDataset.from_jsonl(path).

    vocab_size: None, or every token id must be < vocab_size (checked here, not in the middle of training).
    Empty datasets are refused.
    """

    def __init__(self, items, *, vocab_size=None):
        if isinstance(items, (str, Path, dict)) or not hasattr(items, "__iter__"):
            raise TypeError(f"items must be a list of dicts (use RAGDataset.from_jsonl for a file), "
                            f"got {type(items).__name__}")
        if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                       or vocab_size < 1):
            raise ValueError(f"vocab_size must be None or an int >= 1, got {vocab_size!r}")
        self.items = [check_item(item, f"items[{i}]") for i, item in enumerate(items)]
        if not self.items:
            raise ValueError("the dataset is empty: RAGDataset needs at least one item")
        if vocab_size is not None:
            for i, item in enumerate(self.items):
                for key in ("query_ids", "context_ids", "answer_ids"):
                    if item[key] and max(item[key]) >= vocab_size:
                        raise ValueError(f"items[{i}].{key} holds token id {max(item[key])}, outside the "
                                         f"vocabulary [0, {vocab_size})")
                for j, doc in enumerate(item["retrieved_docs"]):
                    if max(doc) >= vocab_size:
                        raise ValueError(f"items[{i}].retrieved_docs[{j}] holds token id {max(doc)}, outside "
                                         f"the vocabulary [0, {vocab_size})")
        self.vocab_size = vocab_size

    @classmethod
    def from_jsonl(cls, path, *, vocab_size=None):
        """One JSON object per line (blank lines skipped); errors name the file and line."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such dataset file: {path}")
        items = []
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path} line {number}: not valid JSON ({error.msg})") from None
        if not items:
            raise ValueError(f"the dataset is empty: {path} holds no items")
        try:
            return cls(items, vocab_size=vocab_size)
        except (ValueError, TypeError) as error:
            raise type(error)(f"{path}: {error}") from None

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


class RAGCollator:
    """Pads a list of items into a batch of tensors.

    input_ids = query_ids + context_ids + answer_ids, right-padded with pad_id: (B, T) int64.
    attention_mask: (B, T) int64, 1 on real tokens. labels: (B, T) int64, the answer tokens where they sit in
        input_ids and -100 elsewhere (query, context, padding); the model shifts them as causal LMs do. Position 0
        is always a query token, so the count of label tokens is the same shifted or not.
    retrieved, retrieved_mask: (B, K, L) int64 / bool, the retrieved passages padded to the most passages (K) and
        the longest passage (L) of the batch; present only when some item of the batch has passages.
    task_type: list of B str (not a tensor: the trainer does not pass it to the model).
    layout="parts" gives, in place of input_ids/attention_mask/labels, query_ids, query_mask (B, Lq) and
        answer_ids, answer_mask (B, La), each right-padded (int64), for models that join question, passages and
        answer themselves (hybridrag.train.marginal.MarginalRAG); context_ids must then be empty.
    """

    def __init__(self, pad_id=0, *, layout="joined"):
        if isinstance(pad_id, bool) or not isinstance(pad_id, int) or pad_id < 0:
            raise ValueError(f"pad_id must be an int >= 0, got {pad_id!r}")
        if layout not in ("joined", "parts"):
            raise ValueError(f"layout must be 'joined' or 'parts', got {layout!r}")
        self.pad_id, self.layout = pad_id, layout

    def _pad(self, rows):
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = 1
        return ids, mask

    def __call__(self, items):
        if not isinstance(items, (list, tuple)) or not items:
            raise ValueError(f"collate needs a non-empty list of items, got {items!r}"[:200])
        items = [check_item(item, f"batch[{i}]") for i, item in enumerate(items)]
        if self.layout == "parts":
            with_context = [i for i, item in enumerate(items) if item["context_ids"]]
            if with_context:
                raise ValueError(f"batch[{with_context[0]}].context_ids is not empty, but layout='parts' has no "
                                 "place for a context (use layout='joined')")
            batch = {}
            batch["query_ids"], batch["query_mask"] = self._pad([item["query_ids"] for item in items])
            batch["answer_ids"], batch["answer_mask"] = self._pad([item["answer_ids"] for item in items])
        else:
            prompts = [item["query_ids"] + item["context_ids"] for item in items]
            input_ids, attention_mask = self._pad([p + item["answer_ids"] for p, item in zip(prompts, items)])
            labels = torch.full_like(input_ids, IGNORE_INDEX)
            for i, (prompt, item) in enumerate(zip(prompts, items)):
                labels[i, len(prompt):len(prompt) + len(item["answer_ids"])] = torch.tensor(item["answer_ids"])
            batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        docs = [item["retrieved_docs"] for item in items]
        if any(docs):
            k = max(len(d) for d in docs)
            width = max(len(doc) for d in docs for doc in d)
            retrieved = torch.full((len(items), k, width), self.pad_id, dtype=torch.long)
            retrieved_mask = torch.zeros((len(items), k, width), dtype=torch.bool)
            for i, d in enumerate(docs):
                for j, doc in enumerate(d):
                    retrieved[i, j, :len(doc)] = torch.tensor(doc, dtype=torch.long)
                    retrieved_mask[i, j, :len(doc)] = True
            batch["retrieved"], batch["retrieved_mask"] = retrieved, retrieved_mask
        batch["task_type"] = [item["task_type"] for item in items]
        return batch


def collate_rag(items, pad_id=0):
    """RAGCollator(pad_id)(items): the default collate."""
    return RAGCollator(pad_id)(items)
