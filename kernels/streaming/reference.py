"""Streaming attention reference: gather every key the cache and the chunk hold, with its position, and run a dense
softmax under the stream's visibility. The truth for tests. Memory: O(B * H * C * (sinks + window + C))."""
import torch

from ..nonfinite import poison_output, poison_scores, split_finite
from .cache_layout import ring_positions, stream_visibility


def streaming_attention_reference(q, k, v, sink_k, sink_v, ring_k, ring_v, length, sinks, window, scale):
    """q (B, H, C, D) at positions length .. length + C - 1; k/v (B, Hkv, C, D) the chunk; the cache before the chunk:
    sink_k/v (B, Hkv, sinks, D), ring_k/v (B, Hkv, window, D) after `length` tokens -> o (B, H, C, D) in q's dtype."""
    chunk = q.shape[2]
    device = q.device
    sink_pos = torch.arange(sinks, device=device)
    sink_pos = torch.where(sink_pos < length, sink_pos, torch.full_like(sink_pos, -1))
    key_pos = torch.cat([sink_pos, ring_positions(length, sinks, window, device),
                         torch.arange(length, length + chunk, device=device)])
    keys = torch.cat([sink_k, ring_k, k], dim=2)
    values = torch.cat([sink_v, ring_v, v], dim=2)
    group = q.shape[1] // k.shape[1]
    q, q_bad = split_finite(q)
    keys, k_bad = split_finite(keys.repeat_interleave(group, dim=1))
    values, v_bad = split_finite(values.repeat_interleave(group, dim=1))
    scores = (q @ keys.transpose(-1, -2)) * scale
    visible = stream_visibility(torch.arange(length, length + chunk, device=device), key_pos, sinks, window)
    scores = poison_scores(scores, visible, q_bad, k_bad).masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(q.dtype)
    return poison_output(probs @ values, visible, v_bad)
