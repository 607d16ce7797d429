"""quantize_int8 and int8_matmul on the CPU path and the reference: quantization, accuracy, gradients, state_dict,
and bad input refused before any kernel runs."""
import pytest
import torch
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
    x_ref = x.detach().double().requires_grad_(True)
    bias_ref = None if bias is None else bias.detach().double().requires_grad_(True)
    truth = hr.int8_matmul(x_ref, qweight, bias_ref, activations=activations, backend="reference")
    # What PyTorch does in the input dtype: the dequantized weight in that dtype, one matmul.
    baseline = x @ qweight.dequantize(dtype).T + (0 if bias is None else bias)
    x_got = x.detach().requires_grad_(True)
    bias_got = None if bias is None else bias.detach().requires_grad_(True)
    got = hr.int8_matmul(x_got, qweight, bias_got, activations=activations, backend="cpu")
    assert got.dtype == dtype and got.shape == (m, n)
    failures = [tolerance_error("y", got, truth, baseline, dtype)]
    grad_out = torch.randn(m, n).to(dtype)
    truth_grads = torch.autograd.grad(truth, [t for t in (x_ref, bias_ref) if t is not None], grad_out.double())
    got_grads = torch.autograd.grad(got, [t for t in (x_got, bias_got) if t is not None], grad_out)
    base_grads = [grad_out @ qweight.dequantize(dtype)] + ([grad_out.sum(0)] if bias is not None else [])
    for name, g, t, b in zip(("dx", "dbias"), got_grads, truth_grads, base_grads):
        failures.append(tolerance_error(name, g, t, b, dtype))
    failures = [f for f in failures if f is not None]
    assert not failures, "\n".join(failures)


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
    for name in ("int8_matmul_cpu", "int8_matmul_reference"):
        monkeypatch.setattr(int8_ops, name, no_kernel)
    kwargs = make(qweight)
    with pytest.raises(error, match=match):
        hr.int8_matmul(kwargs.pop("x"), kwargs.pop("qweight"), **kwargs)
