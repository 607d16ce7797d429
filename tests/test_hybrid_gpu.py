"""Compiled hybrid-attention kernels on a GPU: bf16/fp16 at long sequences with many landmarks and memory tokens
(so the global rows' key splits are exercised), attention mass, and determinism. Skipped without CUDA."""
import pytest
import torch
from tolerance import assert_within_tolerance

import hybridrag as hr

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _inputs(seq, dim, dtype, memory):
    q = torch.randn(1, 4, seq, dim, device="cuda", dtype=dtype)
    k, v = (torch.randn(1, 2, seq, dim, device="cuda", dtype=dtype) for _ in range(2))
    mem = [torch.randn(1, 2, memory, dim, device="cuda", dtype=dtype) for _ in range(2)] if memory else [None, None]
    return q, k, v, *mem


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("seq, window, stride, dim, memory",
                         [(2048, 512, 64, 128, 16), (4099, 777, 97, 96, 0), (8192, 1024, 128, 128, 8)])
def test_long_sequences_match_reference(seq, window, stride, dim, memory, dtype):
    q, k, v, memory_k, memory_v = _inputs(seq, dim, dtype, memory)
    grad_out = torch.randn_like(q)

    def run(backend, *tensors):
        leaves = [None if t is None else t.detach().requires_grad_(True) for t in tensors]
        out = hr.hybrid_attention(*leaves[:3], window, landmarks=stride, memory_k=leaves[3], memory_v=leaves[4],
                                  backend=backend)
        wanted = [t for t in leaves if t is not None]
        return (out, *torch.autograd.grad(out, wanted, grad_out.to(out.dtype)))

    tensors = (q, k, v, memory_k, memory_v)
    got = run("triton", *tensors)
    baseline = run("reference", *tensors)
    truth_dtype = torch.float64 if seq <= 4099 else torch.float32  # float64 scores at 8k take too much memory
    truth = run("reference", *(None if t is None else t.to(truth_dtype) for t in tensors))
    names = ("o", "dq", "dk", "dv", "dmemory_k", "dmemory_v")
    for name, g, t, b in zip(names, got, truth, baseline):
        assert_within_tolerance(name, g, t, b, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_attention_mass_matches_reference(dtype):
    q, k, _, memory_k, _ = _inputs(2048, 128, dtype, 8)
    segments = torch.randint(-1, 16, (1, 2048), device="cuda")
    query_mask = torch.rand(1, 2048, device="cuda") > 0.5
    kwargs = dict(landmarks=64, query_mask=query_mask, memory_k=memory_k)
    got = hr.attention_mass(q, k, segments, 16, 512, backend="triton", **kwargs)
    truth = hr.attention_mass(q.double(), k.double(), segments, 16, 512, backend="reference",
                              **{**kwargs, "memory_k": memory_k.double()})
    baseline = hr.attention_mass(q, k, segments, 16, 512, backend="reference", **kwargs)
    assert_within_tolerance("mass", got, truth, baseline, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_forward_and_backward_are_deterministic(dtype):
    q, k, v, memory_k, memory_v = (t.requires_grad_(True) for t in _inputs(3000, 128, dtype, 4))
    grad_out = torch.randn_like(q)
    results = []
    for _ in range(2):
        out = hr.hybrid_attention(q, k, v, 1000, landmarks=50, memory_k=memory_k, memory_v=memory_v)
        results.append((out, *torch.autograd.grad(out, (q, k, v, memory_k, memory_v), grad_out)))
    for first, second in zip(*results):
        assert torch.equal(first, second)
    segments = torch.randint(-1, 16, (1, 3000), device="cuda")
    masses = [hr.attention_mass(q, k, segments, 16, 1000, landmarks=50, memory_k=memory_k) for _ in range(2)]
    assert torch.equal(*masses)
