"""Inputs a fault probe found coerced, wrapped or crashing in the attention ops: each is now refused with a named error,
or means exactly what it says on every backend."""
import pytest
import torch
from conftest import DEVICE

import hybridrag as hr

BACKENDS = ["triton", "reference"] + (["cpu"] if DEVICE == "cpu" else [])


def _qkv(batch=1, t=20, heads=2, kv_heads=2, dim=64):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, t, dim, generator=generator).to(DEVICE)
    k, v = (torch.randn(batch, kv_heads, t, dim, generator=generator).to(DEVICE) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("start", [2**32 + 5, 2**31, 21, -1])
def test_kv_start_out_of_range_is_refused_not_wrapped(backend, start):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"kv_start values must lie in \[0, 20\]"):
        hr.hybrid_attention(q, k, v, 8, kv_start=torch.tensor([start], device=DEVICE), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kv_start_at_tk_hides_every_key(backend):
    q, k, v = _qkv()
    out, lse = hr.hybrid_attention(q, k, v, 8, kv_start=torch.tensor([20], device=DEVICE), return_lse=True,
                                   backend=backend)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


@pytest.mark.parametrize("op", ["sliding_window_attention", "hybrid_attention"])
@pytest.mark.parametrize("flag", ["causal", "return_lse"])
def test_flags_must_be_bools(op, flag):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=f"{flag} must be a bool, got str"):
        getattr(hr, op)(q, k, v, 8, **{flag: "no"})


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_landmark_stride_past_the_sequence_means_position_zero(backend):
    q, k, v = _qkv()
    huge = hr.hybrid_attention(q, k, v, 4, landmarks=10**30, backend=backend)
    first = hr.hybrid_attention(q, k, v, 4, landmarks=torch.tensor([0], device=DEVICE), backend=backend)
    assert torch.equal(huge, first)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["sliding_window_attention", "hybrid_attention"])
def test_a_window_side_past_every_position_means_unbounded(backend, op):
    q, k, v = _qkv()
    attend = getattr(hr, op)
    torch.testing.assert_close(attend(q, k, v, (10**20, 0), backend=backend), attend(q, k, v, -1, backend=backend),
                               rtol=0, atol=0)
    torch.testing.assert_close(attend(q, k, v, (2**40, 2**40), causal=False, backend=backend),
                               attend(q, k, v, (-1, -1), causal=False, backend=backend), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["sliding_window_attention", "hybrid_attention"])
def test_an_empty_batch_gives_empty_outputs_and_gradients(backend, op):
    q, k, v = (t[:0].requires_grad_() for t in _qkv(batch=1))
    out, lse = getattr(hr, op)(q, k, v, 8, return_lse=True, backend=backend)
    assert out.shape == (0, 2, 20, 64) and lse.shape == (0, 2, 20)
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


def _cache_state(cache):
    return [t.clone() for t in (cache.sink_k, cache.sink_v, cache.ring_k, cache.ring_v)] + [cache.length]


@pytest.mark.parametrize("bad", ["v one token short", "one head for two", "head_dim", "dtype", "empty chunk"])
def test_a_bad_chunk_is_refused_before_the_cache_changes(bad):
    cache = hr.StreamingKVCache(1, 2, 64, 8, sinks=2, device=DEVICE)
    k, v = _qkv(t=12)[1:]
    cache.append(k, v)
    before = _cache_state(cache)
    k, v = _qkv(t=5)[1:]
    if bad == "v one token short":
        v = v[:, :, :4]
    elif bad == "one head for two":
        k, v = k[:, :1], v[:, :1]
    elif bad == "head_dim":
        k, v = k[..., :32], v[..., :32]
    elif bad == "dtype":
        k, v = k.double(), v.double()
    else:
        k, v = k[:, :, :0], v[:, :, :0]
    with pytest.raises((ValueError, TypeError), match="cache|one shape"):
        cache.append(k, v)
    after = _cache_state(cache)
    assert after[-1] == before[-1] and all(torch.equal(a, b) for a, b in zip(after[:-1], before[:-1]))
