"""Question/answer records for fine-tuning, their retrieved passages, and the token ids the model trains on.

A record file is JSON lines, one question each:

    {"question": "...", "answer": "..."}                 # or "answers": ["first is the target", "other golds"]
    {"question": "...", "answer": "...", "documents": [{"title": "...", "text": "..."}]}   # retrieval "static"

"id" is optional (default "line-<n>"); other keys are refused, so a typo is not silently dropped. The prompt is the
project's RAG formatting (hybridrag.train.formatting): the retrieval block merged into the user turn of the chat
template, then the answer as the assistant turn, on which alone the loss is taken.
"""
import json
from pathlib import Path

__all__ = ["load_qa_records", "RECORD_KEYS", "rag_prompt_ids", "record_item", "DEFAULT_SYSTEM"]

RECORD_KEYS = ("id", "question", "answer", "answers", "documents", "topic")
DEFAULT_SYSTEM = "Answer the question in a few words, using the retrieved documents."


def _check_record(record, where, need_documents):
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a record must be a JSON object with 'question' and 'answer', got "
                         f"{type(record).__name__}")
    unknown = sorted(set(record) - set(RECORD_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; a record may hold {list(RECORD_KEYS)}")
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: 'question' must be a non-empty str, got {question!r}")
    if ("answer" in record) == ("answers" in record):
        raise ValueError(f"{where}: give exactly one of 'answer' (a str) and 'answers' (a list of str), got "
                         f"{[k for k in ('answer', 'answers') if k in record] or 'neither'}")
    golds = [record["answer"]] if "answer" in record else record["answers"]
    if not isinstance(golds, list) or not golds or not all(isinstance(g, str) and g.strip() for g in golds):
        raise ValueError(f"{where}: the answer(s) must be non-empty str, got {golds!r}")
    documents = record.get("documents")
    if need_documents and documents is None:
        raise ValueError(f"{where}: retrieval 'static' needs a 'documents' list in every record (or use "
                         "retrieval 'kb' with a corpus)")
    if documents is not None and not (isinstance(documents, list) and all(
            isinstance(d, dict) and isinstance(d.get("text"), str) for d in documents)):
        raise ValueError(f"{where}: 'documents' must be a list of {{'title', 'text'}} objects, got {documents!r}"[:300])
    return {"id": str(record.get("id", where)), "question": question, "golds": golds, "documents": documents,
            "topic": record.get("topic")}


def load_qa_records(path, *, need_documents=False):
    """The checked records of a JSONL file: dicts {"id", "question", "golds" (target first), "documents" (or None),
    "topic"}. FileNotFoundError for a missing file, ValueError naming the file and line for anything wrong (an
    empty file included)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path} (--data must be a JSONL file of question/answer records)")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {number}: not valid JSON ({error.msg})") from None
        if isinstance(record, dict) and "id" not in record:
            record = {"id": f"line-{number}", **record}
        records.append(_check_record(record, f"{path} line {number}", need_documents))
    if not records:
        raise ValueError(f"the data file {path} is empty: it needs at least one question/answer record")
    return records


def _split(ids, mask, where):
    """(prompt ids, answer ids) of a rendered conversation whose masked tokens are one run at the end."""
    if 1 not in mask:
        raise ValueError(f"{where}: no answer token survived (the prompt fills max_length); shorten the passages "
                         "(max_passage_chars) or raise max_length")
    first = mask.index(1)
    if 0 in mask[first:]:
        raise ValueError(f"{where}: the answer tokens are not one run at the end of the conversation")
    return ids[:first], ids[first:]


def rag_prompt_ids(question, documents, tokenizer, *, system=DEFAULT_SYSTEM, max_passage_chars=None):
    """The prompt token ids exactly as training renders them (through the assistant header), for generation."""
    from .formatting import create_rag_training_example

    example = create_rag_training_example(question, "x", documents, system=system, max_chars=max_passage_chars,
                                          tokenizer=tokenizer)
    return _split(example["input_ids"], example["loss_mask"], "prompt")[0]


def record_item(record, documents, tokenizer, *, system=DEFAULT_SYSTEM, max_passage_chars=None, max_length=1024):
    """A RAGDataset item for one record: query_ids = the prompt (retrieval block included), answer_ids = the target
    answer and the template's end-of-turn tokens; ValueError when the whole example exceeds max_length tokens."""
    from .formatting import create_rag_training_example

    example = create_rag_training_example(record["question"], record["golds"][0], documents, system=system,
                                          max_chars=max_passage_chars, tokenizer=tokenizer)
    ids, mask = example["input_ids"], example["loss_mask"]
    if len(ids) > max_length:
        raise ValueError(f"record {record['id']}: the example has {len(ids)} tokens, more than max_length="
                         f"{max_length}; shorten the passages (max_passage_chars) or raise max_length")
    prompt, answer = _split(ids, mask, f"record {record['id']}")
    return {"query_ids": prompt, "context_ids": [], "answer_ids": answer, "retrieved_docs": [], "task_type": "qa"}
