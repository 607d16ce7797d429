"""hybridrag: fused kernels and layers for long-context retrieval-augmented models."""
from .ops import attention_mass, hybrid_attention, sliding_window_attention

__version__ = "0.1.0"
__all__ = ["sliding_window_attention", "hybrid_attention", "attention_mass"]
