"""Attention mass in Triton: key-major sums of the weighted probabilities each key receives (shaped like the dk/dv
pass, so no atomics)."""
import triton
import triton.language as tl

from ..triton_common import _block_range
from .triton_tiles import _key_ok, _visible


@triton.jit
def _key_mass_stage(acc, k, q_base, stride_qm, LSE, WEIGHT, ROWS, kpos, valid_k, offs_m, offs_d, mask_d,
                    start, stop, R, offset, LEFT, RIGHT, kv_start, qk_scale,
                    MODE: tl.constexpr, CAUSAL: tl.constexpr, GATHERED: tl.constexpr,
                    BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc [N] += sum over rows start..stop of WEIGHT[row] * p(row, key) for one key block (the rows a
    `_dkdv_kernel` visits). Row blocks whose weights are all zero are skipped."""
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
def _key_mass_kernel(Q, K, LSE_BAND, LSE, WEIGHT, ROWS, KV_START, KEY_MASK, KEY_MASS,
                     stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_kmb,
                     H, Hkv, GROUP, Tq, Tk, D, G, LEFT, RIGHT, G_LEFT, G_RIGHT, qk_scale,
                     CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
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
    key_ok = offs_n >= kv_start  # keys of the padding: the interior stage does not mask them
    if HAS_KEY_MASK:
        key_ok = key_ok & _key_ok(KEY_MASK + off_b * stride_kmb, offs_n, mask_n)
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
        acc = tl.where(key_ok, acc, 0.0)
        tl.store(KEY_MASS + (off_b * H + off_h) * Tk + offs_n, acc, mask=mask_n)


@triton.jit
def _landmark_mass_kernel(Q, XK, XPOS, LSE_BAND, WEIGHT, KV_START, KEY_MASK, LANDMARK_MASS,
                          stride_qb, stride_qh, stride_qm, stride_xkb, stride_xkh, stride_xkn, stride_kmb,
                          H, Hkv, GROUP, Tq, Tk, D, L, LEFT, RIGHT, qk_scale,
                          CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
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
        if HAS_KEY_MASK:  # hidden landmarks get nothing
            acc = tl.where(_key_ok(KEY_MASK + off_b * stride_kmb, xpos, mask_x), acc, 0.0)
        tl.store(LANDMARK_MASS + (off_b * H + off_h) * L + offs_x, acc, mask=mask_x)
