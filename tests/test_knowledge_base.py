"""KnowledgeBase: the three search modes, rerank, add/remove, atomic save/load, damaged files, bad input; the CLI."""
import json

import numpy as np
import pytest

from hybridrag.retrieval import encoder as encoder_module
from hybridrag.retrieval import storage
from hybridrag.retrieval.cli import main
from hybridrag.retrieval.documents import Document, save_jsonl
from hybridrag.retrieval.encoder import DEFAULT_MODEL_NAME, HashingEncoder
from hybridrag.retrieval.fusion import reciprocal_rank_fusion
from hybridrag.retrieval.knowledge_base import KnowledgeBase
from hybridrag.retrieval.manager import RetrievalManager

CORPUS = [
    Document("try", "Use try and except to handle an exception; finally runs cleanup code.", "Errors"),
    Document("loop", "A for loop iterates over the items of a list or any iterable.", "Loops"),
    Document("dict", "A dictionary maps keys to values; look up a value by its key.", "Mappings"),
    Document("class", "A class statement defines a new type with methods and attributes.", "Classes"),
    Document("with", "The with statement calls a context manager's enter and exit methods.", "Context"),
    Document("import", "The import statement loads a module and binds its name.", "Modules"),
]


@pytest.fixture
def kb():
    return KnowledgeBase.build(CORPUS, HashingEncoder(512))


def ids(results):
    return [r.document.id for r in results]


def test_each_mode_finds_the_obvious_document(kb):
    for mode in ("dense", "bm25", "hybrid"):
        results = kb.search("handle an exception with try", 3, mode)
        assert results[0].document.id == "try", mode
        assert [r.rank for r in results] == list(range(1, len(results) + 1))
        assert all(a.score >= b.score for a, b in zip(results, results[1:]))


def test_hybrid_is_the_weighted_fusion_of_dense_and_bm25(kb):
    query = "key value lookup in a loop"
    dense = ids(kb.search(query, 6, "dense"))
    lexical = ids(kb.search(query, 6, "bm25"))
    for weights in (None, (1.0, 1.0), (0.2, 1.0), (1.0, 0.0)):
        fused = reciprocal_rank_fusion([dense, lexical], weights=weights)
        results = kb.search(query, 4, "hybrid", weights=weights)
        assert ids(results) == [i for i, _ in fused][:4]
        assert [r.score for r in results] == pytest.approx([s for _, s in fused][:4])


def test_k_larger_than_the_corpus_returns_everything_once(kb):
    assert sorted(ids(kb.search("statement", 50, "dense"))) == sorted(d.id for d in CORPUS)
    assert len(kb.search("statement", 50, "hybrid")) == len(CORPUS)
    assert ids(kb.search("zebra", 5, "bm25")) == []  # no shared term: a defined empty result


def test_search_vectors_is_dense_search_without_the_encoder(kb, monkeypatch):
    queries = ["handle an exception with try", "keys and values"]
    expected = [[(r.document.id, r.score, r.rank) for r in hits] for hits in kb.search_many(queries, 3, "dense")]
    vectors = kb.encoder.encode(queries)
    monkeypatch.setattr(kb.encoder, "encode", lambda texts: pytest.fail("search_vectors encoded a text"))
    found = [[(r.document.id, r.score, r.rank) for r in hits] for hits in kb.search_vectors(vectors, k=3)]
    assert found == expected
    assert [len(hits) for hits in kb.search_vectors(vectors, k=50)] == [len(CORPUS)] * 2
    assert kb.search_vectors(np.zeros((0, kb.encoder.dimension), np.float32)) == []
    with pytest.raises(ValueError, match=r"vectors must have shape \(Q, 512\), got \(2, 3\)"):
        kb.search_vectors(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="k must be a positive int, got 0"):
        kb.search_vectors(vectors, k=0)


def test_rerank_orders_the_candidates_by_the_rerankers_scores(kb):
    def by_first_letter(query, documents):
        return np.array([ord(d.id[0]) for d in documents], dtype=float)

    results = kb.search("statement", 3, "dense", rerank=by_first_letter)
    assert ids(results) == ["with", "try", "loop"]
    assert [r.score for r in results] == [ord("w"), ord("t"), ord("l")]
    with pytest.raises(ValueError, match=r"the reranker returned scores of shape \(2,\), expected \(6,\)"):
        kb.search("statement", 3, "dense", rerank=lambda q, docs: np.zeros(2))


def test_add_remove_and_embeddings(kb):
    kb.add([Document("lambda", "A lambda expression makes a small anonymous function.")])
    assert ids(kb.search("anonymous function lambda", 1, "hybrid")) == ["lambda"]
    np.testing.assert_allclose(kb.embeddings_for(["lambda"]), HashingEncoder(512).encode(
        ["A lambda expression makes a small anonymous function."]), atol=1e-6)
    assert kb.remove(["lambda", "try", "nope"]) == 2
    assert "try" not in kb and len(kb) == 5
    for mode in ("dense", "bm25", "hybrid"):
        assert "try" not in ids(kb.search("exception try", 10, mode))
    with pytest.raises(ValueError, match=r"document ids already in the knowledge base: \['loop'\]"):
        kb.add([Document("loop", "again")])


def test_precomputed_vectors_skip_the_encoder_and_may_come_without_text(kb, tmp_path, monkeypatch):
    """add(documents, vectors=...): no encoding; a text-less document (a generated embedding) is dense-only,
    survives a save and load, and goes with remove."""
    encoder = HashingEncoder(512)
    query = "anonymous function lambda"
    generated = encoder.encode([query])[0] + 0.01  # near the query in the encoder's space
    monkeypatch.setattr(kb.encoder, "encode", lambda texts: pytest.fail("add must not encode precomputed vectors"))
    kb.add([Document("synthetic-0", "", metadata={"synthetic": True}),
            Document("lambda", "A lambda expression makes a small anonymous function.")],
           vectors=np.stack([generated, encoder.encode(["lambda expression"])[0]]))
    monkeypatch.undo()
    np.testing.assert_allclose(kb.embeddings_for(["synthetic-0"])[0], generated, atol=1e-6)
    assert ids(kb.search(query, 1, "dense")) == ["synthetic-0"]
    assert "synthetic-0" in ids(kb.search(query, 3, "hybrid"))
    assert "synthetic-0" not in ids(kb.search(query, 10, "bm25")) and "lambda" in ids(kb.search(query, 10, "bm25"))
    assert kb.stats()["bm25_documents"] == len(kb) - 1
    kb.save(tmp_path / "kb")
    loaded = KnowledgeBase.load(tmp_path / "kb")
    assert ids(loaded.search(query, 1, "dense")) == ["synthetic-0"] and loaded.get("synthetic-0").text == ""
    assert loaded.remove(["synthetic-0"]) == 1 and "synthetic-0" not in ids(loaded.search(query, 10, "dense"))
    import torch

    loaded.add([Document("synthetic-1", "")], vectors=torch.from_numpy(generated[None]).double())  # torch, float64
    assert ids(loaded.search(query, 1, "dense")) == ["synthetic-1"]


@pytest.mark.parametrize("vectors, error, match", [
    (np.zeros((2, 512), dtype=np.float32), ValueError, r"vectors must have shape \(1, 512\) .* got \(2, 512\)"),
    (np.zeros((1, 64), dtype=np.float32), ValueError, r"the encoder 'hashing-512''s dimension\), got \(1, 64\)"),
    (np.zeros((1, 512), dtype=np.int64), TypeError, "vectors must be floating point, got dtype int64"),
    ([[0.0] * 512], TypeError, "got list"),
    (np.full((1, 512), np.nan, dtype=np.float32), ValueError, "vectors holds NaN or inf"),
])
def test_bad_precomputed_vectors_change_nothing(kb, vectors, error, match):
    before = len(kb)
    with pytest.raises(error, match=match):
        kb.add([Document("new", "some text")], vectors=vectors)
    assert len(kb) == before and "new" not in kb


def test_without_vectors_a_text_less_document_is_refused(kb):
    with pytest.raises(ValueError, match=r"give them text, their vectors \(add\(documents, vectors=\.\.\.\)\)"):
        kb.add([Document("a", "text"), Document("b", "  ")])


def test_chunked_build_keeps_sources(kb):
    long = Document("long", " ".join(f"word{i}" for i in range(50)) + " exception handling at the end")
    chunked = KnowledgeBase.build([long, *CORPUS], HashingEncoder(512), chunk_tokens=20, overlap=5)
    hit = chunked.search("exception handling", 1, "bm25")[0].document
    assert hit.id == "long#3" and hit.metadata["source_id"] == "long"
    assert chunked.stats()["sources"] == len(CORPUS) + 1


def test_save_load_round_trip(tmp_path, kb):
    kb.remove(["with"])
    kb.save(tmp_path / "kb")
    loaded = KnowledgeBase.load(tmp_path / "kb")  # the hashing encoder is rebuilt from the manifest
    assert loaded.documents == kb.documents
    for mode in ("dense", "bm25", "hybrid"):
        assert kb.search("module import name", 5, mode) == loaded.search("module import name", 5, mode)
    loaded.add([Document("new", "brand new text about modules")])
    assert "new" in ids(loaded.search("modules", 6, "hybrid"))
    assert loaded.stats()["documents"] == 6
    kb.save(tmp_path / "kb")  # replacing an existing knowledge base
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kb"]  # no staging or retired folder left


def test_a_crash_mid_save_leaves_the_previous_knowledge_base(tmp_path, kb, monkeypatch):
    kb.save(tmp_path / "kb")
    kb.add([Document("extra", "extra text")])

    def crash(path):
        raise OSError("disk full")

    monkeypatch.setattr(kb.index, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        kb.save(tmp_path / "kb")
    assert len(KnowledgeBase.load(tmp_path / "kb")) == len(CORPUS)  # the old one, whole


def test_damaged_knowledge_bases_are_refused(tmp_path, kb):
    kb.save(tmp_path / "kb")
    vectors = tmp_path / "kb" / "vectors.npz"
    data = bytearray(vectors.read_bytes())
    data[len(data) // 2] ^= 0xFF
    vectors.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"vectors.npz is corrupted \(its size or sha256 differs"):
        KnowledgeBase.load(tmp_path / "kb")
    kb.save(tmp_path / "kb")
    (tmp_path / "kb" / "documents.jsonl").unlink()
    with pytest.raises(ValueError, match="is missing documents.jsonl"):
        KnowledgeBase.load(tmp_path / "kb")
    (tmp_path / "kb" / "manifest.json").write_text("{oops")
    with pytest.raises(ValueError, match="manifest.json is corrupted"):
        KnowledgeBase.load(tmp_path / "kb")
    with pytest.raises(FileNotFoundError, match="no knowledge base at .*missing manifest.json"):
        KnowledgeBase.load(tmp_path / "elsewhere")
    (tmp_path / "not_kb").mkdir()
    (tmp_path / "not_kb" / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="exists and is not a knowledge base"):
        kb.save(tmp_path / "not_kb")


def test_a_different_encoder_on_load_is_refused(tmp_path, kb):
    kb.save(tmp_path / "kb")
    with pytest.raises(ValueError, match=r"built with encoder 'hashing-512' \(512-dim\), but the encoder given is "
                                         r"'hashing-128' \(128-dim\)"):
        KnowledgeBase.load(tmp_path / "kb", HashingEncoder(128))
    manifest = json.loads((tmp_path / "kb" / "manifest.json").read_text())
    manifest["encoder"]["name"] = "someone/else"
    (tmp_path / "kb" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="built with encoder 'someone/else' .* pass encoder="):
        KnowledgeBase.load(tmp_path / "kb")


def test_bad_input(kb):
    with pytest.raises(ValueError, match="documents is empty"):
        KnowledgeBase.build([], HashingEncoder(8))
    with pytest.raises(ValueError, match="query is empty"):
        kb.search("   ", 3)
    with pytest.raises(ValueError, match=r"mode must be one of \('dense', 'bm25', 'hybrid'\), got 'sparse'"):
        kb.search("x", 3, "sparse")
    with pytest.raises(ValueError, match="k must be a positive int, got 0"):
        kb.search("x", 0)
    with pytest.raises(TypeError, match="query must be a str, got int"):
        kb.search(3, 3)
    with pytest.raises(ValueError, match="weights applies to mode='hybrid' only"):
        kb.search("x", 3, "dense", weights=(1, 1))
    with pytest.raises(TypeError, match="encoder must have .name, .dimension and .encode"):
        KnowledgeBase(object())
    with pytest.raises(KeyError, match="no document with id 'nope'"):
        kb.get("nope")


def test_manifest_lists_every_file_with_its_checksum(tmp_path, kb):
    kb.save(tmp_path / "kb")
    manifest = storage.read_manifest(tmp_path / "kb")
    on_disk = {str(p.relative_to(tmp_path / "kb")) for p in (tmp_path / "kb").rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {"manifest.json"}
    assert manifest["documents"] == len(CORPUS) and manifest["encoder"] == {"name": "hashing-512", "dimension": 512}


def test_command_line_build_search_stats(tmp_path, capsys):
    save_jsonl(CORPUS, tmp_path / "docs.jsonl")
    assert main(["build", str(tmp_path / "docs.jsonl"), str(tmp_path / "kb"), "--encoder", "hashing-256"]) == 0
    assert "6 documents -> 6 entries, flat index" in capsys.readouterr().out
    assert main(["search", str(tmp_path / "kb"), "context manager enter exit", "-k", "2", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["id"] for line in lines][0] == "with" and len(lines) == 2
    assert main(["stats", str(tmp_path / "kb")]) == 0
    assert "encoder: hashing-256" in capsys.readouterr().out
    assert main(["search", str(tmp_path / "missing"), "x"]) == 2
    assert "error: no knowledge base at" in capsys.readouterr().err
    assert main(["search", str(tmp_path / "kb"), ""]) == 2
    assert "error: query is empty" in capsys.readouterr().err


class NamedLikeMiniLM(HashingEncoder):
    """A hashing encoder under the bundled model's name: a knowledge base "built with MiniLM" in microseconds."""

    def __init__(self):
        super().__init__(384)
        self.name = DEFAULT_MODEL_NAME


def test_loading_never_loads_the_model_until_a_query_is_encoded(tmp_path, monkeypatch, capsys):
    KnowledgeBase.build(CORPUS, NamedLikeMiniLM()).save(tmp_path / "kb")
    loads = []
    monkeypatch.setattr(encoder_module, "DenseEncoder", lambda: loads.append(1) or NamedLikeMiniLM())
    assert main(["stats", str(tmp_path / "kb")]) == 0
    assert f"encoder: {DEFAULT_MODEL_NAME}" in capsys.readouterr().out and not loads
    assert main(["search", str(tmp_path / "kb"), "context manager", "--mode", "bm25"]) == 0
    assert "with" in capsys.readouterr().out and not loads
    loaded = KnowledgeBase.load(tmp_path / "kb")
    assert repr(loaded.encoder) == f"LazyEncoder(name={DEFAULT_MODEL_NAME!r}, dimension=384, not loaded)"
    assert ids(loaded.search("context manager enter exit", 1, "dense")) == ["with"] and loads == [1]


def test_reprs(kb):
    assert repr(kb) == ("KnowledgeBase(documents=6, sources=6, encoder='hashing-512', dimension=512, index='flat', "
                        "bm25_documents=6)")
    assert repr(kb.index) == "VectorIndex(dimension=512, kind='flat', size=6, on_gpu=False)"
    assert repr(kb.bm25) == "BM25Index(size=6, method='lucene', k1=1.5, b=0.75, stopwords='en')"
    empty = KnowledgeBase(HashingEncoder(8))
    assert repr(empty) == ("KnowledgeBase(documents=0, sources=0, encoder='hashing-8', dimension=8, index='auto', "
                           "bm25_documents=0)")
    manager = RetrievalManager(kb, mode="bm25")
    assert repr(manager) == f"RetrievalManager({kb!r}, mode='bm25', weights=None, reranker=None, candidates=50)"
