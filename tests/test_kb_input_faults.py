"""KnowledgeBase input faults found by a probe (issue 12): ids given as a bare string, huge k, data that only failed
at save time, corpora with no BM25 token, documents with no text; and that a refused add or remove changes nothing."""
import time
import tracemalloc

import numpy as np
import pytest

from hybridrag.retrieval.documents import Document
from hybridrag.retrieval.encoder import HashingEncoder
from hybridrag.retrieval.knowledge_base import KnowledgeBase

ENCODER = HashingEncoder(64)
CORPUS = [Document("1", "alpha beta gamma"), Document("2", "beta gamma delta"), Document("12", "gamma delta epsilon"),
          *(Document(f"f{i}", f"filler text number{i} about topic{i % 5}") for i in range(47))]


@pytest.fixture
def kb():
    return KnowledgeBase.build(CORPUS, ENCODER)


def state(kb):
    """Everything a refused call must leave as it was."""
    return (list(kb._documents.items()), dict(kb._keys), dict(kb._by_key), kb._next_key, kb.index.ids().tolist(),
            list(kb.bm25._ids), dict(kb.bm25._texts),
            [[(r.document.id, r.score) for r in kb.search("gamma delta", 5, mode)] for mode in ("dense", "bm25")])


# ---------------------------------------------------------------- 2. remove and ids


def test_remove_refuses_a_bare_string(kb):
    before = state(kb)
    with pytest.raises(TypeError, match=r"doc_ids must be a list of document ids, got str; pass \[doc_id\] to "
                                        r"remove\(\) one document"):
        kb.remove("12")
    with pytest.raises(TypeError, match=r"doc_ids\[1\] must be a str, got int"):
        kb.remove(["1", 2])
    with pytest.raises(TypeError, match="doc_ids must be a list of document ids, got int"):
        kb.remove(12)
    with pytest.raises(TypeError, match=r"pass \[doc_id\] to embeddings_for\(\) one document"):
        kb.embeddings_for("12")
    assert state(kb) == before  # "1" and "2" are still there
    assert kb.remove(["12"]) == 1 and "1" in kb and "2" in kb and "12" not in kb


def test_add_refuses_a_single_document_or_a_string(kb):
    with pytest.raises(TypeError, match="documents must be a list of Document objects, got Document"):
        kb.add(Document("x", "some text"))
    with pytest.raises(TypeError, match="documents must be a list of Document objects, got str"):
        kb.add("some text")


# ---------------------------------------------------------------- 3. huge k


def bounded(call):
    """call() -> its result, asserting it took under a second and allocated under 4 MiB (numpy reports its arrays
    to tracemalloc)."""
    started = time.perf_counter()
    tracemalloc.start()
    try:
        result = call()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    seconds = time.perf_counter() - started
    assert seconds < 1.0 and peak < 4 << 20, f"{seconds:.2f} s, {peak / 2**20:.1f} MiB"
    return result


@pytest.mark.parametrize("k", [2**31, 10**8])
@pytest.mark.parametrize("mode", ["dense", "bm25", "hybrid"])
def test_a_huge_k_costs_what_the_corpus_size_does(kb, k, mode):
    expected = kb.search("gamma delta", len(CORPUS), mode)
    assert bounded(lambda: kb.search("gamma delta", k, mode)) == expected
    assert bounded(lambda: kb.search("gamma delta", 3, mode, candidates=k)) == kb.search("gamma delta", 3, mode,
                                                                                           candidates=len(CORPUS))
    reranked = bounded(lambda: kb.search("gamma", k, mode, rerank=lambda q, docs: np.arange(len(docs), dtype=float),
                                         candidates=k))
    assert len(reranked) == len(expected)
    assert bounded(lambda: kb.bm25.search_many(["gamma", "delta"], k)) == kb.bm25.search_many(["gamma", "delta"], 50)


def test_an_empty_knowledge_base_answers_a_huge_k_with_nothing():
    empty = KnowledgeBase(ENCODER)
    for mode in ("dense", "bm25", "hybrid"):
        assert bounded(lambda: empty.search("anything", 2**31, mode)) == []


# ---------------------------------------------------------------- 4. data that failed only at save


@pytest.mark.parametrize("metadata, field", [
    ({"tags": {"a", "b"}}, r"metadata\['tags'\] is of type set, not JSON \(use a list\)"),
    ({"when": object()}, r"metadata\['when'\] is of type object, not JSON"),
    ({"score": float("nan")}, r"metadata\['score'\] is nan: JSON has no NaN or infinity"),
    ({"score": [1.0, float("inf")]}, r"metadata\['score'\]\[1\] is inf"),
    ({"pair": (1, 2)}, r"metadata\['pair'\] is of type tuple, not JSON \(use a list\)"),
    ({1: "one"}, r"metadata has the key 1 of type int: JSON keys are strings"),
    ({"note": "bad \ud800 char"}, r"metadata\['note'\] holds a lone surrogate at index 4"),
    ({"bad \udfff key": 1}, r"metadata key 'bad \\udfff key' holds a lone surrogate at index 4"),
])
def test_metadata_that_json_cannot_hold_is_refused_at_the_door(metadata, field):
    with pytest.raises(ValueError, match=rf"document 'doc': {field}"):
        Document("doc", "text", metadata=metadata)


@pytest.mark.parametrize("name", ["id", "text", "title"])
def test_lone_surrogates_are_refused_at_the_door(name):
    fields = {"id": "doc", "text": "text", "title": "title"}
    fields[name] = "bad \ud800 here"
    shown = "'bad \\\\ud800 here'" if name == "id" else "'doc'"
    with pytest.raises(ValueError, match=rf"document {shown}: {name} holds a lone surrogate at index 4, which UTF-8 "
                                         "cannot encode"):
        Document(fields["id"], fields["text"], fields["title"])


def test_metadata_changed_after_construction_is_refused_by_add(kb, tmp_path):
    document = Document("late", "late text", metadata={"ok": 1})
    document.metadata["ok"] = {1, 2}
    before = state(kb)
    with pytest.raises(ValueError, match=r"document 'late': metadata\['ok'\] is of type set"):
        kb.add([document])
    with pytest.raises(ValueError, match=r"document 'late': metadata\['ok'\] is of type set"):
        KnowledgeBase.build([*CORPUS[:3], document], ENCODER)
    assert state(kb) == before
    kb.save(tmp_path / "kb")  # what was accepted saves
    assert KnowledgeBase.load(tmp_path / "kb").documents == kb.documents


# ---------------------------------------------------------------- 5. no BM25 token in the corpus


@pytest.mark.parametrize("texts", [["!", "?!"], ["a b c", "x y"], ["the and of", "a the"], ["the a", "z"]])
def test_a_corpus_with_no_bm25_token_searches_saves_and_loads(tmp_path, texts):
    documents = [Document(f"d{i}", text) for i, text in enumerate(texts)]  # (whitespace only is refused: below)
    kb = KnowledgeBase.build(documents, ENCODER)
    assert kb.search("the a x", 5, "bm25") == []
    dense = kb.search("the a x", 5, "dense")
    hybrid = kb.search("the a x", 5, "hybrid")
    assert [r.document.id for r in hybrid] == [r.document.id for r in dense]  # dense fused with nothing
    assert [r.score for r in hybrid] == pytest.approx([1 / (60 + rank) for rank in range(1, len(dense) + 1)])
    kb.save(tmp_path / "kb")
    loaded = KnowledgeBase.load(tmp_path / "kb")
    assert loaded.documents == kb.documents and loaded.search("the a x", 5, "hybrid") == hybrid
    assert loaded.search("the a x", 5, "bm25") == []
    loaded.add([Document("words", "searchable words at last")])
    assert [r.document.id for r in loaded.search("searchable words", 5, "bm25")] == ["words"]
    loaded.remove(["words"])
    assert loaded.search("searchable words", 5, "bm25") == []


# ---------------------------------------------------------------- 6. documents with no text


def test_a_corpus_with_no_text_is_refused_with_its_size():
    blank = [Document(f"b{i}", " \n\t ") for i in range(3)]
    for chunk_tokens in (None, 10):
        with pytest.raises(ValueError, match=r"the 3 document\(s\) given hold no text \(each is empty or whitespace "
                                             r"only\): there is nothing to index"):
            KnowledgeBase.build(blank, ENCODER, chunk_tokens=chunk_tokens, overlap=2)


def test_one_document_with_no_text_among_good_ones_is_refused_by_id(kb):
    documents = [*CORPUS[:3], Document("blank", "   "), Document("empty", "", title="a title")]
    for chunk_tokens in (None, 10):
        with pytest.raises(ValueError, match=r"2 of the 5 documents hold no text \(empty or whitespace only\): "
                                             r"\['blank', 'empty'\]"):
            KnowledgeBase.build(documents, ENCODER, chunk_tokens=chunk_tokens, overlap=2)
    before = state(kb)
    with pytest.raises(ValueError, match=r"1 of the 2 documents hold no text .*\['blank'\]"):
        kb.add([Document("fine", "fine text"), Document("blank", "   ")])
    assert state(kb) == before


class TokenizerCountingNothing:
    def __call__(self, text, **options):
        return {"offset_mapping": []}


def test_a_document_the_tokenizer_finds_no_token_in_is_refused():
    encoder = HashingEncoder(64)
    encoder.tokenizer = TokenizerCountingNothing()
    with pytest.raises(ValueError, match=r"2 of the 2 documents gave no chunk \(no token the tokenizer counts\)"):
        KnowledgeBase.build(CORPUS[:2], encoder, chunk_tokens=10, overlap=2)


# ---------------------------------------------------------------- a refused add changes nothing


class BrokenEncoder(HashingEncoder):
    def __init__(self, output):
        super().__init__(64)
        self.output = output

    def encode(self, texts, **options):
        vectors = super().encode(texts)
        return self.output(vectors)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_a_failing_add_leaves_the_knowledge_base_as_it_was(kind, monkeypatch):
    kb = KnowledgeBase.build(CORPUS, ENCODER, index_kind=kind)
    kb.remove(["f0"])
    before = state(kb)
    new = [Document("n1", "brand new gamma"), Document("n2", "another delta")]
    with pytest.raises(ValueError, match=r"document ids already in the knowledge base: \['1'\]"):
        kb.add([*new, Document("1", "clash")])
    with pytest.raises(ValueError, match="document id 'n1' appears more than once"):
        kb.add([*new, new[0]])
    for output, error, message in [(lambda v: np.full_like(v, np.nan), ValueError, "vectors holds NaN or inf"),
                                   (lambda v: v[:, :8], ValueError, r"vectors must have shape \(N, 64\), got \(2, 8\)"),
                                   (lambda v: v.astype(np.int8), TypeError, "vectors must be floating point")]:
        kb.encoder = BrokenEncoder(output)
        with pytest.raises(error, match=message):
            kb.add(new)
    kb.encoder = ENCODER

    def bm25_fails(texts, ids):
        raise MemoryError("simulated failure inside the BM25 index")

    monkeypatch.setattr(kb.bm25, "add", bm25_fails)
    with pytest.raises(MemoryError, match="simulated failure"):
        kb.add(new)  # the vectors already went in: they are taken out again
    monkeypatch.undo()
    assert state(kb) == before
    kb.add(new)  # and it still works
    assert [r.document.id for r in kb.search("brand new", 1, "bm25")] == ["n1"]
    assert len(kb.index) == len(kb.bm25) == len(kb) == len(CORPUS) + 1
