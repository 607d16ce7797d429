"""Hybrid attention on CPU tensors: a call whose pattern is the window alone (no landmarks, memory tokens, kv_start
or key mask: a transformers model's causal or sliding-window layers) runs the sliding-window CPU kernels (the C++
ones where they are in use, kernels/sliding_window/cpu.py); every other pattern runs the blockwise path."""
from ..sliding_window.cpu import sliding_window_bwd_cpu, sliding_window_fwd_cpu
from .blockwise import hybrid_bwd_blockwise, hybrid_fwd_blockwise


def _window_only(v, landmarks, memory_k, kv_start, key_mask):
    return v is not None and landmarks.numel() == 0 and memory_k is None and kv_start is None and key_mask is None


def _band(left, right, causal):
    """The sliding-window band of the hybrid pattern with no landmarks: causal caps the right side at 0."""
    return left, 0 if causal else right


def hybrid_fwd_cpu(q, k, v, left, right, causal, landmarks, global_queries, scale, memory_k=None, memory_v=None,
                   kv_start=None, key_mask=None):
    """As `hybrid_fwd_blockwise` (same arguments and result)."""
    if _window_only(v, landmarks, memory_k, kv_start, key_mask):
        return sliding_window_fwd_cpu(q, k, v, *_band(left, right, causal), scale)
    return hybrid_fwd_blockwise(q, k, v, left, right, causal, landmarks, global_queries, scale, memory_k, memory_v,
                                kv_start, key_mask)


def hybrid_bwd_cpu(q, k, v, out, lse, grad_out, grad_lse, left, right, causal, landmarks, global_queries, scale,
                   memory_k=None, memory_v=None, kv_start=None, key_mask=None):
    """As `hybrid_bwd_blockwise` (same arguments and result)."""
    if _window_only(v, landmarks, memory_k, kv_start, key_mask):
        dq, dk, dv = sliding_window_bwd_cpu(q, k, v, out, lse, grad_out, grad_lse, *_band(left, right, causal), scale)
        return dq, dk, dv, None, None
    return hybrid_bwd_blockwise(q, k, v, out, lse, grad_out, grad_lse, left, right, causal, landmarks, global_queries,
                                scale, memory_k, memory_v, kv_start, key_mask)


__all__ = ["hybrid_fwd_cpu", "hybrid_bwd_cpu"]
