"""Sliding-window attention on CPU tensors: the C++ kernels (csrc/window_attention.cpp) where they are in use
(`hybridrag.kernels.cpp`), else the blockwise PyTorch path.

The C++ kernels multiply whole key tiles, so a NaN or inf hidden by the band can reach a row through a zero
probability (0 * NaN). They report whether every output is finite; where one is not, the call is repeated on the
blockwise path, which keeps non-finite values to the rows that see them (kernels/nonfinite.py), and the C++ kernels
run again on finite copies of the inputs: the result takes the blockwise path's non-finite values and the C++
kernels' finite ones (`take_exact_where_non_finite`), so rows that see no non-finite value are bit for bit those of
a call without it. Finite inputs never take that second pass.

Memory: the outputs, float32 dk/dv buffers of k's size in the backward, and per thread a few (rows, 1024) float32
tiles (csrc/window_attention.cpp); never a Tq x Tk matrix.
"""
from ..cpp import cpp_ops
from ..nonfinite import finite_copy, take_exact_where_non_finite
from .blockwise import sliding_window_bwd_blockwise, sliding_window_fwd_blockwise


def sliding_window_fwd_cpu(q, k, v, left, right, scale):
    """q (B, H, Tq, D), k/v (B, Hkv, Tk, D), unit last strides -> (o (B, H, Tq, D) in q's dtype, lse (B, H, Tq)
    float32)."""
    ops = cpp_ops() if q.numel() else None  # an empty batch or head dim: nothing to compute, the PyTorch path's shapes
    if ops is not None:
        out, lse, finite = ops.window_attention_fwd(q, k, v, left, right, scale)
        if finite:
            return out, lse
        exact_out, exact_lse = sliding_window_fwd_blockwise(q, k, v, left, right, scale)
        out, lse, _ = ops.window_attention_fwd(*(finite_copy(t) for t in (q, k, v)), left, right, scale)
        return (take_exact_where_non_finite(out, exact_out),
                take_exact_where_non_finite(lse, exact_lse, lse=True))
    return sliding_window_fwd_blockwise(q, k, v, left, right, scale)


def sliding_window_bwd_cpu(q, k, v, o, lse, grad_o, grad_lse, left, right, scale):
    """(dq, dk, dv) in the dtypes of q, k, v; grad_lse (B, H, Tq) float32 or None."""
    ops = cpp_ops() if q.numel() else None
    if ops is not None:
        dq, dk, dv, finite = ops.window_attention_bwd(q, k, v, o, lse, grad_o, grad_lse, left, right, scale)
        if finite:
            return dq, dk, dv
        exact = sliding_window_bwd_blockwise(q, k, v, o, lse, grad_o, grad_lse, left, right, scale)
        *clean, _ = ops.window_attention_bwd(*(finite_copy(t) for t in (q, k, v, o)),
                                             finite_copy(lse, keep_negative_inf=True), finite_copy(grad_o),
                                             finite_copy(grad_lse), left, right, scale)
        return tuple(take_exact_where_non_finite(c, e) for c, e in zip(clean, exact))
    return sliding_window_bwd_blockwise(q, k, v, o, lse, grad_o, grad_lse, left, right, scale)
