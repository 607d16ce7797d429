"""Bad input raises before any kernel runs, naming the argument, the expected and the actual value."""
import pytest
import torch

import hybridrag as hr
from hybridrag.ops import backend as backend_module


def inputs(heads=4, kv_heads=2, tq=8, tk=8, dim=32, dtype=torch.float32):
    return (torch.randn(1, heads, tq, dim, dtype=dtype), torch.randn(1, kv_heads, tk, dim, dtype=dtype),
            torch.randn(1, kv_heads, tk, dim, dtype=dtype))


@pytest.mark.parametrize("window, causal, error, match", [
    (0, True, ValueError, r"window must be >= 1 \(or -1 for unbounded\), got 0"),
    (-2, True, ValueError, r"window must be >= 1 \(or -1 for unbounded\), got -2"),
    (4, False, ValueError, r"int window \(4\).*needs causal=True"),
    ((3, -2), False, ValueError, r"window right must be >= 0 or -1 \(unbounded\), got -2"),
    ((-5, 0), True, ValueError, r"window left must be >= 0 or -1 \(unbounded\), got -5"),
    ((1, 2, 3), True, TypeError, r"tuple of two ints, got \(1, 2, 3\)"),
    ((1.5, 0), True, TypeError, r"tuple of two ints"),
    (2.0, True, TypeError, r"window must be an int or a \(left, right\) tuple of ints, got float"),
    (True, True, TypeError, r"got bool"),
    (None, True, TypeError, r"got NoneType"),
])
def test_bad_window(window, causal, error, match):
    with pytest.raises(error, match=match):
        hr.sliding_window_attention(*inputs(), window, causal=causal)


def test_bad_tensors():
    q, k, v = inputs()
    cases = [
        ((q.numpy(), k, v), TypeError, r"q must be a torch.Tensor, got ndarray"),
        ((q[0], k, v), ValueError, r"q must be 4-D \(batch, heads, seq, head_dim\), got shape \(4, 8, 32\)"),
        ((q.long(), k, v), TypeError, r"q must have dtype in \(float16, bfloat16, float32\), got torch.int64"),
        ((q.double(), k.double(), v.double()), TypeError, r"got torch.float64"),
        ((q, k.half(), v.half()), TypeError, r"k has dtype torch.float16 but q has torch.float32"),
        ((q, k, v[:, :, :4]), ValueError, r"k and v must have one shape, got k \(1, 2, 8, 32\) and v \(1, 2, 4, 32\)"),
        ((torch.cat([q, q]), k, v), ValueError, r"k has batch 1 but q has batch 2"),
        ((q, k[..., :16], v[..., :16]), ValueError, r"k has head_dim 16 but q has head_dim 32"),
        ((q[:, :3], k, v), ValueError, r"k has 2 heads, which does not divide q's 3 heads"),
        (inputs(dim=8), ValueError, r"head_dim must be in \[16, 256\], got 8"),
        (inputs(dim=320), ValueError, r"head_dim must be in \[16, 256\], got 320"),
        (inputs(tk=0), ValueError, r"q and k need at least one position, got Tq=8 and Tk=0"),
    ]
    for args, error, match in cases:
        with pytest.raises(error, match=match):
            hr.sliding_window_attention(*args, 4)


@pytest.mark.parametrize("scale, error, match", [
    (0.0, ValueError, r"scale must be positive and finite, got 0.0"),
    (-1.0, ValueError, r"scale must be positive and finite, got -1.0"),
    (float("nan"), ValueError, r"got nan"),
    (float("inf"), ValueError, r"got inf"),
    ("0.1", TypeError, r"scale must be a float or None, got str"),
])
def test_bad_scale(scale, error, match):
    with pytest.raises(error, match=match):
        hr.sliding_window_attention(*inputs(), 4, scale=scale)


def test_reference_backend_takes_float64():
    q, k, v = (t.double() for t in inputs())
    assert hr.sliding_window_attention(q, k, v, 4, backend="reference").dtype == torch.float64


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'cpu', 'reference'\), got 'cuda'"):
        hr.sliding_window_attention(*inputs(), 4, backend="cuda")


def test_triton_on_cpu_tensors_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors, got tensors on cpu; use backend='cpu'"):
        hr.sliding_window_attention(*inputs(), 4, backend="triton")


def test_bfloat16_under_the_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(TypeError, match=r"Triton interpreter cannot run bfloat16 dots"):
        hr.sliding_window_attention(*inputs(dtype=torch.bfloat16), 4, backend="triton")


def test_environment_sets_the_default_backend(monkeypatch):
    backend_module.default_backend.cache_clear()
    try:
        monkeypatch.setenv("HYBRIDRAG_BACKEND", "reference")
        assert backend_module.resolve_backend("auto", torch.device("cpu")) == "reference"
        assert backend_module.resolve_backend("cpu", torch.device("cpu")) == "cpu"
        backend_module.default_backend.cache_clear()
        monkeypatch.setenv("HYBRIDRAG_BACKEND", "fast")
        with pytest.raises(ValueError, match=r"HYBRIDRAG_BACKEND must be one of .*, got 'fast'"):
            backend_module.resolve_backend("auto", torch.device("cpu"))
    finally:
        backend_module.default_backend.cache_clear()


def test_auto_picks_the_cpu_path_for_cpu_tensors():
    assert backend_module.resolve_backend("auto", torch.device("cpu")) == "cpu"
    assert backend_module.resolve_backend("auto", torch.device("cuda", 0)) == "triton"


def test_sequence_offsets_past_int32_are_refused():
    """A (B, T, H, D) view with a huge head count would overflow the kernels' int32 sequence offsets."""
    from hybridrag.kernels.triton_common import _check_row_offsets
    huge = torch.empty_strided((1, 2, 70_000, 16), (0, 16, 40_000, 1), device="meta")  # metadata only
    with pytest.raises(ValueError, match=r"q \(1, 2, 70000, 16\) with sequence stride 40000 reaches .* int32"):
        _check_row_offsets(q=huge)
    _check_row_offsets(q=torch.empty(1, 2, 70_000, 16, device="meta"))
