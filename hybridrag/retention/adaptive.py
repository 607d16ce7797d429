"""AdaptiveRetriever: a coarse top-`coarse_k` search in a vector index, then exact re-scoring of those candidates, and a
score threshold that adapts to each query's candidate scores, keeping at most `fine_k`.

Per query, in one place:
1. Coarse: `index.search(queries, coarse_k)`; empty slots (id -1) are dropped, so an index holding fewer than coarse_k
   items gives fewer candidates. Their order and scores are used for nothing else.
2. Fine: each candidate gets a fine score: by default the exact inner product of the query with the stored vector
   (`index.reconstruct`), which corrects the ranking of an approximate coarse stage (IVF, HNSW, compressed codes);
   or `scorer(query (d,) float32, candidate_ids (n,) int64) -> (n,)` (a trained model, per-item weights, ...).
   Candidates are sorted by fine score, best first; equal scores keep the coarse order.
3. Threshold tau on the fine scores s_1..s_n of all n candidates (population mean and standard deviation):
       adaptive: tau = max(min_score, min(mean(s) + z * std(s), max(s)))
       a number: tau = that number
   A query whose best candidates stand out of the pool keeps only those; a flat pool keeps up to fine_k. The cap at
   max(s) means the best candidate always survives the adaptive rule unless min_score removes it. The distribution is
   that of the fine scores, so tau is on the scale of the scores it filters, for a custom scorer too.
4. Result: the candidates with fine score >= tau, at most fine_k, best first, and tau (NaN when there was no
   candidate: no distribution to adapt to).
"""
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..ops.validation import check_int

__all__ = ["AdaptiveRetriever", "AdaptiveResult"]


@dataclass(frozen=True)
class AdaptiveResult:
    """One query's result: ids int64 (n,) and fine scores float32 (n,), best first, n <= fine_k; the threshold used."""
    ids: np.ndarray
    scores: np.ndarray
    threshold: float


def _check_float(name, value, allow_infinite=False):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if math.isnan(value) or (not allow_infinite and math.isinf(value)):
        raise ValueError(f"{name} must be {'a number, not NaN' if allow_infinite else 'finite'}, got {value}")
    return float(value)


def _numpy(name, value):
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu", torch.float32).numpy()
    array = np.asarray(value)
    if array.dtype.kind not in "iuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {array.dtype}")
    return array


class AdaptiveRetriever:
    """Two-stage retrieval with an adaptive threshold; see the module docstring for the exact rule.

    Args:
        index: an object with `search(queries float32 (Q, d), k) -> (scores (Q, k), ids int64 (Q, k))` (id -1 for an
            empty slot) and `reconstruct(ids int64 (n,)) -> float32 (n, d)`, such as
            `hybridrag.retrieval.vector_index.VectorIndex`. Its `dimension`, when it has one, checks the queries.
        coarse_k: candidates taken from the index per query.
        fine_k: the most results per query (<= coarse_k).
        scorer: None (exact inner product with the reconstructed vectors) or a callable
            scorer(query float32 (d,), candidate_ids int64 (n,)) -> finite (n,) scores (array or tensor).
        threshold: "adaptive" or a fixed number (-inf keeps the fine_k best).
        z: standard deviations above the mean for the adaptive threshold (any finite number; 1.0 keeps roughly the
            top sixth of a bell-shaped pool, so a flat pool of 50 fills fine_k = 5).
        min_score: floor of the adaptive threshold (default -inf: none). z and min_score apply to "adaptive" only.

    Memory: the coarse (Q, coarse_k) scores and ids and, for the default scorer, the float32 vectors of the distinct
    candidates of the batch (at most Q * coarse_k * d).
    """

    def __init__(self, index, *, coarse_k=50, fine_k=5, scorer=None, threshold="adaptive", z=1.0,
                 min_score=-math.inf):
        for method in ("search", "reconstruct"):
            if not callable(getattr(index, method, None)):
                raise TypeError(f"index must have search(queries, k) and reconstruct(ids) methods; "
                                f"{type(index).__name__} has no {method}")
        self.index = index
        self.coarse_k = check_int("coarse_k", coarse_k, 1, numpy_ints=True)
        self.fine_k = check_int("fine_k", fine_k, 1, numpy_ints=True)
        if self.fine_k > self.coarse_k:
            raise ValueError(f"fine_k ({fine_k}) must be <= coarse_k ({coarse_k})")
        if scorer is not None and not callable(scorer):
            raise TypeError(f"scorer must be None or a callable(query, candidate_ids), got {type(scorer).__name__}")
        self.scorer = scorer
        if isinstance(threshold, str):
            if threshold != "adaptive":
                raise ValueError(f"threshold must be 'adaptive' or a number, got {threshold!r}")
        else:
            threshold = _check_float("threshold", threshold, allow_infinite=True)
        self.threshold = threshold
        self.z = _check_float("z", z)
        self.min_score = _check_float("min_score", min_score, allow_infinite=True)

    def __repr__(self):
        return (f"AdaptiveRetriever(coarse_k={self.coarse_k}, fine_k={self.fine_k}, threshold={self.threshold!r}, "
                f"z={self.z}, min_score={self.min_score}, scorer={'default' if self.scorer is None else 'custom'})")

    def retrieve(self, query_vectors):
        """query_vectors (d,) -> one AdaptiveResult; (Q, d) -> a list of Q of them."""
        queries = _numpy("query_vectors", query_vectors)
        dimension = getattr(self.index, "dimension", None)
        if queries.ndim not in (1, 2) or (dimension is not None and queries.shape[-1] != dimension):
            expected = "(d,) or (Q, d)" if dimension is None else f"({dimension},) or (Q, {dimension})"
            raise ValueError(f"query_vectors must have shape {expected}, got {queries.shape}")
        single = queries.ndim == 1
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if not np.isfinite(queries).all():
            raise ValueError("query_vectors has NaN or inf values")
        _, coarse_ids = self.index.search(queries, self.coarse_k)
        coarse_ids = np.asarray(coarse_ids, dtype=np.int64)
        vectors = None
        if self.scorer is None:
            unique = np.unique(coarse_ids[coarse_ids >= 0])
            vectors = dict(zip(unique.tolist(), np.asarray(self.index.reconstruct(unique), dtype=np.float32)))
        results = [self._fine(query, ids[ids >= 0], vectors) for query, ids in zip(queries, coarse_ids)]
        return results[0] if single else results

    def _fine(self, query, candidates, vectors):
        if not len(candidates):
            return AdaptiveResult(np.zeros(0, np.int64), np.zeros(0, np.float32), math.nan)
        if vectors is None:
            scores = _numpy("scorer output", self.scorer(query, candidates.copy()))
            if scores.shape != candidates.shape or not np.isfinite(scores).all():
                raise ValueError(f"scorer must return finite scores of shape {candidates.shape} (one per candidate), "
                                 f"got shape {scores.shape}" + ("" if scores.shape != candidates.shape else
                                                                " with NaN or inf"))
        else:
            scores = np.stack([vectors[i] for i in candidates.tolist()]) @ query
        scores = scores.astype(np.float32).astype(np.float64)  # the float32 scores, compared exactly
        order = np.argsort(-scores, kind="stable")
        threshold = self._threshold(scores)
        keep = order[scores[order] >= threshold][:self.fine_k]
        return AdaptiveResult(candidates[keep], scores[keep].astype(np.float32), threshold)

    def _threshold(self, scores):
        if self.threshold != "adaptive":
            return self.threshold
        return float(max(self.min_score, min(scores.mean() + self.z * scores.std(), scores.max())))
