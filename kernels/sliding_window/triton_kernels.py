"""Sliding-window attention in Triton: forward (online softmax over the band) and backward (dq; dk and dv).

Every program handles one block of rows and visits only the blocks of the other side that lie inside the band, in
three stages: blocks that straddle the band's left edge (masked), blocks every row sees whole (no mask), and blocks
that straddle its right edge or the end of the sequence (masked). Work is O(Tq x (window + block)), extra memory is
O(B x H x Tq) for lse and delta. Scores are kept in base 2: s2 = q.k * scale * log2(e).
"""
import os

import torch
import triton
import triton.language as tl

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
def _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, pos_m, offs_n, mask_d,
               start, stop, Tk, LEFT, RIGHT, qk_scale,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    for start_n in range(start, stop, BLOCK_N):
        cols = start_n + offs_n
        k = tl.load(k_ptrs + start_n * stride_kn, mask=mask_d[:, None] & (cols[None, :] < Tk), other=0.0)  # [D, N]
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # [M, N]
        if MASKED:
            visible = (cols[None, :] >= pos_m[:, None] - LEFT) & (cols[None, :] <= pos_m[:, None] + RIGHT)
            s = tl.where(visible & (cols[None, :] < Tk), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet stay at p = 0
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs + start_n * stride_vn, mask=(cols[:, None] < Tk) & mask_d[None, :], other=0.0)  # [N, D]
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE,
                stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                H, GROUP, Tq, Tk, D, LEFT, RIGHT, qk_scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    off_kv = off_h // GROUP
    offset = Tk - Tq

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < Tq
    mask_d = offs_d < D
    pos_m = offs_m + offset

    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # [M, D]
    k_ptrs = K + off_b * stride_kb + off_kv * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None]  # [D, N]
    v_ptrs = V + off_b * stride_vb + off_kv * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :]  # [N, D]

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    last_m = tl.minimum(start_m + BLOCK_M, Tq) - 1
    lo, mid_lo, mid_hi, hi = _block_range(start_m + offset, last_m + offset, LEFT, RIGHT, Tk, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, pos_m, offs_n, mask_d,
                               lo, mid_lo, Tk, LEFT, RIGHT, qk_scale, BLOCK_N, True, DOT_PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, pos_m, offs_n, mask_d,
                               mid_lo, mid_hi, Tk, LEFT, RIGHT, qk_scale, BLOCK_N, False, DOT_PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, pos_m, offs_n, mask_d,
                               mid_hi, hi, Tk, LEFT, RIGHT, qk_scale, BLOCK_N, True, DOT_PRECISION)

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    tl.store(LSE + off_bh.to(tl.int64) * Tq + offs_m, lse, mask=mask_m)


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
    delta = tl.sum(o * do, 1)
    row = off_bh.to(tl.int64) * Tq + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLSE + row, mask=offs_m < Tq, other=0.0)
    tl.store(DELTA + row, delta, mask=offs_m < Tq)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, stride_qm, stride_dom, LSE, DELTA, pos_n, offs_m, mask_d,
                    start, stop, Tq, offset, LEFT, RIGHT, qk_scale,
                    BLOCK_M: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    for start_m in range(start, stop, BLOCK_M):
        rows = start_m + offs_m
        in_rows = rows < Tq
        qT = tl.load(q_ptrs + start_m * stride_qm, mask=mask_d[:, None] & in_rows[None, :], other=0.0)  # [D, M]
        do = tl.load(do_ptrs + start_m * stride_dom, mask=in_rows[:, None] & mask_d[None, :], other=0.0)  # [M, D]
        lse2 = tl.load(LSE + rows, mask=in_rows, other=0.0) * 1.4426950408889634
        lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)  # rows that see no key: their scores are all masked
        delta = tl.load(DELTA + rows, mask=in_rows, other=0.0)
        sT = tl.dot(k, qT, input_precision=DOT_PRECISION) * qk_scale  # [N, M]
        if MASKED:
            pos_m = rows + offset
            visible = (pos_n[:, None] >= pos_m[None, :] - LEFT) & (pos_n[:, None] <= pos_m[None, :] + RIGHT)
            sT = tl.where(visible & in_rows[None, :], sT, float("-inf"))
        pT = tl.math.exp2(sT - lse2[None, :])
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # [N, M]
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                     stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                     stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                     H, Hkv, GROUP, Tq, Tk, D, LEFT, RIGHT, qk_scale, scale,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """One program per (key block, batch, kv head): sums over the kv head's query heads, so no atomics."""
    start_n = tl.program_id(0) * BLOCK_N
    off_bkv = tl.program_id(1)
    off_b = (off_bkv // Hkv).to(tl.int64)
    off_kv = (off_bkv % Hkv).to(tl.int64)
    offset = Tk - Tq

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < Tk
    mask_d = offs_d < D
    mask_nd = mask_n[:, None] & mask_d[None, :]
    k = tl.load(K + off_b * stride_kb + off_kv * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=mask_nd, other=0.0)
    v = tl.load(V + off_b * stride_vb + off_kv * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                mask=mask_nd, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Query row i (position i + offset) sees key j iff j - RIGHT <= i + offset <= j + LEFT: the band seen from keys.
    last_n = tl.minimum(start_n + BLOCK_N, Tk) - 1
    lo, mid_lo, mid_hi, hi = _block_range(start_n - offset, last_n - offset, RIGHT, LEFT, Tq, BLOCK_M)
    for g in range(GROUP):
        off_h = off_kv * GROUP + g
        q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[None, :] * stride_qm + offs_d[:, None]  # [D, M]
        do_ptrs = DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :]
        row_base = (off_b * H + off_h) * Tq
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, stride_qm, stride_dom, LSE + row_base,
                                 DELTA + row_base, offs_n, offs_m, mask_d, lo, mid_lo, Tq, offset, LEFT, RIGHT,
                                 qk_scale, BLOCK_M, True, DOT_PRECISION)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, stride_qm, stride_dom, LSE + row_base,
                                 DELTA + row_base, offs_n, offs_m, mask_d, mid_lo, mid_hi, Tq, offset, LEFT, RIGHT,
                                 qk_scale, BLOCK_M, False, DOT_PRECISION)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, stride_qm, stride_dom, LSE + row_base,
                                 DELTA + row_base, offs_n, offs_m, mask_d, mid_hi, hi, Tq, offset, LEFT, RIGHT,
                                 qk_scale, BLOCK_M, True, DOT_PRECISION)
    tl.store(DK + off_b * stride_dkb + off_kv * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=mask_nd)
    tl.store(DV + off_b * stride_dvb + off_kv * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=mask_nd)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, pos_m, offs_n, mask_d,
                  start, stop, Tk, LEFT, RIGHT, qk_scale,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    for start_n in range(start, stop, BLOCK_N):
        cols = start_n + offs_n
        kT = tl.load(k_ptrs + start_n * stride_kn, mask=mask_d[:, None] & (cols[None, :] < Tk), other=0.0)  # [D, N]
        vT = tl.load(v_ptrs + start_n * stride_vn, mask=mask_d[:, None] & (cols[None, :] < Tk), other=0.0)  # [D, N]
        s = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale  # [M, N]
        if MASKED:
            visible = (cols[None, :] >= pos_m[:, None] - LEFT) & (cols[None, :] <= pos_m[:, None] + RIGHT)
            s = tl.where(visible & (cols[None, :] < Tk), s, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, vT, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                   stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                   stride_dqb, stride_dqh, stride_dqm,
                   H, GROUP, Tq, Tk, D, LEFT, RIGHT, qk_scale, scale,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    off_kv = off_h // GROUP
    offset = Tk - Tq

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < Tq
    mask_d = offs_d < D
    mask_md = mask_m[:, None] & mask_d[None, :]
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=mask_md, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :],
                 mask=mask_md, other=0.0)
    row = off_bh.to(tl.int64) * Tq + offs_m
    lse2 = tl.load(LSE + row, mask=mask_m, other=0.0) * 1.4426950408889634
    lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)
    delta = tl.load(DELTA + row, mask=mask_m, other=0.0)
    k_ptrs = K + off_b * stride_kb + off_kv * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None]  # [D, N]
    v_ptrs = V + off_b * stride_vb + off_kv * stride_vh + offs_n[None, :] * stride_vn + offs_d[:, None]  # [D, N]
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    pos_m = offs_m + offset
    last_m = tl.minimum(start_m + BLOCK_M, Tq) - 1
    lo, mid_lo, mid_hi, hi = _block_range(start_m + offset, last_m + offset, LEFT, RIGHT, Tk, BLOCK_N)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, pos_m, offs_n, mask_d,
                       lo, mid_lo, Tk, LEFT, RIGHT, qk_scale, BLOCK_N, True, DOT_PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, pos_m, offs_n, mask_d,
                       mid_lo, mid_hi, Tk, LEFT, RIGHT, qk_scale, BLOCK_N, False, DOT_PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, pos_m, offs_n, mask_d,
                       mid_hi, hi, Tk, LEFT, RIGHT, qk_scale, BLOCK_N, True, DOT_PRECISION)
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=mask_md)


# ----------------------------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------------------------

def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _block_d(dim):
    return max(16, triton.next_power_of_2(dim))


def _fwd_config(dim, dtype):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the forward.

    GPU choices follow the shapes that Triton's fused-attention tutorial runs on Hopper; they are a starting point,
    not yet tuned on this kernel. The interpreter gets blocks of 32, large enough to run fast and small enough to
    exercise several band blocks at test sizes."""
    if _interpreting():
        return 32, 32, 4, 1
    wide = dim > 128 or dtype == torch.float32
    if wide:
        return 64, 32, 4, 2
    return 128, 64, 4 if dim <= 64 else 8, 3


def _bwd_config(dim, dtype):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) shared by the dq and dk/dv kernels."""
    if _interpreting():
        return 32, 32, 4, 1
    if dim > 128 or dtype == torch.float32:
        return 32, 32, 4, 1
    return 64, 64, 4 if dim <= 64 else 8, 2


def _dot_precision(dtype):
    # float32 inputs must get float32 products (PyTorch's own default), not TF32.
    return "ieee" if dtype == torch.float32 else "tf32"


def _band(left, right, tq, tk):
    """Kernel-side band: an unbounded side becomes a distance no pair of positions reaches."""
    far = tq + tk
    return (far if left < 0 else left), (far if right < 0 else right)


def _check_row_offsets(**tensors):
    """Batch and head offsets are int64 in the kernels; offsets along the sequence are int32 and must fit."""
    for name, t in tensors.items():
        reach = (t.shape[2] - 1) * t.stride(2) + t.shape[3]
        if reach >= 2**31:
            raise ValueError(f"{name} {tuple(t.shape)} with sequence stride {t.stride(2)} reaches {reach} elements "
                             "within one head, past int32 offsets; make it contiguous in (B, H, T, D) order")


def sliding_window_fwd_triton(q, k, v, left, right, scale):
    """q (B, H, Tq, D), k/v (B, Hkv, Tk, D), unit last stride -> (o (B, H, Tq, D), lse (B, H, Tq) float32).

    Extra memory: o and lse only."""
    _check_row_offsets(q=q, k=k, v=v)
    batch, heads, tq, dim = q.shape
    kv_heads, tk = k.shape[1], k.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(batch, heads, tq, dtype=torch.float32, device=q.device)
    block_m, block_n, num_warps, num_stages = _fwd_config(dim, q.dtype)
    band_left, band_right = _band(left, right, tq, tk)
    grid = (triton.cdiv(tq, block_m), batch * heads)
    _fwd_kernel[grid](
        q, k, v, out, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        heads, heads // kv_heads, tq, tk, dim, band_left, band_right, scale * LOG2E,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(dim), DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse


def sliding_window_bwd_triton(q, k, v, out, lse, grad_out, grad_lse, left, right, scale):
    """Gradients (dq, dk, dv) of out and lse (grad_lse may be None). All inputs have unit last stride.

    Extra memory: delta (B, H, Tq) float32 besides the three gradients; deterministic (no atomics)."""
    _check_row_offsets(grad_out=grad_out)
    batch, heads, tq, dim = q.shape
    kv_heads, tk = k.shape[1], k.shape[2]
    block_m, block_n, num_warps, num_stages = _bwd_config(dim, q.dtype)
    block_d = _block_d(dim)
    band_left, band_right = _band(left, right, tq, tk)
    precision = _dot_precision(q.dtype)

    delta = torch.empty(batch, heads, tq, dtype=torch.float32, device=q.device)
    _bwd_delta_kernel[(triton.cdiv(tq, block_m), batch * heads)](
        out, grad_out, grad_lse if grad_lse is not None else delta, delta,
        out.stride(0), out.stride(1), out.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        heads, tq, dim, HAS_DLSE=grad_lse is not None, BLOCK_M=block_m, BLOCK_D=block_d,
    )

    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    _bwd_dkdv_kernel[(triton.cdiv(tk, block_n), batch * kv_heads)](
        q, k, v, grad_out, lse, delta, dk, dv,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        heads, kv_heads, heads // kv_heads, tq, tk, dim, band_left, band_right, scale * LOG2E, scale,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, DOT_PRECISION=precision,
        num_warps=num_warps, num_stages=num_stages,
    )
    _bwd_dq_kernel[(triton.cdiv(tq, block_m), batch * heads)](
        q, k, v, grad_out, lse, delta, dq,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        heads, heads // kv_heads, tq, tk, dim, band_left, band_right, scale * LOG2E, scale,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, DOT_PRECISION=precision,
        num_warps=num_warps, num_stages=num_stages,
    )
    return dq, dk, dv
