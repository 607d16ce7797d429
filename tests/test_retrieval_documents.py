"""Documents: validation, JSONL round trip and errors, chunking with offsets and overlap."""
import json

import pytest

from hybridrag.retrieval.documents import Document, chunk_documents, load_jsonl, save_jsonl


def words(count, prefix="w"):
    return " ".join(f"{prefix}{i}" for i in range(count))


def test_document_validation():
    with pytest.raises(ValueError, match="Document.id must be a non-empty"):
        Document("", "text")
    with pytest.raises(TypeError, match="Document.text must be a str, got int"):
        Document("a", 3)
    with pytest.raises(TypeError, match="Document.metadata must be a dict, got list"):
        Document("a", "text", metadata=[1])
    with pytest.raises(ValueError, match=r"document 'a': metadata\['x'\] is of type set"):
        Document("a", "text", metadata={"x": {1}})
    assert Document("a", "", metadata={"n": [1, 2.5, None, True, {"k": "v"}]}).text == ""  # empty text: KB refuses it


def test_jsonl_round_trip(tmp_path):
    documents = [Document("a", "first text", "A", {"year": 2020}), Document("b", "second\nline", metadata={"x": [1]}),
                 Document("c", "ünïcode ✓")]
    path = tmp_path / "docs.jsonl"
    save_jsonl(documents, path)
    assert load_jsonl(path) == documents
    assert [p.name for p in tmp_path.iterdir()] == ["docs.jsonl"]  # no temporary file left behind


@pytest.mark.parametrize("line, message", [
    ("{not json", r"docs.jsonl:2: not valid JSON"),
    ('{"text": "no id"}', r"docs.jsonl:2: missing field 'id'"),
    ('{"id": "b", "text": "x", "body": "?"}', r"docs.jsonl:2: unknown fields \['body'\]"),
    ('{"id": "b", "text": 5}', r"docs.jsonl:2: Document.text must be a str"),
    ('["a list"]', r"docs.jsonl:2: expected a JSON object, got list"),
    ('{"id": "a", "text": "again"}', r"document id 'a' appears more than once"),
    ('{"id": null, "text": "x"}', r"docs.jsonl:2: id must be a string \(or an integer\), got null"),
    ('{"id": true, "text": "x"}', r"docs.jsonl:2: id must be a string \(or an integer\), got true"),
    ('{"id": 1.5, "text": "x"}', r"docs.jsonl:2: id must be a string \(or an integer\), got 1.5"),
    ('{"id": "b", "text": "lone \\ud800 surrogate"}', r"docs.jsonl:2: document 'b': text holds a lone surrogate"),
    ('{"id": "b", "text": "x", "metadata": {"v": NaN}}', r"docs.jsonl:2: document 'b': metadata\['v'\] is nan"),
])
def test_load_jsonl_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"id": "a", "text": "ok"}) + "\n" + line + "\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_jsonl(path)


def test_load_jsonl_names_the_file_and_line_of_invalid_utf8(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b'{"id": "a", "text": "ok"}\n\n{"id": "b", "text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"docs.jsonl:3: not valid UTF-8 \(invalid continuation byte at byte 24 "
                                         r"of the line\)"):
        load_jsonl(path)


def test_load_jsonl_keeps_integer_ids_and_crlf_lines(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b'{"id": 7, "text": "seven"}\r\n{"id": "b", "text": "\xc3\xbc"}\r\n')
    assert load_jsonl(path) == [Document("7", "seven"), Document("b", "\u00fc")]


def test_load_jsonl_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such JSONL file"):
        load_jsonl(tmp_path / "absent.jsonl")


@pytest.mark.parametrize("count", [0, 1, 3, 4, 5, 9, 10, 11, 23])
@pytest.mark.parametrize("chunk_tokens, overlap", [(4, 0), (4, 1), (4, 3), (1, 0), (7, 2)])
def test_chunks_cover_the_text_with_exact_overlap(count, chunk_tokens, overlap):
    source = Document("doc", "  " + words(count).replace(" ", " \n "), "T", {"lang": "en"})
    chunks = chunk_documents([source], chunk_tokens, overlap)
    tokens = [c.text.split() for c in chunks]
    if count == 0:
        assert chunks == []
        return
    assert tokens[0][0] == "w0" and tokens[-1][-1] == f"w{count - 1}"
    for number, (chunk, chunk_tokens_list) in enumerate(zip(chunks, tokens)):
        assert chunk.id == f"doc#{number}" and chunk.title == "T"
        assert chunk.metadata == {"lang": "en", "source_id": "doc", "chunk": number,
                                  "start": chunk.metadata["start"], "end": chunk.metadata["end"]}
        assert source.text[chunk.metadata["start"]:chunk.metadata["end"]] == chunk.text
        assert 1 <= len(chunk_tokens_list) <= chunk_tokens
    for previous, following in zip(tokens, tokens[1:]):
        assert len(previous) == chunk_tokens
        assert previous[len(previous) - overlap:] == following[:overlap]
        assert following[overlap:] and following[overlap] == f"w{int(previous[-1][1:]) + 1}"


def test_chunking_with_a_model_tokenizer_counts_model_tokens():
    from transformers import AutoTokenizer

    from hybridrag.retrieval.encoder import bundled_model_path

    tokenizer = AutoTokenizer.from_pretrained(str(bundled_model_path()))
    source = Document("doc", "Tokenization splits unbelievably long words into word pieces. " * 10)
    chunks = chunk_documents([source], 16, 4, tokenizer=tokenizer)
    assert len(chunks) > 1
    for chunk in chunks:
        assert source.text[chunk.metadata["start"]:chunk.metadata["end"]] == chunk.text
        assert len(tokenizer(chunk.text, add_special_tokens=False)["input_ids"]) <= 16


@pytest.mark.parametrize("chunk_tokens, overlap, error, message", [
    (0, 0, ValueError, "chunk_tokens must be >= 1, got 0"),
    (4, 4, ValueError, r"overlap must be in \[0, chunk_tokens=4\), got 4"),
    (4, -1, ValueError, "overlap must be in"),
    (4.0, 1, TypeError, "chunk_tokens must be an int, got float"),
])
def test_chunking_rejects_bad_sizes(chunk_tokens, overlap, error, message):
    with pytest.raises(error, match=message):
        chunk_documents([Document("a", "x y z")], chunk_tokens, overlap)
