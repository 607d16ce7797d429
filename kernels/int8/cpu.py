"""int8 matmul on CPU. W8A8 runs on PyTorch's int8 kernel `_int_mm` (int8 x int8 -> int32). W8A16 converts the int8
weight to float32 for one matmul and applies the per-channel scale to the output (group-wise: dequantized first).
PyTorch's `_weight_int8pack_mm` was measured and not used: on a 2-core EPYC (torch 2.13 CPU build, N = K = 1024) it
took 0.64 / 3.6 / 14 / 107 ms at M = 1 / 4 / 16 / 128 against 0.19 / 0.46 / 1.6 / 2.1 ms for convert-and-matmul.
Math in float32, output in x's dtype.

Memory: float32 copies of x and the output; W8A16 also a float32 (N, K) weight for the duration of the call."""
import torch

from .quantize import dequantize_weight, quantize_activations


def int8_matmul_cpu(x, data, scale, group_size, bias=None, activations="fp"):
    """x (M, K), data int8 (N, K), scale float32 (N,) or (N, K // group_size), bias (N,) or None -> (M, N)."""
    if activations == "int8":  # per-channel weights only (checked by the op)
        x_data, x_scale = quantize_activations(x)
        out = torch._int_mm(x_data, data.T).float() * x_scale[:, None] * scale[None, :]
    elif group_size is None:
        out = (x.float() @ data.T.float()) * scale
    else:
        out = x.float() @ dequantize_weight(data, scale, group_size).T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def int8_matmul_grad_input_cpu(grad_out, data, scale, group_size):
    """grad_out (M, N) -> grad_x (M, K) = grad_out @ dequant(W), in grad_out's dtype."""
    if group_size is None:  # fold the per-channel scale into grad_out
        return ((grad_out.float() * scale[None, :]) @ data.float()).to(grad_out.dtype)
    return (grad_out.float() @ dequantize_weight(data, scale, group_size)).to(grad_out.dtype)
