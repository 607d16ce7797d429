"""`sliding_window_attention`: validation and backend choice in front of the `hybridrag::sliding_window_fwd` op."""
from hybridrag.kernels.patterns import resolve_window
from hybridrag.kernels.sliding_window import sliding_window_attention_reference

from .backend import resolve_backend
from .library_window import sliding_window_fwd
from .validation import (ATTENTION_DTYPES, REFERENCE_DTYPES, check_attention_inputs, check_flag,
                         check_interpreter_dtype, check_scale, check_tensor, unit_last_stride)


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
        out, lse = sliding_window_fwd(q, k, v, left, right, scale, backend)
    return (out, lse) if return_lse else out
