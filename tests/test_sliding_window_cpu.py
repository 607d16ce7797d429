"""The blockwise CPU path (what backend="auto" runs on CPU tensors) at long sequence lengths, and its memory."""
import pytest
import torch
from tolerance import assert_within_tolerance

import hybridrag as hr


def grads(q, k, v, window, backend, grad_out):
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = hr.sliding_window_attention(q, k, v, window, backend=backend)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


def test_long_sequence_matches_reference():
    tq = tk = 4096
    q, k, v = torch.randn(1, 4, tq, 64), torch.randn(1, 2, tk, 64), torch.randn(1, 2, tk, 64)
    grad_out = torch.randn_like(q)
    truth = grads(q.double(), k.double(), v.double(), 512, "reference", grad_out.double())
    baseline = grads(q, k, v, 512, "reference", grad_out)
    got = grads(q, k, v, 512, "auto", grad_out)
    for name, g, t, b in zip(("o", "dq", "dk", "dv"), got, truth, baseline):
        assert_within_tolerance(name, g, t, b, torch.float32)


def largest_allocation(fn):
    """Bytes of the largest single CPU allocation made while fn runs (from the profiler's memory events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(event.cpu_memory_usage for event in prof.events())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_path_never_allocates_a_t_by_t_matrix(dtype):
    tq = tk = 4096
    q, k, v = (torch.randn(1, 2, tq, 64, dtype=dtype).requires_grad_(True) for _ in range(3))

    def forward_backward(backend):
        def step():
            hr.sliding_window_attention(q, k, v, 256, backend=backend).sum().backward()
        return step

    one_score_matrix = tq * tk * 4  # a single head's float32 Tq x Tk matrix
    assert largest_allocation(forward_backward("cpu")) < one_score_matrix / 8
    # The measurement can see such a matrix: the dense reference makes one.
    assert largest_allocation(forward_backward("reference")) >= one_score_matrix / 2
