"""`StreamingKVCache` and `streaming_attention`: attention over an endless stream in constant memory."""
import torch

from hybridrag.kernels.streaming import streaming_attention_reference
from hybridrag.kernels.streaming.cpu import streaming_attention_cpu_storing

from .backend import resolve_backend
from .library_streaming import streaming_attention_op
from .validation import (ATTENTION_DTYPES, REFERENCE_DTYPES, check_attention_inputs, check_int, check_interpreter_dtype,
                         check_scale, check_tensor)


class StreamingKVCache:
    """Fixed-size keys/values of a stream: `sinks` sink slots (the first positions, kept for good) and a ring of the
    last `window` positions. Memory: 2 x B x Hkv x (sinks + window) x D elements, however many tokens have passed.

    A query at position p sees key j iff j <= p and (j < sinks or p - window < j): the int `window` means what it
    means in `hybrid_attention` (the window most recent keys, the query's own included), and the sinks are landmarks
    with global_queries=False. Every row of the batch advances together (`length` tokens seen).
    """

    def __init__(self, batch, kv_heads, head_dim, window, *, sinks=4, dtype=torch.float32, device=None):
        for name, value, low in (("batch", batch, 1), ("kv_heads", kv_heads, 1), ("head_dim", head_dim, 1),
                                 ("window", window, 1), ("sinks", sinks, 0)):
            check_int(name, value, low)
        if dtype not in REFERENCE_DTYPES:  # float64 serves the reference backend (the tests' truth)
            raise TypeError(f"dtype must be one of {REFERENCE_DTYPES}, got {dtype}")
        self.window, self.sinks = window, sinks
        self.sink_k = torch.zeros(batch, kv_heads, sinks, head_dim, dtype=dtype, device=device)
        self.sink_v = torch.zeros_like(self.sink_k)
        self.ring_k = torch.zeros(batch, kv_heads, window, head_dim, dtype=dtype, device=device)
        self.ring_v = torch.zeros_like(self.ring_k)
        self.length = 0

    @property
    def shape(self):
        """(batch, kv_heads, head_dim) the cache takes chunks of."""
        batch, kv_heads, _, head_dim = self.ring_k.shape
        return batch, kv_heads, head_dim

    @property
    def dtype(self):
        return self.ring_k.dtype

    @property
    def device(self):
        return self.ring_k.device

    @property
    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in (self.sink_k, self.sink_v, self.ring_k, self.ring_v))

    def reset(self):
        """Start a new stream (the storage is kept and overwritten)."""
        self.length = 0

    def check_chunk(self, k, v):
        """k, v: one (B, Hkv, C, D) shape with C >= 1 and (B, Hkv, D) the cache's, in its dtype and device."""
        check_tensor("k", k)
        check_tensor("v", v)
        batch, kv_heads, head_dim = self.shape
        for name, t in (("k", k), ("v", v)):
            if t.dim() != 4 or (t.shape[0], t.shape[1], t.shape[3]) != (batch, kv_heads, head_dim) or t.shape[2] < 1:
                raise ValueError(f"{name} must have shape ({batch}, {kv_heads}, C >= 1, {head_dim}) (the cache's "
                                 f"batch, kv_heads and head_dim), got {tuple(t.shape)}")
            if t.dtype != self.dtype or t.device != self.device:
                raise TypeError(f"{name} has dtype {t.dtype} on {t.device} but the cache holds {self.dtype} on "
                                f"{self.device}")
        if k.shape != v.shape:
            raise ValueError(f"k and v must have one shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")

    def append(self, k, v):
        """Store a chunk k/v (B, Hkv, C, D) at positions length .. length + C - 1, in place (no host sync).
        Checked first (`check_chunk`): a bad chunk leaves the cache as it was."""
        self.check_chunk(k, v)
        self._store(k, v)

    def _store(self, k, v):
        """`append` without the checks, for chunks already checked."""
        chunk = k.shape[2]
        to_sinks = max(0, min(self.sinks - self.length, chunk))  # the chunk's first tokens may still be sinks
        if to_sinks:
            self.sink_k[:, :, self.length:self.length + to_sinks] = k[:, :, :to_sinks]
            self.sink_v[:, :, self.length:self.length + to_sinks] = v[:, :, :to_sinks]
        ring_first = max(to_sinks, chunk - self.window)  # older tokens of a long chunk would be overwritten anyway
        if chunk == 1 and ring_first == 0 and not torch.compiler.is_compiling():
            # one token for the ring (decode): a slice copy, no index tensor (under torch.compile the index_copy_
            # below keeps one graph for every position: a slot computed from the position specialises on it)
            slot = (self.length - self.sinks) % self.window
            self.ring_k.select(2, slot).copy_(k.select(2, 0))
            self.ring_v.select(2, slot).copy_(v.select(2, 0))
        elif ring_first < chunk:
            positions = torch.arange(self.length + ring_first, self.length + chunk, device=k.device)
            slots = (positions - self.sinks) % self.window
            self.ring_k.index_copy_(2, slots, k[:, :, ring_first:])
            self.ring_v.index_copy_(2, slots, v[:, :, ring_first:])
        self.length += chunk


def streaming_attention(q, k, v, cache, *, scale=None, backend="auto"):
    """Attend a chunk of queries to the stream so far and the chunk itself, then append the chunk to the cache.

    Args:
        q: (B, H, C, D) queries at positions cache.length .. cache.length + C - 1 (any C >= 1).
        k, v: (B, Hkv, C, D) the chunk's keys and values, in the cache's dtype and device.
        cache: a StreamingKVCache; it advances by C.
        scale: multiplies q.k; default D ** -0.5.
        backend: "auto" | "triton" | "cpu" | "reference".

    Returns:
        o (B, H, C, D) in q's dtype: what `hybrid_attention(q, k, v, window=cache.window,
        landmarks=torch.arange(cache.sinks), global_queries=False)` gives these rows over the whole sequence.

    Inference only: inputs that require grad are refused (train with `hybrid_attention`). Memory: the output, plus
    the CPU path's temporaries: for chunks of up to 16 tokens (the C++ decode kernel) (G * C, <= 1024) float32 scores
    per tile of keys, else (B, H, 128, window) float32; never a C x (sinks + window + C) matrix except "reference".
    """
    check_tensor("q", q)
    if not isinstance(cache, StreamingKVCache):
        raise TypeError(f"cache must be a StreamingKVCache, got {type(cache).__name__}")
    backend = resolve_backend(backend, q.device)
    check_attention_inputs(q, k, v, REFERENCE_DTYPES if backend == "reference" else ATTENTION_DTYPES)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError("streaming_attention is inference only (its cache keeps no graph); use "
                         "hybrid_attention(q, k, v, window, landmarks=torch.arange(sinks), global_queries=False) to "
                         "train, or call it under torch.no_grad()")
    cache.check_chunk(k, v)
    check_interpreter_dtype(backend, q)
    scale = check_scale(scale, q.shape[-1])
    state = (cache.sink_k, cache.sink_v, cache.ring_k, cache.ring_v, cache.length, cache.sinks, cache.window, scale)
    if backend == "reference":
        out = streaming_attention_reference(q, k, v, *state)
    elif backend == "cpu" and not torch.compiler.is_compiling():
        # what the op runs, without its dispatch, and the C++ decode kernel stores the chunk in the same call
        out, stored = streaming_attention_cpu_storing(q, k, v, *state)
        if stored:
            cache.length += k.shape[2]
            return out
    else:
        out = streaming_attention_op(q, k, v, *state, backend)
    cache._store(k, v)  # outside the op, which is functional: torch.compile sees the in-place copies
    return out
