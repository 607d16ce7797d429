"""Hybrid attention backward in Triton: dq per row block (like the forward), dk/dv per key block over the band rows
and the global rows (no atomics), and dk/dv of the extra keys."""
import triton
import triton.language as tl

from ..triton_common import _block_range, _non_finite
from .triton_tiles import _key_blocks, _key_ok, _key_positions, _masked_scores, _rows, _visible


@triton.jit
def _dq_block(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, KPOS, pos, idx, offs_d, mask_d, limit,
              LEFT, RIGHT, kv_start, key_mask, qk_scale, masked, MODE: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_KV_START: tl.constexpr, HAS_KEY_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Add one key block's share (keys idx [N] of k_base/v_base) to dq [M, D]. `masked` (a runtime flag) applies
    the pattern of MODE (1: band, 2: extra keys); band blocks seen whole by every row skip it."""
    valid = idx < limit
    mask = mask_d[:, None] & valid[None, :]
    kT = tl.load(k_base + idx[None, :] * stride_kn + offs_d[:, None], mask=mask, other=0.0)  # [D, N]
    vT = tl.load(v_base + idx[None, :] * stride_vn + offs_d[:, None], mask=mask, other=0.0)  # [D, N]
    s = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale
    kpos = _key_positions(KPOS, idx, valid, MODE)
    if masked:
        s = _masked_scores(s, pos, kpos, valid, LEFT, RIGHT, CAUSAL, kv_start, key_mask, MODE, HAS_KV_START,
                           HAS_KEY_MASK)
        kT = tl.where(_non_finite(kT), 0.0, kT)  # hidden NaN/inf must not meet p = 0 (kernels/nonfinite.py)
        vT = tl.where(_non_finite(vT), 0.0, vT)
    elif HAS_KV_START or HAS_KEY_MASK:
        s = _masked_scores(s, pos, kpos, valid, LEFT, RIGHT, CAUSAL, kv_start, key_mask, 0, HAS_KV_START,
                           HAS_KEY_MASK)
        kT = tl.where(_non_finite(kT), 0.0, kT)
        vT = tl.where(_non_finite(vT), 0.0, vT)
    p = tl.math.exp2(s - lse2[:, None])
    dp = tl.dot(do, vT, input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=DOT_PRECISION)


@triton.jit
def _dq_kernel(Q, K, V, XK, XV, XPOS, ROWS, KV_START, KEY_MASK, DO, LSE, DELTA, DQ,
               stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
               stride_xkb, stride_xkh, stride_xkn, stride_xvb, stride_xvh, stride_xvn,
               stride_dob, stride_doh, stride_dom, stride_dqs, stride_dqb, stride_dqh, stride_dqm, stride_kmb,
               H, GROUP, R, Tq, Tk, D, LEFT, RIGHT, X_LO, X_HI, CHUNK, qk_scale, scale,
               CAUSAL: tl.constexpr, GATHERED: tl.constexpr, HAS_KV_START: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dq of the launch's R rows over the same keys as `_fwd_kernel` visits; split s writes its partial sum."""
    off_bh = tl.program_id(1)
    split = tl.program_id(2)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    off_kv = off_h // GROUP
    offs_r, mask_r, row, pos, first, last = _rows(ROWS, tl.program_id(0) * BLOCK_M, R, Tq, Tk, GATHERED, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask_rd = mask_r[:, None] & mask_d[None, :]
    if HAS_KV_START:
        kv_start = tl.load(KV_START + off_b)
    else:
        kv_start = 0
    key_mask = KEY_MASK + off_b * stride_kmb
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + row[:, None] * stride_qm + offs_d[None, :],
                mask=mask_rd, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + row[:, None] * stride_dom + offs_d[None, :],
                 mask=mask_rd, other=0.0)
    stat = off_bh.to(tl.int64) * Tq + row
    lse2 = tl.load(LSE + stat, mask=mask_r, other=0.0) * 1.4426950408889634
    lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)  # rows that see no key: their scores are all masked
    delta = tl.load(DELTA + stat, mask=mask_r, other=0.0)
    k_base = K + off_b * stride_kb + off_kv * stride_kh
    v_base = V + off_b * stride_vb + off_kv * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_lo = split * CHUNK
    lo, mid_lo, mid_hi, hi = _key_blocks(first, last, LEFT, RIGHT, Tk, k_lo, tl.minimum(k_lo + CHUNK, Tk), BLOCK_N)
    # The band in one loop (its edge blocks masked at run time), then the extra keys: fewer inlined loops, fewer
    # registers live together.
    for start_n in range(lo, hi, BLOCK_N):
        masked = (start_n < mid_lo) | (start_n >= mid_hi)
        dq = _dq_block(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, XPOS, pos, start_n + offs_n,
                       offs_d, mask_d, Tk, LEFT, RIGHT, kv_start, key_mask, qk_scale, masked, 1, CAUSAL, HAS_KV_START,
                       HAS_KEY_MASK, DOT_PRECISION)
    x_hi = tl.where(split == 0, X_HI, X_LO)
    xk_base = XK + off_b * stride_xkb + off_kv * stride_xkh
    xv_base = XV + off_b * stride_xvb + off_kv * stride_xvh
    for start_n in range(X_LO, x_hi, BLOCK_N):
        dq = _dq_block(dq, q, do, lse2, delta, xk_base, xv_base, stride_xkn, stride_xvn, XPOS, pos, start_n + offs_n,
                       offs_d, mask_d, x_hi, LEFT, RIGHT, kv_start, key_mask, qk_scale, True, 2, CAUSAL,
                       HAS_KV_START, HAS_KEY_MASK, DOT_PRECISION)
    dq_ptrs = DQ + split * stride_dqs + off_b * stride_dqb + off_h * stride_dqh + offs_r[:, None] * stride_dqm
    tl.store(dq_ptrs + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=mask_rd)


@triton.jit
def _dkdv_block(dk, dv, k, v, q_base, do_base, stride_qm, stride_dom, LSE, DELTA, row, mask_r, kpos, valid_k,
                offs_d, mask_d, offset, LEFT, RIGHT, kv_start, qk_scale, masked, MODE: tl.constexpr,
                CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Add one row block's share to dk, dv [N, D] of a key block. `row` [M] are the block's query rows, LSE and
    DELTA point at this (batch, head)'s rows; `masked` (a runtime flag) applies the pattern, which blocks seen whole
    by every row skip. Keys before kv_start are zeroed by the caller."""
    qT = tl.load(q_base + row[None, :] * stride_qm + offs_d[:, None], mask=mask_d[:, None] & mask_r[None, :],
                 other=0.0)  # [D, M]
    do = tl.load(do_base + row[:, None] * stride_dom + offs_d[None, :], mask=mask_r[:, None] & mask_d[None, :],
                 other=0.0)  # [M, D]
    lse2 = tl.load(LSE + row, mask=mask_r, other=0.0) * 1.4426950408889634
    lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)  # +inf (rows hidden from this pass) gives p = 0
    delta = tl.load(DELTA + row, mask=mask_r, other=0.0)
    sT = tl.dot(k, qT, input_precision=DOT_PRECISION) * qk_scale  # [N, M]
    pT = tl.math.exp2(sT - lse2[None, :])
    if masked:
        seen = _visible((row + offset)[None, :], kpos[:, None], valid_k[:, None] & mask_r[None, :], LEFT, RIGHT,
                        CAUSAL, kv_start, MODE)
        pT = tl.where(seen, pT, 0.0)
        qT = tl.where(_non_finite(qT), 0.0, qT)  # hidden NaN/inf must not meet p = 0 (kernels/nonfinite.py)
    dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # [N, M]
    dsT = pT * (dpT - delta[None, :])
    dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, DO, LSE_BAND, LSE, DELTA, ROWS, KV_START, KEY_MASK, LM_INDEX, XDK, XDV, DK, DV,
                 stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                 stride_dob, stride_doh, stride_dom, stride_xb, stride_xh, stride_xn,
                 stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn, stride_kmb,
                 H, Hkv, GROUP, Tq, Tk, D, G, LEFT, RIGHT, G_LEFT, G_RIGHT, qk_scale, scale,
                 CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
                 HAS_LANDMARKS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """One program per (key block, batch x kv head), summing over the kv head's query heads (no atomics): the rows
    whose band covers the block (LSE_BAND hides the global rows), then the G global rows (ROWS). Landmark keys then
    add what the extra-key pass gathered for them (XDK/XDV at LM_INDEX)."""
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
    v = tl.where(_non_finite(v), 0.0, v)  # v only enters dP, where a hidden row's p = 0 would meet it
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if HAS_KV_START:
        kv_start = tl.load(KV_START + off_b)
    else:
        kv_start = 0

    # Query row i (position i + offset) sees key j through the band iff j - RIGHT <= i + offset <= j + LEFT.
    last_n = tl.minimum(start_n + BLOCK_N, Tk) - 1
    lo, mid_lo, mid_hi, hi = _block_range(start_n - offset, last_n - offset, RIGHT, LEFT, Tq, BLOCK_M)
    band_blocks = (hi - lo + BLOCK_M - 1) // BLOCK_M
    per_head = band_blocks + (G + BLOCK_M - 1) // BLOCK_M
    # One loop body for every query head of the group and both row sets (band rows, then the gathered global
    # rows): four inlined loops per head kept their invariants live together and spilled (compile report).
    for it in range(0, GROUP * per_head):
        g = it // per_head
        i = it % per_head
        is_global = i >= band_blocks
        off_h = off_kv * GROUP + g
        stat = (off_b * H + off_h) * Tq
        start_m = tl.where(is_global, (i - band_blocks) * BLOCK_M, lo + i * BLOCK_M)
        offs_r = start_m + offs_m
        mask_r = offs_r < tl.where(is_global, G, Tq)
        gathered = offs_r < tl.where(is_global, G, 0)  # (not mask_r & is_global: the interpreter refuses it)
        row = tl.where(is_global, tl.load(ROWS + offs_r, mask=gathered, other=0), offs_r)
        masked = is_global | (start_m < mid_lo) | (start_m >= mid_hi)
        dk, dv = _dkdv_block(dk, dv, k, v, Q + off_b * stride_qb + off_h * stride_qh,
                             DO + off_b * stride_dob + off_h * stride_doh, stride_qm, stride_dom,
                             tl.where(is_global, LSE, LSE_BAND) + stat, DELTA + stat, row, mask_r, offs_n, mask_n,
                             offs_d, mask_d, offset, tl.where(is_global, G_LEFT, LEFT),
                             tl.where(is_global, G_RIGHT, RIGHT), kv_start, qk_scale, masked, 1, CAUSAL,
                             DOT_PRECISION)
    dk = dk * scale
    if HAS_KV_START:  # keys of the padding: no query sees them
        dk = tl.where(offs_n[:, None] >= kv_start, dk, 0.0)
        dv = tl.where(offs_n[:, None] >= kv_start, dv, 0.0)
    if HAS_LANDMARKS:
        index = tl.load(LM_INDEX + offs_n, mask=mask_n, other=-1)
        x_ptrs = off_b * stride_xb + off_kv * stride_xh + index[:, None] * stride_xn + offs_d[None, :]
        is_landmark = (index >= 0)[:, None] & mask_d[None, :]
        dk += tl.load(XDK + x_ptrs, mask=is_landmark, other=0.0)
        dv += tl.load(XDV + x_ptrs, mask=is_landmark, other=0.0)
    if HAS_KEY_MASK:  # hidden keys (landmarks among them): no query sees them
        key_ok = _key_ok(KEY_MASK + off_b * stride_kmb, offs_n, mask_n)[:, None]
        dk = tl.where(key_ok, dk, 0.0)
        dv = tl.where(key_ok, dv, 0.0)
    tl.store(DK + off_b * stride_dkb + off_kv * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=mask_nd)
    tl.store(DV + off_b * stride_dvb + off_kv * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=mask_nd)


@triton.jit
def _dkdv_extra_kernel(Q, XK, XV, XPOS, DO, LSE, DELTA, KV_START, XDK, XDV,
                       stride_qb, stride_qh, stride_qm, stride_xkb, stride_xkh, stride_xkn,
                       stride_xvb, stride_xvh, stride_xvn, stride_dob, stride_doh, stride_dom,
                       stride_xb, stride_xh, stride_xn,
                       H, Hkv, GROUP, Tq, Tk, D, X_LO, X_HI, LEFT, RIGHT, qk_scale, scale,
                       CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    """dk, dv (float32) of extra keys X_LO..X_HI from every query row that sees them outside its band."""
    offs_x = X_LO + tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    off_bkv = tl.program_id(1)
    off_b = (off_bkv // Hkv).to(tl.int64)
    off_kv = (off_bkv % Hkv).to(tl.int64)
    offset = Tk - Tq
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_x = offs_x < X_HI
    mask_d = offs_d < D
    mask_xd = mask_x[:, None] & mask_d[None, :]
    xpos = tl.load(XPOS + offs_x, mask=mask_x, other=0)
    k = tl.load(XK + off_b * stride_xkb + off_kv * stride_xkh + offs_x[:, None] * stride_xkn + offs_d[None, :],
                mask=mask_xd, other=0.0)
    v = tl.load(XV + off_b * stride_xvb + off_kv * stride_xvh + offs_x[:, None] * stride_xvn + offs_d[None, :],
                mask=mask_xd, other=0.0)
    v = tl.where(_non_finite(v), 0.0, v)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if HAS_KV_START:
        kv_start = tl.load(KV_START + off_b)
    else:
        kv_start = 0
    row_lo = 0
    if CAUSAL:  # rows before the block's first landmark see none of it (memory tokens sit at -1: all rows)
        first = tl.min(tl.where(mask_x, xpos, Tk), 0)
        row_lo = tl.where(first < 0, 0, tl.maximum(first - offset, 0))
        row_lo = (row_lo // BLOCK_M) * BLOCK_M
    per_head = (Tq - row_lo + BLOCK_M - 1) // BLOCK_M
    for it in range(0, GROUP * per_head):  # every query head of the group in one loop, as in _dkdv_kernel
        off_h = off_kv * GROUP + it // per_head
        stat = (off_b * H + off_h) * Tq
        offs_r = row_lo + (it % per_head) * BLOCK_M + offs_m
        dk, dv = _dkdv_block(dk, dv, k, v, Q + off_b * stride_qb + off_h * stride_qh,
                             DO + off_b * stride_dob + off_h * stride_doh, stride_qm, stride_dom, LSE + stat,
                             DELTA + stat, offs_r, offs_r < Tq, xpos, mask_x, offs_d, mask_d, offset, LEFT, RIGHT,
                             kv_start, qk_scale, True, 2, CAUSAL, DOT_PRECISION)
    x_ptrs = off_b * stride_xb + off_kv * stride_xh + offs_x[:, None] * stride_xn + offs_d[None, :]
    tl.store(XDK + x_ptrs, dk * scale, mask=mask_xd)
    tl.store(XDV + x_ptrs, dv, mask=mask_xd)
