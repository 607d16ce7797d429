"""StreamingKVCache and streaming_attention on the CPU backend (both implementations: the C++ decode kernel takes
chunks of up to 16 tokens) and the reference: any chunk schedule gives what
hybrid_attention gives over the whole sequence (window = the cache's, landmarks = the sinks, global_queries=False),
in constant memory; bad input refused."""
import pytest
import torch
from tolerance import tolerance_error

import hybridrag as hr


def one_shot(q, k, v, window, sinks):
    landmarks = torch.arange(min(sinks, k.shape[2])) if sinks else None
    return hr.hybrid_attention(q, k, v, window, landmarks=landmarks, global_queries=False, backend="reference")


def streamed(q, k, v, window, sinks, schedule, backend, dtype):
    cache = hr.StreamingKVCache(q.shape[0], k.shape[1], q.shape[3], window, sinks=sinks, dtype=dtype)
    outs, start = [], 0
    for size in schedule:
        rows = slice(start, start + size)
        outs.append(hr.streaming_attention(q[:, :, rows].to(dtype), k[:, :, rows].to(dtype), v[:, :, rows].to(dtype),
                                           cache, backend=backend))
        start += size
    assert cache.length == start
    return torch.cat(outs, dim=2)


def schedule_for(total, seed, largest):
    generator = torch.Generator().manual_seed(seed)
    sizes, left = [], total
    while left:
        size = min(int(torch.randint(1, largest + 1, (1,), generator=generator)), left)
        sizes.append(size)
        left -= size
    return sizes


# (B, H, Hkv, T, D, window, sinks, largest chunk)
CASES = [
    (2, 4, 2, 60, 40, 8, 4, 12),
    (1, 2, 1, 150, 64, 16, 2, 40),    # chunks larger than the window, many wrap-arounds
    (1, 4, 1, 40, 100, 1, 1, 5),      # a window of one key: only itself and the sink
    (2, 2, 2, 45, 16, 5, 0, 7),       # no sinks
    (1, 2, 2, 30, 64, 3, 4, 30),      # more sinks than the window
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}kv{}T{}D{}w{}s{}c{}".format(*c))
def test_any_schedule_matches_one_shot(case, dtype, cpu_kernels):
    batch, heads, kv_heads, total, dim, window, sinks, largest = case
    q = torch.randn(batch, heads, total, dim, dtype=torch.float64)
    k, v = (torch.randn(batch, kv_heads, total, dim, dtype=torch.float64) for _ in range(2))
    truth = one_shot(q, k, v, window, sinks)
    for seed in range(2):
        schedule = schedule_for(total, seed, largest)
        baseline = streamed(q, k, v, window, sinks, schedule, "reference", dtype)
        got = streamed(q, k, v, window, sinks, schedule, "cpu", dtype)
        assert got.dtype == dtype
        error = tolerance_error("o", got, truth, baseline, dtype)
        assert error is None, f"schedule {schedule}: {error}"


def test_decode_after_prefill_and_reset(cpu_kernels):
    q = torch.randn(1, 4, 70, 32, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 70, 32, dtype=torch.float64) for _ in range(2))
    truth = one_shot(q, k, v, 16, 4)
    schedule = [50] + [1] * 20
    got = streamed(q, k, v, 16, 4, schedule, "cpu", torch.float32)
    torch.testing.assert_close(got.double(), truth, atol=2e-6, rtol=0)
    cache = hr.StreamingKVCache(1, 2, 32, 16, sinks=4)
    hr.streaming_attention(q[:, :, :10].float(), k[:, :, :10].float(), v[:, :, :10].float(), cache)
    cache.reset()
    again = hr.streaming_attention(q[:, :, :10].float(), k[:, :, :10].float(), v[:, :, :10].float(), cache)
    torch.testing.assert_close(again.double(), truth[:, :, :10], atol=2e-6, rtol=0)


def test_tolerance_rule_can_fail():
    """A cache one key narrower than the one-shot window gives an answer the rule rejects."""
    q = torch.randn(1, 2, 40, 32, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 40, 32, dtype=torch.float64) for _ in range(2))
    truth = one_shot(q, k, v, 8, 2)
    baseline = streamed(q, k, v, 8, 2, [10] * 4, "reference", torch.float32)
    wrong = streamed(q, k, v, 7, 2, [10] * 4, "cpu", torch.float32)
    assert tolerance_error("o", wrong, truth, baseline, torch.float32) is not None


def test_memory_is_constant_over_a_long_stream():
    cache = hr.StreamingKVCache(1, 2, 16, 32, sinks=4)
    before = cache.nbytes
    assert before == 2 * 1 * 2 * (4 + 32) * 16 * 4
    storage = [t.data_ptr() for t in (cache.sink_k, cache.ring_k)]
    for _ in range(200):
        chunk = torch.randn(1, 2, 25, 16)
        hr.streaming_attention(torch.randn(1, 4, 25, 16), chunk, chunk, cache)
    assert cache.length == 5000 and cache.nbytes == before
    assert [t.data_ptr() for t in (cache.sink_k, cache.ring_k)] == storage  # written in place, never reallocated


def test_requires_grad_is_refused():
    cache = hr.StreamingKVCache(1, 2, 16, 8)
    q = torch.randn(1, 2, 4, 16, requires_grad=True)
    k = torch.randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match="inference only.*hybrid_attention"):
        hr.streaming_attention(q, k, k, cache)
    assert cache.length == 0
    with torch.no_grad():
        hr.streaming_attention(q, k, k, cache)
    assert cache.length == 4


@pytest.mark.parametrize("make, error, match", [
    (lambda: dict(args=(1, 2, 16, 0)), ValueError, "window must be >= 1"),
    (lambda: dict(args=(1, 2, 16, 8), sinks=-1), ValueError, "sinks must be >= 0"),
    (lambda: dict(args=(1, 2, 16, 8.0)), TypeError, "window must be an int"),
    (lambda: dict(args=(1, 2, 16, 8), dtype=torch.int32), TypeError, "dtype must be one of"),
])
def test_cache_bad_arguments(make, error, match):
    kwargs = make()
    with pytest.raises(error, match=match):
        hr.StreamingKVCache(*kwargs.pop("args"), **kwargs)


@pytest.mark.parametrize("make, error, match", [
    (lambda c: (torch.randn(1, 2, 4, 16), torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 16), c), ValueError,
     "kv_heads"),
    (lambda c: (torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16).half(), torch.randn(1, 2, 4, 16).half(), c),
     TypeError, "dtype"),
    (lambda c: (torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16), "cache"), TypeError,
     "StreamingKVCache"),
    (lambda c: (torch.randn(1, 3, 4, 16), torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16), c), ValueError,
     "does not divide"),
])
def test_attention_bad_input(make, error, match):
    cache = hr.StreamingKVCache(1, 2, 16, 8)
    with pytest.raises(error, match=match):
        hr.streaming_attention(*make(cache))
    assert cache.length == 0
