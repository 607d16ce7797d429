"""The CPU backend under torch.autocast: the blockwise kernels compute in float32 as without autocast (their
statistics are float32 buffers), so a bfloat16 autocast region gives the same outputs and gradients as none, with
a key mask, landmarks and memory tokens included (a training loop with mixed_precision="bf16" runs there)."""
import pytest
import torch

import hybridrag as hr


def _inputs(dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, 37, 16, generator=generator).to(dtype).requires_grad_()
    k = torch.randn(2, 2, 37, 16, generator=generator).to(dtype).requires_grad_()
    v = torch.randn(2, 2, 37, 16, generator=generator).to(dtype).requires_grad_()
    mask = torch.rand(2, 37, generator=generator) > 0.3
    return q, k, v, mask


CALLS = {
    "sliding_window": lambda q, k, v, mask: hr.sliding_window_attention(q, k, v, 9, key_mask=mask, backend="cpu"),
    "hybrid": lambda q, k, v, mask: hr.hybrid_attention(q, k, v, 9, landmarks=8, key_mask=mask, backend="cpu"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", sorted(CALLS))
def test_autocast_region_changes_nothing(name, dtype):
    results = []
    for autocast in (False, True):
        q, k, v, mask = _inputs(dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = CALLS[name](q, k, v, mask)
        out.float().square().sum().backward()
        results.append([out, q.grad, k.grad, v.grad])
    for plain, autocast in zip(*results):
        assert plain.dtype == autocast.dtype == dtype
        assert torch.equal(plain, autocast)


def test_streaming_decode_under_autocast():
    cache = hr.StreamingKVCache(1, 2, 16, 8, sinks=2)
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, h, 12, 16, generator=generator) for h in (4, 2, 2))
    plain = hr.streaming_attention(q, k, v, cache, backend="cpu")
    cache = hr.StreamingKVCache(1, 2, 16, 8, sinks=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = hr.streaming_attention(q, k, v, cache, backend="cpu")
    assert torch.equal(plain, autocast)
