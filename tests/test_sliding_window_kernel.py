"""The Triton sliding-window kernel (interpreted on CPU, compiled on GPU) and the CPU path against the reference:
outputs, lse and all three gradients, under the tolerance rule."""
import pytest
import torch
from conftest import DEVICE
from conftest import CPU_IMPLEMENTATIONS  # (a line of its own: gpu_check.sh finds the CUDA tests by the one above)
from tolerance import tolerance_error

import hybridrag as hr

# Triton takes bfloat16 only on a GPU: the interpreter's bf16 dot multiplies bit patterns.
TRITON_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
BACKEND_DTYPES = [("triton", dtype) for dtype in TRITON_DTYPES]
if DEVICE == "cpu":  # both CPU implementations: the C++ kernels and the blockwise PyTorch path
    BACKEND_DTYPES += [(cpu, dtype) for cpu in CPU_IMPLEMENTATIONS
                       for dtype in (torch.float32, torch.float16, torch.bfloat16)]
BACKEND_DTYPE_IDS = [f"{backend}-{str(dtype).removeprefix('torch.')}" for backend, dtype in BACKEND_DTYPES]



def make_inputs(batch, heads, kv_heads, tq, tk, dim, dtype, device=DEVICE, non_contiguous=False):
    """q (B, H, Tq, D), k/v (B, Hkv, Tk, D); non_contiguous builds them as transposes of (B, T, H, D) with padding."""
    def tensor(h, t):
        if non_contiguous:
            return torch.randn(batch, t, h, dim + 8, device=device, dtype=dtype)[..., :dim].transpose(1, 2)
        return torch.randn(batch, h, t, dim, device=device, dtype=dtype)
    return tensor(heads, tq), tensor(kv_heads, tk), tensor(kv_heads, tk)


def run(q, k, v, window, causal, backend, grad_out, grad_lse):
    """Output, lse and gradients of sum(o * grad_out) + sum(lse * grad_lse) (lse terms only where finite)."""
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out, lse = hr.sliding_window_attention(q, k, v, window, causal=causal, return_lse=True, backend=backend)
    finite_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    loss = (out.float() * grad_out.float()).sum() + (finite_lse * grad_lse).sum()
    dq, dk, dv = torch.autograd.grad(loss, (q, k, v))
    return {"o": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}


def compare(backend, batch, heads, kv_heads, tq, tk, dim, window, causal, dtype, non_contiguous=False):
    """Return the tolerance-rule failures of `backend` against the float64 reference (empty list = pass)."""
    q, k, v = make_inputs(batch, heads, kv_heads, tq, tk, dim, dtype, non_contiguous=non_contiguous)
    grad_out = torch.randn(batch, heads, tq, dim, device=DEVICE, dtype=dtype)
    grad_lse = torch.randn(batch, heads, tq, device=DEVICE)
    truth = run(q.double(), k.double(), v.double(), window, causal, "reference", grad_out.double(), grad_lse.double())
    baseline = run(q, k, v, window, causal, "reference", grad_out, grad_lse)
    got = run(q, k, v, window, causal, backend, grad_out, grad_lse)
    for name in ("o", "dq", "dk", "dv"):
        assert got[name].dtype == dtype and got[name].shape == truth[name].shape, name
    assert got["lse"].dtype == torch.float32
    errors = [tolerance_error(name, got[name], truth[name], baseline[name], dtype) for name in truth]
    return [e for e in errors if e is not None]


# (batch, heads, kv_heads, Tq, Tk, D, window, causal): odd lengths and head dims, Tq < Tk, Tq > Tk, GQA and MQA,
# windows at the edges (one key, zero width, wider than the sequence, unbounded) and bidirectional bands.
CASES = [
    (1, 2, 2, 1, 1, 64, 1, True),
    (2, 4, 2, 15, 15, 40, 4, True),
    (1, 4, 1, 63, 63, 100, (5, 9), False),
    (1, 2, 1, 113, 113, 128, 16, True),
    (1, 2, 2, 300, 300, 64, 64, True),
    (1, 4, 2, 300, 300, 40, -1, True),
    (1, 2, 1, 113, 300, 64, 40, True),
    (1, 4, 2, 1, 300, 100, 100, True),
    (1, 2, 2, 15, 113, 128, (0, 0), False),
    (1, 2, 1, 63, 15, 64, 8, True),
    (1, 2, 2, 63, 63, 64, 1000, True),
    (1, 2, 2, 113, 113, 40, (-1, -1), False),
    (1, 2, 1, 63, 113, 100, (0, -1), False),
    (1, 2, 2, 113, 63, 64, (-1, 7), False),
]


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES, ids=BACKEND_DTYPE_IDS, indirect=["backend"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}kv{}q{}k{}D{}w{}{}".format(*c[:7], "c" if c[7] else "b"))
def test_matches_reference(case, backend, dtype):
    failures = compare(backend, *case, dtype=dtype)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES, ids=BACKEND_DTYPE_IDS, indirect=["backend"])
def test_non_contiguous_inputs(backend, dtype):
    failures = compare(backend, 2, 4, 2, 113, 113, 64, 24, True, dtype, non_contiguous=True)
    assert not failures, "\n".join(failures)


def test_tolerance_rule_can_fail():
    """The check rejects an answer for a neighbouring window (off by one key)."""
    q, k, v = make_inputs(1, 2, 2, 63, 63, 64, torch.float32)
    truth = hr.sliding_window_attention(q.double(), k.double(), v.double(), 8, backend="reference")
    baseline = hr.sliding_window_attention(q, k, v, 8, backend="reference")
    wrong = hr.sliding_window_attention(q, k, v, 9, backend="triton")
    assert tolerance_error("o", wrong, truth, baseline, torch.float32) is not None


def test_rows_that_see_no_key_are_zero():
    """More queries than keys: the first rows sit at negative positions and see nothing under causal masking."""
    q, k, v = make_inputs(1, 2, 2, 40, 8, 64, torch.float32)
    out, lse = hr.sliding_window_attention(q, k, v, 4, return_lse=True, backend="triton")
    assert torch.equal(out[:, :, :32], torch.zeros_like(out[:, :, :32]))
    assert torch.isneginf(lse[:, :, :32]).all() and torch.isfinite(lse[:, :, 32:]).all()


def test_block_sizes_other_than_default(monkeypatch):
    """Unequal query and key blocks (and dq and dk/dv on different ones) exercise the masked/unmasked split on
    other boundaries."""
    from hybridrag.kernels.hybrid import triton_kernels  # the window op runs on the hybrid kernels
    monkeypatch.setattr(triton_kernels, "_fwd_config", lambda dim, dtype: (16, 32, 4, 1))
    monkeypatch.setattr(triton_kernels, "_bwd_config",
                        lambda dim, dtype, kernel: (32, 16, 4, 1) if kernel == "dq" else (16, 32, 4, 1))
    failures = compare("triton", 1, 4, 2, 150, 170, 64, 37, True, torch.float32)
    failures += compare("triton", 1, 2, 1, 100, 100, 64, (20, 33), False, torch.float32)
    assert not failures, "\n".join(failures)
