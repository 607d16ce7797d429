"""Drop-in layers built on `hybridrag.ops`."""
from .rotary import RotaryEmbedding
from .sliding_window_attention import SlidingWindowAttention

__all__ = ["SlidingWindowAttention", "RotaryEmbedding"]
