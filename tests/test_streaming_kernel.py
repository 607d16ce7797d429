"""The streaming Triton kernel (kernels/streaming/triton_kernels.py) against the one-shot hybrid reference in float64,
under the tolerance rule of tests/tolerance.py; the baseline is the streaming reference backend in the input dtype on
the same chunk schedule. Both launch shapes (prefill, split-K decode) are forced through monkeypatch."""
import pytest
import torch
from conftest import DEVICE
from tolerance import assert_within_tolerance

import hybridrag as hr
from hybridrag.kernels.streaming import triton_kernels as tk

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _schedule(total, seed, largest=40):
    """Random chunk sizes 1..largest summing to total."""
    gen = torch.Generator().manual_seed(seed)
    sizes, done = [], 0
    while done < total:
        size = min(int(torch.randint(1, largest + 1, (), generator=gen)), total - done)
        sizes.append(size)
        done += size
    return sizes


def _inputs(batch, heads, kv_heads, dim, length, dtype, layout="bhtd"):
    if layout == "bthd":  # strided views: sequence stride H * D, head stride D
        q = torch.randn(batch, length, heads, dim, dtype=dtype, device=DEVICE).transpose(1, 2)
        k = torch.randn(batch, length, kv_heads, dim, dtype=dtype, device=DEVICE).transpose(1, 2)
        v = torch.randn(batch, length, kv_heads, dim, dtype=dtype, device=DEVICE).transpose(1, 2)
        return q, k, v
    return tuple(torch.randn(batch, h, length, dim, dtype=dtype, device=DEVICE) for h in (heads, kv_heads, kv_heads))


def _stream(q, k, v, window, sinks, sizes, backend, cache_dtype=None, nbytes=None):
    batch, kv_heads, _, dim = k.shape
    cache = hr.StreamingKVCache(batch, kv_heads, dim, window, sinks=sinks, dtype=cache_dtype or k.dtype,
                                device=k.device)
    start, outs, sizes_seen = 0, [], set()
    with torch.no_grad():
        for size in sizes:
            part = slice(start, start + size)
            outs.append(hr.streaming_attention(q[:, :, part], k[:, :, part].to(cache.dtype),
                                               v[:, :, part].to(cache.dtype), cache, backend=backend))
            sizes_seen.add(cache.nbytes)
            start += size
    if nbytes is not None:
        nbytes.extend(sizes_seen)
    assert cache.length == q.shape[2]
    return torch.cat(outs, dim=2)


def _truth(q, k, v, window, sinks):
    landmarks = torch.arange(min(sinks, q.shape[2]), device=q.device) if sinks else None
    return hr.hybrid_attention(q.double(), k.double(), v.double(), window, landmarks=landmarks,
                               global_queries=False, backend="reference")


def _check(q, k, v, window, sinks, sizes, name="o"):
    got = _stream(q, k, v, window, sinks, sizes, "triton")
    assert got.dtype == q.dtype and got.shape == q.shape
    baseline = _stream(q, k, v, window, sinks, sizes, "reference")
    assert_within_tolerance(name, got, _truth(q, k, v, window, sinks), baseline, q.dtype)
    return got


def _force(monkeypatch, path):
    """auto: the heuristic; split / prefill: every call forced onto that launch shape."""
    if path != "auto":
        monkeypatch.setattr(tk, "_use_split", lambda *args: path == "split")


# (batch, heads, kv_heads, dim, length, window, sinks, dtype, seed)
CASES = [
    (1, 4, 2, 40, 120, 5, 3, torch.float32, 0),     # GQA, odd dim, wraps ~20 times
    (2, 4, 1, 100, 60, 16, 4, torch.float16, 1),    # MQA, odd dim
    (1, 2, 2, 16, 70, 1, 0, torch.float32, 2),      # window 1, no sinks: o = v
    (1, 3, 3, 32, 150, 64, 2, torch.float16, 3),    # chunks smaller than the window
    (1, 2, 1, 64, 60, 16, 1, torch.float32, 4),
]
FORCED = [("split", CASES[0]), ("prefill", CASES[0]), ("split", CASES[1]), ("prefill", CASES[1])]


def _case_id(c):
    return f"B{c[0]}H{c[1]}kv{c[2]}D{c[3]}T{c[4]}W{c[5]}S{c[6]}-{str(c[7]).removeprefix('torch.')}"


def _run_case(case):
    batch, heads, kv_heads, dim, length, window, sinks, dtype, seed = case
    q, k, v = _inputs(batch, heads, kv_heads, dim, length, dtype)
    _check(q, k, v, window, sinks, _schedule(length, seed))


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_random_schedules(case):
    _run_case(case)


@pytest.mark.parametrize("path,case", FORCED, ids=lambda x: x if isinstance(x, str) else _case_id(x))
def test_random_schedules_forced_path(path, case, monkeypatch):
    _force(monkeypatch, path)
    _run_case(case)


@pytest.mark.parametrize("path,window,sinks", [("split", 5, 4), ("prefill", 5, 4), ("split", 16, 0), ("auto", 64, 2)])
def test_decode_after_prefill(path, window, sinks, monkeypatch):
    """One big chunk (larger than the window for W < 40), then one token at a time, the ring wrapping."""
    _force(monkeypatch, path)
    steps = min(2 * window + 3, 20)
    q, k, v = _inputs(1, 4, 2, 40, 40 + steps, torch.float32)
    _check(q, k, v, window, sinks, [40] + [1] * steps)


def test_long_stream_constant_memory():
    """T >> W: the ring wraps ~50 times; cache.nbytes never changes."""
    q, k, v = _inputs(1, 2, 1, 16, 300, torch.float16)
    window, sinks = 5, 2
    sizes = _schedule(300, 7, largest=12)
    nbytes = []
    got = _stream(q, k, v, window, sinks, sizes, "triton", nbytes=nbytes)
    assert nbytes == [2 * 1 * 1 * (sinks + window) * 16 * 2]
    baseline = _stream(q, k, v, window, sinks, sizes, "reference")
    assert_within_tolerance("o", got, _truth(q, k, v, window, sinks), baseline, torch.float16)


def test_strided_inputs_and_first_chunk_of_sinks():
    """(B, T, H, D) views transposed to (B, H, T, D); the first chunks hold the sinks (1, 1, then a larger one)."""
    q, k, v = _inputs(1, 4, 2, 48, 64, torch.float32, layout="bthd")
    _check(q, k, v, 8, 4, [1, 1, 20, 3, 1, 39])


def test_triton_matches_cpu_backend():
    q, k, v = _inputs(1, 4, 2, 40, 100, torch.float32)
    sizes = _schedule(100, 11)
    got = _stream(q, k, v, 16, 3, sizes, "triton")
    cpu = _stream(q, k, v, 16, 3, sizes, "cpu")
    torch.testing.assert_close(got, cpu, rtol=1e-5, atol=1e-5)


def test_split_config_monkeypatch_many_splits(monkeypatch):
    """Every key block its own split (more splits than blocks a row can see: empty splits must merge to nothing)."""
    monkeypatch.setattr(tk, "_use_split", lambda *args: True)
    monkeypatch.setattr(tk, "_splits", lambda key_blocks, programs, device: key_blocks)
    q, k, v = _inputs(1, 2, 1, 32, 50, torch.float32)
    _check(q, k, v, 16, 2, [20] + [1] * 10 + [20])


@CUDA
@pytest.mark.parametrize("path", ["auto", "split", "prefill"])
def test_bfloat16_gpu(path, monkeypatch):
    _force(monkeypatch, path)
    q, k, v = _inputs(2, 8, 2, 128, 600, torch.bfloat16)
    _check(q, k, v, 100, 4, _schedule(600, 5, largest=150))


@CUDA
def test_long_window_decode_gpu():
    """A 32k window: prefill 33k tokens (the ring wraps), then decode steps on the split-K path."""
    window, sinks, prefill, steps = 32768, 4, 33000, 8
    length = prefill + steps
    q, k, v = _inputs(1, 8, 2, 128, length, torch.float16)
    cache = hr.StreamingKVCache(1, 2, 128, window, sinks=sinks, dtype=torch.float16, device=DEVICE)
    with torch.no_grad():
        for start in range(0, prefill, 4096):
            end = min(start + 4096, prefill)
            hr.streaming_attention(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], cache, backend="triton")
        got = [hr.streaming_attention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], cache, backend="triton")
               for t in range(prefill, length)]
    got = torch.cat(got, dim=2)
    assert tk._use_split(1, 4, sinks + window + 1, q.device)
    rows = slice(prefill, length)
    # truth (float64) and baseline (PyTorch in float16) over the keys these rows see: no T x T matrix
    first = length - steps - window + 1
    keys = torch.cat([k[:, :, :sinks], k[:, :, first:]], dim=2).repeat_interleave(4, 1)
    values = torch.cat([v[:, :, :sinks], v[:, :, first:]], dim=2).repeat_interleave(4, 1)
    pos = torch.cat([torch.arange(sinks), torch.arange(first, length)]).to(DEVICE)
    qpos = torch.arange(prefill, length, device=DEVICE)
    hidden = ~((pos[None] <= qpos[:, None]) & ((pos[None] < sinks) | (pos[None] > qpos[:, None] - window)))

    def attend(dtype):
        scores = (q[:, :, rows].to(dtype) @ keys.to(dtype).transpose(-1, -2)) * 128 ** -0.5
        probs = torch.softmax(scores.masked_fill(hidden, float("-inf")).to(torch.promote_types(dtype, torch.float32)),
                              -1).to(dtype)
        return probs @ values.to(dtype)

    assert_within_tolerance("o", got, attend(torch.float64), attend(torch.float16), torch.float16)
