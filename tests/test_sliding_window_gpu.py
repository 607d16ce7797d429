"""Compiled Triton kernels on a GPU: bf16/fp16 at long sequences, and determinism. Skipped without CUDA."""
import pytest
import torch
from tolerance import assert_within_tolerance

import hybridrag as hr

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("seq, window, dim", [(2048, 512, 128), (16384, 4096, 128), (4099, 777, 96)])
def test_long_sequences_match_reference(seq, window, dim, dtype):
    q = torch.randn(1, 4, seq, dim, device="cuda", dtype=dtype)
    k, v = (torch.randn(1, 2, seq, dim, device="cuda", dtype=dtype) for _ in range(2))
    grad_out = torch.randn_like(q)

    def run(backend, *tensors):
        leaves = [t.detach().requires_grad_(True) for t in tensors]
        out = hr.sliding_window_attention(*leaves, window, backend=backend)
        return (out, *torch.autograd.grad(out, leaves, grad_out.to(out.dtype)))

    got = run("triton", q, k, v)
    baseline = run("reference", q, k, v)
    # float64 scores at 16k take too much memory; float32 errors are still far below bf16/fp16 ones there.
    truth_dtype = torch.float64 if seq <= 4099 else torch.float32
    truth = run("reference", q.to(truth_dtype), k.to(truth_dtype), v.to(truth_dtype))
    for name, g, t, b in zip(("o", "dq", "dk", "dv"), got, truth, baseline):
        assert_within_tolerance(name, g, t, b, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_forward_and_backward_are_deterministic(dtype):
    q = torch.randn(2, 8, 3000, 128, device="cuda", dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, 2, 3000, 128, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    grad_out = torch.randn_like(q)
    results = []
    for _ in range(2):
        out = hr.sliding_window_attention(q, k, v, 1000)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad_out)))
    for first, second in zip(*results):
        assert torch.equal(first, second)


def test_auto_uses_triton_for_cuda_tensors():
    q = torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.bfloat16)
    out = hr.sliding_window_attention(q, q, q, 16)
    ref = hr.sliding_window_attention(q, q, q, 16, backend="triton")
    assert torch.equal(out, ref)
