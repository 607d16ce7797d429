"""Plain PyTorch hybrid attention and attention mass with dense masks: obviously correct, the truth for tests.

Memory: O(B * H * Tq * (Tk + M)) (full score matrices). Differentiable through autograd.
"""
import torch

from ..nonfinite import poison_output, poison_scores, split_finite
from ..patterns import hybrid_mask


def _masked_scores(q, k, left, right, causal, landmark_positions, global_queries, memory_k, scale, kv_start,
                   key_mask):
    """(scores (B, H, Tq, Tk + M) in q's dtype with -inf where hidden, visibility broadcastable to it); memory keys
    come last and are always seen. Non-finite entries reach only the rows that see them (kernels/nonfinite.py)."""
    batch, heads, tq, _ = q.shape
    group = heads // k.shape[1]
    keys = k
    if memory_k is not None:
        keys = torch.cat([k, memory_k.expand(batch, -1, -1, -1)], dim=2)
    q, q_bad = split_finite(q)
    keys, k_bad = split_finite(keys.repeat_interleave(group, dim=1))
    scores = (q @ keys.transpose(-1, -2)) * scale
    visible = hybrid_mask(tq, k.shape[2], left, right, causal, landmark_positions, global_queries, kv_start,
                          key_mask)
    if memory_k is not None:
        visible = torch.cat([visible, visible.new_ones(visible.shape[:-1] + (memory_k.shape[2],))], dim=-1)
    visible = visible[:, None] if visible.dim() == 3 else visible  # (B or 1, 1, Tq, Tk + M) against (B, H, ...)
    scores = poison_scores(scores, visible, q_bad, k_bad)
    return scores.masked_fill(~visible, float("-inf")), visible


def _attend(probs, v, memory_v, visible, group):
    """probs @ values (main keys then memory tokens), non-finite values reaching only the rows that see them."""
    values = v if memory_v is None else torch.cat([v, memory_v.expand(v.shape[0], -1, -1, -1)], dim=2)
    values, v_bad = split_finite(values.repeat_interleave(group, dim=1))
    return poison_output(probs @ values, visible, v_bad)


def _softmax_with_lse(scores):
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = row_max.masked_fill(torch.isinf(row_max), 0.0)
    weights = torch.exp(scores - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(total == 0, torch.ones_like(total), total)
    lse = (row_max + torch.log(total)).squeeze(-1)
    return probs, lse.to(torch.promote_types(lse.dtype, torch.float32))


def hybrid_attention_reference(q, k, v, left, right, causal, landmark_positions, global_queries, scale,
                               memory_k=None, memory_v=None, kv_start=None, key_mask=None):
    """q (B, H, Tq, D), k/v (B, Hkv, Tk, D), memory_k/v (B or 1, Hkv, M, D) or None, kv_start (B,) or None,
    key_mask (B, Tk) bool or None -> (o, lse (B, H, Tq)).

    Computes in q's dtype; a row that sees no key gets o = 0 and lse = -inf."""
    scores, visible = _masked_scores(q, k, left, right, causal, landmark_positions, global_queries, memory_k, scale,
                                     kv_start, key_mask)
    probs, lse = _softmax_with_lse(scores)
    return _attend(probs, v, memory_v, visible, q.shape[1] // k.shape[1]), lse


def hybrid_attention_weights_reference(q, k, v, left, right, causal, landmark_positions, global_queries, scale,
                                       memory_k=None, memory_v=None, kv_start=None, key_mask=None):
    """(o (B, H, Tq, D), probabilities (B, H, Tq, Tk + M)) in q's dtype, memory tokens' columns last: the dense
    attention weights, for `output_attentions`. Memory: O(B * H * Tq * (Tk + M))."""
    scores, visible = _masked_scores(q, k, left, right, causal, landmark_positions, global_queries, memory_k, scale,
                                     kv_start, key_mask)
    probs = _softmax_with_lse(scores)[0]
    return _attend(probs, v, memory_v, visible, q.shape[1] // k.shape[1]), probs


def attention_mass_reference(q, k, segments, num_segments, left, right, causal, landmark_positions, global_queries,
                             scale, query_mask=None, memory_k=None, kv_start=None, key_mask=None):
    """(B, H, S) float32 (float64 for float64 inputs): the probability the selected query rows give to each key
    segment, averaged over the rows.

    segments (B, Tk) int (-1 = no segment), query_mask (B, Tq) bool or None (all rows). Memory tokens take part in
    the softmax but belong to no segment."""
    scores = _masked_scores(q, k, left, right, causal, landmark_positions, global_queries, memory_k, scale, kv_start,
                            key_mask)[0]
    probs = _softmax_with_lse(scores)[0][..., :k.shape[2]]  # (B, H, Tq, Tk) in q's dtype
    batch, heads, tq, _ = q.shape
    sums = torch.promote_types(q.dtype, torch.float32)
    rows = torch.ones(batch, tq, dtype=torch.bool, device=q.device) if query_mask is None else query_mask
    weights = rows.to(sums) / rows.sum(dim=1, keepdim=True).clamp(min=1)
    key_mass = torch.einsum("bq,bhqk->bhk", weights, probs.to(sums))
    mass = torch.zeros(batch, heads, num_segments + 1, dtype=sums, device=q.device)
    bins = torch.where(segments < 0, num_segments, segments).long()
    mass.scatter_add_(2, bins[:, None].expand(-1, heads, -1), key_mass)
    return mass[..., :num_segments].to(sums)
