"""The hybrid RAG system: documents in a knowledge base, answers from a real offline LLM running on the kernels.

    from hybridrag.system import create_hybrid_rag_system
    system = create_hybrid_rag_system(config)   # None | dict | path to JSON/YAML | SystemConfig

Submodules: config (the dataclasses), loading (load_documents), model (the language model, offline), generation
(streamed decoding with timings), evaluation (answer metrics), system (HybridRAGSystem).
"""
import importlib

_EXPORTS = {
    "create_hybrid_rag_system": "system", "HybridRAGSystem": "system", "load_knowledge_base": "system",
    "SystemConfig": "config", "AttentionConfig": "config", "RetrieverConfig": "config", "GenerationConfig": "config",
    "load_documents": "loading", "load_language_model": "model", "LanguageModel": "model",
    "stream_generate": "generation", "GenerationStats": "generation",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):  # imported on first use: the model stack is heavy
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hybridrag.system' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
