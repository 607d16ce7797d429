"""What the Triton attention kernels share: the band's block ranges, the backward's delta kernel, block configs and
host-side checks. Scores are kept in base 2: s2 = q.k * scale * log2(e)."""
import torch
import triton
import triton.language as tl

from .targets import gpu_target

LOG2E = 1.4426950408889634


@triton.jit
def _block_range(first, last, LEFT, RIGHT, limit, BLOCK: tl.constexpr):
    """For the other side's indices visible from positions first..last of this side, return block-aligned bounds
    (lo, mid_lo, mid_hi, hi): [lo, mid_lo) and [mid_hi, hi) need masks, [mid_lo, mid_hi) is seen whole by every row.
    Index j is visible from position p iff p - LEFT <= j <= p + RIGHT and 0 <= j < limit."""
    lo = tl.maximum(first - LEFT, 0)
    hi = tl.minimum(last + RIGHT + 1, limit)
    hi = tl.maximum(hi, lo)
    lo = (lo // BLOCK) * BLOCK
    full_lo = tl.maximum(last - LEFT, 0)
    full_lo = ((full_lo + BLOCK - 1) // BLOCK) * BLOCK
    full_hi = tl.maximum(tl.minimum(first + RIGHT + 1, limit), 0)
    full_hi = (full_hi // BLOCK) * BLOCK
    hi_up = ((hi + BLOCK - 1) // BLOCK) * BLOCK
    mid_lo = tl.minimum(tl.maximum(full_lo, lo), hi_up)
    mid_hi = tl.maximum(tl.minimum(full_hi, hi_up), mid_lo)
    return lo, mid_lo, mid_hi, hi



@triton.jit
def _non_finite(x):
    """NaN or +-inf, elementwise."""
    return (x != x) | (tl.abs(x) == float("inf"))


@triton.jit
def _online_softmax_step(acc, l_i, m_i, s, v_base, stride_vn, idx, valid, offs_d, mask_d,
                         COMPUTE_O: tl.constexpr, DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr = True):
    """Fold one key block's base-2 scores s [M, N] (-inf where hidden) into the running max m_i, sum l_i and output
    acc [M, D], reading the block's values at rows idx of v_base. Rows that have seen nothing stay at p = 0.

    MASKED: some row may not see some key of the block. A NaN/inf value must then reach only the rows that see it
    (p = 0 would multiply it into NaN): the product runs on finite values and a row that sees a non-finite value is
    set to NaN, all of it (kernels/nonfinite.py). A select and a row reduction, no branch and no extra dot: exact
    columns would need a second dot (or a branch around one), which spills registers inside the loop on sm_90."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    if COMPUTE_O:
        v = tl.load(v_base + idx[:, None] * stride_vn + offs_d[None, :], mask=valid[:, None] & mask_d[None, :],
                    other=0.0)  # [N, D]
        if MASKED:
            bad = _non_finite(v)
            v = tl.where(bad, 0.0, v)
            bad_key = tl.max(bad.to(tl.int32), 1)  # [N]
            acc = tl.where(tl.max(tl.where(s == float("-inf"), 0, bad_key[None, :]), 1)[:, None] > 0,
                           float("nan"), acc)  # rows that see one; NaN survives the rescale and the sum
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if COMPUTE_O:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _softmax_result(acc, l_i, m_i):
    """(o [M, D], natural-log lse [M]) from the online softmax's state; rows that saw no key: o = 0, lse = -inf."""
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) / 1.4426950408889634,
                   tl.where(l_i == 0.0, float("-inf"), float("nan")))  # NaN: the row saw a non-finite score
    return out, lse


@triton.jit
def _bwd_delta_kernel(O, DO, DLSE, DELTA, stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
                      H, Tq, D, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta = rowsum(o * do) - dlse: the per-row term of dS = P * (dP - delta)."""
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < Tq) & (offs_d[None, :] < D)
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(tl.where(do == 0.0, 0.0, o * do), 1)  # a NaN row nobody takes a gradient of stays out
    row = off_bh.to(tl.int64) * Tq + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLSE + row, mask=offs_m < Tq, other=0.0)
    tl.store(DELTA + row, delta, mask=offs_m < Tq)


def _block_d(dim):
    return max(16, triton.next_power_of_2(dim))


# Forward (BLOCK_M, BLOCK_N, num_warps, num_stages) for fp16/bf16 at D <= 128, by target and head dim: the largest
# blocks with which every launch of the hybrid forward (global rows, memory and kv_start included) and the streaming
# prefill compile without register spills (python -m benchmarks.compile_report, triton 3.9). A head dim that is not a
# power of two pads BLOCK_D and masks every load, which costs registers: smaller blocks there.
_FWD_CONFIGS = {
    90: {"d64": (128, 64, 8, 3), "padded": (64, 32, 8, 3), "d128": (128, 64, 8, 2)},
    80: {"d64": (128, 32, 8, 3), "padded": (64, 32, 8, 3), "d128": (64, 32, 4, 3)},
}


def _fwd_config(dim, dtype):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the forward, for the target it compiles for
    (kernels.targets.gpu_target: sm_90 and later take the Hopper table, earlier GPUs the A100 one).

    fp16/bf16 at D <= 128 take _FWD_CONFIGS, D > 128 a narrow config on 8 warps; float32 a narrow config (its
    register use not yet held to no spills). The interpreter gets blocks of 32, large enough to run fast and small
    enough to exercise several band blocks at test sizes."""
    target = gpu_target()
    if target is None:
        return 32, 32, 4, 1
    if dtype == torch.float32:
        return 64, 32, 4, 2
    if dim > 128:
        return 64, 32, 8, 2  # eight warps: four spill at D 256
    return _FWD_CONFIGS[90 if target.arch >= 90 else 80][_dim_class(dim)]


def _dim_class(dim):
    """The config tables' key for a head dim <= 128: "d64" (D <= 64), "d128", or "padded" (between: BLOCK_D 128)."""
    if dim > 64 and dim != 128:
        return "padded"
    return "d64" if dim <= 64 else "d128"


# Backward (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, for fp16/bf16 at D <= 128, by target and head
# dim, the same way: "dq" is row-major (rows BLOCK_M, keys BLOCK_N per step); "dkdv" key-major (keys BLOCK_N per
# program, rows BLOCK_M per step; the attention-mass kernels take it too); "dkdv_extra" the dk/dv of the landmark
# and memory keys, which are few, so narrower key blocks cost nothing there. On sm_80 the mma.sync operands live in
# registers, so the dk/dv pass takes narrower blocks than on sm_90, where wgmma reads them from shared memory.
_BWD_CONFIGS = {
    90: {"dq": {"d64": (64, 64, 4, 2), "padded": (64, 32, 4, 2), "d128": (64, 64, 8, 2)},
         "dkdv": {"d64": (64, 64, 8, 2), "padded": (32, 64, 8, 2), "d128": (64, 64, 8, 2)},
         "dkdv_extra": {"d64": (64, 64, 8, 2), "padded": (64, 32, 8, 2), "d128": (64, 32, 8, 2)}},
    80: {"dq": {"d64": (32, 64, 4, 2), "padded": (64, 64, 8, 2), "d128": (64, 64, 8, 1)},
         "dkdv": {"d64": (64, 32, 4, 2), "padded": (64, 32, 8, 2), "d128": (64, 32, 8, 2)},
         "dkdv_extra": {"d64": (64, 32, 4, 2), "padded": (64, 32, 8, 2), "d128": (64, 32, 8, 2)}},
}


def _bwd_config(dim, dtype, kernel):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the backward's "dq", "dkdv" or "dkdv_extra" kernel
    (_BWD_CONFIGS); D > 128 and float32 a narrow config (not yet tuned)."""
    if kernel not in _BWD_CONFIGS[90]:
        raise ValueError(f"kernel must be one of {sorted(_BWD_CONFIGS[90])}, got {kernel!r}")
    target = gpu_target()
    if target is None:
        return 32, 32, 4, 1
    if dim > 128 or dtype == torch.float32:
        return 32, 32, 4, 1
    return _BWD_CONFIGS[90 if target.arch >= 90 else 80][kernel][_dim_class(dim)]


def _dot_precision(dtype):
    # float32 inputs must get float32 products (PyTorch's own default), not TF32.
    return "ieee" if dtype == torch.float32 else "tf32"


def _band(left, right, tq, tk):
    """Kernel-side band: an unbounded side, or one past every pair of positions, becomes a distance no pair reaches
    yet p + side stays within int32."""
    far = tq + tk
    return (far if left < 0 or left > far else left), (far if right < 0 or right > far else right)


def _check_row_offsets(**tensors):
    """Batch and head offsets are int64 in the kernels; offsets along the sequence are int32 and must fit."""
    for name, t in tensors.items():
        reach = (t.shape[2] - 1) * t.stride(2) + t.shape[3]
        if reach >= 2**31:
            raise ValueError(f"{name} {tuple(t.shape)} with sequence stride {t.stride(2)} reaches {reach} elements "
                             "within one head, past int32 offsets; make it contiguous in (B, H, T, D) order")
