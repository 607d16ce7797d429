"""Drop-in streaming self-attention layer: attention sinks and a sliding window over an endless stream, one chunk at a
time, in constant memory (`hr.streaming_attention` on a `hr.StreamingKVCache`); and `stream_chunks`, which runs such a
layer over a long input."""
import torch
from torch import nn

from ..ops.streaming import StreamingKVCache, streaming_attention
from .common import (_check_backend, _check_flag, _check_hidden_states, _check_non_negative_int, _check_positive_int,
                     _head_layout, _merge_heads, _qkvo_projections, _split_heads)
from .rotary import RotaryEmbedding

ROPE_POSITIONS = ("absolute", "cache")


class StreamingAttention(nn.Module):
    """Multi-head (or grouped-query) causal self-attention over `sinks` attention-sink tokens (the first tokens of the
    stream, kept for good) and a sliding window of the `window` most recent tokens (the token itself included), fed
    one chunk at a time through a `StreamingKVCache` (StreamingLLM, Xiao et al. 2023). Inference only.

    The weights are those of `HybridAttention` (q_proj, k_proj, v_proj, o_proj; rotary has no persistent state), so
    the state_dict of a trained `HybridAttention(window=W, global_queries=False)` whose landmarks are the positions
    arange(sinks), with no memory tokens, loads here; with rope_positions="absolute" the stream then gives the same
    outputs as that layer over the whole sequence, whatever the chunk sizes.

    Args:
        hidden_size, num_heads, num_kv_heads, head_dim, bias: as in `HybridAttention` (head_dim 16..256).
        window: an int w >= 1: a token sees the w most recent tokens, itself included (the int meaning of
            `hr.sliding_window_attention`'s window with causal=True).
        sinks: S >= 0 attention sinks: every token also sees the first S tokens of the stream.
        rope, rope_base: rotate-half rotary embeddings on q and k, base `rope_theta`.
        rope_positions: where RoPE puts the tokens.
            "absolute": the position in the stream, cache.length + i for the chunk's i-th token (what
                `HybridAttention` does with the default position_ids).
            "cache": the position within what the token sees, as in StreamingLLM: the keys a query at stream position
                p sees are numbered 0, 1, ... in stream order (sinks first), the query itself last, at
                c = min(p, sinks + window - 1). Only the query-key distance enters RoPE attention, so this is exact
                with the keys cached rotated at their absolute positions: window keys keep their distance p - j; only
                the sinks move, to distance c - i. Before the cache is full (p <= sinks + window - 1) both modes are
                the same, and so they are with sinks=0. Past that, each query needs its sinks rotated by its own
                offset p - c, so the layer attends one token at a time there (one op call per token, the sink keys
                re-rotated from the cached ones into a (B, Hkv, sinks, D) temporary), which makes long chunks slower
                than "absolute"; decoding (chunks of 1) costs about the same. Needs rope=True.
                Numerics: the angles are still computed from absolute positions in float32 (as in "absolute"), so the
                same float32 angle rounding applies to very long streams (p beyond ~1e6).
        backend: passed to the op: "auto" | "triton" | "cpu" | "reference".
        device, dtype: for the weights.

    Shapes:
        forward(hidden_states (B, C, hidden_size), cache) -> (B, C, hidden_size): the chunk's C tokens sit at stream
        positions cache.length .. cache.length + C - 1; the cache advances by C. `new_cache(B)` builds the cache.
        Refuses to run where autograd would record it (train `HybridAttention`; run this under torch.no_grad() or
        torch.inference_mode(), or through `stream_chunks`, which does).

    Memory: the cache is 2 x B x Hkv x (sinks + window) x D elements whatever the stream's length (`cache.nbytes`);
    a call holds the chunk's activations, O(B x C x hidden_size), and the op's temporaries (see
    `hr.streaming_attention`).
    """

    def __init__(self, hidden_size, num_heads, *, num_kv_heads=None, head_dim=None, window, sinks=4, rope=True,
                 rope_base=10000.0, rope_positions="absolute", bias=False, backend="auto", device=None, dtype=None):
        super().__init__()
        num_kv_heads, head_dim = _head_layout(hidden_size, num_heads, num_kv_heads, head_dim, rope=rope)
        _check_positive_int("window", window)
        _check_non_negative_int("sinks", sinks)
        _check_flag("bias", bias)
        if rope_positions not in ROPE_POSITIONS:
            raise ValueError(f"rope_positions must be one of {ROPE_POSITIONS}, got {rope_positions!r}")
        if rope_positions == "cache" and not rope:
            raise ValueError("rope_positions='cache' needs rope=True (without RoPE there are no positions)")
        _check_backend(backend)
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.window = window
        self.sinks = sinks
        self.rope_positions = rope_positions
        self.backend = backend

        self.q_proj, self.k_proj, self.v_proj, self.o_proj = _qkvo_projections(
            hidden_size, num_heads, num_kv_heads, head_dim, bias=bias, device=device, dtype=dtype)
        self.rotary = RotaryEmbedding(head_dim, base=rope_base, device=device) if rope else None

    def extra_repr(self):
        return (f"hidden_size={self.hidden_size}, window={self.window}, sinks={self.sinks}, "
                f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"rope_positions={self.rope_positions!r}, backend={self.backend!r}")

    def new_cache(self, batch, device=None, dtype=None):
        """An empty `StreamingKVCache` for this layer: (batch, num_kv_heads, head_dim), window and sinks; device and
        dtype default to the k_proj weight's (the dtype the cached keys will have)."""
        weight = self.k_proj.weight
        return StreamingKVCache(batch, self.num_kv_heads, self.head_dim, self.window, sinks=self.sinks,
                                dtype=weight.dtype if dtype is None else dtype,
                                device=weight.device if device is None else device)

    def _check_cache(self, cache, batch):
        if not isinstance(cache, StreamingKVCache):
            raise TypeError(f"cache must be a StreamingKVCache (see new_cache), got {type(cache).__name__}")
        expected = (batch, self.num_kv_heads, self.head_dim)
        if tuple(cache.shape) != expected:
            raise ValueError(f"cache holds (batch, kv_heads, head_dim) {tuple(cache.shape)}, expected {expected}")
        if (cache.window, cache.sinks) != (self.window, self.sinks):
            raise ValueError(f"cache has window={cache.window}, sinks={cache.sinks} but the layer has "
                             f"window={self.window}, sinks={self.sinks}")

    def forward(self, hidden_states, cache):
        _check_hidden_states(hidden_states, self.hidden_size)
        self._check_cache(cache, hidden_states.shape[0])
        if torch.is_grad_enabled() and (hidden_states.requires_grad or
                                        any(p.requires_grad for p in self.parameters())):
            raise ValueError("StreamingAttention is inference only (its cache keeps no graph): call it under "
                             "torch.no_grad() or torch.inference_mode(), or use hybridrag.nn.stream_chunks; to train, "
                             "use HybridAttention(window, global_queries=False) with landmarks arange(sinks) and "
                             "load its state_dict here")
        chunk, start = hidden_states.shape[1], cache.length
        q = _split_heads(self.q_proj(hidden_states), self.num_heads, self.head_dim)
        k = _split_heads(self.k_proj(hidden_states), self.num_kv_heads, self.head_dim)
        v = _split_heads(self.v_proj(hidden_states), self.num_kv_heads, self.head_dim)
        if self.rotary is not None:
            positions = torch.arange(start, start + chunk, device=hidden_states.device)
            q, k = self.rotary(q, k, positions)
        if self.rope_positions == "cache" and self.sinks:
            o = self._attend_cache_positions(q, k, v, cache, start)
        else:
            o = streaming_attention(q, k, v, cache, backend=self.backend)
        return self.o_proj(_merge_heads(o))

    def _attend_cache_positions(self, q, k, v, cache, start):
        """rope_positions="cache": queries up to position sinks + window - 1 see the same as "absolute" (one call);
        each later query p sees the sinks at distance sinks + window - 1 - i, i.e. the cached sink keys (rotated at
        i) rotated on by p - (sinks + window - 1), one call per token."""
        full = self.sinks + self.window - 1  # the first position whose cache is full; its offset is 0
        chunk = q.shape[2]
        shared = max(0, min(chunk, full + 1 - start))  # queries at p <= full
        outs = []
        if shared:
            outs.append(streaming_attention(q[:, :, :shared], k[:, :, :shared], v[:, :, :shared], cache,
                                            backend=self.backend))
        stored = cache.sink_k
        for i in range(shared, chunk):
            offset = torch.tensor([start + i - full], device=q.device)
            cos, sin = self.rotary.cos_sin(offset, device=q.device)  # (1, D) float32
            # Positions >= sinks never write the sink slots, so the op reads the temporary and appends to the ring.
            cache.sink_k = RotaryEmbedding._rotate(stored, cos, sin)
            try:
                outs.append(streaming_attention(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], cache,
                                                backend=self.backend))
            finally:
                cache.sink_k = stored
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _stream(layer, hidden_states, chunk_size, cache):
    for begin in range(0, hidden_states.shape[1], chunk_size):
        with torch.no_grad():  # only around the call: a generator must not leave grad off for its consumer
            out = layer(hidden_states[:, begin:begin + chunk_size], cache)
        yield out


def stream_chunks(layer, hidden_states, chunk_size, cache=None, *, yield_chunks=False):
    """Run a streaming layer over a long input chunk by chunk, without autograd.

    Args:
        layer: a `StreamingAttention`, or any callable `layer(chunk (B, C, hidden), cache) -> (B, C, out)` that keeps
            its state in `cache` (a stack of layers can take a list of caches).
        hidden_states: (B, T, hidden) with T >= 1; fed in chunks of chunk_size tokens (the last may be shorter).
            Must not require grad while grad mode is on (the outputs would carry no graph).
        chunk_size: tokens per call, an int >= 1.
        cache: the state to continue from (it advances by T); None makes a fresh one with `layer.new_cache(B)`.
        yield_chunks: False returns the outputs concatenated, (B, T, out); True returns a generator of the chunks'
            outputs (B, C, out) in order, each computed when asked for (arguments are checked at once).

    Memory: the cache is constant (`cache.nbytes`); each call holds one chunk's activations. With yield_chunks=False
    the result (B, T, out) is kept whole (plus the list of chunk outputs until they are concatenated, so about twice
    it at the end); with yield_chunks=True nothing grows with T beyond what the consumer keeps.
    """
    if not callable(layer):
        raise TypeError(f"layer must be callable as layer(chunk, cache), got {type(layer).__name__}")
    if not isinstance(hidden_states, torch.Tensor):
        raise TypeError(f"hidden_states must be a tensor, got {type(hidden_states).__name__}")
    if hidden_states.dim() != 3 or hidden_states.shape[1] == 0:
        raise ValueError(f"hidden_states must be (B, T, hidden) with T >= 1, got shape {tuple(hidden_states.shape)}")
    _check_positive_int("chunk_size", chunk_size)
    _check_flag("yield_chunks", yield_chunks)
    if torch.is_grad_enabled() and hidden_states.requires_grad:
        raise ValueError("stream_chunks runs without autograd, but hidden_states requires grad: detach it, or train "
                         "HybridAttention over the whole sequence instead")
    if cache is None:
        if not hasattr(layer, "new_cache"):
            raise TypeError(f"cache=None needs a layer with new_cache(batch); {type(layer).__name__} has none, so "
                            f"pass the cache")
        cache = layer.new_cache(hidden_states.shape[0])
    chunks = _stream(layer, hidden_states, chunk_size, cache)
    if yield_chunks:
        return chunks
    return torch.cat(list(chunks), dim=1)
