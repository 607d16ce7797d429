"""A knowledge base: documents, their dense vectors in a FAISS index and a BM25 index, searchable by dense, BM25 or
hybrid (reciprocal-rank fusion) retrieval, with an optional rerank stage; saved to and loaded from a directory."""
from dataclasses import dataclass

import numpy as np

from .bm25 import BM25Index
from .documents import Document, check_unique_ids, chunk_documents, embedding_text
from .encoder import DenseEncoder, check_encoder
from .fusion import reciprocal_rank_fusion
from .storage import load_knowledge_base, save_knowledge_base
from .vector_index import VectorIndex

MODES = ("dense", "bm25", "hybrid")


@dataclass(frozen=True)
class SearchResult:
    """One hit: the document, its score (cosine for dense, BM25 for bm25, the fused score for hybrid, the reranker's
    score after a rerank) and its rank from 1."""

    document: Document
    score: float
    rank: int


class KnowledgeBase:
    """Documents searchable by dense vectors (FAISS), BM25, or both fused.

    Build with `KnowledgeBase.build(documents, encoder)` (or `KnowledgeBase(encoder)` then `add`). Each document gets
    an int64 key in the vector index; `remove` deletes from both indexes. Memory: the documents, 4 * d bytes a vector
    (plus the index's overhead, see VectorIndex) and the BM25 matrix.
    """

    def __init__(self, encoder=None, *, index_kind="auto", device="auto", bm25=None, index=None):
        self.encoder = check_encoder(encoder if encoder is not None else DenseEncoder())
        self.index = index if index is not None else VectorIndex(self.encoder.dimension, kind=index_kind,
                                                                 device=device)
        if self.index.dimension != self.encoder.dimension:
            raise ValueError(f"the vector index holds {self.index.dimension}-dim vectors but encoder "
                             f"{self.encoder.name!r} makes {self.encoder.dimension}-dim ones")
        self.bm25 = bm25 if bm25 is not None else BM25Index()
        self._documents = {}
        self._keys = {}
        self._by_key = {}
        self._next_key = 0

    @classmethod
    def build(cls, documents, encoder=None, *, chunk_tokens=None, overlap=40, index_kind="auto", device="auto"):
        """A knowledge base holding `documents` (non-empty), optionally chunked first into `chunk_tokens`-token
        windows with `overlap` (counted with the encoder's tokenizer when it has one)."""
        documents = check_unique_ids(documents)
        if not documents:
            raise ValueError("documents is empty: a knowledge base needs at least one document")
        knowledge_base = cls(encoder, index_kind=index_kind, device=device)
        if chunk_tokens is not None:
            tokenizer = getattr(knowledge_base.encoder, "tokenizer", None)
            documents = chunk_documents(documents, chunk_tokens, overlap, tokenizer=tokenizer)
        knowledge_base.add(documents)
        return knowledge_base

    # ---------------------------------------------------------------- contents

    def __len__(self):
        return len(self._documents)

    def __contains__(self, doc_id):
        return doc_id in self._documents

    def __repr__(self):
        stats = self.stats()
        return (f"KnowledgeBase(documents={stats['documents']}, sources={stats['sources']}, "
                f"encoder={stats['encoder']!r}, dimension={stats['dimension']}, "
                f"index={self.index.kind or self.index.requested_kind!r}, bm25_documents={stats['bm25_documents']})")

    @property
    def documents(self):
        return list(self._documents.values())

    def get(self, doc_id):
        if doc_id not in self._documents:
            raise KeyError(f"no document with id {doc_id!r}")
        return self._documents[doc_id]

    def add(self, documents):
        """Encode and index new documents (ids must not be in the knowledge base yet)."""
        documents = check_unique_ids(documents)
        clashes = [d.id for d in documents if d.id in self._documents]
        if clashes:
            raise ValueError(f"document ids already in the knowledge base: {clashes[:5]}")
        if not documents:
            return
        texts = [embedding_text(d) for d in documents]
        keys = np.arange(self._next_key, self._next_key + len(documents), dtype=np.int64)
        self.index.add(self.encoder.encode(texts), keys)
        self.bm25.add(texts, [d.id for d in documents])
        for key, document in zip(keys.tolist(), documents):
            self._documents[document.id] = document
            self._keys[document.id] = key
            self._by_key[key] = document.id
        self._next_key += len(documents)

    def remove(self, doc_ids):
        """Remove documents by id; returns how many were present."""
        present = [i for i in dict.fromkeys(doc_ids) if i in self._documents]
        if present:
            self.index.remove(np.array([self._keys[i] for i in present], dtype=np.int64))
            self.bm25.remove(present)
            for doc_id in present:
                del self._documents[doc_id]
                del self._by_key[self._keys.pop(doc_id)]
        return len(present)

    def embeddings_for(self, doc_ids):
        """The stored float32 vectors (n, d) of the given document ids."""
        return self.index.reconstruct(np.array([self._keys[self.get(i).id] for i in doc_ids], dtype=np.int64))

    # ---------------------------------------------------------------- search

    def search(self, query, k=5, mode="hybrid", *, weights=None, rerank=None, candidates=50):
        """The best k documents for `query`, best first (fewer when the knowledge base holds fewer, or when BM25
        finds fewer sharing a term with the query).

        mode: "dense" (cosine of the encoded query), "bm25", or "hybrid": reciprocal-rank fusion of the top
            `candidates` of each, with `weights` (dense, bm25) (default equal).
        rerank: None, or a callable reranker(query, documents) -> scores (n,) applied to the top `candidates` of
            the mode; the result is ordered by its scores.
        """
        return self.search_many([query], k, mode, weights=weights, rerank=rerank, candidates=candidates)[0]

    def search_many(self, queries, k=5, mode="hybrid", *, weights=None, rerank=None, candidates=50):
        """`search` for a list of queries (dense queries are encoded and searched as one batch)."""
        if isinstance(queries, str):
            raise TypeError("queries must be a list of strings; use search() for one query")
        queries = list(queries)
        for position, query in enumerate(queries):
            if not isinstance(query, str):
                raise TypeError(f"query must be a str, got {type(query).__name__} (queries[{position}])")
            if not query.strip():
                raise ValueError(f"query is empty (queries[{position}]): give some text to search for")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        for name, value in (("k", k), ("candidates", candidates)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if weights is not None and mode != "hybrid":
            raise ValueError(f"weights applies to mode='hybrid' only, got mode={mode!r}")
        if rerank is not None and not callable(rerank):
            raise TypeError(f"rerank must be a callable reranker(query, documents) or None, got "
                            f"{type(rerank).__name__}")
        depth = max(k, candidates) if (mode == "hybrid" or rerank is not None) else k
        rankings = self._rank(queries, depth, mode, weights)
        results = []
        for query, ranking in zip(queries, rankings):
            if rerank is not None and ranking:
                ranking = self._rerank(query, ranking, rerank)
            results.append([SearchResult(self._documents[doc_id], score, rank)
                            for rank, (doc_id, score) in enumerate(ranking[:k], start=1)])
        return results

    def _rank(self, queries, depth, mode, weights):
        dense = self._dense(queries, depth) if mode in ("dense", "hybrid") else None
        lexical = self.bm25.search_many(queries, depth) if mode in ("bm25", "hybrid") else None
        if mode == "dense":
            return dense
        if mode == "bm25":
            return lexical
        weights = (1.0, 1.0) if weights is None else weights
        return [reciprocal_rank_fusion([[i for i, _ in d], [i for i, _ in b]], weights=weights)
                for d, b in zip(dense, lexical)]

    def _dense(self, queries, depth):
        scores, keys = self.index.search(self.encoder.encode(queries), depth)
        return [[(self._by_key[key], float(score)) for key, score in zip(row_keys.tolist(), row_scores) if key >= 0]
                for row_keys, row_scores in zip(keys, scores)]

    def _rerank(self, query, ranking, reranker):
        documents = [self._documents[doc_id] for doc_id, _ in ranking]
        scores = np.asarray(reranker(query, documents), dtype=np.float64)
        if scores.shape != (len(documents),):
            raise ValueError(f"the reranker returned scores of shape {scores.shape}, expected ({len(documents)},)")
        order = np.argsort(-scores, kind="stable")
        return [(documents[i].id, float(scores[i])) for i in order]

    # ---------------------------------------------------------------- persistence

    def save(self, directory):
        """Write the knowledge base to `directory` atomically (see hybridrag.retrieval.storage)."""
        save_knowledge_base(self, directory)

    @classmethod
    def load(cls, directory, encoder=None, *, device="auto"):
        """Read a knowledge base written by `save`. encoder: the one it was built with; None rebuilds the bundled
        MiniLM or a hashing encoder from the manifest. A different model or dimension is a ValueError."""
        return load_knowledge_base(cls, directory, encoder, device=device)

    def stats(self):
        """A dict describing the contents: counts, encoder, index kind and device, sizes."""
        texts = [d.text for d in self._documents.values()]
        sources = {d.metadata.get("source_id", d.id) for d in self._documents.values()}
        return {"documents": len(self), "sources": len(sources), "characters": sum(map(len, texts)),
                "encoder": self.encoder.name, "dimension": self.encoder.dimension, "index_kind": self.index.kind,
                "index_on_gpu": self.index.on_gpu, "vector_bytes": 4 * self.encoder.dimension * len(self),
                "bm25_documents": len(self.bm25)}

