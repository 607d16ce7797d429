"""Hybrid attention forward in Triton: online softmax over a row block's band, then its extra keys (landmarks and
memory tokens). Also the lse-only pass of the attention mass."""
import triton
import triton.language as tl

from ..triton_common import _online_softmax_step, _softmax_result
from .triton_tiles import _key_blocks, _key_positions, _masked_scores, _rows


@triton.jit
def _fwd_stage(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, KPOS, pos, offs_n, offs_d, mask_d,
               start, stop, limit, LEFT, RIGHT, kv_start, key_mask, qk_scale,
               MODE: tl.constexpr, CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
               COMPUTE_O: tl.constexpr,
               BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    for start_n in range(start, stop, BLOCK_N):
        idx = start_n + offs_n
        valid = idx < limit
        kT = tl.load(k_base + idx[None, :] * stride_kn + offs_d[:, None], mask=mask_d[:, None] & valid[None, :],
                     other=0.0)  # [D, N]
        s = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale
        kpos = _key_positions(KPOS, idx, valid, MODE)
        s = _masked_scores(s, pos, kpos, valid, LEFT, RIGHT, CAUSAL, kv_start, key_mask, MODE, HAS_KV_START,
                           HAS_KEY_MASK)
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, s, v_base, stride_vn, idx, valid, offs_d, mask_d,
                                             COMPUTE_O, DOT_PRECISION, MODE != 0 or HAS_KV_START or HAS_KEY_MASK)
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, XK, XV, XPOS, ROWS, KV_START, KEY_MASK, O, LSE,
                stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                stride_xkb, stride_xkh, stride_xkn, stride_xvb, stride_xvh, stride_xvn,
                stride_os, stride_ob, stride_oh, stride_om, stride_kmb,
                B, H, GROUP, R, Tq, Tk, D, LEFT, RIGHT, X_LO, X_HI, CHUNK, qk_scale,
                CAUSAL: tl.constexpr, GATHERED: tl.constexpr, HAS_KV_START: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
                COMPUTE_O: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
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
    key_mask = KEY_MASK + off_b * stride_kmb

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
                               mask_d, lo, mid_lo, Tk, LEFT, RIGHT, kv_start, key_mask, qk_scale,
                               1, CAUSAL, HAS_KV_START, HAS_KEY_MASK, COMPUTE_O, BLOCK_N, DOT_PRECISION)
    acc, l_i, m_i = _fwd_stage(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, XPOS, pos, offs_n, offs_d,
                               mask_d, mid_lo, mid_hi, Tk, LEFT, RIGHT, kv_start, key_mask, qk_scale,
                               0, CAUSAL, HAS_KV_START, HAS_KEY_MASK, COMPUTE_O, BLOCK_N, DOT_PRECISION)
    acc, l_i, m_i = _fwd_stage(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, XPOS, pos, offs_n, offs_d,
                               mask_d, mid_hi, hi, Tk, LEFT, RIGHT, kv_start, key_mask, qk_scale,
                               1, CAUSAL, HAS_KV_START, HAS_KEY_MASK, COMPUTE_O, BLOCK_N, DOT_PRECISION)
    x_hi = tl.where(split == 0, X_HI, X_LO)
    acc, l_i, m_i = _fwd_stage(acc, l_i, m_i, q, XK + off_b * stride_xkb + off_kv * stride_xkh,
                               XV + off_b * stride_xvb + off_kv * stride_xvh, stride_xkn, stride_xvn, XPOS, pos,
                               offs_n, offs_d, mask_d, X_LO, x_hi, x_hi, LEFT, RIGHT, kv_start, key_mask, qk_scale,
                               2, CAUSAL, HAS_KV_START, HAS_KEY_MASK, COMPUTE_O, BLOCK_N, DOT_PRECISION)

    out, lse = _softmax_result(acc, l_i, m_i)
    if COMPUTE_O:
        o_ptrs = O + split * stride_os + off_b * stride_ob + off_h * stride_oh + offs_r[:, None] * stride_om
        tl.store(o_ptrs + offs_d[None, :], out.to(O.dtype.element_ty), mask=mask_r[:, None] & mask_d[None, :])
    tl.store(LSE + (split * B * H + off_bh).to(tl.int64) * R + offs_r, lse, mask=mask_r)
