"""Plain PyTorch sliding-window attention with a dense mask: obviously correct, the truth for tests.

Memory: O(B * H * Tq * Tk) (it builds the full score matrix). Differentiable through autograd.
"""
import torch

from ..nonfinite import poison_output, poison_scores, split_finite
from ..patterns import window_mask


def sliding_window_attention_reference(q, k, v, left, right, scale):
    """q (B, H, Tq, D), k/v (B, Hkv, Tk, D), effective band (left, right) -> (o (B, H, Tq, D), lse (B, H, Tq)).

    Computes in q's dtype (so float16 inputs show what PyTorch itself does in float16). lse is natural-log,
    at least float32; a row that sees no key gets o = 0 and lse = -inf. NaN/inf reach only the rows that see them
    (kernels/nonfinite.py).
    """
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    q, q_bad = split_finite(q)
    k, k_bad = split_finite(k)
    v, v_bad = split_finite(v)
    scores = (q @ k.transpose(-1, -2)) * scale
    visible = window_mask(q.shape[2], k.shape[2], left, right, device=q.device)
    scores = poison_scores(scores, visible, q_bad, k_bad).masked_fill(~visible, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = row_max.masked_fill(torch.isinf(row_max), 0.0)
    weights = torch.exp(scores - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    out = poison_output((weights / torch.where(total == 0, torch.ones_like(total), total)) @ v, visible, v_bad)
    lse = (row_max + torch.log(total)).squeeze(-1)
    return out, lse.to(torch.promote_types(lse.dtype, torch.float32))
