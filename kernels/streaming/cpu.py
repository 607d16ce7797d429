"""Streaming attention on CPU tensors: the C++ decode kernel (csrc/streaming_decode.cpp) for chunks of up to
DECODE_CHUNK tokens where the C++ kernels are in use (`hybridrag.kernels.cpp`), else the blockwise PyTorch path.

The decode kernel reads the sink slots and the ring in place, once per kv head, in tiles of keys multiplied whole,
so a NaN or inf that a row cannot see can still meet a zero probability there. It reports whether every output is
finite; where one is not, the call is repeated on the blockwise path, whose non-finite semantics are the contract's
(kernels/nonfinite.py), and on the kernel with finite copies of the inputs; the result takes the first's non-finite
values and the second's finite ones (`take_exact_where_non_finite`).

Memory: the output, and per task (G * C, <= 1024) float32 scores and (G * C, D) float32 partial outputs.
"""
from ..cpp import cpp_ops
from ..nonfinite import finite_copy, take_exact_where_non_finite
from .blockwise import streaming_attention_blockwise

DECODE_CHUNK = 16  # longer chunks are prefill: the blockwise path's matmuls serve them


def _unit_last_stride(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def streaming_attention_cpu(q, k, v, sink_k, sink_v, ring_k, ring_v, length, sinks, window, scale):
    """As `streaming_attention_blockwise` (same arguments and result)."""
    return streaming_attention_cpu_storing(q, k, v, sink_k, sink_v, ring_k, ring_v, length, sinks, window, scale,
                                           store=False)[0]


def streaming_attention_cpu_storing(q, k, v, sink_k, sink_v, ring_k, ring_v, length, sinks, window, scale, *,
                                    store=True):
    """(o, stored): as `streaming_attention_cpu`, and with `store` the C++ decode kernel also writes the chunk into
    the cache tensors in the same call when every output is finite (stored True; the caller then only advances the
    length). stored False: the cache tensors are as they were, for the caller to store the chunk (the cache must be
    contiguous in its last dimension for the kernel to write it)."""
    ops = cpp_ops() if 0 < q.shape[2] <= DECODE_CHUNK and q.numel() else None
    if ops is None:
        return streaming_attention_blockwise(q, k, v, sink_k, sink_v, ring_k, ring_v, length, sinks, window,
                                             scale), False
    cache = (sink_k, sink_v, ring_k, ring_v)
    store = store and all(t.stride(-1) == 1 for t in cache)
    tensors = [_unit_last_stride(t) for t in (q, k, v, *cache)]
    decode = ops.streaming_decode_append if store else ops.streaming_decode
    out, finite = decode(*tensors, length, sinks, window, scale)
    if finite:
        return out, store
    exact = streaming_attention_blockwise(q, k, v, sink_k, sink_v, ring_k, ring_v, length, sinks, window, scale)
    clean, _ = ops.streaming_decode(*(finite_copy(t) for t in tensors), length, sinks, window, scale)
    return take_exact_where_non_finite(clean, exact), False
