"""INT8 matmul in Triton: W8A16 (int8 weight, float activations) and W8A8 (int8 x int8 -> int32), forward and the
gradient to the input. Imported on first use by `hybridrag.ops.int8`.

One GEMM kernel serves every case. It computes out (M, C) = A (M, R) @ B (R, C), where B is the int8 weight seen
through strides: the forward reads W (N, K) as B = W^T (R = K, C = N); the gradient to the input reads W as it is
(R = N, C = K). The weight is never dequantized into memory: each (BLOCK_R, BLOCK_C) int8 tile is loaded, turned into
floats in registers and fed to the tensor-core dot. Where the scale is applied is a constexpr (SCALE_MODE):

- EPILOGUE (forward, per-channel scale, fp32 accumulation; and W8A8): the scale depends only on the output column n,
  so acc[m, n] = sum_k x[m, k] * q[n, k] is scaled once at the end. The int8 values are exact in fp16/bf16 (|q| <= 127
  needs 7 bits), so the loop is a plain fp16/bf16 dot with fp32 accumulation: the cheapest scheme and as accurate as
  the dot itself. (fp32 x: an ieee fp32 dot.)
- PER_TILE (forward, group-wise scale, BLOCK_R divides group_size): within one K tile the scale is constant per n, so
  each tile's dot (exact int8 weights, fp32 result) is multiplied by scale[n, group] and added to the accumulator:
  BLOCK_M x BLOCK_C multiplies per tile instead of BLOCK_R x BLOCK_C for the weights, and no rounding of scaled
  weights to fp16. The launcher shrinks BLOCK_R to a power of two dividing group_size when one >= min(BLOCK_R, 32)
  exists (group sizes 32, 64, 128, ...).
- IN_REGISTERS (everything else): the int8 tile is multiplied by its scales in fp32 and rounded to the input dtype
  before the dot, as PyTorch does when it casts the dequantized weight: group sizes with no power-of-two divisor
  >= 16 (8, 20, ...), the gradient to the input (the per-channel scale lies along the reduction dim N there, so it
  cannot wait for the epilogue; scaling grad_out instead would push small gradients into fp16 subnormals, while
  scale x q has the magnitude of the original weight), and accumulate="fp16" (see below).

Accumulation: fp32 by default (int32 for W8A8). accumulate="fp16" keeps the accumulator in fp16 (tl.dot with
out_dtype=tl.float16): faster MMA on GPUs with a 2x fp16-accumulate rate, but every addition into the accumulator
rounds to fp16 (unit roundoff u = 2^-11), so the error bound grows like gamma_K * sum_k |x[m, k] * w[n, k]| with
gamma_K = K u / (1 - K u) (Higham, Accuracy and Stability of Numerical Algorithms, 3.1), against a single rounding
of the output with fp32 accumulation. It always dequantizes in registers, so that the fp16 accumulator holds values
of the output's magnitude: the raw integer sums (up to 127 / max|w| times larger) could overflow fp16's 65504.

Two launch shapes, chosen by `_use_splitk` (small functions so that tests can monkeypatch them):
- tiled (prefill, training): a 2-D grid of (BLOCK_M, BLOCK_C) output tiles in grouped order (GROUP_M row blocks
  share weight tiles in L2), each running the whole reduction and a fused epilogue (scale, bias, cast).
- split-K (decode, M <= 16: bandwidth bound, one row block): the reduction is cut into `splits` chunks so that
  column blocks x splits fill the GPU. Each program writes its partial sum (fp32, or int32 for W8A8 so that the sum
  stays exact) to a (splits, M, C) workspace, and a second small kernel adds the splits in a fixed order and applies
  the same epilogue: deterministic, unlike atomics. With accumulate="fp16" each split accumulates in fp16 and the
  splits are added in fp32.

W8A8: a fused kernel quantizes each row of x (abs-max, scale = amax / 127 or 1 for an all-zero row, x / scale rounded
to nearest even, clamped to [-127, 127], cast to int8), bit for bit as `quantize.quantize_activations` does (IEEE
divisions via div_rn, and rint by the 1.5 * 2^23 trick, which works in the interpreter and compiled alike). A row
holding NaN or inf gets a NaN scale, so the epilogue makes its whole output row NaN.

Non-finite values otherwise fall out of the arithmetic, as in the reference: a NaN or inf in x (W8A16) meets the
exact int8 weights in the dot (inf * 0 = NaN, +inf + -inf = NaN), and a NaN weight scale multiplies into every
output of its column. No extra pass, no host sync. Then the
GEMM runs int8 x int8 dots accumulating in int32, and the epilogue computes acc * x_scale[m] * w_scale[n] + bias in
fp32 (the order of the CPU path) before the cast. int32 accumulation is exact up to K = 133143.

Offsets: every base offset is computed in int64 once per program (rows, columns and the split's first reduction
index); the in-loop pointer steps (BLOCK_R x stride) are host-side Python ints, which Triton passes as int64 when
they need it. So no tensor is limited to 2^31 elements. Scale offsets in the loop are int64 vectors of BLOCK_R or
BLOCK_C elements.

Extra memory: the output; W8A8 also an int8 copy of x and M float32 scales; split-K also the (splits, M, C) float32
or int32 workspace.
"""
from collections import namedtuple

import torch
import triton
import triton.language as tl

from ..targets import gpu_target
from ..triton_common import _dot_precision

EPILOGUE, PER_TILE, IN_REGISTERS = 0, 1, 2  # SCALE_MODE: where the weight scale is applied
_RINT_MAGIC = 12582912.0  # 1.5 * 2^23

Config = namedtuple("Config", "block_m block_c block_r group_m splits num_warps num_stages")


# ---------------------------------------------------------------------------------------------------------------
# Tile-level helpers
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _rint(v):
    """Round to nearest, ties to even (torch.round) for |v| < 2^22: adding 1.5 * 2^23 leaves no fraction bits in
    float32's mantissa, so the IEEE round-to-nearest-even add does the rounding and the subtraction is exact. Plain
    float adds (no libdevice), so the interpreter and the compiled kernel agree. Larger |v| stay large and are
    clamped by the caller."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _tile_ids(pid, M, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped order (Triton's matmul tutorial): GROUP_M row blocks walk the column blocks together, so each weight
    tile is read by GROUP_M programs close in time (L2 hits)."""
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_c = tl.cdiv(C, BLOCK_C)
    in_group = GROUP_M * blocks_c
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_c = (pid % in_group) // size_m
    return pid_m, pid_c


@triton.jit
def _epilogue(acc, offs_m, offs_c, mask_m, mask_c, SCALE, stride_sc, A_SCALE, BIAS, stride_bias,
              INT8_A: tl.constexpr, SCALE_MODE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """acc [BM, BC] (fp32, fp16 or int32) -> fp32 output: x_scale[m] (W8A8), w_scale[n] (EPILOGUE mode), + bias."""
    out = acc.to(tl.float32)
    if INT8_A:
        out = out * tl.load(A_SCALE + offs_m, mask=mask_m, other=0.0)[:, None]
    if SCALE_MODE == 0:
        out = out * tl.load(SCALE + offs_c * stride_sc, mask=mask_c, other=0.0)[None, :]
    if HAS_BIAS:
        out += tl.load(BIAS + offs_c * stride_bias, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _quantize_rows_kernel(X, XQ, XS, K, stride_xm, stride_xk, stride_qm, BLOCK_K: tl.constexpr):
    """One program per row: amax over the row, then x / scale rounded, clamped and stored as int8. A row holding NaN
    or inf gets a NaN scale (and data 0), as `quantize.quantize_activations` does."""
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_xm
    q_row = XQ + row * stride_qm
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    poison = tl.zeros([BLOCK_K], dtype=tl.float32)  # x - x: 0 where x is finite, NaN where it is NaN or inf
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs
        x = tl.load(x_row + k.to(tl.int64) * stride_xk, mask=k < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
        poison += x - x
    row_max = tl.max(amax, 0)
    # A sum carries NaN under every compiler's rules (tl.max may drop it on a GPU, keep it in the interpreter).
    scale = tl.where(row_max > 0, tl.math.div_rn(row_max, 127.0), 1.0) + tl.sum(poison, 0)
    tl.store(XS + row, scale)
    finite = scale == scale
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs
        x = tl.load(x_row + k.to(tl.int64) * stride_xk, mask=k < K, other=0.0).to(tl.float32)
        q = _rint(tl.math.div_rn(x, scale))
        q = tl.where(finite, tl.minimum(tl.maximum(q, -127.0), 127.0), 0.0)  # no cast of NaN to int8
        tl.store(q_row + k, q.to(tl.int8), mask=k < K)


@triton.jit
def _int8_mm_kernel(A, B, SCALE, A_SCALE, BIAS, OUT,
                    M, C, R, CHUNK,
                    stride_am, stride_ar, stride_br, stride_bc, stride_sr, stride_sc, stride_bias,
                    stride_os, stride_om, stride_oc, step_a, step_b, GROUP_R, GROUP_C,
                    INT8_A: tl.constexpr, SCALE_MODE: tl.constexpr, SCALE_ON_R: tl.constexpr,
                    SCALE_ON_C: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
                    ACC_FP16: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr):
    """out[m, c] = sum_r A[m, r] * dequant(B)[r, c] over the reduction chunk of split `program_id(1)`.

    B is int8 with strides (stride_br, stride_bc). The scale of B[r, c] sits at
    SCALE + (r // GROUP_R) * stride_sr + (c // GROUP_C) * stride_sc (a term is absent when SCALE_ON_R / SCALE_ON_C is
    off). PARTIAL: store the raw fp32/int32 sum into split `program_id(1)` of a workspace (scale of EPILOGUE mode,
    x_scale and bias left to the reduction); otherwise apply the epilogue and store in OUT's dtype."""
    split = tl.program_id(1)
    pid_m, pid_c = _tile_ids(tl.program_id(0), M, C, BLOCK_M, BLOCK_C, GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_c = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_c = offs_c < C
    r_lo = split * CHUNK
    r_hi = tl.minimum(r_lo + CHUNK, R)
    offs_r = r_lo.to(tl.int64) + offs_k
    a_ptrs = A + offs_m[:, None] * stride_am + offs_r[None, :] * stride_ar  # [BM, BR]
    b_ptrs = B + offs_r[:, None] * stride_br + offs_c[None, :] * stride_bc  # [BR, BC]
    if SCALE_ON_C:
        s_cols = (offs_c // GROUP_C) * stride_sc  # [BC]
    if SCALE_MODE == 2:
        if not SCALE_ON_R:  # per output column: loop invariant
            s_fixed = tl.load(SCALE + s_cols, mask=mask_c, other=0.0)[None, :]  # [1, BC]

    if INT8_A:
        acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.int32)
    elif ACC_FP16:
        acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float16)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for r0 in range(r_lo, r_hi, BLOCK_R):
        mask_r = r0 + offs_k < r_hi
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0)  # [BM, BR]
        b = tl.load(b_ptrs, mask=mask_r[:, None] & mask_c[None, :], other=0)  # [BR, BC] int8
        if INT8_A:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        elif SCALE_MODE == 0:
            acc = tl.dot(a, b.to(a.dtype), acc, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        elif SCALE_MODE == 1:  # one group per tile: scale the tile's exact-weight product
            s = tl.load(SCALE + s_cols + (r0 // GROUP_R).to(tl.int64) * stride_sr, mask=mask_c, other=0.0)
            acc += tl.dot(a, b.to(a.dtype), input_precision=DOT_PRECISION, out_dtype=tl.float32) * s[None, :]
        else:  # dequantize in registers, rounded to the input dtype as PyTorch's cast of the weight would be
            if SCALE_ON_R:
                s_rows = ((r0 + offs_k) // GROUP_R).to(tl.int64) * stride_sr  # [BR]
                if SCALE_ON_C:
                    s = tl.load(SCALE + s_rows[:, None] + s_cols[None, :], mask=mask_r[:, None] & mask_c[None, :],
                                other=0.0)  # [BR, BC]
                else:
                    s = tl.load(SCALE + s_rows, mask=mask_r, other=0.0)[:, None]  # [BR, 1]
            else:
                s = s_fixed
            w = (b.to(tl.float32) * s).to(a.dtype)
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)
        a_ptrs += step_a
        b_ptrs += step_b

    mask = mask_m[:, None] & mask_c[None, :]
    o_ptrs = OUT + split.to(tl.int64) * stride_os + offs_m[:, None] * stride_om + offs_c[None, :] * stride_oc
    if PARTIAL:
        if INT8_A:
            tl.store(o_ptrs, acc, mask=mask)
        else:
            tl.store(o_ptrs, acc.to(tl.float32), mask=mask)
    else:
        out = _epilogue(acc, offs_m, offs_c, mask_m, mask_c, SCALE, stride_sc, A_SCALE, BIAS, stride_bias,
                        INT8_A, SCALE_MODE, HAS_BIAS)
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _splitk_reduce_kernel(PART, SCALE, A_SCALE, BIAS, OUT, M, C, SPLITS,
                          stride_ps, stride_pm, stride_pc, stride_sc, stride_bias, stride_om, stride_oc,
                          INT8_A: tl.constexpr, SCALE_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Sum the splits' partials in split order (deterministic), then the epilogue and the cast."""
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_c = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    mask_m = offs_m < M
    mask_c = offs_c < C
    mask = mask_m[:, None] & mask_c[None, :]
    p_ptrs = PART + offs_m[:, None] * stride_pm + offs_c[None, :] * stride_pc
    acc = tl.load(p_ptrs, mask=mask, other=0)
    for s in range(1, SPLITS):
        acc += tl.load(p_ptrs + s * stride_ps, mask=mask, other=0)
    out = _epilogue(acc, offs_m, offs_c, mask_m, mask_c, SCALE, stride_sc, A_SCALE, BIAS, stride_bias,
                    INT8_A, SCALE_MODE, HAS_BIAS)
    tl.store(OUT + offs_m[:, None] * stride_om + offs_c[None, :] * stride_oc, out.to(OUT.dtype.element_ty),
             mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# Configs: (m, n, k) are the GEMM's output rows, output columns and reduction length; dtype is A's (torch.int8 for
# W8A8). GPU choices are a starting point from Triton's matmul tutorial shapes, not yet tuned on these kernels.
# ---------------------------------------------------------------------------------------------------------------

def _use_splitk(m, n, k, device):
    """Decode shapes (at most one 16-row block) are bandwidth bound: split the reduction to fill the GPU."""
    return m <= 16


def _tiled_config(m, n, k, dtype, device):
    """fp16/bf16: 128 x 128 x 64 tiles in three stages on sm_80 (four stages of the in-register scale path need
    172,032 B of shared memory, over the A100's 166,912); on sm_90 four stages of 128 x 128 x 32, since the 64-deep
    tile spills registers there with a group-wise scale in bf16 (benchmarks/compile_report.py)."""
    target = gpu_target(device)
    if target is None:
        return Config(16, 32, 16, 2, 1, 4, 1)  # several blocks each way at test sizes
    block_m = 64 if m <= 64 else 128
    if dtype == torch.int8:
        return Config(block_m, 128, 128, 8, 1, 8, 3)
    if dtype == torch.float32:  # eight warps: float32 products run on FMA units, four warps' share of them spills
        return Config(64, 64, 32, 8, 1, 8, 3)
    if target.arch >= 90:
        return Config(block_m, 128, 32, 8, 1, 8, 4)
    return Config(block_m, 128, 64, 8, 1, 8, 3)


def _splitk_config(m, n, k, dtype, device):
    """One 16-row block (tl.dot's minimum), narrow column blocks, and enough reduction splits that column blocks x
    splits is about twice the SM count, each split at least four reduction tiles."""
    target = gpu_target(device)
    if target is None:
        return Config(16, 16, 16, 1, triton.cdiv(triton.cdiv(k, 16), 2), 4, 1)  # two tiles per split
    block_r = {torch.int8: 256, torch.float32: 64}.get(dtype, 128)
    block_c = 64
    tiles = triton.cdiv(m, 16) * triton.cdiv(n, block_c)
    wanted = triton.cdiv(2 * target.sm_count, tiles)
    splits = max(1, min(wanted, triton.cdiv(k, 4 * block_r)))
    # three stages for int8 x int8: four leave ptxas 64 registers on sm_90, and it spills
    return Config(16, block_c, block_r, 1, splits, 4, 3 if dtype in (torch.float32, torch.int8) else 4)


# ---------------------------------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------------------------------

def _fit_groups(block_r, group_size):
    """(block_r, PER_TILE) when a power of two >= min(block_r, 32) and <= block_r divides group_size, else
    (block_r, IN_REGISTERS)."""
    fit = min(group_size & -group_size, block_r)
    if fit >= max(16, min(block_r, 32)):
        return fit, PER_TILE
    return block_r, IN_REGISTERS


def _gemm(a, data, transposed, scale, group_size, bias, a_scale, acc_fp16, out_dtype):
    """out (M, C) = a (M, R) @ dequant(B) with B = data.T (forward: R = K, C = N) when `transposed`, else data
    (gradient to the input: R = N, C = K). a_scale (M,) float32 marks W8A8 (a int8); scale and group_size as in
    QuantizedWeight."""
    m, r = a.shape
    c = data.shape[0] if transposed else data.shape[1]
    out = torch.empty(m, c, dtype=out_dtype, device=a.device)
    if m == 0 or c == 0:
        return out
    if r == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand(m, c))
    int8_a = a_scale is not None

    stride_br, stride_bc = (data.stride(1), data.stride(0)) if transposed else data.stride()
    # Scale of B[r, c]: scale[(r // group_r) * stride_sr + (c // group_c) * stride_sc].
    if transposed and group_size is None:  # forward, per channel: scale[n], n = c
        on_r, on_c, stride_sr, stride_sc, group_r, group_c = False, True, 0, scale.stride(0), 1, 1
    elif transposed:  # forward, per group: scale[n, k // g], n = c, k = r
        on_r, on_c, stride_sr, stride_sc, group_r, group_c = True, True, scale.stride(1), scale.stride(0), group_size, 1
    elif group_size is None:  # gradient to the input, per channel: scale[n], n = r
        on_r, on_c, stride_sr, stride_sc, group_r, group_c = True, False, scale.stride(0), 0, 1, 1
    else:  # gradient to the input, per group: scale[n, k // g], n = r, k = c
        on_r, on_c, stride_sr, stride_sc, group_r, group_c = True, True, scale.stride(0), scale.stride(1), 1, group_size

    a_dtype = torch.int8 if int8_a else a.dtype
    splitk = _use_splitk(m, c, r, a.device)
    cfg = (_splitk_config if splitk else _tiled_config)(m, c, r, a_dtype, a.device)
    block_r = cfg.block_r
    if int8_a or (transposed and group_size is None and not acc_fp16):
        mode = EPILOGUE
    elif transposed and group_size is not None and not acc_fp16:
        block_r, mode = _fit_groups(block_r, group_size)
    else:
        mode = IN_REGISTERS
    splits = cfg.splits if splitk else 1
    chunk = triton.cdiv(triton.cdiv(r, splits), block_r) * block_r
    splits = triton.cdiv(r, chunk)

    partial = splits > 1
    if partial:
        target = torch.empty(splits, m, c, dtype=torch.int32 if int8_a else torch.float32, device=a.device)
        out_strides = target.stride()
    else:
        target = out
        out_strides = (0, *out.stride())
    placeholder = scale
    bias_arg, stride_bias = (placeholder, 0) if bias is None else (bias, bias.stride(0))
    a_scale_arg = placeholder if a_scale is None else a_scale
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(c, cfg.block_c), splits)
    _int8_mm_kernel[grid](
        a, data, scale, a_scale_arg, bias_arg, target,
        m, c, r, chunk,
        a.stride(0), a.stride(1), stride_br, stride_bc, stride_sr, stride_sc, stride_bias,
        *out_strides, block_r * a.stride(1), block_r * stride_br, group_r, group_c,
        INT8_A=int8_a, SCALE_MODE=mode, SCALE_ON_R=on_r, SCALE_ON_C=on_c, HAS_BIAS=bias is not None,
        PARTIAL=partial, ACC_FP16=acc_fp16, DOT_PRECISION=_dot_precision(a.dtype),
        BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, BLOCK_R=block_r, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if partial:
        block_m, block_c = 16, (16 if gpu_target(a.device) is None else 128)
        _splitk_reduce_kernel[(triton.cdiv(m, block_m), triton.cdiv(c, block_c))](
            target, scale, a_scale_arg, bias_arg, out, m, c, splits,
            *target.stride(), stride_sc, stride_bias, *out.stride(),
            INT8_A=int8_a, SCALE_MODE=mode, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_C=block_c,
            num_warps=4,
        )
    return out


def quantize_activations_triton(x):
    """x (M, K) float (any strides) -> (int8 (M, K) contiguous, float32 (M,)): per-row symmetric quantization, bit for
    bit `quantize.quantize_activations`."""
    m, k = x.shape
    data = torch.empty(m, k, dtype=torch.int8, device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return data, scale
    block_k = 64 if gpu_target(x.device) is None else min(max(triton.next_power_of_2(k), 128), 2048)
    _quantize_rows_kernel[(m,)](x, data, scale, k, x.stride(0), x.stride(1), data.stride(0), BLOCK_K=block_k,
                                num_warps=4 if block_k <= 1024 else 8)
    return data, scale


def int8_matmul_triton(x, data, scale, group_size, bias, activations, accumulate):
    """x (M, K) float16/bfloat16/float32 (any strides), data int8 (N, K), scale float32 (N,) or (N, K // group_size),
    bias (N,) in x's dtype or None -> (M, N) in x's dtype. activations "fp" (W8A16) or "int8" (W8A8, per-channel
    weight); accumulate "fp32" or "fp16" (float16 x, W8A16). Arguments are checked by hybridrag.ops.int8 (bfloat16
    under the interpreter and W8A8 reductions past MAX_INT8_REDUCTION included)."""
    if activations == "int8":
        x_data, x_scale = quantize_activations_triton(x)
        return _gemm(x_data, data, True, scale, None, bias, x_scale, False, x.dtype)
    return _gemm(x, data, True, scale, group_size, bias, None, accumulate == "fp16", x.dtype)


def int8_matmul_grad_input_triton(grad_out, data, scale, group_size, accumulate):
    """grad_out (M, N) -> grad_x (M, K) = grad_out @ dequant(W) in grad_out's dtype, W dequantized in registers only.
    accumulate="fp16" accumulates in fp16 here too."""
    return _gemm(grad_out, data, False, scale, group_size, None, None, accumulate == "fp16", grad_out.dtype)
