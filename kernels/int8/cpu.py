"""int8 matmul on CPU with PyTorch's own int8 kernels where they pay: `_int_mm` (int8 x int8 -> int32) for W8A8 and
`_weight_int8pack_mm` for per-channel W8A16 at decode sizes (M <= 4). For more rows that kernel scales badly
(measured on a 2-core EPYC at N = K = 1024: about 9x slower than converting the weight at M = 128), so the weight
is converted to float32 for one matmul and the per-channel scale applied to the output. Group-wise weights are
dequantized to float32. Math in float32, output in x's dtype.

Memory: float32 copies of x and the output; W8A16 beyond decode sizes also a float32 (N, K) weight."""
import torch

from .quantize import dequantize_weight, quantize_activations

INT8PACK_MAX_ROWS = 4  # above this, converting the weight and one float32 matmul is faster on CPU


def int8_matmul_cpu(x, data, scale, group_size, bias=None, activations="fp"):
    """x (M, K), data int8 (N, K), scale float32 (N,) or (N, K // group_size), bias (N,) or None -> (M, N)."""
    if activations == "int8":  # per-channel weights only (checked by the op)
        x_data, x_scale = quantize_activations(x)
        out = torch._int_mm(x_data, data.T).float() * x_scale[:, None] * scale[None, :]
    elif group_size is None and x.shape[0] <= INT8PACK_MAX_ROWS:
        out = torch.ops.aten._weight_int8pack_mm(x.float().contiguous(), data.contiguous(), scale)
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
