"""Symmetric int8 quantization, round to nearest, values clamped to [-127, 127] (so -128 is never used and the grid
is symmetric). Weights (N, K) get one float32 scale per output channel, or per group of `group_size` along K;
activations (M, K) get one scale per row (per token)."""
import torch

INT8_MAX = 127
MAX_INT8_REDUCTION = (2**31 - 1) // (INT8_MAX * INT8_MAX)  # longest exact int32 sum of int8 x int8 products


def _scales(amax):
    """Scale so that amax maps to 127; an all-zero channel gets scale 1 (its data is 0 either way)."""
    return torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))


def quantize_weight(weight, group_size=None):
    """weight (N, K) float -> (data int8 (N, K), scale float32 (N,) or (N, K // group_size))."""
    n, k = weight.shape
    w = weight.detach().float()
    if group_size is None:
        scale = _scales(w.abs().amax(dim=1))
        data = torch.round(w / scale[:, None])
    else:
        grouped = w.view(n, k // group_size, group_size)
        scale = _scales(grouped.abs().amax(dim=2))
        data = torch.round(grouped / scale[:, :, None]).view(n, k)
    return data.clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def dequantize_weight(data, scale, group_size=None, dtype=torch.float32):
    """(N, K) int8 and its scales -> (N, K) in `dtype` (computed in float32)."""
    n, k = data.shape
    if group_size is None:
        return (data.float() * scale[:, None]).to(dtype)
    grouped = data.float().view(n, k // group_size, group_size) * scale[:, :, None]
    return grouped.view(n, k).to(dtype)


def quantize_activations(x):
    """x (M, K) float -> (int8 (M, K), scale float32 (M,)): one scale per row (per token)."""
    x = x.float()
    scale = _scales(x.abs().amax(dim=1))
    return torch.round(x / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scale
