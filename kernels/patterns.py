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
        return window - 1, 0
    if len(window) != 2 or any(isinstance(w, bool) or not isinstance(w, int) for w in window):
        raise TypeError(f"window must be an int or a (left, right) tuple of two ints, got {tuple(window)!r}")
    left, right = window
    for name, value in (("left", left), ("right", right)):
        if value < UNBOUNDED:
            raise ValueError(f"window {name} must be >= 0 or -1 (unbounded), got {value}")
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
