"""The one definition of the attention patterns. Every kernel, CPU path and reference uses these.

A query row i of Tq sits at absolute position p = i + Tk - Tq (queries are aligned to the end of the keys).
It sees key j iff p - left <= j <= p + right, where -1 means unbounded on that side.
"""
import torch

UNBOUNDED = -1


def resolve_window(window, causal):
    """Turn the user's `window` and `causal` into the effective band (left, right), -1 = unbounded.

    An int w is shorthand for (w - 1, 0) and needs causal=True: the w most recent keys, the query's own included;
    w = -1 means every earlier key. causal=True clips the right side to 0. Raises TypeError/ValueError on bad input.
    """
    if isinstance(window, bool) or not isinstance(window, (int, tuple, list)):
        raise TypeError(f"window must be an int or a (left, right) tuple of ints, got {type(window).__name__}")
    if isinstance(window, int):
        if not causal:
            raise ValueError(f"an int window ({window}) means the {window} most recent keys and needs causal=True; "
                             "pass window=(left, right) for a bidirectional band")
        if window == UNBOUNDED:
            return UNBOUNDED, 0
        if window < 1:
            raise ValueError(f"window must be >= 1 (or -1 for unbounded), got {window}")
        return (UNBOUNDED if window > 2**31 else window - 1), 0
    if len(window) != 2 or any(isinstance(w, bool) or not isinstance(w, int) for w in window):
        raise TypeError(f"window must be an int or a (left, right) tuple of two ints, got {tuple(window)!r}")
    left, right = window
    for name, value in (("left", left), ("right", right)):
        if value < UNBOUNDED:
            raise ValueError(f"window {name} must be >= 0 or -1 (unbounded), got {value}")
    # A side of 2**31 or more reaches past every position the kernels index (int32): it is unbounded.
    left, right = (UNBOUNDED if side >= 2**31 else side for side in (left, right))
    if causal:
        right = 0
    return left, right


def window_mask(tq, tk, left, right, device=None):
    """Dense visibility mask (tq, tk), True where the query row sees the key. For references and small peers only."""
    return block_visibility(tk - tq, tq, 0, tk, left, right, device)


def block_visibility(pos_first, rows, key_first, keys, left, right, device=None):
    """Visibility (rows, keys) of keys key_first.. from queries at positions pos_first.. (one tile of the mask)."""
    pos = torch.arange(pos_first, pos_first + rows, device=device)[:, None]
    key = torch.arange(key_first, key_first + keys, device=device)[None, :]
    visible = torch.ones(rows, keys, dtype=torch.bool, device=device)
    if left != UNBOUNDED:
        visible &= key >= pos - left
    if right != UNBOUNDED:
        visible &= key <= pos + right
    return visible


def visible_key_range(pos_first, pos_last, left, right, tk):
    """Half-open range [lo, hi) of keys that any query with position in [pos_first, pos_last] can see (may be empty)."""
    lo = 0 if left == UNBOUNDED else max(pos_first - left, 0)
    hi = tk if right == UNBOUNDED else min(pos_last + right + 1, tk)
    return lo, max(hi, lo)


def visible_key_counts(tq, tk, left, right):
    """Number of keys each query row sees, (tq,) int64, without a tq x tk matrix (for FLOP counts and tests)."""
    pos = torch.arange(tq) + (tk - tq)
    lo = torch.zeros_like(pos) if left == UNBOUNDED else (pos - left).clamp(min=0)
    hi = torch.full_like(pos, tk) if right == UNBOUNDED else (pos + right + 1).clamp(max=tk)
    return (hi - lo).clamp(min=0)


# ---------------------------------------------------------------------------------------------------------------
# Hybrid pattern: window | landmark keys | (global_queries) landmark rows see every key; plus memory tokens.
# For a query at p and a key at j (kv_start[b] hides the keys of left padding, key_mask[b, j] = False any key):
#   visible = j >= kv_start[b]  and  key_mask[b, j]  and  (not causal or j <= p)
#             and  (p - left <= j <= p + right  or  j is a landmark  or  (global_queries and p is a landmark))
# Memory tokens are keys every query sees. Each key counts once in the softmax.
# ---------------------------------------------------------------------------------------------------------------

def resolve_landmarks(landmarks, tk, device=None):
    """Landmark key positions as a sorted, duplicate-free int64 tensor (L,) in [0, tk); empty for None.

    `landmarks` is an int stride s (positions 0, s, 2s, ... < tk) or a 1-D integer tensor of strictly increasing
    positions. Raises TypeError/ValueError naming the argument.
    """
    if landmarks is None:
        return torch.empty(0, dtype=torch.long, device=device)
    if isinstance(landmarks, bool) or not isinstance(landmarks, (int, torch.Tensor)):
        raise TypeError(f"landmarks must be None, an int stride or a 1-D integer tensor of positions, "
                        f"got {type(landmarks).__name__}")
    if isinstance(landmarks, int):
        if landmarks < 1:
            raise ValueError(f"a landmark stride must be >= 1, got {landmarks}")
        return torch.arange(0, tk, min(landmarks, max(tk, 1)), device=device)  # a stride past Tk: position 0 only
    if landmarks.dim() != 1 or landmarks.dtype.is_floating_point or landmarks.dtype.is_complex \
            or landmarks.dtype == torch.bool:
        raise TypeError(f"landmarks must be a 1-D integer tensor, got dtype {landmarks.dtype} and shape "
                        f"{tuple(landmarks.shape)}")
    if device is not None and landmarks.device != torch.device(device):
        raise ValueError(f"landmarks are on {landmarks.device} but the keys are on {device}")
    positions = landmarks.long()
    if positions.numel() and (positions[0] < 0 or positions[-1] >= tk):
        raise ValueError(f"landmark positions must lie in [0, {tk}) (Tk = {tk}), got {positions[0].item()} .. "
                         f"{positions[-1].item()}")
    if positions.numel() > 1 and not bool((positions[1:] > positions[:-1]).all()):
        raise ValueError("landmark positions must be strictly increasing (sorted, no repeats)")
    return positions


def global_query_rows(landmark_positions, tq, tk):
    """Query rows (int64, sorted) that sit on a landmark position: the rows that see every key."""
    rows = landmark_positions - (tk - tq)
    return rows[rows >= 0]


def hybrid_visibility(query_pos, key_pos, left, right, causal, key_is_landmark, query_is_global, kv_start=None,
                      key_mask=None):
    """Visibility of keys at `key_pos` (N,) from queries at `query_pos` (R,) under the hybrid pattern.

    key_is_landmark (N,) and query_is_global (R,) are bool. Returns (R, N) bool, or (B, R, N) when kv_start (B,)
    or key_mask (B, Tk) bool is given. One tile of the mask; memory tokens are not part of it (every query sees
    them)."""
    p, j = query_pos[:, None], key_pos[None, :]
    visible = torch.ones(p.shape[0], j.shape[1], dtype=torch.bool, device=key_pos.device)
    if left != UNBOUNDED:
        visible &= j >= p - left
    if right != UNBOUNDED:
        visible &= j <= p + right
    visible |= key_is_landmark[None, :] | query_is_global[:, None]
    if causal:
        visible &= j <= p
    if kv_start is not None:
        visible = visible[None] & (j[None] >= kv_start[:, None, None])
    if key_mask is not None:
        visible = visible & key_mask[:, None, key_pos]
    return visible


def landmark_flags(positions, landmark_positions):
    """Bool (len(positions),): which of `positions` are landmark positions (positions may be out of range)."""
    if landmark_positions.numel() == 0:
        return torch.zeros(positions.shape, dtype=torch.bool, device=positions.device)
    index = torch.searchsorted(landmark_positions, positions).clamp(max=landmark_positions.numel() - 1)
    return landmark_positions[index] == positions


def hybrid_mask(tq, tk, left, right, causal, landmark_positions, global_queries, kv_start=None, key_mask=None):
    """Dense visibility (tq, tk), or (B, tq, tk) with kv_start or key_mask. For references and small peers only."""
    device = landmark_positions.device
    query_pos = torch.arange(tk - tq, tk, device=device)
    key_pos = torch.arange(tk, device=device)
    query_global = landmark_flags(query_pos, landmark_positions) & global_queries
    return hybrid_visibility(query_pos, key_pos, left, right, causal, landmark_flags(key_pos, landmark_positions),
                             query_global, kv_start, key_mask)


def hybrid_key_counts(tq, tk, left, right, causal, landmark_positions, global_queries, memory=0):
    """Number of keys each query row sees under the hybrid pattern, (tq,) int64, without a tq x tk matrix
    (for FLOP counts and tests). Memory tokens add `memory` to every row."""
    landmark_positions = landmark_positions.cpu()
    pos = torch.arange(tq) + (tk - tq)
    window = visible_key_counts(tq, tk, left, right)  # resolve_window already clipped right to 0 when causal
    lo = torch.zeros_like(pos) if left == UNBOUNDED else (pos - left).clamp(min=0)
    hi = lo + window
    reach = pos + 1 if causal else torch.full_like(pos, tk)
    count = torch.searchsorted(landmark_positions, reach)  # landmarks j < reach
    in_band = torch.searchsorted(landmark_positions, hi) - torch.searchsorted(landmark_positions, lo)
    counts = window + count - in_band
    if global_queries:
        counts = torch.where(landmark_flags(pos, landmark_positions), reach.clamp(max=tk), counts)
    return counts + memory
