"""The integration layer: a HybridRAGSystem with hybrid-encoder retrieval (HybridRAGPipeline), a knowledge base with
hybrid embeddings, an explicit fallback and generated documents (HybridVectorStoreAdapter), real-time queries through
the StreamProcessor, and every layer's config in one object (HybridRAGConfig, default_config).

    from hybridrag.pipeline import HybridRAGPipeline, default_config
    pipeline = HybridRAGPipeline(system, hybrid_encoder=HybridEncoder(default_config().encoder), use_hybrid=True)
    out = pipeline.query("a question", top_k=4)          # {"answer", "sources", "method", "encoder", "timings", ...}

Layering: above system/ (it wraps a HybridRAGSystem), encoders/, distillation/, diffusion/, retention/ and
streaming/ (it combines them), below the planned server/; nothing below imports it. The config module imports
configs only (no model, no system).
"""
import importlib

_EXPORTS = {"HybridRAGPipeline": "rag", "HybridVectorStoreAdapter": "vector_store", "GENERATED_PREFIX": "vector_store",
            "HybridRAGConfig": "config", "default_config": "config", "SECTIONS": "config"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):  # imported on first use: the pipeline imports the system (transformers), the config does not
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
