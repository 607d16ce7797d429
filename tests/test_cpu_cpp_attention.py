"""The C++ sliding-window kernels (csrc/window_attention.cpp) as ops: schema and fake (opcheck), their own checks,
the route that takes them, and the second pass that a non-finite output triggers. Their accuracy over shapes, GQA,
dtypes and strides is tested with every backend in test_sliding_window_kernel.py and test_attention_nonfinite.py."""
import pytest
import torch

import hybridrag as hr

pytestmark = pytest.mark.parametrize("cpu_kernels", ["cpp"], indirect=True)


def inputs(dtype=torch.float32, tq=37, tk=37, heads=4, kv_heads=2, dim=40):
    return (torch.randn(2, heads, tq, dim, dtype=dtype), torch.randn(2, kv_heads, tk, dim, dtype=dtype),
            torch.randn(2, kv_heads, tk, dim, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_ops_pass_opcheck(dtype, cpu_kernels):
    q, k, v = inputs(dtype)
    ops = torch.ops.hybridrag_cpu
    torch.library.opcheck(ops.window_attention_fwd.default, (q, k, v, 7, 0, 0.25))
    out, lse, _ = ops.window_attention_fwd(q, k, v, 7, 0, 0.25)
    for grad_lse in (None, torch.randn(lse.shape)):
        torch.library.opcheck(ops.window_attention_bwd.default,
                              (q, k, v, out, lse, torch.randn_like(out), grad_lse, 7, 0, 0.25))


def test_the_cpu_backend_runs_the_cpp_kernels(cpu_kernels):
    q, k, v = (t.requires_grad_(True) for t in inputs())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        hr.sliding_window_attention(q, k, v, 8, backend="cpu").sum().backward()
    names = {event.name for event in prof.events()}
    assert {"hybridrag_cpu::window_attention_fwd", "hybridrag_cpu::window_attention_bwd"} <= names


def test_a_hidden_nan_is_reported_and_the_route_keeps_it_out(cpu_kernels):
    """Key 0 holds NaN; with a window of 4 only the first 4 rows see it. The kernel multiplies it into a key tile
    that other rows share, reports a non-finite output, and the route's second pass gives the reference's rows."""
    q, k, v = inputs(tq=40, tk=40)
    v[:, :, 0] = float("nan")
    *_, finite = torch.ops.hybridrag_cpu.window_attention_fwd(q, k, v, 3, 0, 0.25)
    assert not finite
    out = hr.sliding_window_attention(q, k, v, 4, scale=0.25, backend="cpu")
    truth = hr.sliding_window_attention(q.double(), k.double(), v.double(), 4, scale=0.25, backend="reference")
    assert torch.isnan(out[:, :, :4]).all() and not torch.isnan(out[:, :, 4:]).any()
    torch.testing.assert_close(out[:, :, 4:].double(), truth[:, :, 4:], atol=1e-5, rtol=1e-5)


def test_finite_inputs_report_finite_outputs(cpu_kernels):
    q, k, v = inputs()
    out, lse, finite = torch.ops.hybridrag_cpu.window_attention_fwd(q, k, v, 7, 0, 0.25)
    *grads, grad_finite = torch.ops.hybridrag_cpu.window_attention_bwd(q, k, v, out, lse, torch.randn_like(out),
                                                                       None, 7, 0, 0.25)
    assert finite and grad_finite and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("change, match", [
    ({"q": torch.randn(2, 4, 37, 40).double()}, "float32, bfloat16 or float16"),
    ({"k": torch.randn(2, 2, 37, 40).half()}, "must share a dtype"),
    ({"q": torch.randn(2, 3, 37, 40)}, "H must be a multiple of Hkv"),
    ({"v": torch.randn(2, 2, 36, 40)}, "must match q"),
    ({"q": torch.randn(2, 4, 40, 37).transpose(2, 3)}, "unit last strides"),
    ({"scale": 0.0}, "scale must be positive"),
], ids=["dtype", "mixed", "heads", "shapes", "strides", "scale"])
def test_the_op_refuses_what_it_cannot_compute(change, match, cpu_kernels):
    q, k, v = inputs()
    if change.get("q") is not None and change["q"].dtype == torch.float64:
        k, v = k.double(), v.double()
    args = {"q": q, "k": k, "v": v, "scale": 0.25, **change}
    with pytest.raises(RuntimeError, match=match):
        torch.ops.hybridrag_cpu.window_attention_fwd(args["q"], args["k"], args["v"], 7, 0, args["scale"])
