"""Public ops: validation, backend choice and autograd wrappers over `hybridrag.kernels`."""
from .sliding_window import sliding_window_attention

__all__ = ["sliding_window_attention"]
