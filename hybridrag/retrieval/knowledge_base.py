"""A knowledge base: documents, their dense vectors in a FAISS index and a BM25 index, searchable by dense, BM25 or
hybrid (reciprocal-rank fusion) retrieval, with an optional rerank stage; saved to and loaded from a directory.

Threads: one KnowledgeBase may be shared. Any number of searches run together; `add`, `remove` and `save` are
serialized by a writer-preferring readers-writer lock (`hybridrag.retrieval.locking`), so a waiting writer holds
back new searches and is never starved. Each search reads the documents, the vector index and the BM25 index under
one read hold: it sees one state, all of a write or none of it. `save` holds the read lock while storage writes, so
it writes one consistent state beside writers. Encoding and reranking run outside the lock.
"""
import threading
from dataclasses import dataclass

import numpy as np

from .bm25 import BM25Index
from .documents import Document, check_document, check_unique_ids, chunk_documents, embedding_text, source_id
from .encoder import DenseEncoder, check_encoder
from .fusion import reciprocal_rank_fusion
from .locking import ReadWriteLock
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

    Concurrency: any number of threads may search (`search`, `search_many`, `get`, `documents`, `stats`,
    `embeddings_for`) at once. Writers (`add`, `remove`, `save`) are serialized by a writer-preferring readers-writer
    lock: a writer waits for the searches in progress, and searches arriving while it waits queue behind it. Every
    search sees one snapshot: its dense hits, BM25 hits and documents all come from the same state. `save` holds
    the read lock (and a save mutex): it blocks writers, and the searches queued behind a waiting one. The encoder
    (queries, and new documents in `add`) and a reranker are called outside the lock and must tolerate being called
    from several threads; the lazy BM25 rebuild runs once, under the BM25 index's own mutex. The indexes alone are
    safe for concurrent readers only (see VectorIndex, BM25Index): change them through the knowledge base.

    Bad input is refused before anything changes: a failing `add` or `remove` leaves the knowledge base as it was.
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
        self._lock = ReadWriteLock()
        self._save_lock = threading.Lock()  # two saves would share storage's staging folder

    @classmethod
    def build(cls, documents, encoder=None, *, chunk_tokens=None, overlap=40, index_kind="auto", device="auto"):
        """A knowledge base holding `documents` (non-empty, each with some text: a document that is empty or
        whitespace only is a ValueError naming it), optionally chunked first into `chunk_tokens`-token windows with
        `overlap` (counted with the encoder's tokenizer when it has one)."""
        documents = _check_documents(documents)
        if not documents:
            raise ValueError("documents is empty: a knowledge base needs at least one document")
        knowledge_base = cls(encoder, index_kind=index_kind, device=device)
        if chunk_tokens is not None:
            tokenizer = getattr(knowledge_base.encoder, "tokenizer", None)
            chunks = chunk_documents(documents, chunk_tokens, overlap, tokenizer=tokenizer)
            chunked = {c.metadata["source_id"] for c in chunks}
            unchunked = [d.id for d in documents if d.id not in chunked]
            if unchunked:
                raise ValueError(f"{len(unchunked)} of the {len(documents)} documents gave no chunk (no token the "
                                 f"tokenizer counts), such as {unchunked[:5]}")
            documents = chunks
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
        with self._lock.read():
            return list(self._documents.values())

    def get(self, doc_id):
        if doc_id not in self._documents:
            raise KeyError(f"no document with id {doc_id!r}")
        return self._documents[doc_id]

    def add(self, documents, vectors=None):
        """Index new documents (ids must not be in the knowledge base yet; each must survive a save, see Document).
        Nothing changes when any of them is refused.

        vectors: None (the encoder encodes each document, which then needs some text), or their precomputed dense
            vectors, float (n, dimension) numpy or torch, finite, in the encoder's space (generated embeddings, or
            vectors encoded elsewhere): no encoding runs. With vectors a document may hold no text: it is then
            dense-only (found by dense and hybrid search, never by BM25), as for a generated embedding with no
            text behind it.
        """
        documents = _check_documents(documents, allow_empty=vectors is not None)
        if vectors is not None:
            vectors = self._check_vectors(vectors, len(documents))
        if not documents:
            return
        with self._lock.read():
            self._check_new(documents)  # fail before the (slow) encoding
        texts = [embedding_text(d) for d in documents]
        if vectors is None:
            vectors = self.encoder.encode(texts)
        with self._lock.write():
            self._check_new(documents)  # again: another writer may have added one meanwhile
            self._insert(documents, texts, vectors)

    def _check_vectors(self, vectors, count):
        """numpy (count, dimension); the dtype and NaN checks are the vector index's (in _insert, before any
        change)."""
        if hasattr(vectors, "detach"):  # a torch tensor
            vectors = vectors.detach().cpu().numpy()
        if not isinstance(vectors, np.ndarray):
            raise TypeError(f"vectors must be a float numpy array or torch tensor of shape ({count}, "
                            f"{self.encoder.dimension}), got {type(vectors).__name__}")
        if vectors.shape != (count, self.encoder.dimension):
            raise ValueError(f"vectors must have shape ({count}, {self.encoder.dimension}) (one row per document, the "
                             f"encoder {self.encoder.name!r}'s dimension), got {vectors.shape}")
        return vectors

    def _check_new(self, documents):
        clashes = [d.id for d in documents if d.id in self._documents]
        if clashes:
            raise ValueError(f"document ids already in the knowledge base: {clashes[:5]}")

    def _insert(self, documents, texts, vectors):
        """Under the write lock: vectors (n, d) of `documents` into both indexes and the tables."""
        keys = np.arange(self._next_key, self._next_key + len(documents), dtype=np.int64)
        self.index.add(vectors, keys)  # checks the vectors (shape, NaN) before changing anything
        lexical = [(text, d.id) for text, d in zip(texts, documents) if d.text.strip()]  # dense-only: no text
        try:
            if lexical:
                self.bm25.add([text for text, _ in lexical], [doc_id for _, doc_id in lexical])
        except BaseException:
            self.index.remove(keys)
            raise
        for key, document in zip(keys.tolist(), documents):
            self._documents[document.id] = document
            self._keys[document.id] = key
            self._by_key[key] = document.id
        self._next_key += len(documents)

    def remove(self, doc_ids):
        """Remove documents by id (a list of str; unknown ids are ignored); returns how many were present."""
        doc_ids = _check_ids(doc_ids, "remove")
        with self._lock.write():
            present = [i for i in dict.fromkeys(doc_ids) if i in self._documents]
            if present:
                self.index.remove(np.array([self._keys[i] for i in present], dtype=np.int64))
                self.bm25.remove(present)
                for doc_id in present:
                    del self._documents[doc_id]
                    del self._by_key[self._keys.pop(doc_id)]
        return len(present)

    def embeddings_for(self, doc_ids):
        """The stored float32 vectors (n, d) of the given document ids (a list of str)."""
        doc_ids = _check_ids(doc_ids, "embeddings_for")
        with self._lock.read():
            keys = np.array([self._keys[self.get(i).id] for i in doc_ids], dtype=np.int64)
            return self.index.reconstruct(keys)

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
        vectors = self.encoder.encode(queries) if mode != "bm25" else None  # (Q, d), outside the lock: slow
        with self._lock.read():
            depth = min(depth, len(self._documents))  # k = 2**31 costs what k = len(self) does
            rankings = self._rank(queries, vectors, depth, mode, weights) if depth else [[] for _ in queries]
            hits = [[(self._documents[doc_id], score) for doc_id, score in ranking] for ranking in rankings]
        results = []
        for query, ranking in zip(queries, hits):
            if rerank is not None and ranking:
                ranking = self._rerank(query, ranking, rerank)
            results.append([SearchResult(document, score, rank)
                            for rank, (document, score) in enumerate(ranking[:k], start=1)])
        return results

    def search_vectors(self, vectors, k=5):
        """Dense search for query vectors already encoded: `vectors` (Q, d) float array of the knowledge base's
        encoder; the best k documents per row, best first, as `search` with mode="dense" returns them."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.encoder.dimension:
            raise ValueError(f"vectors must have shape (Q, {self.encoder.dimension}), got {vectors.shape}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        with self._lock.read():
            depth = min(k, len(self._documents))
            rankings = self._dense(vectors, depth) if depth and len(vectors) else [[] for _ in vectors]
            return [[SearchResult(self._documents[doc_id], score, rank)
                     for rank, (doc_id, score) in enumerate(ranking, start=1)] for ranking in rankings]

    def _rank(self, queries, vectors, depth, mode, weights):
        """Under the read lock: per query [(doc_id, score)], best first, at most `depth`."""
        dense = self._dense(vectors, depth) if mode in ("dense", "hybrid") else None
        lexical = self.bm25.search_many(queries, depth) if mode in ("bm25", "hybrid") else None
        if mode == "dense":
            return dense
        if mode == "bm25":
            return lexical
        weights = (1.0, 1.0) if weights is None else weights
        return [reciprocal_rank_fusion([[i for i, _ in d], [i for i, _ in b]], weights=weights)
                for d, b in zip(dense, lexical)]

    def _dense(self, vectors, depth):
        scores, keys = self.index.search(vectors, depth)
        return [[(self._by_key[key], float(score)) for key, score in zip(row_keys.tolist(), row_scores) if key >= 0]
                for row_keys, row_scores in zip(keys, scores)]

    def _rerank(self, query, ranking, reranker):
        documents = [document for document, _ in ranking]
        scores = np.asarray(reranker(query, documents), dtype=np.float64)
        if scores.shape != (len(documents),):
            raise ValueError(f"the reranker returned scores of shape {scores.shape}, expected ({len(documents)},)")
        order = np.argsort(-scores, kind="stable")
        return [(documents[i], float(scores[i])) for i in order]

    # ---------------------------------------------------------------- persistence

    def save(self, directory):
        """Write the knowledge base to `directory` atomically (see hybridrag.retrieval.storage). Holds the read lock
        while it writes: writers wait, so the files hold one state; searches go on."""
        with self._save_lock, self._lock.read():
            save_knowledge_base(self, directory)

    @classmethod
    def load(cls, directory, encoder=None, *, device="auto"):
        """Read a knowledge base written by `save`. encoder: the one it was built with; None rebuilds the bundled
        MiniLM or a hashing encoder from the manifest. A different model or dimension is a ValueError."""
        return load_knowledge_base(cls, directory, encoder, device=device)

    def stats(self):
        """A dict describing the contents: counts, encoder, index kind and device, sizes."""
        with self._lock.read():
            return self._stats()

    def _stats(self):
        texts = [d.text for d in self._documents.values()]
        sources = {source_id(d) for d in self._documents.values()}
        return {"documents": len(self), "sources": len(sources), "characters": sum(map(len, texts)),
                "encoder": self.encoder.name, "dimension": self.encoder.dimension, "index_kind": self.index.kind,
                "index_on_gpu": self.index.on_gpu, "vector_bytes": 4 * self.encoder.dimension * len(self),
                "bm25_documents": len(self.bm25)}



def _check_documents(documents, allow_empty=False):
    """The documents as a list: Document objects with unique ids, each surviving a save and (unless allow_empty:
    their vectors come precomputed) with some text."""
    documents = check_unique_ids(documents)
    for document in documents:
        check_document(document)  # again: metadata may have changed since the Document was made
    if allow_empty:
        return documents
    empty = [d.id for d in documents if not d.text.strip()]
    if empty and len(empty) == len(documents):
        raise ValueError(f"the {len(documents)} document(s) given hold no text (each is empty or whitespace only): "
                         "there is nothing to index")
    if empty:
        raise ValueError(f"{len(empty)} of the {len(documents)} documents hold no text (empty or whitespace only): "
                         f"{empty[:5]}; give them text, their vectors (add(documents, vectors=...)), or leave them out")
    return documents


def _check_ids(doc_ids, method):
    """doc_ids as a list of str; a bare str is refused (it would be read as one id a character)."""
    if isinstance(doc_ids, str) or not hasattr(doc_ids, "__iter__"):
        raise TypeError(f"doc_ids must be a list of document ids, got {type(doc_ids).__name__}; pass [doc_id] to "
                        f"{method}() one document")
    doc_ids = list(doc_ids)
    for position, doc_id in enumerate(doc_ids):
        if not isinstance(doc_id, str):
            raise TypeError(f"doc_ids[{position}] must be a str, got {type(doc_id).__name__}")
    return doc_ids
