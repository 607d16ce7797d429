"""quantize_int8 and int8_matmul on the CPU path and the reference: quantization, accuracy, gradients, state_dict,
and bad input refused before any kernel runs."""
import pytest
import torch
from int8_checks import assert_cpu_matches_reference
from tolerance import tolerance_error

import hybridrag as hr
from hybridrag.kernels.int8 import INT8_MAX, quantize_activations


def sqnr_db(signal, approx):
    return (10 * torch.log10(signal.double().pow(2).sum() / (signal.double() - approx.double()).pow(2).sum())).item()


@pytest.mark.parametrize("group_size", [None, 8, 20], ids=lambda g: f"g{g}")
def test_quantization_round_trip(group_size):
    weight = torch.randn(72, 40)
    qweight = hr.quantize_int8(weight, group_size=group_size)
    assert qweight.data.dtype == torch.int8 and qweight.data.shape == (72, 40)
    groups = () if group_size is None else (40 // group_size,)
    assert qweight.scale.dtype == torch.float32 and qweight.scale.shape == (72, *groups)
    assert qweight.data.abs().max() <= INT8_MAX
    assert (qweight.data == INT8_MAX).any() or (qweight.data == -INT8_MAX).any()  # the largest value maps to +-127
    assert sqnr_db(weight, qweight.dequantize()) > 35
    # round to nearest: every element is within half a step of its scaled value
    step = qweight.scale if group_size is None else qweight.scale.repeat_interleave(group_size, dim=1)
    step = step[:, None] if group_size is None else step
    assert ((weight - qweight.dequantize()).abs() <= step / 2 + 1e-7).all()


def test_zero_channel_and_group_size_one():
    weight = torch.randn(4, 16)
    weight[1] = 0
    qweight = hr.quantize_int8(weight)
    assert torch.equal(qweight.data[1], torch.zeros(16, dtype=torch.int8)) and torch.isfinite(qweight.scale).all()
    exact = hr.quantize_int8(weight, group_size=1)  # one scale per element: every nonzero element is +-127
    torch.testing.assert_close(exact.dequantize(), weight)


def test_quantized_weight_state_dict_round_trip():
    qweight = hr.quantize_int8(torch.randn(24, 40), group_size=8)
    fresh = hr.QuantizedWeight(torch.zeros(24, 40, dtype=torch.int8), torch.zeros(24, 5))
    fresh.load_state_dict(qweight.state_dict())
    assert fresh.group_size == 8 and torch.equal(fresh.data, qweight.data) and torch.equal(fresh.scale, qweight.scale)
    assert "group_size=8" in repr(fresh)


def test_activation_quantization_is_per_token():
    x = torch.randn(5, 40) * torch.arange(1, 6)[:, None]
    data, scale = quantize_activations(x)
    torch.testing.assert_close(scale, x.abs().amax(dim=1) / INT8_MAX)
    assert (data.abs().amax(dim=1) == INT8_MAX).all()


# (M, K, N, group_size, bias): odd shapes, one row, group-wise and per channel.
CASES = [(1, 40, 24, None, True), (3, 100, 72, 20, False), (17, 64, 48, None, False), (200, 40, 24, 8, True)]


# W8A8 takes per-channel weights only.
MODES = [(case, activations) for case in CASES for activations in ("fp", "int8")
         if activations == "fp" or case[3] is None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case, activations", MODES,
                         ids=lambda c: "M{}K{}N{}g{}{}".format(*c[:4], "b" if c[4] else "") if isinstance(c, tuple)
                         else c)
def test_cpu_path_matches_reference(case, activations, dtype):
    m, k, n, group_size, with_bias = case
    qweight = hr.quantize_int8(torch.randn(n, k), group_size=group_size)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n).to(dtype) if with_bias else None
    assert_cpu_matches_reference(x, qweight, bias, activations)


# ------------------------------------------------------------------------------------------------------------------
# CPU routes (chosen from dtype, M, grouping and layout; kernels/int8/cpu.py): which one runs, and each against the
# reference. WIDEN_BLOCK_BYTES is shrunk so that the small shapes here cut the weight into several blocks, the last
# one ragged (blocks of 10 of the 72 rows, forward and gradient).
# ------------------------------------------------------------------------------------------------------------------

ROUTE_CASES = [  # (dtype, M, K, group_size, route without the C++ kernels; with them every M <= 8 takes "cpp")
    (torch.bfloat16, 1, 64, None, "int8pack"),
    (torch.bfloat16, 8, 64, None, "int8pack"),
    (torch.bfloat16, 9, 64, None, "bf16"),
    (torch.bfloat16, 128, 64, None, "bf16"),
    (torch.bfloat16, 1, 40, None, "fp32"),  # K % 16 != 0: _weight_int8pack_mm would read past the rows
    (torch.bfloat16, 9, 40, None, "bf16"),
    (torch.bfloat16, 1, 64, 16, "fp32"),  # group-wise, small M
    (torch.bfloat16, 16, 64, 16, "bf16"),
    (torch.float16, 1, 64, None, "fp32"),
    (torch.float16, 128, 64, 16, "fp32"),
    (torch.float32, 1, 64, None, "fp32"),
    (torch.float32, 128, 64, None, "fp32"),
]


@pytest.fixture
def small_blocks(monkeypatch):
    from hybridrag.kernels.int8 import cpu
    monkeypatch.setattr(cpu, "WIDEN_BLOCK_BYTES", 10 * 64 * 4)
    assert cpu._block(72, 64) == 10


@pytest.fixture
def int8pack_calls(monkeypatch):
    """Counts the calls of torch._weight_int8pack_mm (still running it)."""
    calls = []
    real = torch._weight_int8pack_mm

    def counting(*args):
        calls.append(args[0].shape)
        return real(*args)
    monkeypatch.setattr(torch, "_weight_int8pack_mm", counting)
    return calls


@pytest.mark.parametrize("dtype, m, k, group_size, route", ROUTE_CASES,
                         ids=[f"{str(c[0])[6:]}-M{c[1]}K{c[2]}g{c[3]}" for c in ROUTE_CASES])
def test_cpu_route_choice_and_accuracy(dtype, m, k, group_size, route, small_blocks, int8pack_calls, cpu_kernels):
    from hybridrag.kernels.int8.cpu import grad_input_route
    from hybridrag.ops.int8 import cpu_route
    qweight = hr.quantize_int8(torch.randn(72, k), group_size=group_size)
    x = torch.randn(m, k).to(dtype)
    route = "cpp" if cpu_kernels == "cpp" and m <= 8 else route
    assert cpu_route(x, qweight) == route
    assert grad_input_route(torch.empty(m, 72, dtype=dtype)) == ("bf16" if dtype == torch.bfloat16 and m > 2 else
                                                                  "fp32")
    assert_cpu_matches_reference(x, qweight, torch.randn(72).to(dtype))
    assert len(int8pack_calls) == (1 if route == "int8pack" else 0)  # the forward only; its gradient widens


@pytest.mark.parametrize("cpu_kernels", ["blockwise"], indirect=True)
def test_int8pack_route_takes_unaligned_and_strided_x(int8pack_calls, cpu_kernels):
    """_weight_int8pack_mm loads rows of x 32-byte aligned: views that are not get copied first, not misread."""
    qweight = hr.quantize_int8(torch.randn(24, 64))
    base = torch.randn(3 * 64 + 8).bfloat16()
    views = {"offset 8 elements": base[8:].view(3, 64), "transposed": torch.randn(64, 3).bfloat16().T,
             "row stride 72": torch.randn(3, 72).bfloat16()[:, 4:68]}
    for name, x in views.items():
        assert x.data_ptr() % 32 != 0 or not x.is_contiguous(), name
        assert_cpu_matches_reference(x, qweight)
    assert len(int8pack_calls) == len(views)


def test_w8a8_route_and_empty_rows():
    from hybridrag.ops.int8 import cpu_route
    qweight = hr.quantize_int8(torch.randn(24, 64))
    assert cpu_route(torch.randn(2, 64), qweight, "int8") == "int_mm"
    for dtype in (torch.bfloat16, torch.float32):
        assert hr.int8_matmul(torch.empty(0, 64, dtype=dtype), qweight, backend="cpu").shape == (0, 24)


def test_cpu_path_ignores_autocast():
    """Under CPU autocast the routes still compute in the dtypes they chose (float32 x stays float32-accurate)."""
    qweight = hr.quantize_int8(torch.randn(72, 64))
    x = torch.randn(9, 64)
    want = hr.int8_matmul(x, qweight, backend="cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = hr.int8_matmul(x, qweight, backend="cpu")
    assert got.dtype == torch.float32 and torch.equal(got, want)


@pytest.mark.parametrize("cache, dtype", [("fp32", torch.float32), ("fp32", torch.float16), ("fp32", torch.bfloat16),
                                          ("bf16", torch.bfloat16)], ids=str)
@pytest.mark.parametrize("group_size", [None, 16], ids=lambda g: f"g{g}")
def test_cpu_cache_route(cache, dtype, group_size, int8pack_calls, cpu_kernels):
    from hybridrag.ops.int8 import cpu_route
    qweight = hr.quantize_int8(torch.randn(72, 64), group_size=group_size)
    qweight.cpu_cache = cache
    x = torch.randn(3, 64).to(dtype)
    if cpu_kernels == "cpp":  # decode sizes keep the C++ kernel, which reads a byte per weight, faster than the cache
        assert cpu_route(x, qweight) == "cpp"
        x = torch.randn(9, 64).to(dtype)
    elif dtype == torch.bfloat16 and group_size is None:  # and _weight_int8pack_mm, for the same reason
        assert cpu_route(x, qweight) == "int8pack"
        x = torch.randn(9, 64).to(dtype)
    assert cpu_route(x, qweight) == "cached"
    assert_cpu_matches_reference(x, qweight, torch.randn(72).to(dtype))
    dense = qweight.cached_dense()
    assert dense.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[cache] and dense.shape == (72, 64)
    assert qweight.cached_dense() is dense  # kept between calls
    assert not int8pack_calls
    assert "_dense" not in str(qweight.state_dict().keys())


def test_cpu_cache_is_rebuilt_when_the_weight_changes():
    weight = torch.randn(24, 64)
    qweight = hr.quantize_int8(weight)
    qweight.cpu_cache = "fp32"
    x = torch.randn(2, 64)
    first = hr.int8_matmul(x, qweight, backend="cpu")
    other = hr.quantize_int8(-weight)
    qweight.load_state_dict(other.state_dict())  # in place: the buffers' version counters move
    torch.testing.assert_close(hr.int8_matmul(x, qweight, backend="cpu"), -first)
    qweight.scale = qweight.scale * 2  # replaced
    torch.testing.assert_close(hr.int8_matmul(x, qweight, backend="cpu"), -2 * first)
    qweight.cpu_cache = None
    assert qweight._dense is None
    torch.testing.assert_close(hr.int8_matmul(x, qweight, backend="cpu"), -2 * first)


def test_cpu_cache_bad_values_and_dtype():
    qweight = hr.quantize_int8(torch.randn(24, 40))
    for bad in ("fp16", "bfloat16", True, torch.bfloat16):
        with pytest.raises(ValueError, match="cpu_cache must be one of"):
            qweight.cpu_cache = bad
    qweight.cpu_cache = "bf16"
    with pytest.raises(TypeError, match="cpu_cache='bf16' takes bfloat16 x"):
        hr.int8_matmul(torch.randn(2, 40), qweight, backend="cpu")
    assert qweight._dense is None  # refused before anything was built
    hr.int8_matmul(torch.randn(2, 40), qweight, backend="reference")  # the reference never uses the cache


def test_tolerance_rule_can_fail():
    """A weight quantized with another group size gives an answer the rule rejects."""
    weight, x = torch.randn(24, 40), torch.randn(8, 40)
    truth = hr.int8_matmul(x.double(), hr.quantize_int8(weight, group_size=8), backend="reference")
    baseline = x @ hr.quantize_int8(weight, group_size=8).dequantize().T
    wrong = hr.int8_matmul(x, hr.quantize_int8(weight), backend="cpu")
    assert tolerance_error("y", wrong, truth, baseline, torch.float32) is not None


def test_leading_dims_and_no_weight_gradient():
    qweight = hr.quantize_int8(torch.randn(24, 40))
    x = torch.randn(2, 3, 40, requires_grad=True)
    y = hr.int8_matmul(x, qweight)
    assert y.shape == (2, 3, 24)
    y.sum().backward()
    assert x.grad.shape == x.shape and not qweight.data.requires_grad


@pytest.fixture
def qweight():
    return hr.quantize_int8(torch.randn(24, 40))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(weight=torch.randn(3, 4, 5)), ValueError, "2-D"),
    (dict(weight=torch.randint(0, 5, (4, 8))), TypeError, "floating-point"),
    (dict(weight=torch.randn(4, 10), group_size=4), ValueError, "divisor of K=10"),
    (dict(weight=torch.randn(4, 10), group_size=0), ValueError, "divisor"),
    (dict(weight=torch.randn(4, 10), group_size=2.0), TypeError, "group_size must be an int"),
    (dict(weight=[[1.0]]), TypeError, "weight must be a torch.Tensor"),
])
def test_quantize_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        hr.quantize_int8(kwargs.pop("weight"), **kwargs)


@pytest.mark.parametrize("make, error, match", [
    (lambda q: dict(x=torch.randn(2, 41), qweight=q), ValueError, "last dim 40"),
    (lambda q: dict(x=torch.randint(0, 3, (2, 40)), qweight=q), TypeError, "x must have dtype"),
    (lambda q: dict(x=torch.randn(2, 40, dtype=torch.float64), qweight=q), TypeError, "x must have dtype"),
    (lambda q: dict(x=torch.randn(2, 40), qweight=torch.randn(24, 40)), TypeError, "QuantizedWeight"),
    (lambda q: dict(x=torch.randn(2, 40), qweight=hr.QuantizedWeight(q.data.float(), q.scale)), TypeError,
     "int8"),
    (lambda q: dict(x=torch.randn(2, 40), qweight=hr.QuantizedWeight(q.data, q.scale[:5])), ValueError,
     "qweight.scale"),
    (lambda q: dict(x=torch.randn(2, 40), qweight=q, bias=torch.randn(23)), ValueError, "bias must have shape"),
    (lambda q: dict(x=torch.randn(2, 40), qweight=q, bias=torch.randn(24).half()), TypeError, "bias has dtype"),
    (lambda q: dict(x=torch.randn(2, 40), qweight=q, activations="int4"), ValueError, "activations must be"),
    (lambda q: dict(x=torch.randn(2, 40), qweight=q, accumulate="bf16"), ValueError, "accumulate must be"),
    (lambda q: dict(x=torch.randn(2, 40), qweight=q, accumulate="fp16"), ValueError, "float16 x"),
    (lambda q: dict(x=torch.randn(2, 40).half(), qweight=q, accumulate="fp16", backend="cpu"), ValueError,
     "Triton kernel option"),
    (lambda q: dict(x=torch.randn(2, 40), qweight=hr.quantize_int8(torch.randn(24, 40), group_size=8),
                    activations="int8"), ValueError, "per-channel"),
    (lambda q: dict(x=torch.randn(2, 40), qweight=q, backend="gpu"), ValueError, "backend must be one of"),
])
def test_matmul_bad_input(qweight, make, error, match, monkeypatch):
    from hybridrag.ops import int8 as int8_ops

    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel ran before the input was refused")
    for name in ("backend_functions", "int8_matmul_fwd", "int8_matmul_reference", "_cached_matmul"):
        monkeypatch.setattr(int8_ops, name, no_kernel)
    kwargs = make(qweight)
    with pytest.raises(error, match=match):
        hr.int8_matmul(kwargs.pop("x"), kwargs.pop("qweight"), **kwargs)
