"""Streaming attention in Triton: a chunk of queries against the rolling KV cache, read in place, and the chunk itself.

The keys of one call come from three sources, each read where it lies, never concatenated or rolled:
- the sink slots `sink_k/v (B, Hkv, sinks, D)`: slot j holds position j (for j < length); every query sees them;
- the ring `ring_k/v (B, Hkv, window, D)`: slot s holds position sinks + s + window * floor((length - 1 - sinks - s)
  / window) when length - 1 - sinks - s >= 0, else nothing (cache_layout.ring_positions); a query at p sees it iff
  it is >= p - window + 1. The positions a row block can see, [max(first - window + 1, sinks, length - window),
  length), are one run of slots modulo window: at most two slot ranges (the wrap-around), visited as two stages
  whose blocks never overlap;
- the chunk `k/v (B, Hkv, C, D)` at positions length .. length + C - 1: the causal band of the int window, plus the
  chunk's keys at positions < sinks (the first chunks of a stream), visited as two disjoint block ranges.
Masks come from each key's position, so a key is counted once whatever block visits it. One online softmax in base 2
(s2 = q.k * scale * log2(e)) runs across the three sources in one program.

Two launch shapes of one kernel:
- prefill (many queries): programs over (query block, batch x head); each visits the sinks, the ring slots its rows'
  window reaches and the chunk blocks of its band, and writes o in q's dtype. Extra memory: none beside o.
- split-K decode (few queries, `_use_split`): the rows of the GROUP query heads that share a KV head are packed into
  one block (GROUP x C rows), so K/V are read once per KV head; the keys are laid end to end in a virtual index
  (sinks, ring, chunk, each padded to BLOCK_N) and cut into `_splits` ranges, one program each. Each writes a
  partial (o, lse) in float32; the host merges them by log-sum-exp (deterministic, no atomics). Extra memory:
  splits x B x H x C x (D + 1) float32.
Both need only the sinks + ring + chunk keys a row block can see: work C x (sinks + window + C) at most, per head.
"""
import torch
import triton
import triton.language as tl

from ..hybrid.triton_kernels import _merge_splits
from ..targets import gpu_target
from ..triton_common import (LOG2E, _block_d, _check_row_offsets, _dim_class, _dot_precision, _fwd_config,
                             _online_softmax_step, _softmax_result)


@triton.jit
def _stage(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, row_i, offs_n, offs_d, mask_d,
           start, stop, limit, length, SINKS, WINDOW, qk_scale,
           SOURCE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax over key blocks start..stop (block-aligned start) of one source, keys idx < limit.
    SOURCE 0: sink slots, 1: ring slots, 2: the chunk."""
    pos = length + row_i  # [M] query positions
    for start_n in range(start, stop, BLOCK_N):
        idx = start_n + offs_n
        valid = idx < limit
        kT = tl.load(k_base + idx[None, :] * stride_kn + offs_d[:, None], mask=mask_d[:, None] & valid[None, :],
                     other=0.0)  # [D, N]
        s = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale  # [M, N]
        if SOURCE == 0:  # sink slots: limit = the sinks written so far, all before every query
            seen = valid[None, :] & (pos[:, None] >= 0)
        elif SOURCE == 1:  # ring slots: the position each slot holds after `length` tokens
            newest = length - 1 - SINKS - idx
            kpos = SINKS + idx + WINDOW * (tl.maximum(newest, 0) // WINDOW)
            seen = (valid & (newest >= 0))[None, :] & (kpos[None, :] >= pos[:, None] - WINDOW + 1)
        else:  # the chunk: causal, within the window, or a sink position
            seen = (valid[None, :] & (idx[None, :] <= row_i[:, None])
                    & ((length + idx[None, :] < SINKS) | (idx[None, :] >= row_i[:, None] - WINDOW + 1)))
        s = tl.where(seen, s, float("-inf"))
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, s, v_base, stride_vn, idx, valid, offs_d, mask_d, True,
                                             DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _clip(lo, hi, offset, split_lo, split_hi):
    """Clip the block range [lo, hi) of a source at `offset` in the virtual key index to this split's range."""
    lo = tl.maximum(lo, split_lo - offset)
    hi = tl.minimum(hi, split_hi - offset)
    return lo, tl.maximum(hi, lo)


@triton.jit
def _stream_fwd_kernel(Q, K, V, SK, SV, RK, RV, O, LSE,
                       stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                       stride_vb, stride_vh, stride_vn, stride_skb, stride_skh, stride_skn,
                       stride_svb, stride_svh, stride_svn, stride_rkb, stride_rkh, stride_rkn,
                       stride_rvb, stride_rvh, stride_rvn, stride_os, stride_ob, stride_oh, stride_om,
                       B, H, GROUP, R, C, D, length, SINKS, WINDOW, SPLIT_KEYS, RING_OFFSET, CHUNK_OFFSET, qk_scale,
                       PACK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    """One program per (row block, batch x head -- or batch x KV head with PACK, key split). Rows: the C queries of
    one head, or with PACK the GROUP x C (head, query) pairs of one KV head. Keys: the split's share of the virtual
    index [sinks | ring | chunk]. Writes o (normalised) and lse (natural log) of split `program_id(2)`."""
    off_bh = tl.program_id(1)
    split = tl.program_id(2)
    offs_r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_r = offs_r < R
    if PACK:
        kv_heads = H // GROUP
        off_b = (off_bh // kv_heads).to(tl.int64)
        off_kv = (off_bh % kv_heads).to(tl.int64)
        head = off_kv * GROUP + (offs_r // C).to(tl.int64)
        row_i = offs_r % C
    else:
        off_b = (off_bh // H).to(tl.int64)
        head0 = (off_bh % H).to(tl.int64)
        off_kv = head0 // GROUP
        head = head0 + tl.zeros([BLOCK_M], dtype=tl.int64)
        row_i = offs_r
    first = tl.min(tl.where(mask_r, row_i, C), 0)
    last = tl.max(tl.where(mask_r, row_i, 0), 0)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D

    q = tl.load(Q + off_b * stride_qb + head[:, None] * stride_qh + row_i[:, None] * stride_qm + offs_d[None, :],
                mask=mask_r[:, None] & mask_d[None, :], other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    split_lo = split * SPLIT_KEYS
    split_hi = split_lo + SPLIT_KEYS

    # Sinks written so far: slots 0 .. min(sinks, length).
    cached_sinks = tl.minimum(SINKS, length)
    lo, hi = _clip(0, cached_sinks, 0, split_lo, split_hi)
    acc, l_i, m_i = _stage(acc, l_i, m_i, q, SK + off_b * stride_skb + off_kv * stride_skh,
                           SV + off_b * stride_svb + off_kv * stride_svh, stride_skn, stride_svn, row_i, offs_n,
                           offs_d, mask_d, lo, hi, cached_sinks, length, SINKS, WINDOW, qk_scale,
                           0, BLOCK_N, DOT_PRECISION)

    # Ring: positions [oldest, length) seen by some row, a run of slots from slot0 that may wrap past the end.
    oldest = tl.maximum(tl.maximum(length + first - WINDOW + 1, SINKS), length - WINDOW)
    count = tl.maximum(length - oldest, 0)
    slot0 = (tl.maximum(oldest, SINKS) - SINKS) % WINDOW
    aligned0 = (slot0 // BLOCK_N) * BLOCK_N
    hi_a = tl.where(count > 0, tl.minimum(slot0 + count, WINDOW), aligned0)
    hi_b = tl.minimum(tl.maximum(slot0 + count - WINDOW, 0), aligned0)  # the wrapped part, blocks before aligned0
    rk_base = RK + off_b * stride_rkb + off_kv * stride_rkh
    rv_base = RV + off_b * stride_rvb + off_kv * stride_rvh
    lo, hi = _clip(aligned0, hi_a, RING_OFFSET, split_lo, split_hi)
    acc, l_i, m_i = _stage(acc, l_i, m_i, q, rk_base, rv_base, stride_rkn, stride_rvn, row_i, offs_n, offs_d, mask_d,
                           lo, hi, WINDOW, length, SINKS, WINDOW, qk_scale, 1, BLOCK_N, DOT_PRECISION)
    lo, hi = _clip(0, hi_b, RING_OFFSET, split_lo, split_hi)
    acc, l_i, m_i = _stage(acc, l_i, m_i, q, rk_base, rv_base, stride_rkn, stride_rvn, row_i, offs_n, offs_d, mask_d,
                           lo, hi, WINDOW, length, SINKS, WINDOW, qk_scale, 1, BLOCK_N, DOT_PRECISION)

    # Chunk: sink positions inside the chunk (blocks before the band), then the band [first - window + 1, last].
    k_base = K + off_b * stride_kb + off_kv * stride_kh
    v_base = V + off_b * stride_vb + off_kv * stride_vh
    band_lo = (tl.maximum(first - WINDOW + 1, 0) // BLOCK_N) * BLOCK_N
    band_hi = tl.minimum(last + 1, C)
    chunk_sinks = tl.minimum(tl.maximum(SINKS - length, 0), C)
    sinks_hi = tl.minimum(((chunk_sinks + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, band_lo)
    lo, hi = _clip(0, sinks_hi, CHUNK_OFFSET, split_lo, split_hi)
    acc, l_i, m_i = _stage(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, row_i, offs_n, offs_d, mask_d,
                           lo, hi, C, length, SINKS, WINDOW, qk_scale, 2, BLOCK_N, DOT_PRECISION)
    lo, hi = _clip(band_lo, band_hi, CHUNK_OFFSET, split_lo, split_hi)
    acc, l_i, m_i = _stage(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, row_i, offs_n, offs_d, mask_d,
                           lo, hi, C, length, SINKS, WINDOW, qk_scale, 2, BLOCK_N, DOT_PRECISION)

    out, lse = _softmax_result(acc, l_i, m_i)
    o_ptrs = O + split * stride_os + off_b * stride_ob + head[:, None] * stride_oh + row_i[:, None] * stride_om
    tl.store(o_ptrs + offs_d[None, :], out.to(O.dtype.element_ty), mask=mask_r[:, None] & mask_d[None, :])
    tl.store(LSE + ((split * B + off_b) * H + head) * C + row_i, lse, mask=mask_r)


# Host side: heuristics (tests monkeypatch these), then the launcher.

def _use_split(chunk, group, keys, device):
    """Split-K for decode-like calls: few query rows per KV head (a row block would leave the GPU idle) and more keys
    than one block. `keys` = sinks + window + chunk."""
    return chunk <= 16 and group * chunk <= 128 and keys > 64


def _config(dim, dtype, split):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). Prefill takes the hybrid forward's config; decode takes 16 packed
    rows and wide key blocks (a starting point, not tuned on a GPU). The interpreter takes blocks of 16, so that test
    sizes cross block, wrap and split boundaries."""
    if gpu_target() is None:
        return 16, 16, 4, 1
    if not split:
        return _fwd_config(dim, dtype)
    if dim > 128 or dtype == torch.float32:
        return 16, 32, 4, 2
    return 16, 64, 8 if _dim_class(dim) == "padded" else 4, 3  # a padded D's masked loads spill four warps


def _splits(key_blocks, programs, device):
    """How many key splits: about two waves of programs, each split at least four key blocks (two in the
    interpreter, so tests see several splits)."""
    target = gpu_target(device)
    if target is None:
        return max(1, triton.cdiv(key_blocks, 2))
    return max(1, min(triton.cdiv(2 * target.sm_count, max(programs, 1)), key_blocks // 4))


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(t, dims=3):
    return [t.stride(i) for i in range(dims)]


def streaming_attention_triton(q, k, v, sink_k, sink_v, ring_k, ring_v, length, sinks, window, scale):
    """q (B, H, C, D) at positions length .. length + C - 1; k/v (B, Hkv, C, D) the chunk (not yet in the cache);
    sink_k/v (B, Hkv, sinks, D) and ring_k/v (B, Hkv, window, D) the cache after `length` tokens, read in place
    -> o (B, H, C, D) in q's dtype. Any strides with unit last stride; H % Hkv == 0 (K/V never expanded).

    Extra memory: none beside o on the prefill path; the split-K path adds partials splits x B x H x C x D and
    splits x B x H x C float32 (merged on the host by log-sum-exp)."""
    q, k, v, sink_k, sink_v, ring_k, ring_v = (_unit_last(t) for t in (q, k, v, sink_k, sink_v, ring_k, ring_v))
    _check_row_offsets(q=q, k=k, v=v, ring_k=ring_k, ring_v=ring_v)
    if sinks == 0:  # no sink slots: their loop is empty, but the pointers must be real
        sink_k, sink_v = ring_k, ring_v
    batch, heads, chunk, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    if length + chunk >= 2**31:
        raise ValueError(f"stream position {length + chunk} is past the kernel's int32 positions")
    split = _use_split(chunk, group, sinks + window + chunk, q.device)
    block_m, block_n, num_warps, num_stages = _config(dim, q.dtype, split)
    # virtual key index of the split-K path: [sinks | ring | chunk], each padded to whole key blocks
    sink_blocks, ring_blocks, chunk_blocks = (triton.cdiv(n, block_n) for n in (sinks, window, chunk))
    ring_offset, chunk_offset = sink_blocks * block_n, (sink_blocks + ring_blocks) * block_n
    total = chunk_offset + chunk_blocks * block_n
    if split:
        rows, programs = group * chunk, batch * kv_heads
        splits = _splits(total // block_n, triton.cdiv(rows, block_m) * programs, q.device)
        split_keys = triton.cdiv(triton.cdiv(total, splits), block_n) * block_n
        splits = triton.cdiv(total, split_keys)
    else:
        rows, programs, splits, split_keys = chunk, batch * heads, 1, total
    lse = torch.empty(splits, batch, heads, chunk, dtype=torch.float32, device=q.device)
    if splits == 1:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        out_strides = [0] + [out.stride(i) for i in range(3)]
    else:
        out = torch.empty(splits, batch, heads, chunk, dim, dtype=torch.float32, device=q.device)
        out_strides = [out.stride(i) for i in range(4)]
    _stream_fwd_kernel[(triton.cdiv(rows, block_m), programs, splits)](
        q, k, v, sink_k, sink_v, ring_k, ring_v, out, lse,
        *_strides(q), *_strides(k), *_strides(v), *_strides(sink_k), *_strides(sink_v), *_strides(ring_k),
        *_strides(ring_v), *out_strides,
        batch, heads, group, rows, chunk, dim, length, sinks, window, split_keys, ring_offset, chunk_offset,
        scale * LOG2E,
        PACK=split, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(dim), DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    if splits == 1:
        return out
    merged, _ = _merge_splits(out, lse)
    return merged.to(q.dtype)
