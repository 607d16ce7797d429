"""Symmetric int8 quantization, round to nearest, values clamped to [-127, 127] (so -128 is never used and the grid
is symmetric). Weights (N, K) get one float32 scale per output channel, or per group of `group_size` along K;
activations (M, K) get one scale per row (per token).

Non-finite values: a row (or group) holding NaN or +-inf gets a NaN scale, so every product that uses it is NaN:
the int8 format cannot represent the row, and NaN is the honest value for it (for activations, a whole output row
of W8A8; `hybridrag.quantize_int8` refuses such weights instead). The int8 data of such a row is unspecified (what
the cast of NaN gives); it only ever meets the NaN scale. Carried by the scale alone: no extra pass over the data."""
import torch

INT8_MAX = 127
MAX_INT8_REDUCTION = (2**31 - 1) // (INT8_MAX * INT8_MAX)  # longest exact int32 sum of int8 x int8 products


def _scales(amax):
    """Scale so that amax maps to 127; an all-zero channel gets scale 1 (its data is 0 either way); a NaN or inf
    amax (torch's amax propagates NaN) a NaN scale. As many ops as without the NaN case: inf -> NaN in nan_to_num."""
    return torch.where(amax == 0, 1.0, amax.nan_to_num(nan=float("nan"), posinf=float("nan")) / INT8_MAX)


def quantize_weight(weight, group_size=None):
    """weight (N, K) float -> (data int8 (N, K), scale float32 (N,) or (N, K // group_size)); NaN scales for rows
    (groups) that are not finite in float32."""
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
    """x (M, K) float -> (int8 (M, K), scale float32 (M,)): one scale per row (per token), NaN for a row holding
    NaN or inf."""
    x = x.float()
    scale = _scales(x.abs().amax(dim=1))
    return torch.round(x / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scale
