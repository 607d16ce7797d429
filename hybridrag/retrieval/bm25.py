"""BM25 lexical search over bm25s (sparse-matrix BM25; scores precomputed at indexing time)."""
import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np

from .._optional import import_optional
from .encoder import check_texts

bm25s = import_optional("bm25s", "bm25s", "retrieval")

METHODS = ("lucene", "robertson", "atire", "bm25l", "bm25+")


class BM25Index:
    """BM25 over a list of texts with string ids.

    Args:
        k1, b: BM25's term-frequency saturation and length normalisation.
        method: a bm25s variant: "lucene" (default), "robertson", "atire", "bm25l", "bm25+".
        stopwords: "en" (bm25s's English list) or None.

    Tokens are lowercase words of two or more letters/digits (bm25s's default pattern). bm25s indexes are static:
    `add` and `remove` change the stored texts and the index is rebuilt before the next search, O(corpus tokens).
    A corpus with no token at all (whitespace, single letters, stop words only) is valid: every search gives [].
    Memory: the texts' token ids plus a sparse (vocabulary x documents) score matrix.

    Threads: searches (and `save`) may run together: the lazy rebuild runs under an internal mutex, once, and the
    new bm25s retriever is published only when complete (bm25s retrieval only reads it). `build`, `add` and
    `remove` must not overlap any other call; KnowledgeBase's readers-writer lock serves that.
    """

    def __init__(self, *, k1=1.5, b=0.75, method="lucene", stopwords="en"):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if stopwords not in ("en", None):
            raise ValueError(f"stopwords must be 'en' or None, got {stopwords!r}")
        for name, value in (("k1", k1), ("b", b)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        self.k1, self.b, self.method, self.stopwords = float(k1), float(b), method, stopwords
        self._texts, self._ids = {}, []
        self._retriever = None  # None: no vocabulary (or not built yet)
        self._stale = True  # the retriever does not reflect _texts/_ids yet
        self._rebuild = threading.Lock()

    def __len__(self):
        return len(self._ids)

    def __repr__(self):
        return (f"BM25Index(size={len(self)}, method={self.method!r}, k1={self.k1}, b={self.b}, "
                f"stopwords={self.stopwords!r})")

    def build(self, texts, ids):
        """Replace the contents with `texts` under `ids` (unique strings) and index them."""
        self._texts, self._ids = {}, []
        self.add(texts, ids)
        self._index()

    def add(self, texts, ids):
        texts = check_texts(texts)
        ids = check_texts(ids, "ids")
        if len(ids) != len(texts):
            raise ValueError(f"ids has {len(ids)} entries but texts has {len(texts)}")
        clashes = [i for i in ids if i in self._texts]
        if clashes or len(set(ids)) != len(ids):
            raise ValueError(f"ids must be new and unique, got repeats such as {(clashes or ids)[:3]}")
        self._texts.update(zip(ids, texts))
        self._ids = self._ids + ids  # a new list: a search that already took the old one keeps it whole
        self._stale = True

    def remove(self, ids):
        """Drop the given ids; returns how many were present."""
        present = {i for i in check_texts(ids, "ids") if i in self._texts}
        for item in present:
            del self._texts[item]
        if present:
            self._ids = [i for i in self._ids if i not in present]
            self._stale = True
        return len(present)

    def _tokenize(self, texts, return_ids):
        return bm25s.tokenize(texts, stopwords=self.stopwords, return_ids=return_ids, show_progress=False)

    def _index(self):
        """Build the retriever from the stored texts (None when they hold no token: bm25s cannot index that)."""
        tokenized = self._tokenize([self._texts[i] for i in self._ids], True)
        retriever = None
        if tokenized.vocab:
            retriever = bm25s.BM25(k1=self.k1, b=self.b, method=self.method)
            retriever.index(tokenized, show_progress=False)
        self._retriever, self._stale = retriever, False

    def _ready(self):
        """(retriever or None, ids) of the current contents, rebuilding first when stale; one thread rebuilds while
        concurrent searches wait for it rather than read a half-built retriever."""
        with self._rebuild:
            if self._stale:
                self._index()
            return self._retriever, self._ids

    def search(self, query, k):
        """The k best (id, score) pairs, best first. Only documents sharing a term with the query are returned, so
        there may be fewer than k; a query with no indexed term gives []."""
        return self.search_many([query], k)[0]

    def search_many(self, queries, k):
        queries = check_texts(queries, "queries")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        retriever, ids = self._ready()
        results = [[] for _ in queries]
        if retriever is None:
            return results
        vocabulary = retriever.vocab_dict
        tokens = [[t for t in query if t in vocabulary] for query in self._tokenize(queries, False)]
        asked = [row for row, query in enumerate(tokens) if query]
        if asked:
            # k beyond the corpus is clamped before bm25s allocates its (queries, k) arrays
            rows, scores = retriever.retrieve([tokens[row] for row in asked], k=min(k, len(ids)), show_progress=False)
            for row, found, found_scores in zip(asked, rows, scores):
                results[row] = [(ids[d], float(s)) for d, s in zip(found, found_scores) if s > 0]
        return results

    def save(self, directory):
        """Write the index into `directory` (created; its previous content is replaced). A corpus with no token
        writes only bm25.json (with "indexed": false); `load` reads both."""
        retriever, ids = self._ready()
        directory = Path(directory)
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        if retriever is not None:
            retriever.save(str(directory), show_progress=False)
        settings = {"k1": self.k1, "b": self.b, "method": self.method, "stopwords": self.stopwords, "ids": ids,
                    "indexed": retriever is not None}
        with open(directory / "bm25.json", "w", encoding="utf-8") as out:
            json.dump(settings, out)
            out.flush()
            os.fsync(out.fileno())

    @classmethod
    def load(cls, directory, texts):
        """Read an index written by `save`. `texts` maps each id to its text (the knowledge base keeps them), so
        later adds and removes can rebuild."""
        directory = Path(directory)
        settings_path = directory / "bm25.json"
        if not settings_path.is_file():
            raise FileNotFoundError(f"no BM25 index at {directory} (missing bm25.json)")
        try:
            settings = json.loads(settings_path.read_text(encoding="utf-8"))
            index = cls(k1=settings["k1"], b=settings["b"], method=settings["method"], stopwords=settings["stopwords"])
            ids = settings["ids"]
            indexed = settings.get("indexed", bool(ids))  # files written before "indexed" existed: bm25s files iff ids
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"BM25 settings {settings_path} are corrupted ({error})") from None
        missing = [i for i in ids if i not in texts]
        if missing:
            raise ValueError(f"BM25 index at {directory} names ids with no text: {missing[:3]}")
        index._ids = list(ids)
        index._texts = {i: texts[i] for i in ids}
        if indexed:
            index._retriever, index._stale = bm25s.BM25.load(str(directory), show_progress=False), False
        return index
