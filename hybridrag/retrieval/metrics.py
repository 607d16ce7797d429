"""Ranking metrics for retrieval evaluation: recall, precision, reciprocal rank and nDCG at a cutoff, and `evaluate`,
their means over a run of queries. Plain Python (math only); ids are any hashable values, usually str.

Conventions shared by every function here:
- `retrieved` is a ranked sequence of ids, best first. Duplicates are dropped before anything is counted (the first
  occurrence keeps its place, later ones are removed and the ids after them move up), so a ranking of chunks mapped
  to their source documents is scored as the ranking of distinct documents.
- `relevant` is a collection of relevant ids (binary relevance, gain 1 each) or a mapping id -> gain (graded
  relevance, finite gains >= 0; an id with gain 0 counts as not relevant). A relevant set with no id of positive
  gain is refused with ValueError: recall and nDCG are undefined for it, and a query without relevant documents is
  almost always a labelling mistake.
- Cutoffs `k` are ints >= 1. Fewer than k retrieved ids is allowed: the missing slots count as non-relevant
  (precision@k still divides by k).
"""
import math
from collections.abc import Collection, Iterable, Mapping, Sequence

__all__ = ["recall_at_k", "precision_at_k", "reciprocal_rank", "mean_reciprocal_rank", "ndcg_at_k", "evaluate"]


def _check_k(k, name="k"):
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name} must be an int >= 1, got {type(k).__name__} {k!r}")
    if k < 1:
        raise ValueError(f"{name} must be >= 1, got {k}")


def _distinct(retrieved):
    """The ids of `retrieved` in order, each once (first occurrence kept)."""
    if isinstance(retrieved, (str, bytes)) or not isinstance(retrieved, Sequence):
        raise TypeError(f"retrieved must be a sequence of ids (e.g. a list of str), got {type(retrieved).__name__}")
    seen = set()
    out = []
    for doc_id in retrieved:
        if doc_id not in seen:
            seen.add(doc_id)
            out.append(doc_id)
    return out


def _gains(relevant, query=None):
    """relevant (collection of ids, or mapping id -> gain) -> dict id -> gain > 0; refuses an empty relevant set."""
    where = "" if query is None else f" for query {query!r}"
    if isinstance(relevant, (str, bytes)):
        raise TypeError(f"relevant{where} must be a collection of ids or a mapping id -> gain, got a str "
                        f"{relevant!r} (wrap a single id in a set)")
    if isinstance(relevant, Mapping):
        gains = {}
        for doc_id, gain in relevant.items():
            if isinstance(gain, bool) or not isinstance(gain, (int, float)):
                raise TypeError(f"relevant{where} maps {doc_id!r} to {gain!r}; gains must be int or float")
            if not math.isfinite(gain) or gain < 0:
                raise ValueError(f"relevant{where} maps {doc_id!r} to {gain}; gains must be finite and >= 0")
            if gain > 0:
                gains[doc_id] = float(gain)
    elif isinstance(relevant, Collection):
        gains = {doc_id: 1.0 for doc_id in relevant}
    else:
        raise TypeError(f"relevant{where} must be a collection of ids or a mapping id -> gain, "
                        f"got {type(relevant).__name__}")
    if not gains:
        raise ValueError(f"relevant{where} has no relevant id (empty, or every gain is 0): recall, reciprocal rank "
                         f"and nDCG are undefined for it")
    return gains


def recall_at_k(retrieved: Sequence, relevant: Collection, k: int) -> float:
    """Fraction of the relevant ids found among the first k distinct retrieved ids, in [0, 1]."""
    _check_k(k)
    gains = _gains(relevant)
    top = _distinct(retrieved)[:k]
    return sum(doc_id in gains for doc_id in top) / len(gains)


def precision_at_k(retrieved: Sequence, relevant: Collection, k: int) -> float:
    """Number of relevant ids among the first k distinct retrieved ids, divided by k (not by the number retrieved)."""
    _check_k(k)
    gains = _gains(relevant)
    top = _distinct(retrieved)[:k]
    return sum(doc_id in gains for doc_id in top) / k


def reciprocal_rank(retrieved: Sequence, relevant: Collection, k: int | None = None) -> float:
    """1 / rank of the first relevant id (ranks start at 1, counted over distinct ids); 0.0 when no relevant id is
    retrieved, or none within the first k when k is given (MRR@k)."""
    if k is not None:
        _check_k(k)
    gains = _gains(relevant)
    top = _distinct(retrieved)
    if k is not None:
        top = top[:k]
    for rank, doc_id in enumerate(top, start=1):
        if doc_id in gains:
            return 1.0 / rank
    return 0.0


def ndcg_at_k(retrieved: Sequence, relevant: Collection | Mapping, k: int) -> float:
    """Normalised discounted cumulative gain at k, in [0, 1].

    DCG@k = sum over the first k distinct retrieved ids of gain(id) / log2(rank + 1) (linear gain: 1 for binary
    relevance, the mapped value for graded relevance; rank starts at 1). IDCG@k is the DCG of the ideal ranking:
    the relevant ids sorted by gain, best first, cut at k. nDCG@k = DCG@k / IDCG@k.
    """
    _check_k(k)
    gains = _gains(relevant)
    top = _distinct(retrieved)[:k]
    dcg = math.fsum(gains.get(doc_id, 0.0) / math.log2(rank + 1) for rank, doc_id in enumerate(top, start=1))
    ideal = sorted(gains.values(), reverse=True)[:k]
    idcg = math.fsum(gain / math.log2(rank + 1) for rank, gain in enumerate(ideal, start=1))
    return dcg / idcg


def _check_run(run, qrels):
    """run: query id -> ranked ids; qrels: query id -> relevant ids or id -> gain. Every run query needs qrels; a
    qrels query missing from the run retrieved nothing. Returns the query ids (qrels order) and their gains."""
    if not isinstance(run, Mapping):
        raise TypeError(f"run must be a mapping query id -> ranked list of doc ids, got {type(run).__name__}")
    if not isinstance(qrels, Mapping):
        raise TypeError(f"qrels must be a mapping query id -> relevant ids (set) or id -> gain (dict), "
                        f"got {type(qrels).__name__}")
    if not qrels:
        raise ValueError("qrels is empty: there is no query to evaluate")
    unknown = [query for query in run if query not in qrels]
    if unknown:
        raise ValueError(f"run has {len(unknown)} queries without qrels (first: {unknown[:5]!r}); evaluate only "
                         f"queries that have relevance labels")
    gains = {query: _gains(relevant, query=query) for query, relevant in qrels.items()}
    for query, retrieved in run.items():
        if isinstance(retrieved, (str, bytes)) or not isinstance(retrieved, Sequence):
            raise TypeError(f"run[{query!r}] must be a sequence of doc ids, got {type(retrieved).__name__}")
    return gains


def mean_reciprocal_rank(run: Mapping, qrels: Mapping, k: int | None = None) -> float:
    """Mean over the queries of qrels of `reciprocal_rank` (a query missing from run scores 0)."""
    if k is not None:
        _check_k(k)
    gains = _check_run(run, qrels)
    return math.fsum(reciprocal_rank(run.get(query, []), rel, k) for query, rel in gains.items()) / len(gains)


def evaluate(run: Mapping, qrels: Mapping, ks: Iterable[int] = (1, 5, 10)) -> dict[str, float]:
    """Mean metrics of a run over the queries of qrels.

    Args:
        run: query id -> ranked list of doc ids (best first). Every query of run must be in qrels.
        qrels: query id -> relevant doc ids (set/collection, binary) or doc id -> gain (dict, graded). A query of
            qrels absent from run counts as retrieving nothing (every metric 0).
        ks: cutoffs, ints >= 1.
    Returns:
        {"recall@k", "precision@k", "ndcg@k" for each k in ks, "mrr" (no cutoff), "num_queries"}: means over the
        queries of qrels (num_queries is their count, as a float like the rest).
    """
    ks = list(ks) if not isinstance(ks, int) else [ks]
    if not ks:
        raise ValueError("ks must name at least one cutoff, got an empty collection")
    for k in ks:
        _check_k(k, "every k in ks")
    gains = _check_run(run, qrels)
    rows = {query: _distinct(run.get(query, [])) for query in gains}
    out = {}
    n = len(gains)
    for k in ks:
        out[f"recall@{k}"] = math.fsum(recall_at_k(rows[q], rel, k) for q, rel in gains.items()) / n
        out[f"precision@{k}"] = math.fsum(precision_at_k(rows[q], rel, k) for q, rel in gains.items()) / n
        out[f"ndcg@{k}"] = math.fsum(ndcg_at_k(rows[q], rel, k) for q, rel in gains.items()) / n
    out["mrr"] = math.fsum(reciprocal_rank(rows[q], rel) for q, rel in gains.items()) / n
    out["num_queries"] = float(n)
    return out
