"""Sliding-window attention: Triton kernels (`triton_kernels`), the blockwise CPU path (`blockwise`), the reference."""
from .blockwise import sliding_window_bwd_blockwise, sliding_window_fwd_blockwise
from .reference import sliding_window_attention_reference

__all__ = ["sliding_window_attention_reference", "sliding_window_fwd_blockwise", "sliding_window_bwd_blockwise"]
