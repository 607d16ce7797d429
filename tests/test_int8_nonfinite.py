"""NaN and inf through quantize_int8 and int8_matmul: the same non-finite outputs on every backend (cpu, its cached
route, triton, reference), the float layer's pattern for W8A16, whole NaN rows for W8A8; non-finite weights and
degenerate shapes refused with clear errors."""
import pytest
import torch
from conftest import DEVICE
from torch import nn

import hybridrag as hr
from hybridrag.kernels.int8 import quantize_activations, quantize_weight
from hybridrag.nn import Int8Linear, quantize_model

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, interpreter

NAN, INF = float("nan"), float("inf")
DTYPES = [torch.float32, torch.float16]
DTYPE_IDS = ["float32", "float16"]
F32, F16 = torch.float32, torch.float16
# (M, K, N, dtype, kind): one row, split-K (M <= 16) and tiled (M > 16) Triton launches, K and N not powers of two.
# kind "nan" / "inf": NaN / +-inf at the first, middle and last column of every poisoned row; "mix": row 0 NaN,
# the middle row +inf and -inf, the last row +inf (rows are independent, so one x tests all three; the interpreter
# is slow at M = 113).
CASES = [(1, 40, 64, F32, "nan"), (1, 40, 64, F16, "inf"), (1, 100, 100, F16, "nan"), (1, 100, 100, F32, "inf"),
         (15, 100, 100, F16, "mix"), (15, 40, 64, F32, "mix"), (113, 40, 100, F16, "mix"), (113, 100, 64, F32, "mix")]
CASE_IDS = [f"{m}x{k}x{n}-{str(d).removeprefix('torch.')}-{kind}" for m, k, n, d, kind in CASES]
# W8A16 also group-wise (g = 20: Triton dequantizes in registers) on a few of them.
W8A16_CASES = [(*case, None) for case in CASES] + [(*CASES[i], 20) for i in (1, 4, 6)]
W8A16_IDS = [f"{name}-per_channel" for name in CASE_IDS] + [f"{CASE_IDS[i]}-g20" for i in (1, 4, 6)]


def backends(activations, dtype):
    names = ["reference", "cpu", "triton"]
    if activations == "fp":
        names.append("cpu_cache")
        if dtype == torch.float16:
            names.append("triton_fp16_acc")
    return names


def matmul(x, qw, bias, activations, backend):
    if backend == "cpu_cache":
        qw, backend = hr.QuantizedWeight(qw.data, qw.scale, qw.group_size, cpu_cache="fp32"), "cpu"
    accumulate = "fp16" if backend == "triton_fp16_acc" else "fp32"
    return hr.int8_matmul(x, qw, bias, activations=activations, accumulate=accumulate,
                          backend=backend.removesuffix("_fp16_acc"))


def nonfinite(y):
    """0 where y is finite, else its NaN / +inf / -inf (float32): the pattern every backend must give."""
    return torch.where(torch.isfinite(y), 0.0, y.float())


def assert_same_nonfinite(what, y, expected):
    got, want = nonfinite(y), nonfinite(expected)
    same = (got == want) | (got.isnan() & want.isnan())
    assert same.all(), (f"{what}: {int((~same).sum())} outputs differ in finiteness, first at "
                        f"{tuple(int(i) for i in (~same).nonzero()[0])}")


def poison(x, kind):
    """Writes the non-finite values of `kind` (see CASES) into x (M, K) in place; returns the poisoned rows."""
    m, k = x.shape
    if kind == "mix":
        x[0, 0] = NAN
        x[m // 2, k // 2], x[m // 2, 1] = -INF, INF
        x[m - 1, k - 1] = INF
        return sorted({0, m // 2, m - 1})
    for col, value in ((0, INF), (k // 2, -INF), (k - 1, INF)):
        x[:, col] = NAN if kind == "nan" else value
    return list(range(m))


def make_case(m, k, n, dtype, kind, group_size=None):
    """(x poisoned, clean x, poisoned rows, qweight, bias): the weight is 0 where the poisoned columns meet every
    third output channel, so inf meets an int8 0 there."""
    weight = torch.randn(n, k)
    weight[::3, [0, 1, k // 2, k - 1]] = 0
    qw = hr.quantize_int8(weight, group_size=group_size)
    clean = torch.randn(m, k, dtype=dtype)
    x = clean.clone()
    return x, clean, poison(x, kind), qw, torch.randn(n, dtype=dtype)


@pytest.mark.parametrize("m, k, n, dtype, kind, group_size", W8A16_CASES, ids=W8A16_IDS)
def test_w8a16_nonfinite_x_matches_float_layer(m, k, n, dtype, kind, group_size):
    """x is not quantized in W8A16: every backend gives the NaN / +inf / -inf of nn.Linear with the dequantized
    weight, position by position; rows without
    non-finite values are what the clean x gives, bit for bit."""
    x, clean, dirty, qw, bias = make_case(m, k, n, dtype, kind, group_size)
    float_layer = nn.functional.linear(x.float(), qw.dequantize(), bias.float())
    if kind != "inf":
        assert float_layer[0].isnan().all()
    if kind != "nan":  # the case meets all three outcomes
        assert float_layer.isnan().any() and (float_layer == INF).any() and (float_layer == -INF).any()
    rows = [i for i in range(m) if i not in dirty]
    for backend in backends("fp", dtype):
        y = matmul(x, qw, bias, "fp", backend)
        assert_same_nonfinite(backend, y, float_layer)
        if rows:
            assert torch.equal(y[rows], matmul(clean, qw, bias, "fp", backend)[rows]), backend


@pytest.mark.parametrize("m, k, n, dtype, kind", CASES, ids=CASE_IDS)
def test_w8a8_nonfinite_row_is_nan(m, k, n, dtype, kind):
    """A row of x holding NaN or inf cannot be quantized: its scale is NaN and its whole output row NaN on every
    backend; other rows are untouched, bit for bit."""
    x, clean, dirty, qw, bias = make_case(m, k, n, dtype, kind)
    rows = [i for i in range(m) if i not in dirty]
    for backend in backends("int8", dtype):
        y = matmul(x, qw, bias, "int8", backend)
        assert y[dirty].isnan().all(), backend
        if rows:
            assert torch.isfinite(y[rows]).all(), backend
            assert torch.equal(y[rows], matmul(clean, qw, bias, "int8", backend)[rows]), backend


@pytest.mark.parametrize("m, dtype, activations, group_size", [
    (15, F16, "fp", None), (15, F32, "fp", 16), (15, F16, "int8", None),
    (113, F32, "fp", 20), (113, F32, "int8", None)])
def test_nan_weight_scale_makes_its_column_nan(m, dtype, activations, group_size):
    """A hand-built QuantizedWeight with NaN scales (first, middle, last output channel; group-wise in the first,
    second and last group, through Triton's in-register (g = 20) and per-tile (g = 16) scale modes): those columns
    are NaN for every row, the others as with the clean scales."""
    k, n = 80, 100
    qw = hr.quantize_int8(torch.randn(n, k), group_size=group_size)
    bad = hr.QuantizedWeight(qw.data, qw.scale.clone(), group_size)
    cols = [0, n // 2, n - 1]
    if group_size is None:
        bad.scale[cols] = NAN
    else:
        bad.scale[cols, [0, 1, -1]] = NAN
    x, bias = torch.randn(m, k, dtype=dtype), torch.randn(n, dtype=dtype)
    others = [c for c in range(n) if c not in cols]
    for backend in backends(activations, dtype):
        y = matmul(x, bad, bias, activations, backend)
        assert y[:, cols].isnan().all(), backend
        assert torch.equal(y[:, others], matmul(x, qw, bias, activations, backend)[:, others]), backend


def test_nonfinite_bias_column():
    """A NaN / inf bias entry adds into its column as in nn.Linear, on every backend."""
    qw = hr.quantize_int8(torch.randn(64, 40))
    x, bias = torch.randn(15, 40), torch.randn(64)
    bias[[0, 63]] = torch.tensor([NAN, -INF])
    for activations in ("fp", "int8"):
        expected = nn.functional.linear(x, qw.dequantize(), bias)
        for backend in backends(activations, x.dtype):
            assert_same_nonfinite(backend, matmul(x, qw, bias, activations, backend), expected)


@pytest.mark.parametrize("m, k, group_size, activations", [
    (1, 64, None, "fp"),  # _weight_int8pack_mm
    (15, 64, None, "fp"),  # bfloat16 widened blocks
    (3, 40, 20, "fp"),  # float32 route
    (15, 64, None, "int8"),
])
@pytest.mark.parametrize("kind", ["nan", "inf", "mix"])
def test_bfloat16_cpu_routes(m, k, group_size, activations, kind):
    """bfloat16 runs on the cpu backend only here (the interpreter cannot do bfloat16 dots): same patterns."""
    x, _, dirty, qw, bias = make_case(m, k, 48, torch.bfloat16, kind, group_size)
    y = matmul(x, qw, bias, activations, "cpu")
    assert_same_nonfinite("cpu vs reference", y, matmul(x, qw, bias, activations, "reference"))
    if activations == "fp":
        assert_same_nonfinite("cpu vs float layer", y, nn.functional.linear(x.float(), qw.dequantize(), bias.float()))
    else:
        assert y[dirty].isnan().all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_activation_scales_carry_nan(dtype):
    """quantize_activations and the Triton kernel give a NaN scale exactly for the rows holding NaN or inf, bit for
    bit the same scales, and the same int8 data on the finite rows."""
    from hybridrag.kernels.int8 import triton_kernels as tk
    x = torch.randn(113, 100, dtype=dtype)
    x[[0, 5, 56, 112], [0, 99, 50, 7]] = torch.tensor([NAN, INF, -INF, NAN], dtype=dtype)
    data, scale = quantize_activations(x)
    t_data, t_scale = tk.quantize_activations_triton(x)
    bad = torch.zeros(113, dtype=torch.bool)
    bad[[0, 5, 56, 112]] = True
    assert torch.equal(scale.isnan(), bad) and torch.equal(t_scale.isnan(), bad)
    assert torch.equal(scale[~bad], t_scale[~bad]) and torch.equal(data[~bad], t_data[~bad])
    assert (t_data[bad] == 0).all()


@pytest.mark.parametrize("group_size", [None, 4])
def test_quantize_weight_kernel_carries_nan(group_size):
    """The kernel-level quantize_weight (under quantize_int8's check) gives the rows (groups) it cannot represent a
    NaN scale, and only those."""
    weight = torch.randn(6, 8, dtype=torch.float64)
    weight[1, 0], weight[3, 7], weight[5, 4] = NAN, -INF, 1e300  # 1e300: inf in float32
    _, scale = quantize_weight(weight, group_size)
    expected = torch.zeros_like(scale, dtype=torch.bool)
    if group_size is None:
        expected[[1, 3, 5]] = True
    else:
        expected[[1, 3, 5], [0, 1, 1]] = True
    assert torch.equal(scale.isnan(), expected)


@pytest.mark.parametrize("row, col", [(0, 0), (12, 20), (23, 39)])
@pytest.mark.parametrize("value", [NAN, INF, -INF])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("group_size", [None, 8])
def test_quantize_refuses_nonfinite_weight(row, col, value, dtype, group_size):
    weight = torch.randn(24, 40, dtype=dtype)
    weight[row, col] = value
    with pytest.raises(ValueError, match=rf"weight must be finite, but 1 of its 24 rows .* the first: "
                                         rf"weight\[{row}, {col}\] = {value}"):
        hr.quantize_int8(weight, group_size=group_size)


def test_quantize_refusal_counts_rows_and_flags_float32_overflow():
    weight = torch.randn(24, 40, dtype=torch.float64)
    weight[[3, 3, 9]] = 0
    weight[3, 5], weight[9, 1] = 1e300, NAN
    with pytest.raises(ValueError, match=r"2 of its 24 rows .* weight\[3, 5\] = 1e\+300 \(beyond float32"):
        hr.quantize_int8(weight)


def test_layers_name_the_nonfinite_weight():
    linear = nn.Linear(40, 24)
    with torch.no_grad():
        linear.weight[7, 3] = NAN
    with pytest.raises(ValueError, match=r"linear\.weight\[7, 3\] = nan"):
        Int8Linear.from_linear(linear)
    model = nn.Sequential(nn.Linear(40, 40), nn.Sequential(nn.ReLU(), linear))
    with pytest.raises(ValueError, match=r"cannot quantize '1\.1': linear\.weight must be finite.* "
                                         r"linear\.weight\[7, 3\] = nan"):
        quantize_model(model)
    assert type(model[0]) is nn.Linear and type(model[1][1]) is nn.Linear  # nothing was replaced


@pytest.mark.parametrize("weight, group_size, error, match", [
    (torch.randn(4, 0), None, ValueError, r"weight must have at least one output and one input feature, got shape "
                                          r"\(4, 0\)"),
    (torch.randn(0, 4), None, ValueError, r"at least one output .* got shape \(0, 4\)"),
    (torch.randn(0, 0), None, ValueError, r"got shape \(0, 0\)"),
    (torch.randn(4, 0), 2, ValueError, r"got shape \(4, 0\)"),
    (torch.randn(8), None, ValueError, r"weight must be 2-D .* got shape \(8,\)"),
    (torch.tensor(1.0), None, ValueError, r"weight must be 2-D .* got shape \(\)"),
    (torch.randn(2, 3, 4), None, ValueError, r"weight must be 2-D .* got shape \(2, 3, 4\)"),
    (torch.randn(4, 10), 3, ValueError, r"group_size must be a positive divisor of K=10 .* got 3"),
    (torch.randn(4, 10), -2, ValueError, r"positive divisor of K=10 .* got -2"),
    (torch.randn(4, 10), True, TypeError, r"group_size must be an int or None, got bool"),
    (torch.randn(4, 10, dtype=torch.complex64), None, TypeError, r"weight must be a floating-point tensor"),
])
def test_quantize_degenerate_shapes(weight, group_size, error, match):
    with pytest.raises(error, match=match):
        hr.quantize_int8(weight, group_size=group_size)


def test_quantize_strided_weight():
    """A transposed (non-contiguous) weight quantizes as its contiguous copy does, group-wise too."""
    weight = torch.randn(40, 24).T
    for group_size in (None, 8):
        a, b = hr.quantize_int8(weight, group_size=group_size), hr.quantize_int8(weight.contiguous(),
                                                                                  group_size=group_size)
        assert torch.equal(a.data, b.data) and torch.equal(a.scale, b.scale)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("activations", ["fp", "int8"])
@pytest.mark.parametrize("m", [1, 113, 4096])
def test_gpu_nonfinite_matches_reference(m, activations, dtype):
    """Compiled kernels (whose max and min may drop NaN) give the reference's non-finite pattern."""
    k, n = 1000, 1024
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    x[[0, m // 2, m - 1], [0, k // 2, k - 1]] = torch.tensor([NAN, INF, -INF], device="cuda", dtype=dtype)
    weight = torch.randn(n, k, device="cuda")
    weight[::3, [0, k // 2, k - 1]] = 0
    qw = hr.quantize_int8(weight)
    y = hr.int8_matmul(x, qw, activations=activations, backend="triton")
    expected = hr.int8_matmul(x, qw, activations=activations, backend="reference")
    assert_same_nonfinite("triton vs reference", y, expected)
    if activations == "int8":
        assert y[[0, m // 2, m - 1]].isnan().all() and torch.isfinite(y[1:m // 2]).all()
