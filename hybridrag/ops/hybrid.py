"""`hybrid_attention` and `attention_mass`: validation, backend choice and the autograd wrapper around the kernels."""
from dataclasses import dataclass

import torch

from hybridrag.kernels.hybrid import (attention_mass_reference, hybrid_attention_reference,
                                      hybrid_attention_weights_reference)
from hybridrag.kernels.hybrid.plain_causal import plain_causal_sdpa
from hybridrag.kernels.patterns import UNBOUNDED, resolve_landmarks, resolve_window

from .backend import default_backend, resolve_backend
from .library import backend_functions, hybrid_attention_fwd
from .packed import packed_attention
from .validation import (ATTENTION_DTYPES, MAX_HEAD_DIM, MIN_HEAD_DIM, REFERENCE_DTYPES, check_attention_inputs,
                         check_cu_seqlens, check_flag, check_interpreter_dtype, check_key_mask, check_kv_start,
                         check_memory_tokens, check_per_position, check_row_mask, check_scale, check_tensor,
                         unit_last_strides)


# The "cpu" backend runs the plain causal pattern (no landmarks, memory tokens or hidden keys) of float32 inputs
# through torch's scaled_dot_product_attention when no gradient is taken (plain_causal_attention below,
# kernels/hybrid/plain_causal.py); False sends every call through the tiled path (tests compare the two).
PLAIN_CAUSAL_FAST_PATH = True


@dataclass(frozen=True)
class HybridPattern:
    """Everything but the tensors that defines which keys each query sees (see DESIGN.md)."""
    left: int
    right: int
    causal: bool
    landmarks: torch.Tensor  # (L,) sorted int64 positions
    global_queries: bool
    scale: float
    kv_start: torch.Tensor = None  # (B,) int32 or None
    key_mask: torch.Tensor = None  # (B, Tk) bool or None

    def args(self):
        return self.left, self.right, self.causal, self.landmarks, self.global_queries, self.scale

    def hidden_keys(self):
        """The tail of every kernel call: kv_start, key_mask."""
        return self.kv_start, self.key_mask


def _pattern(q, k, window, landmarks, global_queries, causal, scale, kv_start, key_mask=None, tk=None):
    """The checked pattern; tk (default Tk) bounds tensor landmark positions (the longest packed sequence)."""
    check_flag("causal", causal)
    check_flag("global_queries", global_queries)
    left, right = resolve_window(window, causal)
    return HybridPattern(left, right, causal, resolve_landmarks(landmarks, tk or k.shape[2], q.device),
                         global_queries, check_scale(scale, q.shape[-1]), check_kv_start(kv_start, k),
                         check_key_mask(key_mask, k))


def hybrid_attention(q, k, v, window, *, landmarks=None, global_queries=True, memory_k=None, memory_v=None,
                     causal=True, scale=None, return_lse=False, kv_start=None, key_mask=None, cu_seqlens_q=None,
                     cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, backend="auto"):
    """Sliding-window attention fused with landmark (global) tokens and learned memory tokens, in one softmax.

    A query at position p sees key j iff j >= kv_start[b] and (not causal or j <= p) and (j is in p's window, or
    j is a landmark, or global_queries and p is a landmark); it also sees every memory token. Each key counts once.

    Args:
        q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D) with H % Hkv == 0; float16, bfloat16 or float32, unit last stride
            preferred. Query row i sits at position i + Tk - Tq.
        window: as in `sliding_window_attention`: an int w (the w most recent keys; needs causal=True; -1 = all
            earlier keys) or (left, right), -1 = unbounded.
        landmarks: None, an int stride s (positions 0, s, 2s, ... < Tk) or a 1-D integer tensor of strictly
            increasing positions in [0, Tk).
        global_queries: a query sitting on a landmark position sees every key (causal still applies).
        memory_k, memory_v: (B or 1, Hkv, M, D) learned keys/values every query sees; they get gradients.
        causal: hide keys after the query (landmarks included).
        scale: multiplies q.k; default D ** -0.5.
        return_lse: also return the natural-log log-sum-exp (B, H, Tq) float32 (-inf for rows that see no key).
        kv_start: (B,) integer tensor or None; keys with index < kv_start[b] are padding that no query sees
            (left padding). Memory tokens are always seen.
        key_mask: (B, Tk) bool or None; False marks a key no query sees (padding anywhere). A row whose keys are
            all hidden (and that has no memory tokens) outputs zeros with lse -inf.
        cu_seqlens_q, cu_seqlens_k: packed sequences as flash-attn's varlen API takes them: q (1, H, total_q, D),
            k/v (1, Hkv, total_k, D) and (N + 1,) int32 offsets of the N sequences. A sequence never sees another;
            window, landmarks (positions within each sequence) and query alignment (each sequence's queries are
            the last of its keys) apply per sequence; memory tokens are shared. Reads the offsets to the host.
        max_seqlen_q, max_seqlen_k: optional ints, checked against the longest sequence (flash-attn's
            arguments; the offsets are read anyway).
        backend: "auto" | "triton" | "cpu" | "reference" (see DESIGN.md); "reference" also takes float64.

    Returns:
        o (B, H, Tq, D) in q's dtype, and lse when asked. Rows that see no key are zeros.

    Work grows with Tq x (window + L + M) + G x Tk for L landmarks of which G are query rows. Memory: o and lse,
    the gathered landmark and memory keys/values (B, Hkv, L + M, D), and O(B x H x Tq) float32 in the backward;
    never a Tq x Tk matrix (only the "reference" backend builds one).
    """
    if (causal is True and return_lse is False and landmarks is None and memory_k is None and memory_v is None
            and kv_start is None and key_mask is None and cu_seqlens_q is None and cu_seqlens_k is None
            and global_queries.__class__ is bool):
        out = plain_causal_attention(q, k, v, window, scale, backend)
        if out is not None:  # None: not this case, or a non-finite entry, which the tiled path keeps to its rows
            return out
    check_tensor("q", q)
    check_flag("return_lse", return_lse)
    backend = resolve_backend(backend, q.device)
    check_attention_inputs(q, k, v, REFERENCE_DTYPES if backend == "reference" else ATTENTION_DTYPES)
    check_memory_tokens(memory_k, memory_v, k)
    check_interpreter_dtype(backend, q)
    if cu_seqlens_q is not None or cu_seqlens_k is not None:
        if kv_start is not None:
            raise ValueError("kv_start does not apply to packed sequences (cu_seqlens_q/cu_seqlens_k); hide keys "
                             "with key_mask (1, total_k) instead")
        sequences = check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q, k)
        longest = max(1, max(hi - lo for _, _, lo, hi in sequences))
        pattern = _pattern(q, k, window, landmarks, global_queries, causal, scale, None, key_mask, tk=longest)
        out, lse = packed_attention(q, k, v, memory_k, memory_v, pattern, landmarks, sequences, backend)
    else:
        pattern = _pattern(q, k, window, landmarks, global_queries, causal, scale, kv_start, key_mask)
        out, lse = _attention(q, k, v, memory_k, memory_v, pattern, backend)
    return (out, lse) if return_lse else out


def plain_causal_attention(q, k, v, window, scale=None, backend="auto"):
    """hybrid_attention(q, k, v, window, scale=scale, backend=backend) with every other argument at its default,
    when that call is one that plain_causal_sdpa computes and that every check of hybrid_attention accepts: CPU
    backend, float32 q/k/v on the CPU, 4-D shapes that fit, head_dim in range, 1 <= Tq <= Tk, an int window, a
    valid scale, no gradient taken, not compiling (the finiteness test reads values), finite entries. Otherwise
    None: hybrid_attention's full path then runs (raising what it raises). One function of plain checks, since a
    decode step pays for every call it makes; the transformers integration calls it first."""
    if not PLAIN_CAUSAL_FAST_PATH or torch.compiler.is_compiling():
        return None
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
            and q.dtype is torch.float32 and k.dtype is torch.float32 and v.dtype is torch.float32
            and q.is_cpu and k.is_cpu and v.is_cpu):
        return None
    if backend != "cpu" and not (backend == "auto" and default_backend() in ("auto", "cpu")):
        return None
    shape, kv_shape = q.shape, k.shape
    if len(shape) != 4 or len(kv_shape) != 4 or v.shape != kv_shape:
        return None
    batch, heads, tq, dim = shape
    kv_heads, tk = kv_shape[1], kv_shape[2]
    if not (kv_shape[0] == batch and kv_shape[3] == dim and MIN_HEAD_DIM <= dim <= MAX_HEAD_DIM and kv_heads > 0
            and heads % kv_heads == 0 and 1 <= tq <= tk):
        return None
    if window.__class__ is tuple:  # (left, right): the same band as the int spelling, so the same call
        try:
            left, right = resolve_window(window, True)
        except (TypeError, ValueError):
            return None  # the full path raises what it raises
        if right != 0:
            return None
    elif window.__class__ is int and (window == -1 or window >= 1):
        left = UNBOUNDED if window == -1 or window > 2**31 else window - 1  # resolve_window's band of an int
    else:
        return None
    if scale is None:
        scale = dim ** -0.5
    elif scale.__class__ not in (float, int) or not 0 < scale < float("inf"):
        return None
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return None
    return plain_causal_sdpa(q, k, v, left, float(scale))


def hybrid_attention_weights(q, k, v, window, *, landmarks=None, global_queries=True, memory_k=None, memory_v=None,
                             causal=True, scale=None, kv_start=None, key_mask=None):
    """`hybrid_attention` through the dense reference, also returning the attention weights.

    Arguments as in `hybrid_attention` (no packed sequences). Returns (o (B, H, Tq, D), weights (B, H, Tq, Tk + M))
    in q's dtype, the memory tokens' columns last; rows that see no key have zero weights. Differentiable.
    Memory: O(B x H x Tq x (Tk + M)): the full score matrix, which the kernels never form.
    """
    check_tensor("q", q)
    check_attention_inputs(q, k, v, REFERENCE_DTYPES)
    check_memory_tokens(memory_k, memory_v, k)
    pattern = _pattern(q, k, window, landmarks, global_queries, causal, scale, kv_start, key_mask)
    return hybrid_attention_weights_reference(q, k, v, *pattern.args(), memory_k, memory_v, *pattern.hidden_keys())


def _attention(q, k, v, memory_k, memory_v, pattern, backend):
    """(o, lse) of one batch of checked inputs on a concrete backend."""
    if backend == "reference":
        return hybrid_attention_reference(q, k, v, *pattern.args(), memory_k, memory_v, *pattern.hidden_keys())
    q, k, v, memory_k, memory_v = unit_last_strides(q, k, v, memory_k, memory_v)
    return hybrid_attention_fwd(q, k, v, pattern.landmarks, memory_k, memory_v, pattern.kv_start, pattern.key_mask,
                                pattern.left, pattern.right, pattern.causal, pattern.global_queries, pattern.scale,
                                backend)


def _check_segments(segments, num_segments, k):
    check_tensor("segments", segments)
    if isinstance(num_segments, bool) or not isinstance(num_segments, int):
        raise TypeError(f"num_segments must be an int, got {type(num_segments).__name__}")
    if num_segments < 1:
        raise ValueError(f"num_segments must be >= 1, got {num_segments}")
    if segments.dtype.is_floating_point or segments.dtype.is_complex or segments.dtype == torch.bool:
        raise TypeError(f"segments must be an integer tensor, got dtype {segments.dtype}")
    check_per_position("segments", segments, k, "k", "Tk")
    low, high = segments.min().item(), segments.max().item()
    if low < -1 or high >= num_segments:
        raise ValueError(f"segments must hold ids in [-1, {num_segments}) (-1 = no segment), got {low} .. {high}")


def _check_query_mask(query_mask, q):
    if query_mask is None:
        return torch.ones(q.shape[0], q.shape[2], dtype=torch.bool, device=q.device)
    return check_row_mask("query_mask", query_mask, q, "q", "Tq")


@torch.no_grad()
def attention_mass(q, k, segments, num_segments, window, *, landmarks=None, global_queries=True, query_mask=None,
                   memory_k=None, causal=True, scale=None, kv_start=None, key_mask=None, backend="auto"):
    """Attention probability the selected query rows give to each key segment, averaged over those rows.

    Args:
        q, k, window, landmarks, global_queries, memory_k, causal, scale, kv_start, key_mask, backend: as in
            `hybrid_attention` (the same pattern; memory tokens take part in the softmax but belong to no segment).
        segments: (B, Tk) integer segment id of each key in [0, num_segments), -1 for none.
        num_segments: S.
        query_mask: (B, Tq) bool, the rows to average over; default all rows. A batch row with no selected query
            gets zeros.

    Returns:
        (B, H, S) float32 (float64 for the float64 reference). Not differentiable: a feedback and analysis signal.

    Two passes: the log-sum-exp of every row, then the probabilities recomputed tile by tile and summed per segment.
    Memory: (B, H, Tq) float32 for the lse and (B, H, S) for the result; never a Tq x Tk matrix (except "reference").
    """
    check_tensor("q", q)
    backend = resolve_backend(backend, q.device)
    check_attention_inputs(q, k, k, REFERENCE_DTYPES if backend == "reference" else ATTENTION_DTYPES)
    if memory_k is not None:
        check_memory_tokens(memory_k, memory_k, k)
    check_interpreter_dtype(backend, q)
    _check_segments(segments, num_segments, k)
    query_mask = _check_query_mask(query_mask, q)
    pattern = _pattern(q, k, window, landmarks, global_queries, causal, scale, kv_start, key_mask)
    if backend == "reference":
        return attention_mass_reference(q, k, segments, num_segments, *pattern.args(), query_mask, memory_k,
                                        *pattern.hidden_keys())
    q, k, memory_k = unit_last_strides(q, k, memory_k)
    forward_fn, _, mass_fn = backend_functions(backend)
    row_weights = query_mask.float() / query_mask.sum(dim=1, keepdim=True).clamp(min=1)
    if backend == "cpu":  # both passes in one call (on the C++ kernels where they are in use)
        return mass_fn(q, k, segments.contiguous(), num_segments, row_weights, *pattern.args(), memory_k,
                       *pattern.hidden_keys())
    _, lse = forward_fn(q, k, None, *pattern.args(), memory_k, None, *pattern.hidden_keys())
    return mass_fn(q, k, lse, segments.contiguous(), num_segments, row_weights, *pattern.args(), memory_k,
                   *pattern.hidden_keys())
