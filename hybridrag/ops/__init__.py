"""Public ops: validation and backend choice in front of torch.library custom ops (`library*.py`: fake
implementations, autograd formulas) over `hybridrag.kernels`."""
from .hybrid import attention_mass, hybrid_attention, hybrid_attention_weights
from .int8 import QuantizedWeight, int8_matmul, quantize_int8
from .sliding_window import sliding_window_attention
from .streaming import StreamingKVCache, streaming_attention

__all__ = ["sliding_window_attention", "hybrid_attention", "hybrid_attention_weights", "attention_mass",
           "quantize_int8", "int8_matmul", "QuantizedWeight", "StreamingKVCache", "streaming_attention"]
