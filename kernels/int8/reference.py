"""Plain PyTorch int8 matmul: dequantize, then matmul in float32. The truth for tests.

Memory: a float32 (N, K) copy of the weight and float32 copies of x and the output."""
import torch

from .quantize import dequantize_weight, quantize_activations


def int8_matmul_reference(x, data, scale, group_size, bias=None, activations="fp"):
    """x (M, K), data int8 (N, K), scale (N,) or (N, K // group_size), bias (N,) or None -> (M, N) in x's dtype.

    activations="int8" first quantizes x per row (W8A8) and uses the dequantized x. Computes in float32, or float64
    for float64 x (the tests' truth). Non-finite values propagate through the float math: W8A16 as nn.Linear with the
    dequantized weight; W8A8 rows holding NaN or inf get a NaN scale, so a whole NaN output row."""
    dtype = x.dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    if activations == "int8":
        x_data, x_scale = quantize_activations(x)
        x = x_data.to(compute) * x_scale[:, None].to(compute)
    out = x.to(compute) @ dequantize_weight(data, scale, group_size, compute).T
    if bias is not None:
        out = out + bias.to(compute)
    return out.to(dtype)
