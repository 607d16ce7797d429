"""hybridrag: fused kernels and layers for long-context retrieval-augmented models."""
from .ops import (QuantizedWeight, StreamingKVCache, attention_mass, hybrid_attention, int8_matmul, quantize_int8,
                  sliding_window_attention, streaming_attention)

__version__ = "0.1.0"
__all__ = ["sliding_window_attention", "hybrid_attention", "attention_mass", "quantize_int8", "int8_matmul",
           "QuantizedWeight", "StreamingKVCache", "streaming_attention"]
