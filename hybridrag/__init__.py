"""hybridrag: fused kernels and layers for long-context retrieval-augmented models.

The ops are imported with the package; the subpackages (`hr.nn`, `hr.retrieval`, ...) are imported on first
attribute access (PEP 562), so `import hybridrag` costs only the ops and their kernels.
"""
import importlib

from ._checkout import import_hub_kernels_first

import_hub_kernels_first()

from .ops import (QuantizedWeight, StreamingKVCache, attention_mass, hybrid_attention,  # noqa: E402 (after that call)
                  int8_matmul, quantize_int8, sliding_window_attention, streaming_attention)

__version__ = "0.1.0"
__all__ = ["sliding_window_attention", "hybrid_attention", "attention_mass", "quantize_int8", "int8_matmul",
           "QuantizedWeight", "StreamingKVCache", "streaming_attention"]

SUBPACKAGES = ("ops", "kernels", "nn", "integrations", "streaming", "retrieval", "retention", "models", "train",
               "encoders", "diffusion", "distillation", "pipeline")


def __getattr__(name):
    if name in SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")  # the import also binds it as an attribute
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(SUBPACKAGES))
