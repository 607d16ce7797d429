"""int8_matmul's Triton kernels (interpreted on CPU, compiled on GPU) against the float64 reference under the
tolerance rule: W8A16 per channel and per group, W8A8, accumulate="fp16", the tiled and the split-K launch,
non-contiguous and 3-D x, gradients to x and bias, agreement with the CPU path, and the activation quantization
kernel bit for bit."""
import pytest
import torch
from conftest import DEVICE
from tolerance import FLOOR, assert_within_tolerance

import hybridrag as hr
from hybridrag.kernels.int8 import MAX_INT8_REDUCTION, quantize_activations
from hybridrag.kernels.int8 import triton_kernels as tk

# The interpreter's bfloat16 dot multiplies bit patterns: bfloat16 only on a GPU.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
DTYPE_IDS = [str(d).removeprefix("torch.") for d in DTYPES]
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def gpu_only(test):
    return pytest.mark.gpu(pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")(test))


@pytest.fixture(params=["tiled", "splitk"])
def path(request, monkeypatch):
    """Force the launch shape: the tiled grid or the split-K grid with its reduction kernel."""
    monkeypatch.setattr(tk, "_use_splitk", lambda m, n, k, device: request.param == "splitk")
    return request.param


def make_weight(n, k, group_size=None, device=DEVICE):
    return hr.quantize_int8(torch.randn(n, k, device=device) * 0.05, group_size=group_size)


def make_bias(n, dtype, device=DEVICE):
    return torch.randn(n, device=device, dtype=dtype)


def truth(x, qw, bias, activations="fp"):
    """The float64 reference: the activation quantization (W8A8) is part of the op, so it is part of the truth."""
    return hr.int8_matmul(x.double(), qw, None if bias is None else bias.double(), activations=activations,
                          backend="reference")


def baseline(x, qw, bias, activations="fp"):
    """What PyTorch computes in x's dtype. W8A16: the dequantized weight cast to x's dtype, then x @ w.T.
    W8A8: the reference with x in its own dtype (it quantizes x, computes in float32, casts)."""
    if activations == "int8":
        return hr.int8_matmul(x, qw, bias, activations="int8", backend="reference")
    out = x @ qw.dequantize(x.dtype).T
    return out if bias is None else out + bias


def abs_products(x, qw, bias=None):
    """sum_k |x[m, k] * w[n, k]| (+ |bias[n]|) in float64: the scale of any summation's rounding error."""
    out = x.double().abs() @ qw.dequantize(torch.float64).abs().T
    return out if bias is None else out + bias.double().abs()


def gamma(n, u):
    """Higham's gamma_n = n u / (1 - n u): the bound on the relative error of n roundings."""
    return n * u / (1 - n * u)


# Shapes: K and N not multiples of 16 and one that is; group sizes 8, 20 (weights dequantized in registers) and
# 16, 32 (the scale applied per reduction tile), and per channel.
CASES = [  # (M, N, K, group_size, bias)
    (1, 24, 16, None, True),  # one reduction tile: split-K with one split writes the output directly
    (1, 24, 40, None, True),
    (1, 72, 100, 20, False),
    (3, 24, 40, 8, True),
    (3, 32, 64, 32, True),
    (17, 72, 100, None, False),
    (17, 24, 40, 20, True),
    (17, 32, 64, 16, False),
    (200, 40, 100, None, True),
    (200, 24, 40, 8, False),
    (200, 32, 64, 32, True),
]
CASE_IDS = [f"M{m}N{n}K{k}g{g}{'b' if b else ''}" for m, n, k, g, b in CASES]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("m,n,k,group_size,has_bias", CASES, ids=CASE_IDS)
def test_w8a16_forward(path, m, n, k, group_size, has_bias, dtype):
    qw = make_weight(n, k, group_size)
    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
    bias = make_bias(n, dtype) if has_bias else None
    out = hr.int8_matmul(x, qw, bias, backend="triton")
    assert out.dtype == dtype and out.shape == (m, n)
    assert_within_tolerance("out", out, truth(x, qw, bias), baseline(x, qw, bias), dtype)


W8A8_CASES = [(1, 24, 40, True), (3, 72, 100, False), (17, 32, 64, True), (200, 40, 100, True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("m,n,k,has_bias", W8A8_CASES, ids=[f"M{m}N{n}K{k}{'b' if b else ''}"
                                                             for m, n, k, b in W8A8_CASES])
def test_w8a8_forward(path, m, n, k, has_bias, dtype):
    qw = make_weight(n, k)
    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
    x[0, :5] *= 20  # an outlier row: a coarse scale for that token only
    bias = make_bias(n, dtype) if has_bias else None
    out = hr.int8_matmul(x, qw, bias, activations="int8", backend="triton")
    assert out.dtype == dtype
    assert_within_tolerance("out", out, truth(x, qw, bias, "int8"), baseline(x, qw, bias, "int8"), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_quantize_activations_bit_exact(dtype):
    m, k = 7, 150  # several 64-wide blocks in the interpreter, a ragged last one
    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
    x[1] = 0  # all-zero row: scale 1
    x[2, :] = torch.arange(k, device=DEVICE, dtype=dtype) - 74  # amax 75: many x / scale land near .5
    x[3, :] = 0
    x[3, :9] = torch.tensor([127, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5], dtype=dtype)  # exact ties
    x[4] *= 1e-4
    x[5] *= 300 if dtype != torch.float16 else 30
    for view in (x, x.T.contiguous().T, torch.cat([x, x], 1)[:, ::2]):  # contiguous, transposed, strided
        data, scale = tk.quantize_activations_triton(view)
        want_data, want_scale = quantize_activations(view)
        assert torch.equal(scale, want_scale)
        assert torch.equal(data, want_data), (data.int() - want_data.int()).abs().max()
    assert torch.equal(tk.quantize_activations_triton(x[3:4])[0][0, :9],
                       torch.tensor([127, 0, 2, 2, 0, -2, -2, 126, -126], dtype=torch.int8, device=DEVICE))


@pytest.mark.parametrize("m,k", [(1, 40), (3, 100), (17, 128)])
def test_accumulate_fp16(path, m, k):
    """fp16 accumulation. Each of the K additions into the accumulator may round (unit roundoff u = 2^-11), as may
    the weight dequantized to fp16 and the product (the interpreter's numpy matmul): K + 2 roundings on the terms, so
    |error| <= gamma_{K+2} * sum_k |x w| elementwise (Higham 3.1, any summation order), plus the output's own
    rounding after the bias is added in fp32, plus the floor. The bound grows like K^1.5 against the output's
    sqrt(K): at K = 128 it is still well below the outputs' size, which the test asserts so that it can fail."""
    n, dtype = 72, torch.float16
    u = UNIT_ROUNDOFF[dtype]
    qw = make_weight(n, k)
    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
    bias = make_bias(n, dtype)
    out = hr.int8_matmul(x, qw, bias, accumulate="fp16", backend="triton")
    want = truth(x, qw, bias)
    bound = gamma(k + 2, u) * abs_products(x, qw) + u * want.abs() + FLOOR[dtype] * max(want.abs().max(), 1)
    assert bound.max() < 0.5 * want.abs().max() and bound.mean() < 0.5 * want.abs().mean()
    err = (out.double() - want).abs()
    assert (err <= bound).all(), f"max error {err.max():.3g}, bound there {bound.flatten()[err.argmax()]:.3g}"

    # The gradient to x: grad_out @ dequant(W) also accumulates in fp16, over N.
    x.requires_grad_(True)
    grad = torch.randn(m, n, device=DEVICE, dtype=dtype)
    hr.int8_matmul(x, qw, bias, accumulate="fp16", backend="triton").backward(grad)
    w = qw.dequantize(torch.float64)
    want_grad = grad.double() @ w
    bound = gamma(n + 2, u) * (grad.double().abs() @ w.abs()) + u * want_grad.abs() + FLOOR[dtype] * max(
        want_grad.abs().max(), 1)
    assert bound.max() < 0.5 * want_grad.abs().max()
    assert ((x.grad.double() - want_grad).abs() <= bound).all()


@pytest.mark.parametrize("group_size", [None, 20])
@pytest.mark.parametrize("activations", ["fp", "int8"])
def test_non_contiguous_and_3d_x(path, group_size, activations):
    if activations == "int8" and group_size is not None:
        pytest.skip("W8A8 takes per-channel weights")
    n, k, dtype = 24, 40, torch.float16
    qw = make_weight(n, k, group_size)
    bias = make_bias(n, dtype)
    views = {
        "transposed": torch.randn(k, 5, device=DEVICE, dtype=dtype).T,  # strides (1, 5)
        "sliced": torch.randn(6, k + 8, device=DEVICE, dtype=dtype)[:, 3:k + 3],  # row stride k + 8
        "3d": torch.randn(2, 3, k, device=DEVICE, dtype=dtype),
        "3d-permuted": torch.randn(3, 2, k, device=DEVICE, dtype=dtype).transpose(0, 1),
    }
    for name, x in views.items():
        out = hr.int8_matmul(x, qw, bias, activations=activations, backend="triton")
        assert out.shape == (*x.shape[:-1], n)
        assert_within_tolerance(name, out, truth(x, qw, bias, activations).reshape(out.shape),
                                baseline(x.reshape(-1, k), qw, bias, activations).reshape(out.shape), dtype)


GRAD_CASES = [  # (M, N, K, group_size, activations)
    (1, 24, 40, None, "fp"),
    (17, 72, 100, 20, "fp"),
    (3, 32, 64, 16, "fp"),
    (17, 72, 100, None, "int8"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("m,n,k,group_size,activations", GRAD_CASES,
                         ids=[f"M{m}N{n}K{k}g{g}-{a}" for m, n, k, g, a in GRAD_CASES])
def test_gradients(path, m, n, k, group_size, activations, dtype):
    """Gradients to x and bias against the float64 reference's autograd. W8A8 passes the gradient straight through
    the activation quantization, so its truth is the float path's gradient."""
    qw = make_weight(n, k, group_size)
    x = torch.randn(m, k, device=DEVICE, dtype=dtype, requires_grad=True)
    bias = make_bias(n, dtype).requires_grad_(True)
    grad = torch.randn(m, n, device=DEVICE, dtype=dtype)
    hr.int8_matmul(x, qw, bias, activations=activations, backend="triton").backward(grad)

    x64 = x.detach().double().requires_grad_(True)
    bias64 = bias.detach().double().requires_grad_(True)
    hr.int8_matmul(x64, qw, bias64, backend="reference").backward(grad.double())
    assert_within_tolerance("grad x", x.grad, x64.grad, grad @ qw.dequantize(dtype), dtype)
    assert_within_tolerance("grad bias", bias.grad, bias64.grad, grad.sum(0), dtype)


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU path runs on CPU tensors")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("group_size,activations", [(None, "fp"), (20, "fp"), (None, "int8")])
def test_matches_cpu_path(path, group_size, activations, dtype):
    """Triton and the CPU path differ only by float rounding: both sum in fp32 in their own order (each within
    gamma_K * sum |x w| of exact), the Triton kernel may round dequantized weights to x's dtype (u * sum |x w|), and
    each rounds its output once."""
    m, n, k = 17, 72, 100
    qw = make_weight(n, k, group_size)
    x = torch.randn(m, k, dtype=dtype)
    bias = make_bias(n, dtype)
    out = hr.int8_matmul(x, qw, bias, activations=activations, backend="triton")
    cpu = hr.int8_matmul(x, qw, bias, activations=activations, backend="cpu")
    if activations == "int8":  # the same int8 data on both sides; exact int32 sums
        x = quantize_activations(x)[0].double() * quantize_activations(x)[1].double()[:, None]
    u = UNIT_ROUNDOFF[dtype]
    bound = (2 * gamma(k + 2, 2.0**-24) + u) * abs_products(x, qw, bias) + 2 * u * cpu.double().abs()
    err = (out.double() - cpu.double()).abs()
    assert (err <= bound).all(), f"max difference {err.max():.3g}, bound there {bound.flatten()[err.argmax()]:.3g}"


def test_default_launch_choice(monkeypatch):
    """Without monkeypatching _use_splitk, M <= 16 takes split-K and larger M the tiled grid."""
    calls = []
    for name in ("_splitk_config", "_tiled_config"):
        real = getattr(tk, name)
        monkeypatch.setattr(tk, name, lambda *args, _real=real, _name=name: calls.append(_name) or _real(*args))
    qw = make_weight(24, 40)
    for m, config in ((16, "_splitk_config"), (17, "_tiled_config")):
        x = torch.randn(m, 40, device=DEVICE)
        assert_within_tolerance("out", hr.int8_matmul(x, qw, backend="triton"), truth(x, qw, None),
                                baseline(x, qw, None), torch.float32)
        assert calls[-1] == config


def test_scale_modes():
    """Group sizes with a power-of-two divisor >= min(BLOCK_R, 32) scale each reduction tile's product; others
    dequantize in registers."""
    assert tk._fit_groups(16, 32) == (16, tk.PER_TILE)
    assert tk._fit_groups(16, 16) == (16, tk.PER_TILE)
    assert tk._fit_groups(64, 128) == (64, tk.PER_TILE)
    assert tk._fit_groups(64, 96) == (32, tk.PER_TILE)
    assert tk._fit_groups(64, 16) == (64, tk.IN_REGISTERS)
    assert tk._fit_groups(16, 8) == (16, tk.IN_REGISTERS)
    assert tk._fit_groups(16, 20) == (16, tk.IN_REGISTERS)


def test_empty_rows(path):
    qw = make_weight(24, 40)
    x = torch.randn(0, 40, device=DEVICE)
    assert hr.int8_matmul(x, qw, backend="triton").shape == (0, 24)


@pytest.mark.parametrize("backend", ["triton", "cpu"] if DEVICE == "cpu" else ["triton"])
def test_w8a8_reduction_limit(backend):
    qw = hr.QuantizedWeight(torch.zeros(1, MAX_INT8_REDUCTION + 1, dtype=torch.int8, device=DEVICE),
                            torch.ones(1, device=DEVICE))
    with pytest.raises(ValueError, match="int32"):
        hr.int8_matmul(torch.zeros(1, MAX_INT8_REDUCTION + 1, device=DEVICE), qw, activations="int8",
                       backend=backend)


@pytest.mark.skipif(DEVICE != "cpu", reason="only the interpreter refuses bfloat16")
def test_interpreter_refuses_bfloat16():
    qw = make_weight(24, 40)
    with pytest.raises(TypeError, match="bfloat16"):
        hr.int8_matmul(torch.randn(3, 40, dtype=torch.bfloat16), qw, backend="triton")


# --- GPU only: bfloat16 and large shapes ------------------------------------------------------------------------

@gpu_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("group_size,activations", [(None, "fp"), (128, "fp"), (None, "int8")])
@pytest.mark.parametrize("m", [1, 16, 128, 4096])
def test_gpu_large(m, group_size, activations, dtype):
    n = k = 4096
    qw = make_weight(n, k, group_size)
    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
    bias = make_bias(n, dtype)
    out = hr.int8_matmul(x, qw, bias, activations=activations, backend="triton")
    assert_within_tolerance("out", out, truth(x, qw, bias, activations), baseline(x, qw, bias, activations), dtype)
    if activations == "int8":
        data, scale = tk.quantize_activations_triton(x)
        want_data, want_scale = quantize_activations(x)
        assert torch.equal(scale, want_scale) and torch.equal(data, want_data)


@gpu_only
@pytest.mark.parametrize("group_size", [None, 128])
@pytest.mark.parametrize("m", [1, 512])
def test_gpu_bfloat16_gradients(m, group_size):
    n, k, dtype = 1024, 4096, torch.bfloat16
    qw = make_weight(n, k, group_size)
    x = torch.randn(m, k, device=DEVICE, dtype=dtype, requires_grad=True)
    bias = make_bias(n, dtype).requires_grad_(True)
    grad = torch.randn(m, n, device=DEVICE, dtype=dtype)
    hr.int8_matmul(x, qw, bias, backend="triton").backward(grad)
    x64 = x.detach().double().requires_grad_(True)
    hr.int8_matmul(x64, qw, bias.detach().double(), backend="reference").backward(grad.double())
    assert_within_tolerance("grad x", x.grad, x64.grad, grad @ qw.dequantize(dtype), dtype)
