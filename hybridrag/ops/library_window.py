"""`hybridrag::sliding_window_fwd` / `_bwd`: the sliding-window kernels as torch.library custom ops (the pattern of
`library.py`: low-level define/impl, a fake implementation, autograd through `register_autograd`, gradients
through lse too). Inputs are checked and laid out by `hybridrag.ops.sliding_window`; the ops only dispatch."""
import torch

from hybridrag.kernels.sliding_window.cpu import sliding_window_bwd_cpu, sliding_window_fwd_cpu

from .validation import unit_last_stride


def backend_functions(backend):
    """(forward, backward) of a concrete backend ("triton" or "cpu")."""
    if backend == "triton":
        # Imported on first use: CPU-only installs need not have Triton.
        from hybridrag.kernels.sliding_window import triton_kernels
        return triton_kernels.sliding_window_fwd_triton, triton_kernels.sliding_window_bwd_triton
    return sliding_window_fwd_cpu, sliding_window_bwd_cpu


torch.library.define(
    "hybridrag::sliding_window_fwd",
    "(Tensor q, Tensor k, Tensor v, int left, int right, float scale, str backend) -> (Tensor, Tensor)")
torch.library.define(
    "hybridrag::sliding_window_bwd",
    "(Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor grad_out, Tensor? grad_lse, int left, int right, "
    "float scale, str backend) -> (Tensor, Tensor, Tensor)")


@torch.library.impl("hybridrag::sliding_window_fwd", "CompositeExplicitAutograd")
def _forward(q, k, v, left, right, scale, backend):
    """q (B, H, Tq, D), k/v (B, Hkv, Tk, D) -> (o (B, H, Tq, D) contiguous in q's dtype, lse (B, H, Tq) float32)."""
    out, lse = backend_functions(backend)[0](q, k, v, left, right, scale)
    return out.contiguous(), lse.contiguous()


@torch.library.register_fake("hybridrag::sliding_window_fwd")
def _(q, k, v, left, right, scale, backend):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.impl("hybridrag::sliding_window_bwd", "CompositeExplicitAutograd")
def _backward_kernels(q, k, v, out, lse, grad_out, grad_lse, left, right, scale, backend):
    """(dq, dk, dv), contiguous, in the dtypes of q, k, v."""
    dq, dk, dv = backend_functions(backend)[1](q, k, v, out, lse, grad_out, grad_lse, left, right, scale)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@torch.library.register_fake("hybridrag::sliding_window_bwd")
def _(q, k, v, out, lse, grad_out, grad_lse, left, right, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, *constants = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.constants = constants


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    grad_out = torch.zeros_like(out) if grad_out is None else unit_last_stride(grad_out)
    grad_lse = None if grad_lse is None else grad_lse.contiguous()
    dq, dk, dv = torch.ops.hybridrag.sliding_window_bwd(q, k, v, out, lse, grad_out, grad_lse, *ctx.constants)
    return dq, dk, dv, None, None, None, None


torch.library.register_autograd("hybridrag::sliding_window_fwd", _backward, setup_context=_setup_context)
sliding_window_fwd = torch.ops.hybridrag.sliding_window_fwd
