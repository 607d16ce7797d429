"""The int8 CPU path against the float64 reference under the tolerance rule (shared by the int8 test files)."""
import torch
from tolerance import tolerance_error

import hybridrag as hr


def assert_cpu_matches_reference(x, qweight, bias=None, activations="fp"):
    """y, dx and dbias of backend="cpu" against the float64 reference under the tolerance rule (baseline: the
    dequantized weight in x's dtype, one matmul)."""
    dtype, (m, n) = x.dtype, (x.shape[0], qweight.out_features)
    x_ref = x.detach().double().requires_grad_(True)
    bias_ref = None if bias is None else bias.detach().double().requires_grad_(True)
    truth = hr.int8_matmul(x_ref, qweight, bias_ref, activations=activations, backend="reference")
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
