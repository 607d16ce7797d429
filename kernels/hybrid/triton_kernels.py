"""Hybrid attention in Triton: the sliding-window band fused with gathered landmark keys, global landmark rows and
memory tokens; forward, backward and the attention mass.

Two row sets share the work, so that every (row, key) pair that is visible is visited exactly once:
- every query block visits the key blocks of its band (three stages as in the window kernel) and then one compact
  block of "extra" keys: the landmark keys, gathered, masked where the band already covers them, and the memory
  tokens (position -1: always seen);
- with global_queries=True the G rows that sit on a landmark are gathered and attend over every key; their key range
  is split across programs (so that a few rows still fill the GPU) and the partial softmaxes are merged on the host.
  In the first pass those rows are computed and then overwritten; in the backward they are hidden from the first
  pass by giving it lse = +inf for them (so p = 0), and their gradients come from the second pass alone.
The attention mass sums, per key, the weighted probabilities from both row sets in a key-major pass shaped like
the dk/dv pass (no atomics). Work: Tq x (window + L + M) + G x Tk. Extra memory: the gathered extra keys/values (B, Hkv, L + M, D), the partial
outputs of the G global rows (splits x B x H x G x D float32), and O(B x H x Tq) float32 statistics.
Scores are kept in base 2: s2 = q.k * scale * log2(e).
"""
import torch
import triton
import triton.language as tl

from ..patterns import global_query_rows
from ..triton_common import (LOG2E, _band, _block_d, _block_range, _bwd_config, _bwd_delta_kernel, _check_row_offsets,
                             _dot_precision, _fwd_config, _interpreting)

MEMORY_POSITION = -1  # extra keys at negative positions are memory tokens: every query sees them


@triton.jit
def _visible(p, j, valid, LEFT, RIGHT, CAUSAL: tl.constexpr, kv_start, MODE: tl.constexpr):
    """Visibility of keys at positions j from queries at positions p (broadcastable 2-D).
    MODE 1: main keys in the band [p - LEFT, p + RIGHT] at or after kv_start (causal is folded into RIGHT).
    MODE 2: gathered extra keys: landmarks outside the band (causal, kv_start apply), or memory tokens (j < 0)."""
    in_band = (j >= p - LEFT) & (j <= p + RIGHT)
    if MODE == 1:
        seen = in_band & (j >= kv_start)
    else:
        seen = (~in_band) & (j >= kv_start)
        if CAUSAL:
            seen = seen & (j <= p)
        seen = seen | (j < 0)
    return seen & valid


@triton.jit
def _rows(ROWS, start_r, R, Tq, Tk, GATHERED: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows of this block: index into the launch's row set, query row, position, and the first/last position."""
    offs_r = start_r + tl.arange(0, BLOCK_M)
    mask_r = offs_r < R
    if GATHERED:
        row = tl.load(ROWS + offs_r, mask=mask_r, other=0)
    else:
        row = offs_r
    pos = row + (Tk - Tq)
    first = tl.min(tl.where(mask_r, pos, Tk + Tq), 0)
    last = tl.max(tl.where(mask_r, pos, -Tq), 0)
    return offs_r, mask_r, row, pos, first, last


@triton.jit
def _key_blocks(first, last, LEFT, RIGHT, Tk, k_lo, k_hi, BLOCK_N: tl.constexpr):
    """_block_range of the band, clipped to this program's key split [k_lo, k_hi) (k_lo block-aligned)."""
    lo, mid_lo, mid_hi, hi = _block_range(first, last, LEFT, RIGHT, Tk, BLOCK_N)
    lo = tl.minimum(tl.maximum(lo, k_lo), k_hi)
    mid_lo = tl.minimum(tl.maximum(mid_lo, lo), k_hi)
    mid_hi = tl.minimum(tl.maximum(mid_hi, mid_lo), k_hi)
    hi = tl.minimum(tl.maximum(hi, mid_hi), k_hi)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _masked_scores(s, pos, kpos, valid, LEFT, RIGHT, CAUSAL: tl.constexpr, kv_start,
                   MODE: tl.constexpr, HAS_KV_START: tl.constexpr):
    """Scores [M, N] with -inf where hidden. MODE 0: interior band blocks (only kv_start can hide a key)."""
    if MODE == 0:
        if HAS_KV_START:
            s = tl.where(kpos[None, :] >= kv_start, s, float("-inf"))
    else:
        s = tl.where(_visible(pos[:, None], kpos[None, :], valid[None, :], LEFT, RIGHT, CAUSAL, kv_start, MODE),
                     s, float("-inf"))
    return s


@triton.jit
def _key_positions(KPOS, idx, valid, MODE: tl.constexpr):
    if MODE == 2:  # gathered keys carry their positions
        kpos = tl.load(KPOS + idx, mask=valid, other=0)
    else:
        kpos = idx
    return kpos


@triton.jit
def _fwd_stage(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, KPOS, pos, offs_n, offs_d, mask_d,
               start, stop, limit, LEFT, RIGHT, kv_start, qk_scale,
               MODE: tl.constexpr, CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr, COMPUTE_O: tl.constexpr,
               BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    for start_n in range(start, stop, BLOCK_N):
        idx = start_n + offs_n
        valid = idx < limit
        kT = tl.load(k_base + idx[None, :] * stride_kn + offs_d[:, None], mask=mask_d[:, None] & valid[None, :],
                     other=0.0)  # [D, N]
        s = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale
        kpos = _key_positions(KPOS, idx, valid, MODE)
        s = _masked_scores(s, pos, kpos, valid, LEFT, RIGHT, CAUSAL, kv_start, MODE, HAS_KV_START)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet stay at p = 0
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if COMPUTE_O:
            v = tl.load(v_base + idx[:, None] * stride_vn + offs_d[None, :], mask=valid[:, None] & mask_d[None, :],
                        other=0.0)  # [N, D]
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, XK, XV, XPOS, ROWS, KV_START, O, LSE,
                stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                stride_xkb, stride_xkh, stride_xkn, stride_xvb, stride_xvh, stride_xvn,
                stride_os, stride_ob, stride_oh, stride_om,
                B, H, GROUP, R, Tq, Tk, D, LEFT, RIGHT, X_LO, X_HI, CHUNK, qk_scale,
                CAUSAL: tl.constexpr, GATHERED: tl.constexpr, HAS_KV_START: tl.constexpr, COMPUTE_O: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program per (row block, batch x head, key split): the band of its rows within the split, then (split 0
    only) the extra keys X_LO..X_HI. Writes o and lse for split `program_id(2)` of the launch's R rows."""
    off_bh = tl.program_id(1)
    split = tl.program_id(2)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    off_kv = off_h // GROUP
    offs_r, mask_r, row, pos, first, last = _rows(ROWS, tl.program_id(0) * BLOCK_M, R, Tq, Tk, GATHERED, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    if HAS_KV_START:
        kv_start = tl.load(KV_START + off_b)
    else:
        kv_start = 0

    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + row[:, None] * stride_qm + offs_d[None, :],
                mask=mask_r[:, None] & mask_d[None, :], other=0.0)
    k_base = K + off_b * stride_kb + off_kv * stride_kh
    v_base = V + off_b * stride_vb + off_kv * stride_vh
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    k_lo = split * CHUNK
    lo, mid_lo, mid_hi, hi = _key_blocks(first, last, LEFT, RIGHT, Tk, k_lo, tl.minimum(k_lo + CHUNK, Tk), BLOCK_N)
    acc, l_i, m_i = _fwd_stage(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, XPOS, pos, offs_n, offs_d,
                               mask_d, lo, mid_lo, Tk, LEFT, RIGHT, kv_start, qk_scale,
                               1, CAUSAL, HAS_KV_START, COMPUTE_O, BLOCK_N, DOT_PRECISION)
    acc, l_i, m_i = _fwd_stage(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, XPOS, pos, offs_n, offs_d,
                               mask_d, mid_lo, mid_hi, Tk, LEFT, RIGHT, kv_start, qk_scale,
                               0, CAUSAL, HAS_KV_START, COMPUTE_O, BLOCK_N, DOT_PRECISION)
    acc, l_i, m_i = _fwd_stage(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, XPOS, pos, offs_n, offs_d,
                               mask_d, mid_hi, hi, Tk, LEFT, RIGHT, kv_start, qk_scale,
                               1, CAUSAL, HAS_KV_START, COMPUTE_O, BLOCK_N, DOT_PRECISION)
    x_hi = tl.where(split == 0, X_HI, X_LO)
    acc, l_i, m_i = _fwd_stage(acc, l_i, m_i, q, XK + off_b * stride_xkb + off_kv * stride_xkh,
                               XV + off_b * stride_xvb + off_kv * stride_xvh, stride_xkn, stride_xvn, XPOS, pos,
                               offs_n, offs_d, mask_d, X_LO, x_hi, x_hi, LEFT, RIGHT, kv_start, qk_scale,
                               2, CAUSAL, HAS_KV_START, COMPUTE_O, BLOCK_N, DOT_PRECISION)

    seen = l_i > 0.0
    if COMPUTE_O:
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        o_ptrs = O + split * stride_os + off_b * stride_ob + off_h * stride_oh + offs_r[:, None] * stride_om
        tl.store(o_ptrs + offs_d[None, :], out.to(O.dtype.element_ty), mask=mask_r[:, None] & mask_d[None, :])
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    tl.store(LSE + (split * B * H + off_bh).to(tl.int64) * R + offs_r, lse, mask=mask_r)


@triton.jit
def _dq_stage(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, KPOS, pos, offs_n, offs_d, mask_d,
              start, stop, limit, LEFT, RIGHT, kv_start, qk_scale,
              MODE: tl.constexpr, CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr,
              BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    for start_n in range(start, stop, BLOCK_N):
        idx = start_n + offs_n
        valid = idx < limit
        mask = mask_d[:, None] & valid[None, :]
        kT = tl.load(k_base + idx[None, :] * stride_kn + offs_d[:, None], mask=mask, other=0.0)  # [D, N]
        vT = tl.load(v_base + idx[None, :] * stride_vn + offs_d[:, None], mask=mask, other=0.0)  # [D, N]
        s = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale
        kpos = _key_positions(KPOS, idx, valid, MODE)
        s = _masked_scores(s, pos, kpos, valid, LEFT, RIGHT, CAUSAL, kv_start, MODE, HAS_KV_START)
        p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, vT, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _dq_kernel(Q, K, V, XK, XV, XPOS, ROWS, KV_START, DO, LSE, DELTA, DQ,
               stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
               stride_xkb, stride_xkh, stride_xkn, stride_xvb, stride_xvh, stride_xvn,
               stride_dob, stride_doh, stride_dom, stride_dqs, stride_dqb, stride_dqh, stride_dqm,
               H, GROUP, R, Tq, Tk, D, LEFT, RIGHT, X_LO, X_HI, CHUNK, qk_scale, scale,
               CAUSAL: tl.constexpr, GATHERED: tl.constexpr, HAS_KV_START: tl.constexpr,
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
    dq = _dq_stage(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, XPOS, pos, offs_n, offs_d, mask_d,
                   lo, mid_lo, Tk, LEFT, RIGHT, kv_start, qk_scale, 1, CAUSAL, HAS_KV_START, BLOCK_N, DOT_PRECISION)
    dq = _dq_stage(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, XPOS, pos, offs_n, offs_d, mask_d,
                   mid_lo, mid_hi, Tk, LEFT, RIGHT, kv_start, qk_scale, 0, CAUSAL, HAS_KV_START, BLOCK_N,
                   DOT_PRECISION)
    dq = _dq_stage(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, XPOS, pos, offs_n, offs_d, mask_d,
                   mid_hi, hi, Tk, LEFT, RIGHT, kv_start, qk_scale, 1, CAUSAL, HAS_KV_START, BLOCK_N, DOT_PRECISION)
    x_hi = tl.where(split == 0, X_HI, X_LO)
    dq = _dq_stage(dq, q, do, lse2, delta, XK + off_b * stride_xkb + off_kv * stride_xkh,
                   XV + off_b * stride_xvb + off_kv * stride_xvh, stride_xkn, stride_xvn, XPOS, pos, offs_n, offs_d,
                   mask_d, X_LO, x_hi, x_hi, LEFT, RIGHT, kv_start, qk_scale, 2, CAUSAL, HAS_KV_START, BLOCK_N,
                   DOT_PRECISION)
    dq_ptrs = DQ + split * stride_dqs + off_b * stride_dqb + off_h * stride_dqh + offs_r[:, None] * stride_dqm
    tl.store(dq_ptrs + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=mask_rd)


@triton.jit
def _dkdv_stage(dk, dv, k, v, q_base, do_base, stride_qm, stride_dom, LSE, DELTA, ROWS, kpos, valid_k,
                offs_m, offs_d, mask_d, start, stop, R, offset, LEFT, RIGHT, kv_start, qk_scale,
                MODE: tl.constexpr, CAUSAL: tl.constexpr, GATHERED: tl.constexpr,
                BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dk, dv [N, D] of one key block over rows start..stop of a row set (query rows, or gathered ones).
    LSE and DELTA point at this (batch, head)'s rows. Keys before kv_start are zeroed by the caller."""
    for start_m in range(start, stop, BLOCK_M):
        offs_r = start_m + offs_m
        mask_r = offs_r < R
        if GATHERED:
            row = tl.load(ROWS + offs_r, mask=mask_r, other=0)
        else:
            row = offs_r
        qT = tl.load(q_base + row[None, :] * stride_qm + offs_d[:, None], mask=mask_d[:, None] & mask_r[None, :],
                     other=0.0)  # [D, M]
        do = tl.load(do_base + row[:, None] * stride_dom + offs_d[None, :], mask=mask_r[:, None] & mask_d[None, :],
                     other=0.0)  # [M, D]
        lse2 = tl.load(LSE + row, mask=mask_r, other=0.0) * 1.4426950408889634
        lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)  # +inf (rows hidden from this pass) gives p = 0
        delta = tl.load(DELTA + row, mask=mask_r, other=0.0)
        sT = tl.dot(k, qT, input_precision=DOT_PRECISION) * qk_scale  # [N, M]
        if MODE != 0:
            seen = _visible((row + offset)[None, :], kpos[:, None], valid_k[:, None] & mask_r[None, :], LEFT, RIGHT,
                            CAUSAL, kv_start, MODE)
            sT = tl.where(seen, sT, float("-inf"))
        pT = tl.math.exp2(sT - lse2[None, :])
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # [N, M]
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, DO, LSE_BAND, LSE, DELTA, ROWS, KV_START, LM_INDEX, XDK, XDV, DK, DV,
                 stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                 stride_dob, stride_doh, stride_dom, stride_xb, stride_xh, stride_xn,
                 stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                 H, Hkv, GROUP, Tq, Tk, D, G, LEFT, RIGHT, G_LEFT, G_RIGHT, qk_scale, scale,
                 CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr, HAS_LANDMARKS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
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
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if HAS_KV_START:
        kv_start = tl.load(KV_START + off_b)
    else:
        kv_start = 0

    # Query row i (position i + offset) sees key j through the band iff j - RIGHT <= i + offset <= j + LEFT.
    last_n = tl.minimum(start_n + BLOCK_N, Tk) - 1
    lo, mid_lo, mid_hi, hi = _block_range(start_n - offset, last_n - offset, RIGHT, LEFT, Tq, BLOCK_M)
    for g in range(GROUP):
        off_h = off_kv * GROUP + g
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DO + off_b * stride_dob + off_h * stride_doh
        stat = (off_b * H + off_h) * Tq
        dk, dv = _dkdv_stage(dk, dv, k, v, q_base, do_base, stride_qm, stride_dom, LSE_BAND + stat, DELTA + stat,
                             ROWS, offs_n, mask_n, offs_m, offs_d, mask_d, lo, mid_lo, Tq, offset, LEFT, RIGHT,
                             kv_start, qk_scale, 1, CAUSAL, False, BLOCK_M, DOT_PRECISION)
        dk, dv = _dkdv_stage(dk, dv, k, v, q_base, do_base, stride_qm, stride_dom, LSE_BAND + stat, DELTA + stat,
                             ROWS, offs_n, mask_n, offs_m, offs_d, mask_d, mid_lo, mid_hi, Tq, offset, LEFT, RIGHT,
                             kv_start, qk_scale, 0, CAUSAL, False, BLOCK_M, DOT_PRECISION)
        dk, dv = _dkdv_stage(dk, dv, k, v, q_base, do_base, stride_qm, stride_dom, LSE_BAND + stat, DELTA + stat,
                             ROWS, offs_n, mask_n, offs_m, offs_d, mask_d, mid_hi, hi, Tq, offset, LEFT, RIGHT,
                             kv_start, qk_scale, 1, CAUSAL, False, BLOCK_M, DOT_PRECISION)
        dk, dv = _dkdv_stage(dk, dv, k, v, q_base, do_base, stride_qm, stride_dom, LSE + stat, DELTA + stat,
                             ROWS, offs_n, mask_n, offs_m, offs_d, mask_d, 0, G, G, offset, G_LEFT, G_RIGHT,
                             kv_start, qk_scale, 1, CAUSAL, True, BLOCK_M, DOT_PRECISION)
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
    for g in range(GROUP):
        off_h = off_kv * GROUP + g
        stat = (off_b * H + off_h) * Tq
        dk, dv = _dkdv_stage(dk, dv, k, v, Q + off_b * stride_qb + off_h * stride_qh,
                             DO + off_b * stride_dob + off_h * stride_doh, stride_qm, stride_dom, LSE + stat,
                             DELTA + stat, XPOS, xpos, mask_x, offs_m, offs_d, mask_d, row_lo, Tq, Tq, offset,
                             LEFT, RIGHT, kv_start, qk_scale, 2, CAUSAL, False, BLOCK_M, DOT_PRECISION)
    x_ptrs = off_b * stride_xb + off_kv * stride_xh + offs_x[:, None] * stride_xn + offs_d[None, :]
    tl.store(XDK + x_ptrs, dk * scale, mask=mask_xd)
    tl.store(XDV + x_ptrs, dv, mask=mask_xd)


@triton.jit
def _key_mass_stage(acc, k, q_base, stride_qm, LSE, WEIGHT, ROWS, kpos, valid_k, offs_m, offs_d, mask_d,
                    start, stop, R, offset, LEFT, RIGHT, kv_start, qk_scale,
                    MODE: tl.constexpr, CAUSAL: tl.constexpr, GATHERED: tl.constexpr,
                    BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc [N] += sum over rows start..stop of WEIGHT[row] * p(row, key) for one key block (the rows a
    `_dkdv_stage` with the same arguments visits). Row blocks whose weights are all zero are skipped."""
    for start_m in range(start, stop, BLOCK_M):
        offs_r = start_m + offs_m
        mask_r = offs_r < R
        if GATHERED:
            row = tl.load(ROWS + offs_r, mask=mask_r, other=0)
        else:
            row = offs_r
        weight = tl.load(WEIGHT + row, mask=mask_r, other=0.0)
        if tl.max(weight, 0) > 0.0:
            qT = tl.load(q_base + row[None, :] * stride_qm + offs_d[:, None],
                         mask=mask_d[:, None] & mask_r[None, :], other=0.0)  # [D, M]
            lse2 = tl.load(LSE + row, mask=mask_r, other=0.0) * 1.4426950408889634
            lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)  # +inf (rows hidden from this pass) gives p = 0
            sT = tl.dot(k, qT, input_precision=DOT_PRECISION) * qk_scale  # [N, M]
            if MODE != 0:
                seen = _visible((row + offset)[None, :], kpos[:, None], valid_k[:, None] & mask_r[None, :], LEFT,
                                RIGHT, CAUSAL, kv_start, MODE)
                sT = tl.where(seen, sT, float("-inf"))
            acc += tl.sum(tl.math.exp2(sT - lse2[None, :]) * weight[None, :], 1)
    return acc


@triton.jit
def _key_mass_kernel(Q, K, LSE_BAND, LSE, WEIGHT, ROWS, KV_START, KEY_MASS,
                     stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                     H, Hkv, GROUP, Tq, Tk, D, G, LEFT, RIGHT, G_LEFT, G_RIGHT, qk_scale,
                     CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """KEY_MASS[b, h, key] = sum over rows of WEIGHT[b, row] * p(row, key) for the main keys, through the band
    (LSE_BAND hides the global rows) and from the G global rows; one program per (key block, batch x kv head)."""
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
    k = tl.load(K + off_b * stride_kb + off_kv * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    kv_start = tl.load(KV_START + off_b)
    weight = WEIGHT + off_b * Tq
    last_n = tl.minimum(start_n + BLOCK_N, Tk) - 1
    lo, mid_lo, mid_hi, hi = _block_range(start_n - offset, last_n - offset, RIGHT, LEFT, Tq, BLOCK_M)
    for g in range(GROUP):
        off_h = off_kv * GROUP + g
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        stat = (off_b * H + off_h) * Tq
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc = _key_mass_stage(acc, k, q_base, stride_qm, LSE_BAND + stat, weight, ROWS, offs_n, mask_n, offs_m,
                              offs_d, mask_d, lo, mid_lo, Tq, offset, LEFT, RIGHT, kv_start, qk_scale,
                              1, CAUSAL, False, BLOCK_M, DOT_PRECISION)
        acc = _key_mass_stage(acc, k, q_base, stride_qm, LSE_BAND + stat, weight, ROWS, offs_n, mask_n, offs_m,
                              offs_d, mask_d, mid_lo, mid_hi, Tq, offset, LEFT, RIGHT, kv_start, qk_scale,
                              0, CAUSAL, False, BLOCK_M, DOT_PRECISION)
        acc = _key_mass_stage(acc, k, q_base, stride_qm, LSE_BAND + stat, weight, ROWS, offs_n, mask_n, offs_m,
                              offs_d, mask_d, mid_hi, hi, Tq, offset, LEFT, RIGHT, kv_start, qk_scale,
                              1, CAUSAL, False, BLOCK_M, DOT_PRECISION)
        acc = _key_mass_stage(acc, k, q_base, stride_qm, LSE + stat, weight, ROWS, offs_n, mask_n, offs_m,
                              offs_d, mask_d, 0, G, G, offset, G_LEFT, G_RIGHT, kv_start, qk_scale,
                              1, CAUSAL, True, BLOCK_M, DOT_PRECISION)
        acc = tl.where(offs_n >= kv_start, acc, 0.0)  # keys of the padding: the interior stage does not mask them
        tl.store(KEY_MASS + (off_b * H + off_h) * Tk + offs_n, acc, mask=mask_n)


@triton.jit
def _landmark_mass_kernel(Q, XK, XPOS, LSE_BAND, WEIGHT, KV_START, LANDMARK_MASS,
                          stride_qb, stride_qh, stride_qm, stride_xkb, stride_xkh, stride_xkn,
                          H, Hkv, GROUP, Tq, Tk, D, L, LEFT, RIGHT, qk_scale,
                          CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """LANDMARK_MASS[b, h, l]: the weighted probability the band rows give landmark l outside their band."""
    offs_x = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    off_bkv = tl.program_id(1)
    off_b = (off_bkv // Hkv).to(tl.int64)
    off_kv = (off_bkv % Hkv).to(tl.int64)
    offset = Tk - Tq
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_x = offs_x < L
    mask_d = offs_d < D
    xpos = tl.load(XPOS + offs_x, mask=mask_x, other=0)
    k = tl.load(XK + off_b * stride_xkb + off_kv * stride_xkh + offs_x[:, None] * stride_xkn + offs_d[None, :],
                mask=mask_x[:, None] & mask_d[None, :], other=0.0)
    kv_start = tl.load(KV_START + off_b)
    row_lo = 0
    if CAUSAL:  # rows before the block's first landmark see none of it
        row_lo = tl.maximum(tl.min(tl.where(mask_x, xpos, Tk), 0) - offset, 0)
        row_lo = (row_lo // BLOCK_M) * BLOCK_M
    for g in range(GROUP):
        off_h = off_kv * GROUP + g
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc = _key_mass_stage(acc, k, Q + off_b * stride_qb + off_h * stride_qh, stride_qm,
                              LSE_BAND + (off_b * H + off_h) * Tq, WEIGHT + off_b * Tq, XPOS, xpos, mask_x, offs_m,
                              offs_d, mask_d, row_lo, Tq, Tq, offset, LEFT, RIGHT, kv_start, qk_scale,
                              2, CAUSAL, False, BLOCK_M, DOT_PRECISION)
        tl.store(LANDMARK_MASS + (off_b * H + off_h) * L + offs_x, acc, mask=mask_x)


# ----------------------------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------------------------

def _global_splits(row_blocks, programs_per_split, tk, block_n, device):
    """How many key splits the G global rows use: enough programs to fill the GPU twice over, each split at least
    four key blocks. The interpreter takes three-block splits so tests at small T cross split boundaries."""
    key_blocks = triton.cdiv(tk, block_n)
    if _interpreting() or device.type != "cuda":
        return triton.cdiv(key_blocks, 3)
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    wanted = triton.cdiv(target, max(row_blocks * programs_per_split, 1))
    return max(1, min(wanted, triton.cdiv(key_blocks, 4)))


class _Launch:
    """What every launch of one call shares: shapes, the extra keys, the global rows, the pattern's constants."""

    def __init__(self, q, k, v, left, right, causal, landmarks, global_queries, scale, memory_k, memory_v, kv_start):
        _check_row_offsets(q=q, k=k, **({} if v is None else {"v": v}))
        self.batch, self.heads, self.tq, self.dim = q.shape
        self.kv_heads, self.tk = k.shape[1], k.shape[2]
        self.group = self.heads // self.kv_heads
        self.causal = causal
        self.scale = scale
        self.left, self.right = _band(left, right, self.tq, self.tk)
        far = self.tq + self.tk
        self.global_left, self.global_right = far, (0 if causal else far)  # global rows: every (earlier) key
        self.landmarks = landmarks
        self.num_landmarks = landmarks.numel()
        self.memory = 0 if memory_k is None else memory_k.shape[2]
        self.kv_start = kv_start
        self.global_rows = (global_query_rows(landmarks, self.tq, self.tk) if global_queries else landmarks[:0])
        self.global_rows = self.global_rows.to(torch.int32)
        self.num_global = self.global_rows.numel()
        self.placeholder = torch.zeros(1, dtype=torch.int32, device=q.device)  # for pointers a launch never reads
        if self.num_landmarks + self.memory:
            self.extra_k, self.extra_v, self.extra_pos = self._extra_keys(k, v, memory_k, memory_v)
        else:  # no extra keys: the loops over them are empty, but the pointers must be real
            self.extra_k, self.extra_v, self.extra_pos = k, (k if v is None else v), self.placeholder
        self.precision = _dot_precision(q.dtype)
        self.block_d = _block_d(self.dim)

    def _extra_keys(self, k, v, memory_k, memory_v):
        """(B, Hkv, L + M, D) landmark keys/values gathered, then memory tokens; positions (L + M,) int32."""
        batch = self.batch
        keys = [k.index_select(2, self.landmarks)]
        values = None if v is None else [v.index_select(2, self.landmarks)]
        positions = [self.landmarks.to(torch.int32)]
        if memory_k is not None:
            keys.append(memory_k.expand(batch, -1, -1, -1))
            if values is not None:
                values.append(memory_v.expand(batch, -1, -1, -1))
            positions.append(torch.full((self.memory,), -1, dtype=torch.int32, device=k.device))
        extra_k = torch.cat(keys, dim=2)
        extra_v = extra_k if values is None else torch.cat(values, dim=2)
        return extra_k, extra_v, torch.cat(positions)

    @property
    def has_kv_start(self):
        return self.kv_start is not None

    @property
    def kv_start_ptr(self):
        return self.placeholder if self.kv_start is None else self.kv_start

    @property
    def rows_ptr(self):
        return self.global_rows if self.num_global else self.placeholder

    def splits(self, block_m, block_n):
        """(splits, keys per split) for the global rows."""
        row_blocks = triton.cdiv(self.num_global, block_m)
        splits = _global_splits(row_blocks, self.batch * self.heads, self.tk, block_n, self.extra_pos.device)
        chunk = triton.cdiv(triton.cdiv(self.tk, splits), block_n) * block_n
        return triton.cdiv(self.tk, chunk), chunk


def _strides(t, dims=3):
    return [t.stride(i) for i in range(dims)]


def _forward(call, q, k, v, rows, out, lse, band, extra, chunk, splits, gathered, compute_o):
    block_m, block_n, num_warps, num_stages = _fwd_config(call.dim, q.dtype)
    count = call.num_global if gathered else call.tq
    values, extra_values = (v, call.extra_v) if compute_o else (k, call.extra_k)
    out_strides = [out.stride(i) for i in range(4)] if compute_o else [0, 0, 0, 0]
    _fwd_kernel[(triton.cdiv(count, block_m), call.batch * call.heads, splits)](
        q, k, values, call.extra_k, extra_values, call.extra_pos, rows, call.kv_start_ptr,
        out if compute_o else lse, lse,
        *_strides(q), *_strides(k), *_strides(values), *_strides(call.extra_k), *_strides(extra_values), *out_strides,
        call.batch, call.heads, call.group, count, call.tq, call.tk, call.dim, *band, *extra, chunk,
        call.scale * LOG2E,
        CAUSAL=call.causal, GATHERED=gathered, HAS_KV_START=call.has_kv_start, COMPUTE_O=compute_o,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=call.block_d, DOT_PRECISION=call.precision,
        num_warps=num_warps, num_stages=num_stages,
    )


def _merge_splits(out_parts, lse_parts):
    """Merge per-split softmaxes: (S, ..., D) outputs and (S, ...) lse -> (..., D), (...)."""
    lse = torch.logsumexp(lse_parts, dim=0)
    weights = torch.exp(lse_parts - lse).nan_to_num_(0.0)  # splits that saw nothing, rows that saw nothing
    out = None if out_parts is None else (weights[..., None] * out_parts).sum(0)
    return out, lse


def hybrid_fwd_triton(q, k, v, left, right, causal, landmarks, global_queries, scale, memory_k=None, memory_v=None,
                      kv_start=None):
    """q (B, H, Tq, D), k/v (B, Hkv, Tk, D), memory_k/v (B or 1, Hkv, M, D) or None, landmarks (L,) sorted int64,
    kv_start (B,) int32 or None -> (o (B, H, Tq, D), lse (B, H, Tq) float32). With v None only lse is computed.

    Extra memory: o, lse, the gathered extra keys/values and the global rows' partials (splits, B, H, G, D) float32."""
    call = _Launch(q, k, v, left, right, causal, landmarks, global_queries, scale, memory_k, memory_v, kv_start)
    compute_o = v is not None
    out = torch.empty_like(q, memory_format=torch.contiguous_format) if compute_o else None
    lse = torch.empty(call.batch, call.heads, call.tq, dtype=torch.float32, device=q.device)
    extra_all = (0, call.num_landmarks + call.memory)
    _forward(call, q, k, v, call.placeholder, None if out is None else out[None], lse, (call.left, call.right),
             extra_all, call.tk, 1, False, compute_o)
    if call.num_global:
        block_m, block_n = _fwd_config(call.dim, q.dtype)[:2]
        splits, chunk = call.splits(block_m, block_n)
        shape = (splits, call.batch, call.heads, call.num_global)
        out_parts = torch.empty(shape + (call.dim,), dtype=torch.float32, device=q.device) if compute_o else None
        lse_parts = torch.empty(shape, dtype=torch.float32, device=q.device)
        memory_only = (call.num_landmarks, call.num_landmarks + call.memory)
        _forward(call, q, k, v, call.global_rows, out_parts, lse_parts, (call.global_left, call.global_right),
                 memory_only, chunk, splits, True, compute_o)
        out_global, lse_global = _merge_splits(out_parts, lse_parts)
        rows = call.global_rows.long()
        lse[:, :, rows] = lse_global
        if compute_o:
            out[:, :, rows] = out_global.to(out.dtype)
    return out, lse


def _dq(call, q, k, v, grad_out, lse, delta, rows, dq, band, extra, chunk, splits, gathered):
    block_m, block_n, num_warps, num_stages = _bwd_config(call.dim, q.dtype)
    count = call.num_global if gathered else call.tq
    _dq_kernel[(triton.cdiv(count, block_m), call.batch * call.heads, splits)](
        q, k, v, call.extra_k, call.extra_v, call.extra_pos, rows, call.kv_start_ptr, grad_out, lse, delta, dq,
        *_strides(q), *_strides(k), *_strides(v), *_strides(call.extra_k), *_strides(call.extra_v),
        *_strides(grad_out), *[dq.stride(i) for i in range(4)],
        call.heads, call.group, count, call.tq, call.tk, call.dim, *band, *extra, chunk, call.scale * LOG2E,
        call.scale,
        CAUSAL=call.causal, GATHERED=gathered, HAS_KV_START=call.has_kv_start,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=call.block_d, DOT_PRECISION=call.precision,
        num_warps=num_warps, num_stages=num_stages,
    )


def _extra_grads(call, q, grad_out, lse_band, lse, delta):
    """dk, dv (B, Hkv, L + M, D) float32 of the extra keys: landmarks from the band rows, memory from every row."""
    block_m, block_n, num_warps, num_stages = _bwd_config(call.dim, q.dtype)
    grad_k = torch.empty(call.extra_k.shape, dtype=torch.float32, device=q.device)
    grad_v = torch.empty_like(grad_k)
    landmarks, total = call.num_landmarks, call.num_landmarks + call.memory
    for x_lo, x_hi, row_lse in ((0, landmarks, lse_band), (landmarks, total, lse)):
        if x_hi == x_lo:
            continue
        _dkdv_extra_kernel[(triton.cdiv(x_hi - x_lo, block_n), call.batch * call.kv_heads)](
            q, call.extra_k, call.extra_v, call.extra_pos, grad_out, row_lse, delta, call.kv_start_ptr,
            grad_k, grad_v,
            *_strides(q), *_strides(call.extra_k), *_strides(call.extra_v), *_strides(grad_out), *_strides(grad_k),
            call.heads, call.kv_heads, call.group, call.tq, call.tk, call.dim, x_lo, x_hi, call.left, call.right,
            call.scale * LOG2E, call.scale,
            CAUSAL=call.causal, HAS_KV_START=call.has_kv_start,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=call.block_d, DOT_PRECISION=call.precision,
            num_warps=num_warps, num_stages=num_stages,
        )
    return grad_k, grad_v


def hybrid_bwd_triton(q, k, v, out, lse, grad_out, grad_lse, left, right, causal, landmarks, global_queries, scale,
                      memory_k=None, memory_v=None, kv_start=None):
    """Gradients (dq, dk, dv, dmemory_k, dmemory_v) of out and lse (grad_lse may be None); memory gradients are None
    without memory and summed over the batch when memory_k has batch 1.

    Extra memory: delta and a copy of lse (B, H, Tq) float32, the extra keys' gradients (B, Hkv, L + M, D) float32,
    the global rows' dq partials, and a (Tk,) int32 landmark index. Deterministic: no atomics."""
    _check_row_offsets(grad_out=grad_out)
    call = _Launch(q, k, v, left, right, causal, landmarks, global_queries, scale, memory_k, memory_v, kv_start)
    block_m, block_n, num_warps, num_stages = _bwd_config(call.dim, q.dtype)
    delta = torch.empty(call.batch, call.heads, call.tq, dtype=torch.float32, device=q.device)
    _bwd_delta_kernel[(triton.cdiv(call.tq, block_m), call.batch * call.heads)](
        out, grad_out, grad_lse if grad_lse is not None else delta, delta,
        *_strides(out), *_strides(grad_out), call.heads, call.tq, call.dim,
        HAS_DLSE=grad_lse is not None, BLOCK_M=block_m, BLOCK_D=call.block_d,
    )
    global_rows = call.global_rows.long()
    lse_band = lse.index_fill(2, global_rows, float("inf")) if call.num_global else lse

    num_extra = call.num_landmarks + call.memory
    if num_extra:
        extra_dk, extra_dv = _extra_grads(call, q, grad_out, lse_band, lse, delta)
    else:
        extra_dk = extra_dv = torch.zeros(1, 1, 1, 1, dtype=torch.float32, device=q.device)
    landmark_index = call.placeholder
    if call.num_landmarks:  # key position -> its row in the extra block, -1 for keys that are not landmarks
        landmark_index = torch.full((call.tk,), -1, dtype=torch.int32, device=q.device)
        landmark_index[landmarks] = torch.arange(call.num_landmarks, dtype=torch.int32, device=q.device)

    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    _dkdv_kernel[(triton.cdiv(call.tk, block_n), call.batch * call.kv_heads)](
        q, k, v, grad_out, lse_band, lse, delta, call.rows_ptr, call.kv_start_ptr, landmark_index, extra_dk, extra_dv,
        dk, dv,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(extra_dk), *_strides(dk),
        *_strides(dv),
        call.heads, call.kv_heads, call.group, call.tq, call.tk, call.dim, call.num_global, call.left, call.right,
        call.global_left, call.global_right, call.scale * LOG2E, call.scale,
        CAUSAL=call.causal, HAS_KV_START=call.has_kv_start, HAS_LANDMARKS=call.num_landmarks > 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=call.block_d, DOT_PRECISION=call.precision,
        num_warps=num_warps, num_stages=num_stages,
    )

    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    _dq(call, q, k, v, grad_out, lse, delta, call.placeholder, dq[None], (call.left, call.right), (0, num_extra),
        call.tk, 1, False)
    if call.num_global:
        splits, chunk = call.splits(block_m, block_n)
        dq_parts = torch.empty(splits, call.batch, call.heads, call.num_global, call.dim, dtype=torch.float32,
                               device=q.device)
        _dq(call, q, k, v, grad_out, lse, delta, call.global_rows, dq_parts, (call.global_left, call.global_right),
            (call.num_landmarks, num_extra), chunk, splits, True)
        dq[:, :, global_rows] = dq_parts.sum(0).to(dq.dtype)

    if memory_k is None:
        return dq, dk, dv, None, None
    memory_grads = []
    for grad, memory in ((extra_dk, memory_k), (extra_dv, memory_v)):
        grad = grad[:, :, call.num_landmarks:]
        if memory.shape[0] != call.batch:  # one set of memory tokens shared by the batch
            grad = grad.sum(0, keepdim=True)
        memory_grads.append(grad.to(memory.dtype))
    return (dq, dk, dv, *memory_grads)


def attention_mass_triton(q, k, lse, segments, num_segments, row_weights, left, right, causal, landmarks,
                          global_queries, scale, memory_k=None, kv_start=None):
    """(B, H, S) float32: sum over rows of row_weights (B, Tq) times each row's probability on each segment's keys
    (segments (B, Tk), -1 = none), recomputed from lse (B, H, Tq). Key-major, like the dk/dv pass: each program
    sums the probabilities its keys get, so there are no atomics and the result is deterministic.

    Extra memory: the per-key mass (B, H, Tk) and per-landmark mass (B, H, L) in float32 and a copy of lse."""
    call = _Launch(q, k, None, left, right, causal, landmarks, global_queries, scale, memory_k, None, kv_start)
    block_m, block_n, num_warps, num_stages = _bwd_config(call.dim, q.dtype)
    row_weights = row_weights.float().contiguous()
    kv_start = call.kv_start if call.has_kv_start else torch.zeros(call.batch, dtype=torch.int32, device=q.device)
    lse_band = lse.index_fill(2, call.global_rows.long(), float("inf")) if call.num_global else lse
    key_mass = torch.empty(call.batch, call.heads, call.tk, dtype=torch.float32, device=q.device)
    _key_mass_kernel[(triton.cdiv(call.tk, block_n), call.batch * call.kv_heads)](
        q, k, lse_band, lse, row_weights, call.rows_ptr, kv_start, key_mass,
        *_strides(q), *_strides(k),
        call.heads, call.kv_heads, call.group, call.tq, call.tk, call.dim, call.num_global, call.left, call.right,
        call.global_left, call.global_right, call.scale * LOG2E,
        CAUSAL=call.causal, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=call.block_d, DOT_PRECISION=call.precision,
        num_warps=num_warps, num_stages=num_stages,
    )
    if call.num_landmarks:
        landmark_mass = torch.empty(call.batch, call.heads, call.num_landmarks, dtype=torch.float32,
                                    device=q.device)
        _landmark_mass_kernel[(triton.cdiv(call.num_landmarks, block_n), call.batch * call.kv_heads)](
            q, call.extra_k, call.extra_pos, lse_band, row_weights, kv_start, landmark_mass,
            *_strides(q), *_strides(call.extra_k),
            call.heads, call.kv_heads, call.group, call.tq, call.tk, call.dim, call.num_landmarks, call.left,
            call.right, call.scale * LOG2E,
            CAUSAL=call.causal, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=call.block_d,
            DOT_PRECISION=call.precision, num_warps=num_warps, num_stages=num_stages,
        )
        key_mass[:, :, landmarks] += landmark_mass
    bins = torch.where(segments < 0, num_segments, segments).long()
    mass = torch.zeros(call.batch, call.heads, num_segments + 1, dtype=torch.float32, device=q.device)
    mass.scatter_add_(2, bins[:, None].expand(-1, call.heads, -1), key_mass)
    return mass[..., :num_segments]
