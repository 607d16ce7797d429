"""Streaming attention on CPU tensors, where the C++ kernels are in use (`hybridrag.kernels.cpp`): the C++ decode
kernel (csrc/streaming_decode.cpp) for chunks of up to DECODE_CHUNK tokens, the C++ hybrid kernel for longer ones
(prefill: the cache's window gathered before the chunk); else the blockwise PyTorch path.

The decode kernel reads the sink slots and the ring in place, once per kv head, in tiles of keys multiplied whole,
so a NaN or inf that a row cannot see can still meet a zero probability there. It reports whether every output is
finite; where one is not, the call is repeated on the blockwise path, whose non-finite semantics are the contract's
(kernels/nonfinite.py), and on the kernel with finite copies of the inputs; the result takes the first's non-finite
values and the second's finite ones (`take_exact_where_non_finite`).

Memory: the output, and per task (G * C, <= 1024) float32 scores and (G * C, D) float32 partial outputs; prefill
adds the gathered keys and values (B, Hkv, <= sinks + window + C, D) and the hybrid kernel's tiles.
"""
import torch

from ..cpp import cpp_ops
from ..hybrid.cpu import hybrid_fwd_cpu
from ..nonfinite import finite_copy, take_exact_where_non_finite
from .blockwise import streaming_attention_blockwise

DECODE_CHUNK = 16  # longer chunks are prefill: the hybrid kernel's row blocks against the band serve them


def _unit_last_stride(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _prefill(q, k, v, sink_k, sink_v, ring_k, ring_v, length, sinks, window, scale):
    """A chunk of more than DECODE_CHUNK tokens on the C++ hybrid kernel: the cached sinks, the ring's tokens in
    position order and the chunk, gathered into one sequence (B, Hkv, <= sinks + window + C, D). Past the sinks its
    index distances are position distances (the ring holds consecutive positions, the newest window of them), so
    the window is the band and the sinks are landmarks that no row is global for."""
    cached = min(sinks, length)
    in_ring = min(max(length - sinks, 0), window)
    slots = (torch.arange(length - in_ring, length, device=q.device) - sinks) % window  # oldest first
    keys = torch.cat([sink_k[:, :, :cached], ring_k[:, :, slots], k], dim=2)
    values = torch.cat([sink_v[:, :, :cached], ring_v[:, :, slots], v], dim=2)
    # the sinks: those cached, at indices 0 .. cached - 1, and the chunk's first tokens while length < sinks (then
    # nothing is in the ring, so their indices are their positions)
    landmarks = torch.arange(min(sinks, length + q.shape[2]), device=q.device)
    return hybrid_fwd_cpu(q, keys, values, window - 1, 0, True, landmarks, False, scale)[0]


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
    ops = cpp_ops() if q.numel() else None
    if ops is None:
        return streaming_attention_blockwise(q, k, v, sink_k, sink_v, ring_k, ring_v, length, sinks, window,
                                             scale), False
    if q.shape[2] > DECODE_CHUNK:
        return _prefill(q, k, v, sink_k, sink_v, ring_k, ring_v, length, sinks, window, scale), False
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
