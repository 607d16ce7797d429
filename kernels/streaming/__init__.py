"""Streaming attention over a rolling KV cache (sink slots + a ring of the last `window` positions): the layout, the
dense reference, the CPU path and the Triton kernels (`triton_kernels`)."""
from .blockwise import streaming_attention_blockwise
from .cache_layout import ring_positions, stream_visibility
from .reference import streaming_attention_reference

__all__ = ["ring_positions", "stream_visibility", "streaming_attention_reference", "streaming_attention_blockwise"]
