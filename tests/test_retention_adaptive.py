"""AdaptiveRetriever over hybridrag's FAISS VectorIndex: the fine stage corrects an approximate coarse ranking, the
adaptive threshold keeps the standouts of a peaked pool and fine_k of a flat one, small indexes, custom scorers and bad
input."""
import math

import numpy as np
import pytest
import torch

from hybridrag.retention.adaptive import AdaptiveResult, AdaptiveRetriever
from hybridrag.retrieval.vector_index import VectorIndex

DIM = 16


def unit_rows(rng, n, dim=DIM):
    rows = rng.standard_normal((n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def flat_index(vectors, ids=None):
    index = VectorIndex(vectors.shape[1], kind="flat", device="cpu")
    index.add(vectors, np.arange(len(vectors)) if ids is None else ids)
    return index


class CompressedIndex:
    """An approximate coarse stage: searches vectors rounded to a coarse grid (like a compressed code), while
    reconstruct returns the exact vectors."""

    def __init__(self, vectors, step=0.25):
        self.dimension = vectors.shape[1]
        self.exact = vectors
        self.coarse = flat_index(np.round(vectors / step) * step)

    def search(self, queries, k):
        return self.coarse.search(queries, k)

    def reconstruct(self, ids):
        return self.exact[ids]


def with_scores(query, scores, rng):
    """Unit vectors whose inner products with the unit `query` are exactly `scores` (up to float32)."""
    others = rng.standard_normal((len(scores), len(query)))
    others -= np.outer(others @ query, query)
    others /= np.linalg.norm(others, axis=1, keepdims=True)
    scores = np.asarray(scores)[:, None]
    return (scores * query + np.sqrt(1 - scores ** 2) * others).astype(np.float32)


def adaptive_threshold(scores, z=1.0, min_score=-math.inf):
    scores = np.asarray(scores, dtype=np.float64)
    return max(min_score, min(scores.mean() + z * scores.std(), scores.max()))


def test_fine_stage_reorders_an_approximate_coarse_ranking():
    rng = np.random.default_rng(0)
    vectors, queries = unit_rows(rng, 400), unit_rows(rng, 6)
    index = CompressedIndex(vectors)
    retriever = AdaptiveRetriever(index, coarse_k=50, fine_k=5, threshold=-math.inf)
    results = retriever.retrieve(torch.tensor(queries))
    exact = queries @ vectors.T
    _, coarse_ids = index.search(queries, 50)
    reordered = 0
    for query, result, row, coarse in zip(queries, results, exact, coarse_ids):
        best = np.argsort(-row, kind="stable")[:5]
        assert set(best) <= set(coarse)                   # the coarse pool holds the true top 5 ...
        reordered += not np.array_equal(coarse[:5], best)  # ... but not always in the right order
        np.testing.assert_array_equal(result.ids, best)
        np.testing.assert_allclose(result.scores, row[best], rtol=0, atol=1e-6)
        assert result.threshold == -math.inf
    assert reordered >= 3


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_fine_scores_are_exact_on_faiss_approximate_indexes(kind):
    rng = np.random.default_rng(1)
    vectors, queries = unit_rows(rng, 500), unit_rows(rng, 3)
    index = VectorIndex(DIM, kind=kind, device="cpu", nprobe=2)
    index.add(vectors, np.arange(500) + 1000)
    for query, result in zip(queries, AdaptiveRetriever(index, coarse_k=20, threshold=-math.inf).retrieve(queries)):
        assert len(result.ids) == 5 and result.ids.dtype == np.int64
        np.testing.assert_allclose(result.scores, vectors[result.ids - 1000] @ query, rtol=0, atol=1e-6)
        assert (np.diff(result.scores) <= 0).all()


def test_threshold_keeps_the_standouts_of_a_peaked_pool():
    rng = np.random.default_rng(2)
    query = unit_rows(rng, 1)[0]
    scores = np.concatenate([[0.9, 0.85], np.linspace(-0.2, 0.2, 58)])
    index = flat_index(with_scores(query, scores, rng))
    result = AdaptiveRetriever(index).retrieve(query)
    assert isinstance(result, AdaptiveResult)
    assert result.ids.tolist() == [0, 1]
    pool = np.sort(scores)[-50:]                          # the coarse top 50
    assert result.threshold == pytest.approx(adaptive_threshold(pool), abs=1e-6)
    assert 0.2 < result.threshold < 0.85
    floored = AdaptiveRetriever(index, min_score=0.88).retrieve(query)
    assert floored.ids.tolist() == [0] and floored.threshold == 0.88
    assert AdaptiveRetriever(index, min_score=0.95).retrieve(query).ids.tolist() == []


def test_threshold_keeps_fine_k_of_a_flat_pool():
    rng = np.random.default_rng(3)
    query = unit_rows(rng, 1)[0]
    scores = np.linspace(0.4, 0.6, 60)
    index = flat_index(with_scores(query, scores, rng))
    result = AdaptiveRetriever(index, coarse_k=50, fine_k=5).retrieve(query[None])[0]
    assert result.ids.tolist() == [59, 58, 57, 56, 55]
    top50 = scores[-50:]
    assert result.threshold == pytest.approx(adaptive_threshold(top50), abs=1e-6)
    assert result.threshold < scores[55]
    few = AdaptiveRetriever(index, coarse_k=50, fine_k=5, threshold=0.596).retrieve(query)
    assert few.ids.tolist() == [59, 58] and few.threshold == 0.596    # scores .6 and .5966


def test_fewer_items_than_coarse_k():
    rng = np.random.default_rng(4)
    vectors, query = unit_rows(rng, 3), unit_rows(rng, 1)[0]
    index = flat_index(vectors, ids=np.array([10, 20, 30]))
    result = AdaptiveRetriever(index, threshold=-math.inf).retrieve(query)
    order = np.argsort(-(vectors @ query))
    assert result.ids.tolist() == [[10, 20, 30][i] for i in order]
    single = flat_index(vectors[:1])
    only = AdaptiveRetriever(single).retrieve(query)    # one candidate: its score is the max, so it stays
    assert only.ids.tolist() == [0] and only.threshold == pytest.approx(float(vectors[0] @ query))
    empty = AdaptiveRetriever(VectorIndex(DIM, kind="flat", device="cpu")).retrieve(query)
    assert empty.ids.shape == (0,) and empty.scores.shape == (0,) and math.isnan(empty.threshold)


def test_custom_scorer():
    rng = np.random.default_rng(5)
    vectors, query = unit_rows(rng, 30), unit_rows(rng, 1)[0]
    calls = []

    def scorer(q, ids):
        calls.append((q.shape, q.dtype, ids.dtype, len(ids)))
        return torch.tensor(-ids.astype(np.float64))      # prefers low ids, whatever the vectors

    retriever = AdaptiveRetriever(flat_index(vectors), coarse_k=10, fine_k=3, scorer=scorer, threshold=-math.inf)
    result = retriever.retrieve(query)
    _, coarse = flat_index(vectors).search(query[None], 10)
    assert result.ids.tolist() == sorted(coarse[0])[:3]
    assert calls == [((DIM,), np.float32, np.int64, 10)]


def test_bad_scorer_output():
    index = flat_index(unit_rows(np.random.default_rng(6), 8))
    query = np.ones(DIM, dtype=np.float32)
    with pytest.raises(ValueError, match=r"scorer must return finite scores of shape \(8,\) .*got shape \(3,\)"):
        AdaptiveRetriever(index, coarse_k=8, scorer=lambda q, ids: np.zeros(3)).retrieve(query)
    with pytest.raises(ValueError, match=r"scorer must return finite scores .*got shape \(8,\) with NaN or inf"):
        AdaptiveRetriever(index, coarse_k=8, scorer=lambda q, ids: np.full(len(ids), np.nan)).retrieve(query)


class NoReconstruct:
    def search(self, queries, k):
        raise AssertionError("not reached")


CONSTRUCTOR_CASES = [
    (dict(index=NoReconstruct()), TypeError, r"index must have search\(queries, k\) and reconstruct\(ids\) methods; "
                                             r"NoReconstruct has no reconstruct"),
    (dict(coarse_k=0), ValueError, r"coarse_k must be >= 1, got 0"),
    (dict(fine_k=0), ValueError, r"fine_k must be >= 1, got 0"),
    (dict(fine_k=2.0), TypeError, r"fine_k must be an int, got float"),
    (dict(coarse_k=4, fine_k=5), ValueError, r"fine_k \(5\) must be <= coarse_k \(4\)"),
    (dict(scorer="exact"), TypeError, r"scorer must be None or a callable\(query, candidate_ids\), got str"),
    (dict(threshold="auto"), ValueError, r"threshold must be 'adaptive' or a number, got 'auto'"),
    (dict(threshold=float("nan")), ValueError, r"threshold must be a number, not NaN, got nan"),
    (dict(z=float("inf")), ValueError, r"z must be finite, got inf"),
    (dict(min_score=None), TypeError, r"min_score must be a number, got NoneType"),
]


@pytest.mark.parametrize("kwargs, error, match", CONSTRUCTOR_CASES)
def test_bad_constructor_arguments(kwargs, error, match):
    arguments = dict(index=flat_index(unit_rows(np.random.default_rng(7), 4))) | kwargs
    with pytest.raises(error, match=match):
        AdaptiveRetriever(arguments.pop("index"), **arguments)


def test_bad_queries_are_refused_before_the_search():
    class Guarded(CompressedIndex):
        def search(self, queries, k):
            raise AssertionError("the index was searched before the bad query was refused")

    retriever = AdaptiveRetriever(Guarded(unit_rows(np.random.default_rng(8), 4)))
    with pytest.raises(ValueError, match=r"query_vectors must have shape \(16,\) or \(Q, 16\), got \(2, 8\)"):
        retriever.retrieve(np.ones((2, 8)))
    with pytest.raises(ValueError, match=r"query_vectors must have shape .*got \(1, 2, 16\)"):
        retriever.retrieve(np.ones((1, 2, DIM)))
    with pytest.raises(ValueError, match="query_vectors has NaN or inf values"):
        retriever.retrieve(np.full(DIM, np.nan))
    with pytest.raises(TypeError, match="query_vectors must hold real numbers, got dtype <U1"):
        retriever.retrieve(np.array(["x"] * DIM))
