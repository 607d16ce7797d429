"""int8 matmul on CPU. W8A8 runs on PyTorch's int8 kernel `_int_mm` (int8 x int8 -> int32). W8A16 takes one of four
routes, chosen per call by `w8a16_route` from x's dtype, M, the weight's layout and which CPU kernels are in use
(`hybridrag.kernels.cpp`; never by timing):

- "cpp": M <= SMALL_M, a contiguous weight, and the C++ kernels in use (csrc/int8_matmul.cpp): every int8 weight
  widened in registers next to its product, x in float32, fp32 accumulation, per-channel or group-wise scales; the
  weight is read once per call and never copied. Any float dtype of x, any K.
- "int8pack": without the C++ kernels, bfloat16 x, per-channel weight, M <= SMALL_M: PyTorch's `_weight_int8pack_mm`, which reads the
  int8 weight once and dequantizes in registers (fp32 accumulation; the scales rounded to bfloat16, the dtype it takes).
  Its AVX-512 kernel reads x and the weight 16 elements at a time with aligned loads and checks neither, so the route
  needs K % 16 == 0, contiguous operands and 32-byte-aligned rows (x is copied to aligned memory when it is not).
- "bf16": bfloat16 x with M > SMALL_M: the weight is widened to bfloat16 a block of rows at a time (exact for int8
  values; group-wise: dequantized) and multiplied in bfloat16 with fp32 accumulation (oneDNN); scale and bias in fp32.
- "fp32": float16 and float32 x, and bfloat16 x with M <= SMALL_M that _weight_int8pack_mm cannot take (group-wise
  weights, K % 16 != 0): x converted to float32 (exact), the weight widened to float32 a block at a time, fp32
  matmul. Measured on a 2-core EPYC (torch 2.13):
  float16 matmuls there run several times slower than fp32 ones from M = 16, and bfloat16 ones on a freshly widened
  block with a few rows slower than fp32 ones.

No route beats a bfloat16 nn.Linear everywhere: fp32 arithmetic runs at half bf16's rate, and widening costs a pass
over the weight per call. The opt-in cache (QuantizedWeight.cpu_cache, in hybridrag.ops) is the float layer's speed.

The gradient to x, grad_out @ dequant(W), widens the same blocks of rows (`grad_input_route`: "bf16" for bfloat16
grad_out with M > GRAD_SMALL_M, "fp32" otherwise) and sums their products in float32. Outputs are in x's (grad_out's)
dtype.

Non-finite values give the reference's NaN / +-inf at the same positions: NaN or inf in x meets the exact int8 weight
values in the matmul and the positive scales after it (inf * 0 = NaN either way), and W8A8's activation scales carry
NaN for a row holding NaN or inf (`quantize_activations`), which the epilogue spreads over the row. No extra pass.

Memory: besides the output, a float32 (M, N) accumulator (gradient: (M, K)) and x in the compute dtype; one buffer
for the widened weight block, WIDEN_BLOCK_BYTES in float32 (half in bfloat16; group-wise in bfloat16 both); never
an (N, K) copy. The widening buffers are a per-thread workspace kept between calls (at most 2.5 x WIDEN_BLOCK_BYTES,
10 MiB, a thread: a float32 and a bfloat16 block and group-wise bfloat16's float32 intermediate)."""
import threading

import torch

from ..cpp import cpp_ops
from .quantize import quantize_activations

SMALL_M = 8  # _weight_int8pack_mm re-reads the weight per 4 rows of x: measured slower than widened bf16 from M = 16
GRAD_SMALL_M = 2  # the gradient's bfloat16 route measured slower than float32 at M <= 2, not from M = 3
WIDEN_BLOCK_BYTES = 1 << 22  # one widened weight block: measured best of 0.25 to 8 MiB (2-core EPYC, N = K = 4096)


def int8pack_layout(x, data, group_size):
    """Whether x (M, K) and int8 data (N, K) have the dtype, sizes and layout `torch._weight_int8pack_mm` takes; it
    also needs data 32-byte aligned (`w8a16_route` checks the address)."""
    return (x.dtype == torch.bfloat16 and x.shape[0] <= SMALL_M and group_size is None and data.shape[1] % 16 == 0
            and data.is_contiguous())


def takes_cpp(x, data):
    """Whether x (M, K) on int8 data (N, K) takes the "cpp" route: M <= SMALL_M, data contiguous and the C++
    kernels in use (the first such call builds them)."""
    return x.shape[0] <= SMALL_M and data.is_contiguous() and cpp_ops() is not None


def w8a16_route(x, data, group_size):
    """The W8A16 route for x (M, K) and int8 data (N, K): "cpp", "int8pack", "bf16" or "fp32" (module docstring).
    The first call that could take "cpp" builds the C++ kernels (`hybridrag.kernels.cpp`) unless they are built."""
    if takes_cpp(x, data):
        return "cpp"
    if x.dtype != torch.bfloat16:
        return "fp32"
    if x.shape[0] > SMALL_M:
        return "bf16"
    return "int8pack" if int8pack_layout(x, data, group_size) and data.data_ptr() % 32 == 0 else "fp32"


def grad_input_route(grad_out):
    """The route of the gradient to x for grad_out (M, N): "bf16" for bfloat16 grad_out with M > GRAD_SMALL_M, else
    "fp32" (bfloat16 products of one or two rows with a widened block run slower than float32 ones)."""
    return "bf16" if grad_out.dtype == torch.bfloat16 and grad_out.shape[0] > GRAD_SMALL_M else "fp32"


def _compute_dtype(route):
    return torch.bfloat16 if route == "bf16" else torch.float32


def _block(n, k):
    """How many of the weight's n rows (of k values) one widened block holds: WIDEN_BLOCK_BYTES in float32 (the
    block's dtype, or group-wise its intermediate's)."""
    return min(n, max(WIDEN_BLOCK_BYTES // (4 * k), 1))


_WORKSPACE = threading.local()  # per thread: {(slot, dtype): flat buffer}, kept for the process's life


def _workspace(rows, cols, dtype, slot):
    """A (rows, cols) buffer in dtype that this thread's calls reuse: allocating one per call (or per block) costs
    page faults, because the C allocator hands blocks this large back to the system when they are freed. At most
    one block of WIDEN_BLOCK_BYTES in float32 per slot and dtype per thread."""
    buffers = getattr(_WORKSPACE, "buffers", None)
    if buffers is None:
        buffers = _WORKSPACE.buffers = {}
    buffer = buffers.get((slot, dtype))
    if buffer is None or buffer.numel() < rows * cols:
        buffer = buffers[(slot, dtype)] = torch.empty(rows * cols, dtype=dtype)
    return buffer[:rows * cols].view(rows, cols)


class _Widener:
    """Widens blocks of rows of an int8 weight into this thread's workspace, reused block after block and call
    after call: the int8 values themselves (exact) per channel, dequantized group-wise (float32 first, as
    dequantize_weight does)."""

    def __init__(self, data, scale, group_size, dtype):
        self.data, self.scale, self.group_size = data, scale, group_size
        self.rows = _block(data.shape[0], data.shape[1])
        self.buffer = _workspace(self.rows, data.shape[1], dtype, "block")
        needs_fp32 = group_size is not None and dtype != torch.float32
        self.fp32 = _workspace(self.rows, data.shape[1], torch.float32, "fp32") if needs_fp32 else self.buffer

    def blocks(self):
        """Yields (start, stop, block (stop - start, K) in dtype); each block is overwritten by the next."""
        n, k = self.data.shape
        for start in range(0, n, self.rows):
            stop = min(start + self.rows, n)
            if self.group_size is None:
                block = self.buffer[:stop - start].copy_(self.data[start:stop])
            else:
                wide = self.fp32[:stop - start].copy_(self.data[start:stop])
                wide.view(stop - start, k // self.group_size, self.group_size).mul_(self.scale[start:stop, :, None])
                block = wide if wide is self.buffer else self.buffer[:stop - start].copy_(wide)
            yield start, stop, block


def _int8pack(x, data, scale):
    if not x.is_contiguous() or x.data_ptr() % 32 != 0:
        x = x.clone(memory_format=torch.contiguous_format)  # a fresh allocation is 64-byte aligned
        if x.data_ptr() % 32 != 0:
            raise RuntimeError("could not place x in 32-byte-aligned memory for _weight_int8pack_mm")
    return torch._weight_int8pack_mm(x, data, scale.to(torch.bfloat16)).float()


def _widened_matmul(x, data, scale, group_size, dtype):
    """x (M, K) @ dequant(data).T in float32 (M, N), widening `data` to dtype a block of rows at a time."""
    xc = x.to(dtype)
    out = torch.empty(x.shape[0], data.shape[0], dtype=torch.float32)
    for start, stop, block in _Widener(data, scale, group_size, dtype).blocks():
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
        if route == "cpp":
            out = cpp_ops().w8a16_matmul(x.to(torch.float32).contiguous(), data, scale.contiguous(), group_size or 0)
        elif route == "int8pack":
            out = _int8pack(x, data, scale)
        else:
            out = _widened_matmul(x, data, scale, group_size, _compute_dtype(route))
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def int8_matmul_grad_input_cpu(grad_out, data, scale, group_size):
    """grad_out (M, N) -> grad_x (M, K) = grad_out @ dequant(W), in grad_out's dtype: blocks of rows of W widened as
    in the forward, their products summed in a float32 (M, K) accumulator."""
    n, k = data.shape
    dtype = _compute_dtype(grad_input_route(grad_out))
    if group_size is None:  # fold the per-channel scale into grad_out (in fp32, then the compute dtype)
        grad = (grad_out.float() * scale[None, :]).to(dtype)
    else:
        grad = grad_out.to(dtype)
    grad_x = torch.zeros(grad_out.shape[0], k, dtype=torch.float32)
    for start, stop, block in _Widener(data, scale, group_size, dtype).blocks():
        if dtype == torch.float32:
            grad_x.addmm_(grad[:, start:stop], block)
        else:
            grad_x += grad[:, start:stop] @ block
    return grad_x.to(grad_out.dtype)
