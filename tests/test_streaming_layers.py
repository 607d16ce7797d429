"""StreamingAttention and stream_chunks: the layer fed chunk by chunk equals HybridAttention (sinks as landmarks,
global_queries=False) over the whole sequence; rope_positions="cache" equals StreamingLLM written out by hand; the
cache stays the same size; bad input is refused."""
import random

import pytest
import torch
import torch.nn.functional as F

from hybridrag import StreamingKVCache
from hybridrag.nn import HybridAttention, StreamingAttention, stream_chunks

BACKEND = "cpu"  # the blockwise PyTorch path; the Triton streaming kernel has its own tests
ATOL = RTOL = 2e-5


class SinkHybridAttention(HybridAttention):
    """HybridAttention with landmarks at positions arange(sinks): what a StreamingAttention is trained as."""

    def __init__(self, *args, sinks, **kwargs):
        super().__init__(*args, global_queries=False, **kwargs)
        self.sinks = sinks

    def landmarks_for(self, length, device=None):
        return torch.arange(min(self.sinks, length), device=device) if self.sinks else None


def make_pair(seed=0, sinks=4, window=6, **kwargs):
    """A trained-looking SinkHybridAttention and a StreamingAttention loaded with its state_dict."""
    config = {"hidden_size": 64, "num_heads": 4, "num_kv_heads": 2, "window": window, "backend": BACKEND}
    config.update(kwargs)
    torch.manual_seed(seed)
    hybrid = SinkHybridAttention(sinks=sinks, **config)
    stream = StreamingAttention(sinks=sinks, **config)
    stream.load_state_dict(hybrid.state_dict())  # strict: the same parameter names
    return hybrid, stream


def random_chunks(total, window, seed):
    """Chunk sizes summing to total, with 1s, sizes around the window and sizes past it."""
    rng = random.Random(seed)
    sizes = []
    while sum(sizes) < total:
        sizes.append(rng.choice([1, 1, 2, window - 1, window, window + 1, 2 * window + 3, 3 * window]))
    sizes[-1] -= sum(sizes) - total
    return [size for size in sizes if size > 0]


def run_stream(layer, x, sizes, cache=None):
    cache = layer.new_cache(x.shape[0]) if cache is None else cache
    outs, begin = [], 0
    with torch.no_grad():
        for size in sizes:
            outs.append(layer(x[:, begin:begin + size], cache))
            begin += size
    assert cache.length == x.shape[1]
    return torch.cat(outs, dim=1)


# ----------------------------------------------------------------------------------------------------------------
# equivalence with HybridAttention (rope_positions="absolute")


@pytest.mark.parametrize("sinks", [0, 4])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("bias", [False, True])
def test_stream_equals_hybrid_over_whole_sequence(sinks, num_heads, num_kv_heads, bias):
    seed = sinks + num_kv_heads + 10 * bias  # a different chunking per case
    hybrid, stream = make_pair(seed, sinks=sinks, window=6, num_heads=num_heads, num_kv_heads=num_kv_heads, bias=bias)
    x = torch.randn(2, 45, 64)
    with torch.no_grad():
        expected = hybrid(x)
    sizes = random_chunks(45, 6, seed)
    torch.testing.assert_close(run_stream(stream, x, sizes), expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("chunk", [1, 3, 7, 20, 45])
def test_fixed_chunk_sizes_and_head_dim(chunk):
    """head_dim 40 (not a power of two), chunks from one token to the whole sequence."""
    hybrid, stream = make_pair(3, sinks=2, window=5, hidden_size=80, num_heads=2, num_kv_heads=1)
    x = torch.randn(1, 45, 80)
    with torch.no_grad():
        expected = hybrid(x)
    sizes = [chunk] * (45 // chunk) + ([45 % chunk] if 45 % chunk else [])
    torch.testing.assert_close(run_stream(stream, x, sizes), expected, atol=ATOL, rtol=RTOL)


def test_without_rope_and_auto_backend():
    hybrid, stream = make_pair(4, sinks=3, window=4, rope=False)
    stream.backend = "auto"
    x = torch.randn(2, 30, 64)
    with torch.no_grad():
        expected = hybrid(x)
    torch.testing.assert_close(run_stream(stream, x, random_chunks(30, 4, 4)), expected, atol=ATOL, rtol=RTOL)


def test_long_stream_constant_cache_memory():
    """5,000 tokens through a 16-token window: the cache keeps its size and its storage, and the outputs still equal
    HybridAttention over the whole sequence."""
    hybrid, stream = make_pair(5, sinks=4, window=16, hidden_size=32, num_heads=2, num_kv_heads=1)
    x = torch.randn(1, 5000, 32)
    cache = stream.new_cache(1)
    nbytes = cache.nbytes
    assert nbytes == 2 * 1 * 1 * (4 + 16) * 16 * 4
    pointers = [t.data_ptr() for t in (cache.sink_k, cache.sink_v, cache.ring_k, cache.ring_v)]
    sizes = [1, 3, 16, 17, 200, 479, 33] * 6  # 749 per round: the ring wraps often and at every offset
    sizes.append(5000 - sum(sizes))
    out = run_stream(stream, x, sizes, cache=cache)
    assert cache.nbytes == nbytes
    assert [t.data_ptr() for t in (cache.sink_k, cache.sink_v, cache.ring_k, cache.ring_v)] == pointers
    with torch.no_grad():
        expected = hybrid(x)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)


def test_reset_starts_a_new_stream():
    _, stream = make_pair(6)
    x = torch.randn(2, 20, 64)
    cache = stream.new_cache(2)
    first = run_stream(stream, x, [7, 13], cache=cache)
    cache.reset()
    torch.testing.assert_close(run_stream(stream, x, [20], cache=cache), first, atol=ATOL, rtol=RTOL)


def test_new_cache_matches_layer():
    _, stream = make_pair(0, sinks=3, window=5, dtype=torch.float64)
    cache = stream.new_cache(3)
    assert isinstance(cache, StreamingKVCache)
    assert cache.shape == (3, 2, 16) and (cache.window, cache.sinks) == (5, 3)
    assert cache.dtype == torch.float64 and cache.length == 0
    assert stream.new_cache(1, dtype=torch.float32).dtype == torch.float32


# ----------------------------------------------------------------------------------------------------------------
# rope_positions="cache" against StreamingLLM written out by hand


def naive_rope(x, positions, base):
    """x (..., n, D), positions (n,) -> rotate-half RoPE in float64."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    emb = positions.to(torch.float64)[:, None] * inv_freq
    emb = torch.cat((emb, emb), dim=-1)
    return x * emb.cos() + torch.cat((-x[..., dim // 2:], x[..., :dim // 2]), dim=-1) * emb.sin()


def naive_streaming_llm(layer, x):
    """Query p sees the sinks 0..S-1 and the window p-W+1..p; the keys it sees are RoPE'd at their rank among them
    (0, 1, ...), the query at the last rank. float64, one query at a time."""
    def proj(linear, heads):
        bias = None if linear.bias is None else linear.bias.double()
        y = F.linear(x.double(), linear.weight.double(), bias)
        return y.view(x.shape[0], x.shape[1], heads, layer.head_dim).transpose(1, 2)

    q, k, v = proj(layer.q_proj, layer.num_heads), proj(layer.k_proj, layer.num_kv_heads), proj(
        layer.v_proj, layer.num_kv_heads)
    group = layer.num_heads // layer.num_kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    outs = []
    for p in range(x.shape[1]):
        seen = torch.tensor(sorted({j for j in range(p + 1) if j < layer.sinks or j > p - layer.window}))
        ranks = torch.arange(len(seen))
        q_p = naive_rope(q[:, :, p:p + 1], ranks[-1:], layer.rotary.base)
        k_p = naive_rope(k[:, :, seen], ranks, layer.rotary.base)
        weights = torch.softmax(q_p @ k_p.transpose(-1, -2) * layer.head_dim ** -0.5, dim=-1)
        outs.append(weights @ v[:, :, seen])
    o = torch.cat(outs, dim=2).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
    bias = None if layer.o_proj.bias is None else layer.o_proj.bias.double()
    return F.linear(o, layer.o_proj.weight.double(), bias)


@pytest.mark.parametrize("sinks,window,seed", [(4, 5, 0), (1, 1, 1), (3, 8, 2)])
def test_cache_positions_equal_streaming_llm(sinks, window, seed):
    torch.manual_seed(seed)
    layer = StreamingAttention(64, 4, num_kv_heads=2, window=window, sinks=sinks, rope_positions="cache", bias=True,
                               rope_base=100.0, backend=BACKEND)
    x = torch.randn(2, 40, 64)
    out = run_stream(layer, x, random_chunks(40, window, seed))
    torch.testing.assert_close(out, naive_streaming_llm(layer, x).float(), atol=ATOL, rtol=RTOL)


def test_cache_positions_differ_from_absolute_only_once_the_cache_is_full():
    _, absolute = make_pair(7, sinks=3, window=5)
    cache_mode = StreamingAttention(64, 4, num_kv_heads=2, window=5, sinks=3, rope_positions="cache", backend=BACKEND)
    cache_mode.load_state_dict(absolute.state_dict())
    x = torch.randn(1, 20, 64)
    a, c = run_stream(absolute, x, [20]), run_stream(cache_mode, x, [4, 1, 15])
    full = 3 + 5 - 1
    torch.testing.assert_close(c[:, :full + 1], a[:, :full + 1], atol=ATOL, rtol=RTOL)
    assert (c[:, full + 1:] - a[:, full + 1:]).abs().amax() > 1e-3


def test_cache_positions_without_sinks_is_absolute():
    _, absolute = make_pair(8, sinks=0, window=4)
    cache_mode = StreamingAttention(64, 4, num_kv_heads=2, window=4, sinks=0, rope_positions="cache", backend=BACKEND)
    cache_mode.load_state_dict(absolute.state_dict())
    x = torch.randn(2, 25, 64)
    torch.testing.assert_close(run_stream(cache_mode, x, [25]), run_stream(absolute, x, [3, 22]), atol=ATOL,
                               rtol=RTOL)


# ----------------------------------------------------------------------------------------------------------------
# stream_chunks


@pytest.mark.parametrize("chunk_size", [1, 13, 100])
def test_stream_chunks_equals_one_shot(chunk_size):
    _, stream = make_pair(9, sinks=2, window=6)
    x = torch.randn(2, 37, 64)
    expected = run_stream(stream, x, [37])
    out = stream_chunks(stream, x, chunk_size)  # parameters require grad: stream_chunks turns autograd off
    assert out.shape == (2, 37, 64) and not out.requires_grad
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
    pieces = stream_chunks(stream, x, chunk_size, yield_chunks=True)
    first = next(pieces)
    assert torch.is_grad_enabled()  # the generator does not leave grad mode off between chunks
    assert first.shape == (2, min(chunk_size, 37), 64)
    torch.testing.assert_close(torch.cat([first, *pieces], dim=1), expected, atol=ATOL, rtol=RTOL)


def test_stream_chunks_continues_a_cache_and_takes_any_callable():
    """A stack of two layers as a plain function with a list of caches; a given cache is continued."""
    _, first = make_pair(10, sinks=2, window=5)
    _, second = make_pair(11, sinks=1, window=3)

    def stack(chunk, caches):
        return second(first(chunk, caches[0]), caches[1])

    x = torch.randn(1, 30, 64)
    expected = run_stream(second, run_stream(first, x, [30]), [30])
    caches = [first.new_cache(1), second.new_cache(1)]
    head = stream_chunks(stack, x[:, :11], 4, caches)
    tail = stream_chunks(stack, x[:, 11:], 6, caches)
    assert caches[0].length == caches[1].length == 30
    torch.testing.assert_close(torch.cat([head, tail], dim=1), expected, atol=ATOL, rtol=RTOL)


# ----------------------------------------------------------------------------------------------------------------
# refused input


def test_refuses_autograd():
    _, stream = make_pair(12)
    cache = stream.new_cache(1)
    with pytest.raises(ValueError, match="inference only"):
        stream(torch.randn(1, 3, 64), cache)
    assert cache.length == 0  # nothing appended
    with pytest.raises(ValueError, match="requires grad"):
        stream_chunks(stream, torch.randn(1, 3, 64, requires_grad=True), 2)
    stream.requires_grad_(False)
    with pytest.raises(ValueError, match="inference only"):
        stream(torch.randn(1, 3, 64, requires_grad=True), cache)
    stream(torch.randn(1, 3, 64), cache)  # frozen weights, plain input: fine without no_grad
    assert cache.length == 3


@pytest.mark.parametrize("kwargs,error,match", [
    ({"window": 0}, ValueError, "window must be positive"),
    ({"window": (3, 0)}, TypeError, "window must be an int"),
    ({"window": 4, "sinks": -1}, ValueError, "sinks must be >= 0"),
    ({"window": 4, "sinks": 1.0}, TypeError, "sinks must be an int"),
    ({"window": 4, "rope_positions": "relative"}, ValueError, "rope_positions must be one of"),
    ({"window": 4, "rope_positions": "cache", "rope": False}, ValueError, "needs rope=True"),
    ({"window": 4, "backend": "cuda"}, ValueError, "backend must be one of"),
    ({"window": 4, "num_kv_heads": 3}, ValueError, "num_kv_heads"),
])
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        StreamingAttention(64, 4, **kwargs)


def test_bad_forward_arguments():
    _, stream = make_pair(13, sinks=2, window=4)
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        with pytest.raises(TypeError, match="cache must be a StreamingKVCache"):
            stream(x, None)
        with pytest.raises(ValueError, match=r"cache holds \(batch, kv_heads, head_dim\)"):
            stream(x, stream.new_cache(1))
        with pytest.raises(ValueError, match="cache has window=5, sinks=2"):
            stream(x, StreamingKVCache(2, 2, 16, 5, sinks=2))
        with pytest.raises(ValueError, match=r"hidden_states must be \(B, T, 64\)"):
            stream(torch.randn(2, 3, 32), stream.new_cache(2))


def test_bad_stream_chunks_arguments():
    _, stream = make_pair(14)
    x = torch.randn(1, 5, 64)
    with pytest.raises(ValueError, match="chunk_size must be positive"):
        stream_chunks(stream, x, 0)
    with pytest.raises(TypeError, match="chunk_size must be an int"):
        stream_chunks(stream, x, 2.0)
    with pytest.raises(TypeError, match="yield_chunks must be a bool"):
        stream_chunks(stream, x, 2, yield_chunks=1)
    with pytest.raises(ValueError, match=r"hidden_states must be \(B, T, hidden\)"):
        stream_chunks(stream, x[0], 2)
    with pytest.raises(TypeError, match="has none, so pass the cache"):
        stream_chunks(lambda chunk, cache: chunk, x, 2)
    with pytest.raises(TypeError, match="layer must be callable"):
        stream_chunks("layer", x, 2)
