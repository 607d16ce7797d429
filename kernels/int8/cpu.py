"""int8 matmul on CPU. W8A8 runs on PyTorch's int8 kernel `_int_mm` (int8 x int8 -> int32). W8A16 takes one of three
routes, chosen per call by `w8a16_route` from x's dtype, M and the weight's layout (never by timing):

- "int8pack": bfloat16 x, per-channel weight, M <= SMALL_M: PyTorch's `_weight_int8pack_mm`, which reads the
  int8 weight once and dequantizes in registers (fp32 accumulation; the scales rounded to bfloat16, the dtype it takes).
  Its AVX-512 kernel reads x and the weight 16 elements at a time with aligned loads and checks neither, so the route
  needs K % 16 == 0, contiguous operands and 32-byte-aligned rows (x is copied to aligned memory when it is not).
- "bf16": bfloat16 x with M > SMALL_M (or a per-channel weight _weight_int8pack_mm cannot take): the weight is widened
  to bfloat16 a block of rows at a time (exact for int8 values; group-wise: dequantized) and multiplied in bfloat16
  with fp32 accumulation (oneDNN); scale and bias in fp32.
- "fp32": float16 and float32 x, and bfloat16 x with M <= SMALL_M and a group-wise weight: x converted to float32
  (exact), the weight widened to float32 a block at a time, fp32 matmul. Measured on a 2-core EPYC (torch 2.13):
  float16 matmuls, and bfloat16 ones with one to four rows on a freshly widened block, are several times slower
  than fp32 ones there.

The gradient to x, grad_out @ dequant(W), widens blocks of K columns the same way ("bf16" for bfloat16 grad_out, "fp32"
otherwise). Outputs are in x's (grad_out's) dtype.

Memory: besides the output, a float32 (M, N) accumulator and x in the compute dtype; one widened weight block of about
WIDEN_BLOCK_BYTES (group-wise, plus its float32 intermediate of twice that in bfloat16); never an (N, K) copy."""
import torch

from .quantize import dequantize_weight, quantize_activations

SMALL_M = 4  # _weight_int8pack_mm tiles M by 4 and re-reads the weight per tile: widened bfloat16 wins above
WIDEN_BLOCK_BYTES = 1 << 20  # one widened weight block: small enough to stay in cache, large enough for a fast GEMM
ROUTES = ("int8pack", "bf16", "fp32")


def w8a16_route(x, data, group_size):
    """The W8A16 route for x (M, K) and int8 data (N, K): "int8pack", "bf16" or "fp32" (module docstring)."""
    if x.dtype != torch.bfloat16:
        return "fp32"
    if x.shape[0] > SMALL_M:
        return "bf16"
    if group_size is not None:
        return "fp32"
    packable = data.shape[1] % 16 == 0 and data.is_contiguous() and data.data_ptr() % 32 == 0
    return "int8pack" if packable else "bf16"


def _compute_dtype(route):
    return torch.bfloat16 if route == "bf16" else torch.float32


def _block(total, bytes_per_unit, multiple=1):
    """How many rows (or columns) of the weight one widened block holds: about WIDEN_BLOCK_BYTES, a multiple of
    `multiple` (the group size when blocks cut K)."""
    units = max(WIDEN_BLOCK_BYTES // bytes_per_unit, 1)
    return min(total, max(units // multiple, 1) * multiple)


def _widened(data, scale, group_size, dtype):
    """A block of the weight in dtype: the int8 values themselves (exact) per channel, dequantized group-wise."""
    return data.to(dtype) if group_size is None else dequantize_weight(data, scale, group_size, dtype)


def _int8pack(x, data, scale):
    if not x.is_contiguous() or x.data_ptr() % 32 != 0:
        x = x.clone(memory_format=torch.contiguous_format)  # a fresh allocation is 64-byte aligned
        if x.data_ptr() % 32 != 0:
            raise RuntimeError("could not place x in 32-byte-aligned memory for _weight_int8pack_mm")
    return torch._weight_int8pack_mm(x, data, scale.to(torch.bfloat16)).float()


def _widened_matmul(x, data, scale, group_size, dtype):
    """x (M, K) @ dequant(data).T in float32 (M, N), widening `data` to dtype a block of rows at a time."""
    n, k = data.shape
    xc = x.to(dtype)
    out = torch.empty(x.shape[0], n, dtype=torch.float32)
    rows = _block(n, k * dtype.itemsize)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        block = _widened(data[start:stop], scale[start:stop], group_size, dtype)
        if dtype == torch.float32:
            torch.mm(xc, block.T, out=out[:, start:stop])
        else:
            out[:, start:stop] = xc @ block.T
    if group_size is None:
        out *= scale
    return out


def int8_matmul_cpu(x, data, scale, group_size, bias=None, activations="fp"):
    """x (M, K), data int8 (N, K), scale float32 (N,) or (N, K // group_size), bias (N,) or None -> (M, N)."""
    if activations == "int8":  # per-channel weights only (checked by the op)
        x_data, x_scale = quantize_activations(x)
        out = torch._int_mm(x_data, data.T).float() * x_scale[:, None] * scale[None, :]
    else:
        route = w8a16_route(x, data, group_size)
        if route == "int8pack":
            out = _int8pack(x, data, scale)
        else:
            out = _widened_matmul(x, data, scale, group_size, _compute_dtype(route))
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def int8_matmul_grad_input_cpu(grad_out, data, scale, group_size):
    """grad_out (M, N) -> grad_x (M, K) = grad_out @ dequant(W), in grad_out's dtype, widening blocks of K columns."""
    n, k = data.shape
    dtype = _compute_dtype("bf16" if grad_out.dtype == torch.bfloat16 else "fp32")
    if group_size is None:  # fold the per-channel scale into grad_out (in fp32, then the compute dtype)
        grad = (grad_out.float() * scale[None, :]).to(dtype)
    else:
        grad = grad_out.to(dtype)
    grad_x = torch.empty(grad_out.shape[0], k, dtype=dtype)
    cols = _block(k, n * dtype.itemsize, group_size or 1)
    for start in range(0, k, cols):
        stop = min(start + cols, k)
        block_scale = scale if group_size is None else scale[:, start // group_size:stop // group_size]
        torch.mm(grad, _widened(data[:, start:stop], block_scale, group_size, dtype), out=grad_x[:, start:stop])
    return grad_x.to(grad_out.dtype)
