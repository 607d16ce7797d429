"""Documents, JSONL load/save, and chunking into overlapping token windows that keep their source and offsets."""
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class Document:
    """One retrievable item. `id` is unique within a knowledge base.

    Everything must survive a save and load unchanged, so it is checked here rather than failing at save time:
    id, text and title are str with no lone surrogate (UTF-8 cannot encode one), and metadata is JSON that reads
    back equal: dicts with str keys, lists, str, int, bool, None and finite floats (no tuple, set, NaN or object).
    Errors are ValueErrors naming the document id and the field.
    """

    id: str
    text: str
    title: str = ""
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("id", "text", "title"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"Document.{name} must be a str, got {type(value).__name__}")
        if not self.id:
            raise ValueError("Document.id must be a non-empty string")
        if not isinstance(self.metadata, dict):
            raise TypeError(f"Document.metadata must be a dict, got {type(self.metadata).__name__}")
        check_document(self)

    def to_json(self):
        return {"id": self.id, "text": self.text, "title": self.title, "metadata": self.metadata}

    @classmethod
    def from_json(cls, record, *, where="record"):
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        unknown = set(record) - {"id", "text", "title", "metadata"}
        if unknown:
            raise ValueError(f"{where}: unknown fields {sorted(unknown)}; expected id, text, title, metadata")
        for name in ("id", "text"):
            if name not in record:
                raise ValueError(f"{where}: missing field {name!r}")
        if isinstance(record["id"], bool) or not isinstance(record["id"], (str, int)):
            raise ValueError(f"{where}: id must be a string (or an integer), got {json.dumps(record['id'])}")
        try:
            return cls(str(record["id"]), record["text"], record.get("title", ""), record.get("metadata", {}))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}: {error}") from None


def _surrogate(text):
    """Index of the first lone surrogate in `text`, or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return error.start
    return None


def _json_problem(value, where, path=()):
    """Why `value` would not read back equal from JSON (a phrase starting with `where`), or None."""
    if value is None or isinstance(value, (bool, int)):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{where} is {value!r}: JSON has no NaN or infinity"
    if isinstance(value, str):
        position = _surrogate(value)
        return None if position is None else f"{where} holds a lone surrogate at index {position}"
    if id(value) in path:
        return f"{where} contains itself"
    path = path + (id(value),)
    if isinstance(value, list):
        for position, item in enumerate(value):
            problem = _json_problem(item, f"{where}[{position}]", path)
            if problem:
                return problem
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{where} has the key {key!r} of type {type(key).__name__}: JSON keys are strings"
            problem = _json_problem(key, f"{where} key {key!r}", path) or _json_problem(item, f"{where}[{key!r}]",
                                                                                      path)
            if problem:
                return problem
        return None
    hint = " (use a list)" if isinstance(value, (tuple, set, frozenset)) else ""
    return f"{where} is of type {type(value).__name__}, not JSON{hint}"


def check_document(document):
    """ValueError unless `document` survives a save and load unchanged (see Document); returns it. Run again by
    KnowledgeBase.add, since metadata (a dict) can be changed after construction."""
    for name in ("id", "text", "title"):
        position = _surrogate(getattr(document, name))
        if position is not None:
            raise ValueError(f"document {document.id!r}: {name} holds a lone surrogate at index {position}, which "
                             "UTF-8 cannot encode")
    problem = _json_problem(document.metadata, "metadata")
    if problem:
        raise ValueError(f"document {document.id!r}: {problem}")
    return document


def embedding_text(document):
    """What gets encoded and BM25-indexed for a document: its title (when it has one), a newline, its text."""
    return f"{document.title}\n{document.text}" if document.title else document.text


def source_id(document):
    """The id of the document a passage was chunked from (chunk_documents' "source_id"), or its own id."""
    return document.metadata.get("source_id", document.id)


def check_unique_ids(documents):
    """Raise ValueError on a repeated id; returns the list of documents."""
    if isinstance(documents, (Document, str)) or not hasattr(documents, "__iter__"):
        raise TypeError(f"documents must be a list of Document objects, got {type(documents).__name__}")
    documents = list(documents)
    seen = set()
    for document in documents:
        if not isinstance(document, Document):
            raise TypeError(f"documents must hold Document objects, got {type(document).__name__}")
        if document.id in seen:
            raise ValueError(f"document id {document.id!r} appears more than once")
        seen.add(document.id)
    return documents


def load_jsonl(path):
    """Documents from a JSON-lines file, one object {"id", "text", "title"?, "metadata"?} a line (blank lines skipped).
    Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such JSONL file: {path}")
    return check_unique_ids([Document.from_json(record, where=where) for where, record in jsonl_records(path)])


def jsonl_records(path):
    """(where, record) for each non-blank line of the JSONL file `path`, where = "<path>:<line number>"; a line
    that is not UTF-8 or not JSON is a ValueError naming it (decoded line by line, so a bad byte is reported with
    its line)."""
    with Path(path).open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                reason = f"{error.reason} at byte {error.start} of the line"
                raise ValueError(f"{where}: not valid UTF-8 ({reason})") from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg})") from None


def save_jsonl(documents, path):
    """Write documents as JSON lines, atomically (a temporary file in the same folder, then renamed)."""
    documents = check_unique_ids(documents)
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with temporary.open("w", encoding="utf-8") as out:
        for document in documents:
            out.write(json.dumps(document.to_json(), ensure_ascii=False) + "\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)


def token_spans(text, tokenizer=None):
    """Character spans [(start, end)] of the tokens of `text`: whitespace-separated words by default, or the tokens
    of a Hugging Face fast tokenizer (anything callable as tokenizer(text, return_offsets_mapping=True,
    add_special_tokens=False) returning "offset_mapping")."""
    if tokenizer is None:
        return [match.span() for match in _WORD.finditer(text)]
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False, verbose=False)
    return [(int(start), int(end)) for start, end in encoded["offset_mapping"] if end > start]


def chunk_documents(documents, chunk_tokens=200, overlap=40, tokenizer=None):
    """Split each document into windows of `chunk_tokens` tokens, consecutive windows sharing `overlap` tokens.

    A chunk is a Document with id f"{source.id}#{n}" (n from 0), the source's title, and metadata = the source's
    metadata plus "source_id", "chunk" (n), "start" and "end" (character offsets: chunk.text == source.text[start:end]).
    A document with no tokens gives no chunk. Tokens are whitespace words by default; pass the encoder's tokenizer
    (`DenseEncoder.tokenizer`) to count model tokens, so chunks fit the model's maximum length.
    """
    for name, value in (("chunk_tokens", chunk_tokens), ("overlap", overlap)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if not 0 <= overlap < chunk_tokens:
        raise ValueError(f"overlap must be in [0, chunk_tokens={chunk_tokens}), got {overlap}")
    chunks = []
    step = chunk_tokens - overlap
    for source in check_unique_ids(documents):
        spans = token_spans(source.text, tokenizer)
        # Window starts stop once a window reaches the last token; a text with no token gives no window.
        for number, first in enumerate(range(0, max(len(spans) - overlap, min(len(spans), 1)), step)):
            last = min(first + chunk_tokens, len(spans)) - 1
            start, end = spans[first][0], spans[last][1]
            metadata = {**source.metadata, "source_id": source.id, "chunk": number, "start": start, "end": end}
            chunks.append(Document(f"{source.id}#{number}", source.text[start:end], source.title, metadata))
    return chunks
