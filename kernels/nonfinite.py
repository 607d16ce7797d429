"""NaN and inf under an attention mask, for the PyTorch paths: what a row cannot see must not reach it.

`probs @ v` lets a hidden NaN through (0 * NaN = NaN), and so do `bias + q @ k.T` and every backward product of a
zero probability with a non-finite operand. These paths multiply finite copies (NaN/inf entries zeroed) and put NaN
back only where a row sees a non-finite entry:
- a non-finite query row, or a non-finite key the row sees, gives NaN scores there, so a NaN row (o and lse);
- a non-finite value the row sees gives NaN in that value's columns of o (the Triton kernels, in a block a mask
  cuts, make the whole row NaN: exact columns would cost a second dot there; `_online_softmax_step`). Gradients stay clean for every row whose
upstream gradient is zero where its output is NaN (as when those rows are left out of a loss).
"""
import torch


def split_finite(x):
    """(x with NaN/inf entries set to 0, bool mask of those entries), or (x, None) when x is all finite."""
    if x.numel() == 0:
        return x, None
    # one pass with no bool temporary (an isfinite mask costs ~15x more): NaN propagates to both ends, +-inf shows
    low, high = torch.aminmax(x)
    if bool(torch.isfinite(low) & torch.isfinite(high)):
        return x, None
    bad = ~torch.isfinite(x)
    return x.masked_fill(bad, 0.0), bad


def _seen(visible):
    """A bool visibility from a bool mask or an additive 0 / -inf bias (the CPU paths' form)."""
    return visible if visible.dtype == torch.bool else visible == 0


def poison_scores(scores, visible, q_bad, k_bad):
    """scores (..., M, N) with NaN where `visible` (bool, or an additive 0 / -inf bias; broadcastable) and the row's
    query (q_bad (..., M, D)) or the key (k_bad (..., N, D)) holds a non-finite entry; either mask may be None.
    `visible` is read only when there is a non-finite entry."""
    hit = None
    if q_bad is not None:
        hit = q_bad.any(-1)[..., :, None]
    if k_bad is not None:
        key_hit = k_bad.any(-1)[..., None, :]
        hit = key_hit if hit is None else hit | key_hit
    if hit is None:
        return scores
    return scores.masked_fill(hit & _seen(visible), float("nan"))


def poison_output(out, visible, v_bad):
    """out (..., M, D) with NaN in column d of each row that sees (visible (..., M, N), bool or an additive bias) a
    value whose entry d is non-finite (v_bad (..., N, D), or None)."""
    if v_bad is None:
        return out
    hit = (_seen(visible).to(torch.float32) @ v_bad.to(torch.float32)) > 0
    return out.masked_fill(hit, float("nan"))


def output_grad_products(out, grad_out):
    """out * grad_out with 0 where grad_out is 0: a NaN output nobody takes a gradient of stays out of delta."""
    return torch.where(grad_out == 0, torch.zeros((), dtype=out.dtype, device=out.device), out * grad_out)




def finite_copy(t, *, keep_negative_inf=False):
    """t with NaN and +-inf set to 0 (-inf kept with keep_negative_inf: an lse's row that sees no key); None stays."""
    if t is None:
        return None
    return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=float("-inf") if keep_negative_inf else 0.0)


def take_exact_where_non_finite(clean, exact, *, lse=False):
    """The C++ kernels' second pass, where their first output held a non-finite value: `exact` is the blockwise
    path's result (the contract's non-finite values), `clean` the C++ kernels' on finite copies of the inputs
    (`finite_copy`). A hidden entry meets only zero probabilities there, whatever its value, so where `exact` is
    finite `clean` is what the C++ kernels give for any finite value in place of the non-finite ones: bit for bit
    the rows of a call without them. Elsewhere `exact`'s non-finite values. With lse, -inf (a row that sees no key,
    in both) counts as finite."""
    keep = torch.isfinite(exact) | (exact == float("-inf")) if lse else torch.isfinite(exact)
    return torch.where(keep, clean, exact)
