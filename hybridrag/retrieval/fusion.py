"""Combining and reordering rankings: weighted reciprocal-rank fusion, and rerankers.

A reranker is any callable `reranker(query: str, documents: list[Document]) -> np.ndarray (n,)` of real scores,
higher = more relevant. Two are provided: `EncoderReranker` (exact cosine with any encoder) and
`CrossEncoderReranker` (a sentence-transformers cross-encoder from a local directory). `rerank` applies one.
"""
import math
import numbers
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .._optional import import_optional
from .encoder import quiet_model_loading

__all__ = ["reciprocal_rank_fusion", "EncoderReranker", "CrossEncoderReranker", "rerank"]


def reciprocal_rank_fusion(rankings: Sequence[Sequence[str]], weights: Sequence[float] | None = None,
                           k: float = 60) -> list[tuple[str, float]]:
    """Weighted reciprocal-rank fusion (Cormack et al., 2009).

    score(d) = sum over the rankings i that contain d of weights[i] / (k + rank_i(d)), rank_i starting at 1.

    Args:
        rankings: one or more rankings, each a sequence of ids, best first (they may have different lengths, or be
            empty). An id repeated inside one ranking counts at its first occurrence only; the later copies are
            dropped and the ids after them move up one rank.
        weights: one finite weight >= 0 per ranking, not all zero (default all 1). A ranking of weight 0 is ignored
            altogether: its ids do not enter the result unless another ranking has them.
        k: smoothing constant > 0 (60 in the paper); larger k flattens the difference between top and lower ranks.
    Returns:
        [(id, score)] for every id of a ranking with weight > 0, by score descending. Ties (equal scores; sums are
        computed with math.fsum, so they do not depend on the order of the rankings) go to the id with the better
        (smaller) best rank over those rankings, then to the id met first when reading the rankings one after
        another, each from its top.
    """
    if isinstance(rankings, (str, bytes)) or not isinstance(rankings, Sequence):
        raise TypeError(f"rankings must be a sequence of rankings (sequences of ids), got {type(rankings).__name__}")
    if len(rankings) == 0:
        raise ValueError("rankings must hold at least one ranking, got none")
    for i, ranking in enumerate(rankings):
        if isinstance(ranking, (str, bytes)) or not isinstance(ranking, Sequence):
            raise TypeError(f"rankings[{i}] must be a sequence of ids, got {type(ranking).__name__}")
    if isinstance(k, bool) or not isinstance(k, numbers.Real):
        raise TypeError(f"k must be a real number > 0, got {type(k).__name__} {k!r}")
    if not math.isfinite(k) or k <= 0:
        raise ValueError(f"k must be finite and > 0, got {k}")
    if weights is None:
        weights = [1.0] * len(rankings)
    else:
        if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
            raise TypeError(f"weights must be a sequence of numbers, one per ranking, got {type(weights).__name__}")
        if len(weights) != len(rankings):
            raise ValueError(f"weights has {len(weights)} entries but there are {len(rankings)} rankings")
        for i, weight in enumerate(weights):
            if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
                raise TypeError(f"weights[{i}] must be a real number, got {type(weight).__name__} {weight!r}")
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"weights[{i}] must be finite and >= 0, got {weight}")
        if not any(weight > 0 for weight in weights):
            raise ValueError(f"weights must not all be zero, got {list(weights)}")

    terms = {}        # id -> contributions w / (k + rank)
    best_rank = {}    # id -> smallest rank in a ranking of positive weight
    first_seen = {}   # id -> order of first appearance
    for ranking, weight in zip(rankings, weights):
        if weight == 0:
            continue
        seen = set()
        rank = 0
        for doc_id in ranking:
            if doc_id in seen:
                continue
            seen.add(doc_id)
            rank += 1
            terms.setdefault(doc_id, []).append(float(weight) / (k + rank))
            best_rank[doc_id] = min(best_rank.get(doc_id, rank), rank)
            first_seen.setdefault(doc_id, len(first_seen))
    scores = {doc_id: math.fsum(values) for doc_id, values in terms.items()}
    order = sorted(scores, key=lambda doc_id: (-scores[doc_id], best_rank[doc_id], first_seen[doc_id]))
    return [(doc_id, scores[doc_id]) for doc_id in order]


def _check_documents(query, documents):
    if not isinstance(query, str):
        raise TypeError(f"query must be a str, got {type(query).__name__}")
    if isinstance(documents, (str, bytes)) or not isinstance(documents, Sequence):
        raise TypeError(f"documents must be a sequence of Document, got {type(documents).__name__}")
    texts = []
    for i, doc in enumerate(documents):
        text = getattr(doc, "text", None)
        if not isinstance(text, str):
            raise TypeError(f"documents[{i}] must be a Document (with a str attribute text), got {type(doc).__name__}")
        texts.append(text)
    return texts


class EncoderReranker:
    """Scores documents by the exact cosine similarity of the encoded query and document texts.

    Useful after an approximate (IVF/HNSW) or lexical first stage, or with a stronger encoder than the index's.
    Query and texts are encoded in one `encoder.encode([query, *texts])` call; the cosine is computed in float64
    from the returned rows (renormalised, so an encoder need not normalise). A zero row (an encoder that finds no
    feature in a text) has no direction and scores 0.

    Args:
        encoder: any object with `.encode(texts) -> float (N, d)` (e.g. DenseEncoder, HashingEncoder).
    Call:
        reranker(query, documents) -> float32 (n,) cosines in [-1, 1]; document titles are not encoded.
    Memory: the (n + 1, d) embeddings of one call.
    """

    def __init__(self, encoder):
        if not callable(getattr(encoder, "encode", None)):
            raise TypeError(f"encoder must have a callable .encode(texts) method, got {type(encoder).__name__}")
        self.encoder = encoder

    def __call__(self, query, documents):
        texts = _check_documents(query, documents)
        if not texts:
            return np.zeros(0, dtype=np.float32)
        vectors = np.asarray(self.encoder.encode([query, *texts]))
        if vectors.ndim != 2 or vectors.shape[0] != len(texts) + 1:
            raise ValueError(f"the encoder returned an array of shape {vectors.shape} for {len(texts) + 1} texts, "
                             f"expected ({len(texts) + 1}, d)")
        if not np.issubdtype(vectors.dtype, np.floating):
            raise TypeError(f"the encoder returned dtype {vectors.dtype}, expected a float array")
        vectors = vectors.astype(np.float64)
        if not np.isfinite(vectors).all():
            raise ValueError("the encoder returned non-finite values (NaN or inf)")
        norms = np.linalg.norm(vectors, axis=1)
        safe = np.where(norms > 0, norms, 1.0)
        units = vectors / safe[:, None]
        return (units[1:] @ units[0]).astype(np.float32)

    def __repr__(self):
        return f"EncoderReranker({getattr(self.encoder, 'name', type(self.encoder).__name__)!r})"


class CrossEncoderReranker:
    """Scores (query, document text) pairs with a sentence-transformers `CrossEncoder` loaded from a local directory.

    The directory must hold a saved cross-encoder with one output (a relevance logit), e.g. one written by
    `CrossEncoder.save_pretrained`; nothing is ever downloaded (`local_files_only=True`). sentence-transformers is
    imported only when the reranker is built.

    Args:
        model_dir: path to the local model directory (with its config.json).
        batch_size: pairs per forward pass (>= 1).
        device: "cpu", "cuda", ...; None lets sentence-transformers choose (CUDA when available).
    Call:
        reranker(query, documents) -> float32 (n,) the scores `CrossEncoder.predict` gives, i.e. after the model's
        default activation (a sigmoid for a single-output model unless its config names another); compare them
        within one query.
    """

    def __init__(self, model_dir, *, batch_size=32, device=None):
        if not isinstance(model_dir, (str, Path)):
            raise TypeError(f"model_dir must be a path to a local model directory, got {type(model_dir).__name__}")
        path = Path(model_dir)
        if not path.exists():
            raise FileNotFoundError(f"model_dir {str(model_dir)!r} does not exist: CrossEncoderReranker loads a "
                                    f"cross-encoder from a local directory only (models are never downloaded)")
        if not path.is_dir():
            raise NotADirectoryError(f"model_dir {str(model_dir)!r} is a file, expected a local model directory")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model_dir {str(model_dir)!r} has no config.json: it does not hold a saved "
                                    f"model (save one with CrossEncoder.save_pretrained)")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int):
            raise TypeError(f"batch_size must be an int >= 1, got {type(batch_size).__name__} {batch_size!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if device is not None and not isinstance(device, str):
            raise TypeError(f"device must be a str such as 'cpu' or 'cuda', or None, got {type(device).__name__}")
        sentence_transformers = import_optional("sentence_transformers", "sentence-transformers", "retrieval")
        with quiet_model_loading():
            self.model = sentence_transformers.CrossEncoder(str(path), device=device, local_files_only=True)
        num_labels = getattr(self.model, "num_labels", 1)
        if num_labels != 1:
            raise ValueError(f"the cross-encoder in {str(model_dir)!r} has {num_labels} outputs; a reranker needs a "
                             f"model with one relevance score")
        self.model_dir = path
        self.batch_size = batch_size

    def __call__(self, query, documents):
        texts = _check_documents(query, documents)
        if not texts:
            return np.zeros(0, dtype=np.float32)
        scores = self.model.predict([(query, text) for text in texts], batch_size=self.batch_size,
                                    show_progress_bar=False, convert_to_numpy=True)
        return np.asarray(scores, dtype=np.float32).reshape(len(texts))

    def __repr__(self):
        return f"CrossEncoderReranker({str(self.model_dir)!r})"


def rerank(query: str, documents: Sequence, reranker, top_k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Reorder `documents` by a reranker's scores for `query`.

    Generic over result types: pass the documents of any result list (e.g. `[r.document for r in results]`) and use
    the returned indices to reorder that list.

    Args:
        query: the query text.
        documents: the n candidate documents (Document objects).
        reranker: callable reranker(query, documents) -> (n,) real scores, higher = better.
        top_k: keep only the best top_k (>= 1); None keeps all n.
    Returns:
        order: int64 (m,) indices into documents, best first (equal scores keep their input order);
        scores: float64 (m,) the reranker's scores in that order. m = min(n, top_k).
    """
    _check_documents(query, documents)
    if not callable(reranker):
        raise TypeError(f"reranker must be a callable reranker(query, documents), got {type(reranker).__name__}")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int):
            raise TypeError(f"top_k must be an int >= 1 or None, got {type(top_k).__name__} {top_k!r}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
    documents = list(documents)
    scores = np.asarray(reranker(query, documents))
    if scores.shape != (len(documents),):
        raise ValueError(f"the reranker returned scores of shape {scores.shape} for {len(documents)} documents, "
                         f"expected ({len(documents)},)")
    if not (np.issubdtype(scores.dtype, np.floating) or np.issubdtype(scores.dtype, np.integer)):
        raise TypeError(f"the reranker returned scores of dtype {scores.dtype}, expected real numbers")
    scores = scores.astype(np.float64)
    if not np.isfinite(scores).all():
        raise ValueError(f"the reranker returned {int((~np.isfinite(scores)).sum())} non-finite scores (NaN or inf)")
    order = np.argsort(-scores, kind="stable")
    if top_k is not None:
        order = order[:top_k]
    return order.astype(np.int64), scores[order]
