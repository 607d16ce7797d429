"""`sliding_window_attention`: validation, backend choice and the autograd wrapper around the kernels."""
import torch

from hybridrag.kernels.patterns import resolve_window
from hybridrag.kernels.sliding_window import (sliding_window_attention_reference, sliding_window_bwd_blockwise,
                                              sliding_window_fwd_blockwise)

from .backend import resolve_backend
from .validation import (ATTENTION_DTYPES, REFERENCE_DTYPES, check_attention_inputs, check_flag,
                         check_interpreter_dtype, check_scale, check_tensor, unit_last_stride)


def _triton_functions():
    # Imported on first use: CPU-only installs need not have Triton.
    from hybridrag.kernels.sliding_window.triton_kernels import sliding_window_bwd_triton, sliding_window_fwd_triton
    return sliding_window_fwd_triton, sliding_window_bwd_triton


def _backend_functions(backend):
    if backend == "triton":
        return _triton_functions()
    return sliding_window_fwd_blockwise, sliding_window_bwd_blockwise


class SlidingWindowAttentionFunction(torch.autograd.Function):
    """Differentiable (o, lse) from a backend's forward and backward; gradients flow through lse too."""

    @staticmethod
    def forward(ctx, q, k, v, left, right, scale, backend):
        forward_fn, backward_fn = _backend_functions(backend)
        out, lse = forward_fn(q, k, v, left, right, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.band, ctx.scale, ctx.backward_fn = (left, right), scale, backward_fn
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        grad_out = torch.zeros_like(out) if grad_out is None else unit_last_stride(grad_out)
        grad_lse = None if grad_lse is None else grad_lse.contiguous()
        dq, dk, dv = ctx.backward_fn(q, k, v, out, lse, grad_out, grad_lse, *ctx.band, ctx.scale)
        return dq, dk, dv, None, None, None, None


def sliding_window_attention(q, k, v, window, *, causal=True, scale=None, return_lse=False, key_mask=None,
                             cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                             backend="auto"):
    """Attention of each query to the keys inside its window.

    Args:
        q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D) with H % Hkv == 0 (grouped-query heads; K/V are never expanded).
            float16, bfloat16 or float32; any strides (a last stride other than 1 costs a copy).
        window: an int w (the w most recent keys, the query's own included; needs causal=True; -1 = all earlier
            keys), or (left, right): query at position p sees keys p - left ..= p + right, -1 = unbounded.
            Query row i sits at position i + Tk - Tq.
        causal: also hide keys after the query.
        scale: multiplies q.k; default D ** -0.5.
        return_lse: also return the natural-log log-sum-exp (B, H, Tq) float32 (-inf for rows that see no key).
        key_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k: key padding anywhere and packed
            sequences, as in `hybrid_attention` (these calls run as `hybrid_attention` with no landmarks).
        backend: "auto" | "triton" | "cpu" | "reference" (see DESIGN.md); "reference" also takes float64.

    Returns:
        o (B, H, Tq, D) in q's dtype, and lse when asked. Rows that see no key are zeros.

    Memory: o and lse, plus (B, H, Tq) float32 in the backward. Work grows with Tq x window, never Tq x Tk
    (the "reference" backend alone builds the dense Tq x Tk mask and scores).
    """
    if key_mask is not None or cu_seqlens_q is not None or cu_seqlens_k is not None:
        from .hybrid import hybrid_attention  # the same kernels, with the hidden keys they know how to skip
        return hybrid_attention(q, k, v, window, causal=causal, scale=scale, return_lse=return_lse,
                                key_mask=key_mask, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, backend=backend)
    check_tensor("q", q)
    check_flag("causal", causal)
    check_flag("return_lse", return_lse)
    backend = resolve_backend(backend, q.device)
    check_attention_inputs(q, k, v, REFERENCE_DTYPES if backend == "reference" else ATTENTION_DTYPES)
    check_interpreter_dtype(backend, q)
    left, right = resolve_window(window, causal)
    scale = check_scale(scale, q.shape[-1])
    if backend == "reference":
        out, lse = sliding_window_attention_reference(q, k, v, left, right, scale)
    else:
        q, k, v = unit_last_stride(q), unit_last_stride(k), unit_last_stride(v)
        out, lse = SlidingWindowAttentionFunction.apply(q, k, v, left, right, scale, backend)
    return (out, lse) if return_lse else out
