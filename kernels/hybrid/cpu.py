"""Hybrid attention on CPU tensors, on the C++ kernels where they are in use (`hybridrag.kernels.cpp`): a pattern
that is the window alone (no landmarks, memory tokens, kv_start or key mask: a transformers model's causal or
sliding-window layers) on the sliding-window kernels (kernels/sliding_window/cpu.py); landmarks, global rows,
memory tokens, kv_start and key masks on csrc/hybrid_attention.cpp; everything without the C++ kernels on the
blockwise path. The attention mass (csrc/hybrid_mass.cpp) runs both of its passes, the rows' log-sum-exp and the
mass, in one C++ call.

Non-finite values as in kernels/sliding_window/cpu.py: where a C++ output is not finite, the result takes the
blockwise path's non-finite values and the C++ kernel's values on finite copies of the inputs everywhere else.

Memory: the outputs; the C++ kernel's (rows, 1024) float32 tiles and (L, D) gathered landmarks per task, and in the
backward float32 dk/dv of k's size and memory gradients (B, Hkv, M, D); the mass a (B, H, S + 1) float32 sum per
parallel chunk; never a Tq x Tk matrix.
"""
import torch

from ..cpp import cpp_ops
from ..nonfinite import finite_copy, take_exact_where_non_finite
from ..sliding_window.cpu import sliding_window_bwd_cpu, sliding_window_fwd_cpu
from .blockwise import attention_mass_blockwise, hybrid_bwd_blockwise, hybrid_fwd_blockwise


def _window_only(landmarks, memory_k, kv_start, key_mask):
    return landmarks.numel() == 0 and memory_k is None and kv_start is None and key_mask is None


def _band(left, right, causal):
    """The sliding-window band of the hybrid pattern with no landmarks: causal caps the right side at 0."""
    return left, 0 if causal else right


def _cpp(q, v):
    """The C++ ops for this call, or None (no C++ kernels, only lse wanted, an empty tensor)."""
    if v is None or not q.numel():
        return None
    return cpp_ops()


def _long(t):
    return None if t is None else t.to(torch.int64).contiguous()


def _bool(t):
    return None if t is None else t.to(torch.bool).contiguous()


def hybrid_fwd_cpu(q, k, v, left, right, causal, landmarks, global_queries, scale, memory_k=None, memory_v=None,
                   kv_start=None, key_mask=None):
    """As `hybrid_fwd_blockwise` (same arguments and result)."""
    ops = _cpp(q, v)
    if ops is None:
        return hybrid_fwd_blockwise(q, k, v, left, right, causal, landmarks, global_queries, scale, memory_k, memory_v,
                                    kv_start, key_mask)
    if _window_only(landmarks, memory_k, kv_start, key_mask):
        return sliding_window_fwd_cpu(q, k, v, *_band(left, right, causal), scale)
    marks, starts, mask = _long(landmarks), _long(kv_start), _bool(key_mask)

    def run(q, k, v, memory_k, memory_v):
        return ops.hybrid_attention_fwd(q, k, v, marks, memory_k, memory_v, starts, mask, left, right, causal,
                                        global_queries, scale)
    out, lse, finite = run(q, k, v, memory_k, memory_v)
    if finite:
        return out, lse
    exact_out, exact_lse = hybrid_fwd_blockwise(q, k, v, left, right, causal, landmarks, global_queries, scale,
                                                memory_k, memory_v, kv_start, key_mask)
    out, lse, _ = run(*(finite_copy(t) for t in (q, k, v, memory_k, memory_v)))
    return take_exact_where_non_finite(out, exact_out), take_exact_where_non_finite(lse, exact_lse, lse=True)


def hybrid_bwd_cpu(q, k, v, out, lse, grad_out, grad_lse, left, right, causal, landmarks, global_queries, scale,
                   memory_k=None, memory_v=None, kv_start=None, key_mask=None):
    """As `hybrid_bwd_blockwise` (same arguments and result)."""
    ops = _cpp(q, v)
    if ops is None:
        return hybrid_bwd_blockwise(q, k, v, out, lse, grad_out, grad_lse, left, right, causal, landmarks,
                                    global_queries, scale, memory_k, memory_v, kv_start, key_mask)
    if _window_only(landmarks, memory_k, kv_start, key_mask):
        dq, dk, dv = sliding_window_bwd_cpu(q, k, v, out, lse, grad_out, grad_lse, *_band(left, right, causal), scale)
        return dq, dk, dv, None, None
    marks, starts, mask = _long(landmarks), _long(kv_start), _bool(key_mask)

    def run(q, k, v, out, lse, grad_out, grad_lse, memory_k, memory_v):
        *grads, finite = ops.hybrid_attention_bwd(q, k, v, out, lse, grad_out, grad_lse, marks, memory_k, memory_v,
                                                  starts, mask, left, right, causal, global_queries, scale)
        dq, dk, dv, dmemory_k, dmemory_v = grads
        if memory_k is None:
            return (dq, dk, dv, None, None), finite
        if memory_k.shape[0] == 1:  # one memory for the whole batch: its gradient sums the batch's
            dmemory_k, dmemory_v = dmemory_k.sum(0, keepdim=True), dmemory_v.sum(0, keepdim=True)
        return (dq, dk, dv, dmemory_k.to(memory_k.dtype), dmemory_v.to(memory_v.dtype)), finite
    grads, finite = run(q, k, v, out, lse, grad_out, grad_lse, memory_k, memory_v)
    if finite:
        return grads
    exact = hybrid_bwd_blockwise(q, k, v, out, lse, grad_out, grad_lse, left, right, causal, landmarks, global_queries,
                                 scale, memory_k, memory_v, kv_start, key_mask)
    clean, _ = run(*(finite_copy(t) for t in (q, k, v, out)), finite_copy(lse, keep_negative_inf=True),
                   finite_copy(grad_out), finite_copy(grad_lse), finite_copy(memory_k), finite_copy(memory_v))
    return tuple(None if e is None else take_exact_where_non_finite(c, e) for c, e in zip(clean, exact))


def attention_mass_cpu(q, k, segments, num_segments, row_weights, left, right, causal, landmarks, global_queries,
                       scale, memory_k=None, kv_start=None, key_mask=None):
    """As `attention_mass_blockwise` (same result), without its lse argument: both passes run here."""
    ops = _cpp(q, k)

    def blockwise():
        _, lse = hybrid_fwd_blockwise(q, k, None, left, right, causal, landmarks, global_queries, scale, memory_k,
                                      None, kv_start, key_mask)
        return attention_mass_blockwise(q, k, lse, segments, num_segments, row_weights, left, right, causal,
                                        landmarks, global_queries, scale, memory_k, kv_start, key_mask)
    if ops is None:
        return blockwise()
    marks, starts, mask, ids = _long(landmarks), _long(kv_start), _bool(key_mask), _long(segments)
    weights = row_weights.to(torch.float32).contiguous()

    def run(q, k, memory_k):
        return ops.hybrid_attention_mass(q, k, ids, num_segments, weights, marks, memory_k, starts, mask, left, right,
                                         causal, global_queries, scale)
    mass, finite = run(q, k, memory_k)
    if finite:
        return mass
    mass, _ = run(*(finite_copy(t) for t in (q, k, memory_k)))
    return take_exact_where_non_finite(mass, blockwise())
