"""`hybridrag::int8_matmul_fwd` / `_grad_input`: the int8 matmul kernels as torch.library custom ops (the pattern of
`library.py`). Autograd through `register_autograd`: gradients to x and bias, never to the int8 weight. Inputs are
checked and flattened to 2-D by `hybridrag.ops.int8`; the ops only dispatch."""
import torch

from hybridrag.kernels.int8 import int8_matmul_cpu, int8_matmul_grad_input_cpu


def _without_autocast(fn):
    """The CPU functions run their matmuls in the dtypes they chose; autocast must not recast them."""
    def call(*args):
        if not torch.is_autocast_enabled("cpu"):
            return fn(*args)
        with torch.autocast("cpu", enabled=False):
            return fn(*args)
    return call


@_without_autocast
def _forward_cpu(x, data, scale, group_size, bias, activations, accumulate):
    return int8_matmul_cpu(x, data, scale, group_size, bias, activations)


@_without_autocast
def _grad_input_cpu(grad_out, data, scale, group_size, accumulate):
    return int8_matmul_grad_input_cpu(grad_out, data, scale, group_size)


def backend_functions(backend):
    """(forward, grad_input) of a concrete backend ("triton" or "cpu"), both with the Triton launchers' arguments."""
    if backend == "triton":
        # Imported on first use: CPU-only installs need not have Triton.
        from hybridrag.kernels.int8 import triton_kernels
        return triton_kernels.int8_matmul_triton, triton_kernels.int8_matmul_grad_input_triton
    return _forward_cpu, _grad_input_cpu


torch.library.define(
    "hybridrag::int8_matmul_fwd",
    "(Tensor x, Tensor data, Tensor scale, Tensor? bias, int? group_size, str activations, str accumulate, "
    "str backend) -> Tensor")
torch.library.define(
    "hybridrag::int8_matmul_grad_input",
    "(Tensor grad_out, Tensor data, Tensor scale, int? group_size, str accumulate, str backend) -> Tensor")


@torch.library.impl("hybridrag::int8_matmul_fwd", "CompositeExplicitAutograd")
def _forward(x, data, scale, bias, group_size, activations, accumulate, backend):
    """x (M, K) @ dequant(data (N, K), scale).T + bias (N,) -> (M, N) contiguous in x's dtype."""
    return backend_functions(backend)[0](x, data, scale, group_size, bias, activations, accumulate).contiguous()


@torch.library.register_fake("hybridrag::int8_matmul_fwd")
def _(x, data, scale, bias, group_size, activations, accumulate, backend):
    return x.new_empty(x.shape[0], data.shape[0])


@torch.library.impl("hybridrag::int8_matmul_grad_input", "CompositeExplicitAutograd")
def _grad_input(grad_out, data, scale, group_size, accumulate, backend):
    """grad_out (M, N) -> grad_out @ dequant(data (N, K), scale): (M, K) contiguous in grad_out's dtype."""
    return backend_functions(backend)[1](grad_out, data, scale, group_size, accumulate).contiguous()


@torch.library.register_fake("hybridrag::int8_matmul_grad_input")
def _(grad_out, data, scale, group_size, accumulate, backend):
    return grad_out.new_empty(grad_out.shape[0], data.shape[1])


def _setup_context(ctx, inputs, output):
    x, data, scale, bias, group_size, activations, accumulate, backend = inputs
    ctx.save_for_backward(data, scale)
    ctx.constants = group_size, accumulate, backend
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    data, scale = ctx.saved_tensors
    group_size, accumulate, backend = ctx.constants
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.hybridrag.int8_matmul_grad_input(grad_out.contiguous(), data, scale, group_size,
                                                            accumulate, backend)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = grad_out.sum(0, dtype=torch.float32).to(grad_out.dtype)
    return grad_x, None, None, grad_bias, None, None, None, None


torch.library.register_autograd("hybridrag::int8_matmul_fwd", _backward, setup_context=_setup_context)
int8_matmul_fwd = torch.ops.hybridrag.int8_matmul_fwd
