"""RetrievalManager: a knowledge base plus what a model needs around it: per-item weights learned from feedback,
an optional reranker, the prompt with [DOC_n] blocks, and the documents an answer cites."""
import math

import numpy as np

from .knowledge_base import MODES, SearchResult
from .prompting import check_citations, format_documents


class RetrievalManager:
    """Retrieval for a model.

    Args:
        knowledge_base: a KnowledgeBase.
        mode: search mode ("dense", "bm25", "hybrid").
        weights: a hybridrag.retention.WeightUpdater holding per-document weights (None: no weighting).
        reranker: a callable reranker(query, documents) -> scores, or None.
        candidates: how many results of the search are reranked and re-weighted before the top k are kept.

    Weighting works on ranks, so it means the same for every mode's score scale: the search's order gives each
    candidate a share proportional to 1 / rank, the weight w multiplies that share, and the candidates are ordered
    by w / rank (an item at rank 2 with weight 2.5 moves ahead of rank 1 with weight 1). The returned score is
    log(w / rank).
    """

    def __init__(self, knowledge_base, *, mode="hybrid", weights=None, reranker=None, candidates=50):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if weights is not None and not all(hasattr(weights, name) for name in ("weight", "update")):
            raise TypeError(f"weights must be a WeightUpdater (.weight, .update) or None, got "
                            f"{type(weights).__name__}")
        if reranker is not None and not callable(reranker):
            raise TypeError(f"reranker must be callable or None, got {type(reranker).__name__}")
        if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
            raise ValueError(f"candidates must be a positive int, got {candidates!r}")
        self.knowledge_base = knowledge_base
        self.mode, self.weights, self.reranker, self.candidates = mode, weights, reranker, candidates

    def __repr__(self):
        return (f"RetrievalManager({self.knowledge_base!r}, mode={self.mode!r}, weights={self.weights!r}, "
                f"reranker={self.reranker!r}, candidates={self.candidates})")

    def retrieve(self, query, k=5):
        """The k best SearchResults for `query` after rerank and weighting, best first."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        depth = max(k, self.candidates) if self.weights is not None else k
        results = self.knowledge_base.search(query, depth, self.mode, rerank=self.reranker,
                                             candidates=max(depth, self.candidates))
        if self.weights is None or not results:
            return results[:k]
        weights = self.weights.weight([r.document.id for r in results])
        shares = weights / np.arange(1, len(results) + 1)
        order = np.argsort(-shares, kind="stable")[:k]
        return [SearchResult(results[i].document, math.log(shares[i]), rank)
                for rank, i in enumerate(order.tolist(), start=1)]

    def prompt(self, query, k=5, *, max_chars=None):
        """(prompt, results): the retrieved documents as [DOC_1] ... [/DOC_1] blocks followed by the question."""
        results = self.retrieve(query, k)
        context = format_documents([r.document for r in results], max_chars=max_chars)
        return f"{context}\n\nQuestion: {query}\nAnswer citing documents as [DOC_n]:", results

    def cited(self, response, results):
        """The documents of `results` (as given to `prompt`) that `response` cites, in order of first citation.
        Citations of numbers that were not in the prompt are dropped: see prompting.check_citations for them."""
        numbers = check_citations(response, num_documents=len(results)).valid
        return [results[n - 1].document for n in numbers]

    def record_feedback(self, results, feedback):
        """Apply feedback (n,) in [-1, 1] (e.g. from FeedbackExtractor) to the weights of the n results' documents;
        returns their new weights."""
        if self.weights is None:
            raise ValueError("this RetrievalManager has no weights to update; pass weights=WeightUpdater()")
        return self.weights.update([r.document.id for r in results], feedback)
