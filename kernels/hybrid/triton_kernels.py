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
the dk/dv pass (no atomics). Work: Tq x (window + L + M) + G x Tk. Extra memory: the gathered extra keys/values
(B, Hkv, L + M, D), the partial outputs of the G global rows (splits x B x H x G x D float32), and O(B x H x Tq)
float32 statistics. Scores are kept in base 2: s2 = q.k * scale * log2(e).

This module holds the host launchers; the kernels live in triton_forward.py, triton_backward.py and triton_mass.py,
and the tile-level pattern in triton_tiles.py.
"""
import torch
import triton

from ..patterns import global_query_rows
from ..targets import gpu_target
from ..triton_common import (LOG2E, _band, _block_d, _bwd_config, _bwd_delta_kernel, _check_row_offsets, _dot_precision,
                             _fwd_config)
from .triton_backward import _dkdv_extra_kernel, _dkdv_kernel, _dq_kernel
from .triton_forward import _fwd_kernel
from .triton_mass import _key_mass_kernel, _landmark_mass_kernel

MEMORY_POSITION = -1  # extra keys at negative positions are memory tokens: every query sees them


def _global_splits(row_blocks, programs_per_split, tk, block_n, device):
    """How many key splits the G global rows use: enough programs to fill the GPU twice over, each split at least
    four key blocks. The interpreter takes three-block splits so tests at small T cross split boundaries."""
    key_blocks = triton.cdiv(tk, block_n)
    target = gpu_target(device)
    if target is None:
        return triton.cdiv(key_blocks, 3)
    wanted = triton.cdiv(2 * target.sm_count, max(row_blocks * programs_per_split, 1))
    return max(1, min(wanted, triton.cdiv(key_blocks, 4)))


class _Launch:
    """What every launch of one call shares: shapes, the extra keys, the global rows, the pattern's constants."""

    def __init__(self, q, k, v, left, right, causal, landmarks, global_queries, scale, memory_k, memory_v, kv_start,
                 key_mask=None):
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
        self.key_mask = None if key_mask is None else key_mask.contiguous().view(torch.uint8)  # (B, Tk)
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
            positions.append(torch.full((self.memory,), MEMORY_POSITION, dtype=torch.int32, device=k.device))
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
    def has_key_mask(self):
        return self.key_mask is not None

    @property
    def key_mask_ptr(self):
        return self.placeholder if self.key_mask is None else self.key_mask

    @property
    def key_mask_stride(self):
        return 0 if self.key_mask is None else self.key_mask.stride(0)

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
        q, k, values, call.extra_k, extra_values, call.extra_pos, rows, call.kv_start_ptr, call.key_mask_ptr,
        out if compute_o else lse, lse,
        *_strides(q), *_strides(k), *_strides(values), *_strides(call.extra_k), *_strides(extra_values), *out_strides,
        call.key_mask_stride, call.batch, call.heads, call.group, count, call.tq, call.tk, call.dim, *band, *extra,
        chunk,
        call.scale * LOG2E,
        CAUSAL=call.causal, GATHERED=gathered, HAS_KV_START=call.has_kv_start, HAS_KEY_MASK=call.has_key_mask,
        COMPUTE_O=compute_o,
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
                      kv_start=None, key_mask=None):
    """q (B, H, Tq, D), k/v (B, Hkv, Tk, D), memory_k/v (B or 1, Hkv, M, D) or None, landmarks (L,) sorted int64,
    kv_start (B,) int32 or None, key_mask (B, Tk) bool or None -> (o (B, H, Tq, D), lse (B, H, Tq) float32). With v
    None only lse is computed.

    Extra memory: o, lse, the gathered extra keys/values and the global rows' partials (splits, B, H, G, D) float32."""
    call = _Launch(q, k, v, left, right, causal, landmarks, global_queries, scale, memory_k, memory_v, kv_start,
                   key_mask)
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
    block_m, block_n, num_warps, num_stages = _bwd_config(call.dim, q.dtype, "dq")
    count = call.num_global if gathered else call.tq
    _dq_kernel[(triton.cdiv(count, block_m), call.batch * call.heads, splits)](
        q, k, v, call.extra_k, call.extra_v, call.extra_pos, rows, call.kv_start_ptr, call.key_mask_ptr, grad_out, lse,
        delta, dq,
        *_strides(q), *_strides(k), *_strides(v), *_strides(call.extra_k), *_strides(call.extra_v),
        *_strides(grad_out), *[dq.stride(i) for i in range(4)], call.key_mask_stride,
        call.heads, call.group, count, call.tq, call.tk, call.dim, *band, *extra, chunk, call.scale * LOG2E,
        call.scale,
        CAUSAL=call.causal, GATHERED=gathered, HAS_KV_START=call.has_kv_start, HAS_KEY_MASK=call.has_key_mask,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=call.block_d, DOT_PRECISION=call.precision,
        num_warps=num_warps, num_stages=num_stages,
    )


def _extra_grads(call, q, grad_out, lse_band, lse, delta):
    """dk, dv (B, Hkv, L + M, D) float32 of the extra keys: landmarks from the band rows, memory from every row."""
    block_m, block_n, num_warps, num_stages = _bwd_config(call.dim, q.dtype, "dkdv_extra")
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
                      memory_k=None, memory_v=None, kv_start=None, key_mask=None):
    """Gradients (dq, dk, dv, dmemory_k, dmemory_v) of out and lse (grad_lse may be None); memory gradients are None
    without memory and summed over the batch when memory_k has batch 1.

    Extra memory: delta and a copy of lse (B, H, Tq) float32, the extra keys' gradients (B, Hkv, L + M, D) float32,
    the global rows' dq partials, and a (Tk,) int32 landmark index. Deterministic: no atomics."""
    _check_row_offsets(grad_out=grad_out)
    call = _Launch(q, k, v, left, right, causal, landmarks, global_queries, scale, memory_k, memory_v, kv_start,
                   key_mask)
    block_m, block_n, num_warps, num_stages = _bwd_config(call.dim, q.dtype, "dkdv")
    delta = torch.empty(call.batch, call.heads, call.tq, dtype=torch.float32, device=q.device)
    delta_rows = 64  # one row block of o and do per program
    _bwd_delta_kernel[(triton.cdiv(call.tq, delta_rows), call.batch * call.heads)](
        out, grad_out, grad_lse if grad_lse is not None else delta, delta,
        *_strides(out), *_strides(grad_out), call.heads, call.tq, call.dim,
        HAS_DLSE=grad_lse is not None, BLOCK_M=delta_rows, BLOCK_D=call.block_d,
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
        q, k, v, grad_out, lse_band, lse, delta, call.rows_ptr, call.kv_start_ptr, call.key_mask_ptr, landmark_index,
        extra_dk, extra_dv, dk, dv,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(extra_dk), *_strides(dk),
        *_strides(dv), call.key_mask_stride,
        call.heads, call.kv_heads, call.group, call.tq, call.tk, call.dim, call.num_global, call.left, call.right,
        call.global_left, call.global_right, call.scale * LOG2E, call.scale,
        CAUSAL=call.causal, HAS_KV_START=call.has_kv_start, HAS_KEY_MASK=call.has_key_mask,
        HAS_LANDMARKS=call.num_landmarks > 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=call.block_d, DOT_PRECISION=call.precision,
        num_warps=num_warps, num_stages=num_stages,
    )

    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    _dq(call, q, k, v, grad_out, lse, delta, call.placeholder, dq[None], (call.left, call.right), (0, num_extra),
        call.tk, 1, False)
    if call.num_global:
        splits, chunk = call.splits(*_bwd_config(call.dim, q.dtype, "dq")[:2])
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
                          global_queries, scale, memory_k=None, kv_start=None, key_mask=None):
    """(B, H, S) float32: sum over rows of row_weights (B, Tq) times each row's probability on each segment's keys
    (segments (B, Tk), -1 = none), recomputed from lse (B, H, Tq). Key-major, like the dk/dv pass: each program
    sums the probabilities its keys get, so there are no atomics and the result is deterministic.

    Extra memory: the per-key mass (B, H, Tk) and per-landmark mass (B, H, L) in float32 and a copy of lse."""
    call = _Launch(q, k, None, left, right, causal, landmarks, global_queries, scale, memory_k, None, kv_start,
                   key_mask)
    block_m, block_n, num_warps, num_stages = _bwd_config(call.dim, q.dtype, "dkdv")
    row_weights = row_weights.float().contiguous()
    kv_start = call.kv_start if call.has_kv_start else torch.zeros(call.batch, dtype=torch.int32, device=q.device)
    lse_band = lse.index_fill(2, call.global_rows.long(), float("inf")) if call.num_global else lse
    key_mass = torch.empty(call.batch, call.heads, call.tk, dtype=torch.float32, device=q.device)
    _key_mass_kernel[(triton.cdiv(call.tk, block_n), call.batch * call.kv_heads)](
        q, k, lse_band, lse, row_weights, call.rows_ptr, kv_start, call.key_mask_ptr, key_mass,
        *_strides(q), *_strides(k), call.key_mask_stride,
        call.heads, call.kv_heads, call.group, call.tq, call.tk, call.dim, call.num_global, call.left, call.right,
        call.global_left, call.global_right, call.scale * LOG2E,
        CAUSAL=call.causal, HAS_KEY_MASK=call.has_key_mask, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=call.block_d,
        DOT_PRECISION=call.precision, num_warps=num_warps, num_stages=num_stages,
    )
    if call.num_landmarks:
        landmark_mass = torch.empty(call.batch, call.heads, call.num_landmarks, dtype=torch.float32,
                                    device=q.device)
        _landmark_mass_kernel[(triton.cdiv(call.num_landmarks, block_n), call.batch * call.kv_heads)](
            q, call.extra_k, call.extra_pos, lse_band, row_weights, kv_start, call.key_mask_ptr, landmark_mass,
            *_strides(q), *_strides(call.extra_k), call.key_mask_stride,
            call.heads, call.kv_heads, call.group, call.tq, call.tk, call.dim, call.num_landmarks, call.left,
            call.right, call.scale * LOG2E,
            CAUSAL=call.causal, HAS_KEY_MASK=call.has_key_mask, BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_D=call.block_d, DOT_PRECISION=call.precision, num_warps=num_warps, num_stages=num_stages,
        )
        key_mass[:, :, landmarks] += landmark_mass
    bins = torch.where(segments < 0, num_segments, segments).long()
    mass = torch.zeros(call.batch, call.heads, num_segments + 1, dtype=torch.float32, device=q.device)
    mass.scatter_add_(2, bins[:, None].expand(-1, call.heads, -1), key_mass)
    return mass[..., :num_segments]
