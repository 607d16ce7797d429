"""HybridVectorStoreAdapter: a knowledge base searched with hybrid-encoder embeddings, its original encoder kept as an
explicit fallback, and generated (synthetic) documents indexed, listed and removed.

    store = HybridVectorStoreAdapter(system.knowledge_base, hybrid_encoder)   # a HybridEncoder, or any encoder
    hits = store.search("a question", k=4)                     # SearchResults from the hybrid embeddings' index
    vectors = store.embed(["a text"])                          # float32 (1, hybrid dim)
    ids = store.add_generated(texts, {"source": "diffusion"})  # flagged {"synthetic": True}
    store.generated(); store.remove_generated()

How it is built: the original knowledge base (`original`, with its own encoder, e.g. all-MiniLM-L6-v2) stays as it
is; a second KnowledgeBase over the same Document objects (same ids) holds the hybrid encoder's vectors (and its own
BM25 index of the same texts), so dense search runs on hybrid embeddings and ids agree across both. Documents added
through the adapter go into both; `refresh()` re-syncs after the original changed behind its back.

Fallback, never silent: without a hybrid encoder the adapter works on the original encoder, says so once with a
logged warning naming why, and keeps saying so (`using_fallback`, `fallback_reason`, `encoder.name` in every
`describe()`); `use_hybrid=False` on a call asks for the original explicitly. A failing hybrid encoder raises: it
is never swapped for the original behind the caller's back.

Not atomic across the two indexes: a reader may see a document in one and not yet in the other while a write is in
progress (each knowledge base alone is consistent; see KnowledgeBase).
"""
import logging
import re

import numpy as np

from ..diffusion.quality import SYNTHETIC, synthetic_ids
from ..retrieval.documents import Document
from ..retrieval.encoder import as_retrieval_encoder, check_encoder, check_texts
from ..retrieval.knowledge_base import KnowledgeBase

__all__ = ["HybridVectorStoreAdapter", "GENERATED_PREFIX"]

GENERATED_PREFIX = "generated"
log = logging.getLogger(__name__)


class HybridVectorStoreAdapter:
    """A knowledge base with hybrid embeddings, an explicit fallback and generated documents (module docstring).

    Args:
        knowledge_base: the original hybridrag.retrieval.KnowledgeBase (e.g. a HybridRAGSystem's).
        hybrid_encoder: None (work on the original encoder: the fallback, logged), a HybridEncoder (wrapped in
            hybridrag.encoders.HybridTextEncoder, named by its weights) or any retrieval encoder (.name,
            .dimension, .encode). Its dimension may differ from the original's: it gets an index of its own.
        fallback_encoder: None (the knowledge base's own encoder) or an encoder of the same name and dimension (the
            original vectors were made by it: another model would make queries that do not match them).
        index_kind: of the hybrid index ("auto", "flat", "ivf", "hnsw").
    Building encodes every document of the knowledge base with the hybrid encoder once.
    """

    def __init__(self, knowledge_base, hybrid_encoder=None, fallback_encoder=None, *, index_kind="auto"):
        if not isinstance(knowledge_base, KnowledgeBase):
            raise TypeError(f"knowledge_base must be a hybridrag.retrieval.KnowledgeBase, got "
                            f"{type(knowledge_base).__name__}")
        self.original = knowledge_base
        original = knowledge_base.encoder
        if fallback_encoder is None:
            fallback_encoder = original
        else:
            check_encoder(fallback_encoder)
            if fallback_encoder.dimension != original.dimension:
                raise ValueError(f"fallback_encoder makes {fallback_encoder.dimension}-dim vectors but the knowledge "
                                 f"base holds {original.dimension}-dim ones from {original.name!r}: the fallback must "
                                 "be the encoder the knowledge base was built with")
            if fallback_encoder.name != original.name:
                raise ValueError(f"fallback_encoder is {fallback_encoder.name!r} but the knowledge base was built with "
                                 f"{original.name!r}: its vectors would not match the stored ones")
        self.fallback_encoder = fallback_encoder
        if hybrid_encoder is None:
            self.hybrid = None
            self.fallback_reason = "no hybrid_encoder was given"
            log.warning("HybridVectorStoreAdapter: using the knowledge base's own encoder %r (%d-dim), the fallback: "
                        "%s", original.name, original.dimension, self.fallback_reason)
        else:
            encoder = as_retrieval_encoder(hybrid_encoder)
            self.hybrid = KnowledgeBase(encoder, index_kind=index_kind)
            self.fallback_reason = None
            documents = knowledge_base.documents
            if documents:
                self.hybrid.add(documents)

    def __repr__(self):
        return (f"HybridVectorStoreAdapter(documents={len(self)}, encoder={self.encoder.name!r}, "
                f"fallback={self.using_fallback})")

    def __len__(self):
        return len(self.original)

    # ---------------------------------------------------------------- which side

    @property
    def using_fallback(self):
        """True when there is no hybrid encoder, so every call works on the original encoder."""
        return self.hybrid is None

    @property
    def encoder(self):
        """The encoder calls use by default: the hybrid one, or the fallback."""
        return self.fallback_encoder if self.hybrid is None else self.hybrid.encoder

    @property
    def knowledge_base(self):
        """The knowledge base searches use by default: the hybrid one, or the original."""
        return self.original if self.hybrid is None else self.hybrid

    def _side(self, use_hybrid):
        if not isinstance(use_hybrid, bool):
            raise TypeError(f"use_hybrid must be True or False, got {use_hybrid!r}")
        return use_hybrid and self.hybrid is not None

    def describe(self):
        """{"documents", "generated", "encoder" (default), "dimension", "fallback_encoder", "using_fallback",
        "fallback_reason"}."""
        return {"documents": len(self), "generated": len(self.generated()), "encoder": self.encoder.name,
                "dimension": self.encoder.dimension, "fallback_encoder": self.fallback_encoder.name,
                "using_fallback": self.using_fallback, "fallback_reason": self.fallback_reason}

    # ---------------------------------------------------------------- reading

    def embed(self, texts, *, use_hybrid=True):
        """float32 (N, d) L2-normalised embeddings of a list of str: the hybrid encoder's, or the fallback's
        (use_hybrid=False, or no hybrid encoder: see using_fallback)."""
        texts = check_texts(texts)
        encoder = self.hybrid.encoder if self._side(use_hybrid) else self.fallback_encoder
        return np.asarray(encoder.encode(texts), dtype=np.float32)

    def search(self, query, k=5, mode="hybrid", *, use_hybrid=True, **options):
        """KnowledgeBase.search (mode "dense", "bm25" or "hybrid"; options weights, rerank, candidates) on the
        hybrid index, or on the original (use_hybrid=False, or no hybrid encoder)."""
        side = self.hybrid if self._side(use_hybrid) else self.original
        return side.search(query, k, mode, **options)

    # ---------------------------------------------------------------- writing

    def add_documents(self, documents):
        """Index Documents in both knowledge bases (the original first; if the hybrid side refuses them, they are
        taken out of the original again, so both stay in step)."""
        documents = documents if isinstance(documents, (Document, str)) else list(documents)  # add refuses those
        self.original.add(documents)
        if self.hybrid is not None:
            try:
                self.hybrid.add(documents)
            except BaseException:
                self.original.remove([d.id for d in documents])
                raise

    def add_generated(self, texts, metadata=None, *, id_prefix=GENERATED_PREFIX):
        """Index generated texts as Documents flagged synthetic; returns their ids.

        texts: a non-empty list of non-empty str (e.g. a text diffusion model's samples).
        metadata: None, one dict for every text, or a list of one dict per text (JSON values, see Document); each
            document's metadata is it plus {"synthetic": True}.
        id_prefix: ids are "<id_prefix>-<n>", n counting on from the largest such id already there.
        List them with generated(), remove them with remove_generated().
        """
        texts = check_texts(texts)
        if not texts:
            raise ValueError("texts is empty: give at least one generated text")
        for position, text in enumerate(texts):
            if not text.strip():
                raise ValueError(f"texts[{position}] is empty or whitespace only: there is nothing to index")
        if not isinstance(id_prefix, str) or not id_prefix:
            raise ValueError(f"id_prefix must be a non-empty str, got {id_prefix!r}")
        if metadata is None or isinstance(metadata, dict):
            per_text = [dict(metadata or {}) for _ in texts]
        elif isinstance(metadata, (list, tuple)):
            if len(metadata) != len(texts):
                raise ValueError(f"metadata has {len(metadata)} entries but texts has {len(texts)}: give one dict "
                                 "per text, or one dict for all")
            for position, item in enumerate(metadata):
                if not isinstance(item, dict):
                    raise TypeError(f"metadata[{position}] must be a dict, got {type(item).__name__}")
            per_text = [dict(item) for item in metadata]
        else:
            raise TypeError(f"metadata must be None, a dict or a list of dicts, got {type(metadata).__name__}")
        pattern = re.compile(re.escape(id_prefix) + r"-(\d+)")
        numbers = [int(m.group(1)) for d in self.original.documents if (m := pattern.fullmatch(d.id))]
        start = max(numbers, default=-1) + 1
        documents = [Document(f"{id_prefix}-{start + n}", text, metadata={**fields, SYNTHETIC: True})
                     for n, (text, fields) in enumerate(zip(texts, per_text))]
        self.add_documents(documents)
        return [d.id for d in documents]

    def generated(self, id_prefix=None):
        """The ids of the synthetic documents (metadata "synthetic" True), optionally only "<id_prefix>-..." ones."""
        return synthetic_ids(self.original, id_prefix)

    def remove_generated(self, ids=None):
        """Remove generated documents from both knowledge bases: the given ids (each must be a synthetic document
        here; a ValueError names the others and nothing is removed) or, with None, all of them. Returns how many."""
        flagged = set(self.generated())
        if ids is None:
            ids = sorted(flagged)
        else:
            if isinstance(ids, str) or not hasattr(ids, "__iter__"):
                raise TypeError(f"ids must be None or a list of document ids, got {type(ids).__name__}")
            ids = list(ids)
            others = [i for i in ids if i not in flagged]
            if others:
                raise ValueError(f"not generated documents of this store (no such id, or not flagged synthetic): "
                                 f"{others[:5]}; remove_generated removes only documents flagged synthetic")
        if not ids:
            return 0
        removed = self.original.remove(ids)
        if self.hybrid is not None:
            self.hybrid.remove(ids)
        return removed

    def refresh(self):
        """Bring the hybrid index in step with the original's documents (after the original was changed directly):
        encodes the documents it lacks, drops those the original no longer has. Returns {"added", "removed"}."""
        if self.hybrid is None:
            return {"added": 0, "removed": 0}
        documents = {d.id: d for d in self.original.documents}
        held = {d.id for d in self.hybrid.documents}
        gone = sorted(held - documents.keys())
        new = [d for key, d in documents.items() if key not in held]
        if gone:
            self.hybrid.remove(gone)
        if new:
            self.hybrid.add(new)
        return {"added": len(new), "removed": len(gone)}
