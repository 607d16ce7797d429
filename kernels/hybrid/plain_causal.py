"""The plain causal pattern (a causal window, no landmarks, no memory tokens, no hidden keys) on CPU through
torch's `scaled_dot_product_attention`: what a decoder's decode step and prefill run when nothing hybrid is set.

The results of the tiled CPU path (`blockwise`), from torch's fused CPU kernel:
- queries aligned to the end of the keys (row i at position i + Tk - Tq); every row sees at least its own key, so
  no row is empty;
- grouped-query heads without expanding K/V: a single query row per head is folded into its kv head's rows
  ((B, H, 1, D) -> (B, Hkv, G, D), every key visible to each), otherwise sdpa's `enable_gqa`;
- keys that no row's window reaches are cut off before the call (a decode step with a window reads only the
  window).

NaN and inf: sdpa lets a non-finite key or value reach rows that must not see it and turns an inf value into inf
rather than NaN (kernels/nonfinite.py). So these functions return None, and the caller takes the tiled path, when q
or the keys and values the call reads hold a non-finite entry. The tests are sums: a float sum is finite only when
every entry is (a partial sum holding an inf or NaN stays non-finite; a sum of finite entries that overflows also
says "not finite", and the tiled path then runs, which is right either way). A decode step reads its keys and values
once only, in sdpa: one more query row of zeros scores every key 0 * k, NaN for a non-finite key, and otherwise
weights every key exactly 1 / Tk, so its output (the mean of the values) is finite only when every key and value
is. The one exception is a single key (sdpa then returns its value whatever the score), which is summed. (Summing
the keys of every step instead measured 0.98x / 0.99x sdpa's decode tokens/s at 1k / 4k on 2 idle cores; probe rows
of +-1e-30, 0.92x / 0.89x.)
"""
import math

import torch
import torch.nn.functional as F

from ..patterns import UNBOUNDED


MASKED_ROWS = 128  # the most query rows a call with a cache before them or a window runs here (a 128 x Tk mask)


def _finite_sum(*tensors):
    """Whether the sum of each tensor is finite (the float64 total of float32 sums cannot overflow)."""
    return math.isfinite(sum(t.sum().item() for t in tensors))


def plain_causal_sdpa(q, k, v, left, scale):
    """q (B, H, Tq, D), k/v (B, Hkv, Tk, D) float32 with Tq <= Tk, causal, window left (-1 = unbounded) -> o (B, H,
    Tq, D), or None when an entry the call reads is not finite (or a sum overflows), or when the call would need a
    mask of more than MASKED_ROWS x Tk (Tq > MASKED_ROWS with a cache before the queries or a window): the tiled
    path then runs. Memory: sdpa's, plus at most a MASKED_ROWS x Tk bool mask."""
    batch, heads, tq, dim = q.shape
    kv_heads, tk = k.shape[1], k.shape[2]
    if left >= tk - 1:  # the window reaches every key of every row: the same call as unbounded, bit for bit
        left = UNBOUNDED
    lo = 0 if left == UNBOUNDED else max(tk - tq - left, 0)  # the first key the first row's window reaches
    if lo:
        k, v = k[:, :, lo:], v[:, :, lo:]
    if tq == 1:
        # One query row per head, every key left visible: the G heads of a kv head are G rows, and a row of zeros
        # after them is finite only when every key and value is (module docstring). Written out in one function:
        # a decode step pays for every call.
        group = heads // kv_heads
        rows = torch.constant_pad_nd(q.reshape(batch, kv_heads, group, dim), (0, 0, 0, 1))  # (B, Hkv, G + 1, D)
        out = F.scaled_dot_product_attention(rows, k, v, scale=scale)
        check = q.sum() + out.sum() if k.shape[2] > 1 else q.sum() + out.sum() + k.sum()
        if not math.isfinite(check.item()):  # a non-finite entry (or an overflow): the tiled path's semantics
            return None
        return out[:, :, :group].reshape(batch, heads, 1, dim)
    square = tq == tk and left == UNBOUNDED
    if not square and tq > MASKED_ROWS:  # the band below is a (Tq, Tk) bool mask: a few rows only
        return None
    if not _finite_sum(q, k, v):
        return None
    gqa = heads != kv_heads
    if square:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    position = torch.arange(tk - tq, tk, device=q.device)[:, None]
    key = torch.arange(lo, tk, device=q.device)[None, :]
    visible = key <= position
    if left != UNBOUNDED:
        visible &= key >= position - left
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale, enable_gqa=gqa)
