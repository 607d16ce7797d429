"""Streaming attention on CPU without a Tq x Tk matrix and without copying the cache: the chunk's queries attend to the
sink slots and to the ring, each read in place in slot order (the softmax does not care about key order; the mask
comes from each slot's position), and to the chunk itself (the hybrid CPU path with the sinks inside the chunk as
landmarks); the softmaxes merge by their log-sum-exp. Temporaries: (B, H, 128, window) float32 for the ring part,
the hybrid path's for the chunk part."""
import torch

from ..autocast import without_autocast
from ..hybrid.blockwise import CPU_BLOCK, hybrid_fwd_blockwise
from ..nonfinite import poison_output, poison_scores, split_finite
from .cache_layout import ring_positions, stream_visibility


def _cache_part(q, keys, values, key_pos, length, sinks, window, scale, block):
    """o (B, H, C, D) float32 and lse (B, H, C) of the chunk's queries against cached keys (B, Hkv, N, D) at
    positions key_pos (N,) (-1 = empty slot)."""
    batch, heads, chunk, dim = q.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    keys, k_bad = split_finite(keys.float().flatten(0, 1))  # (B * Hkv, N, D)
    values, v_bad = split_finite(values.float().flatten(0, 1))
    out = torch.zeros(batch, heads, chunk, dim, dtype=torch.float32, device=q.device)
    lse = torch.full((batch, heads, chunk), float("-inf"), dtype=torch.float32, device=q.device)
    for lo in range(0, chunk, block):
        hi = min(lo + block, chunk)
        visible = stream_visibility(torch.arange(length + lo, length + hi, device=q.device), key_pos, sinks, window)
        bias = torch.zeros(visible.shape, device=q.device).masked_fill_(~visible, float("-inf")).repeat(group, 1)
        rows, q_bad = split_finite(q[:, :, lo:hi].float().reshape(batch * kv_heads, group * (hi - lo), dim))
        scores = poison_scores(torch.baddbmm(bias, rows, keys.transpose(1, 2), alpha=scale), bias, q_bad, k_bad)
        row_max = scores.amax(dim=-1, keepdim=True)
        row_max.masked_fill_(torch.isinf(row_max), 0.0)
        weights = scores.sub_(row_max).exp_()
        total = weights.sum(dim=-1, keepdim=True)
        o = poison_output(torch.bmm(weights, values), bias, v_bad).div_(total.clamp(min=torch.finfo(torch.float32).tiny))
        out[:, :, lo:hi] = o.view(batch, heads, hi - lo, dim)
        lse[:, :, lo:hi] = (row_max + torch.log(total)).view(batch, heads, hi - lo)
    return out, lse


def _merge(parts):
    """Merge softmaxes over disjoint key sets: [(o float32, lse)] -> o float32."""
    lse = parts[0][1]
    for _, part_lse in parts[1:]:
        lse = torch.logaddexp(lse, part_lse)
    out = torch.zeros_like(parts[0][0])
    for part_out, part_lse in parts:
        empty = part_lse == float("-inf")  # the part holds no key these rows see (a NaN lse must stay NaN)
        weight = torch.where(empty, torch.zeros_like(part_lse), torch.exp(part_lse - lse))
        out += weight[..., None] * torch.where(empty[..., None], torch.zeros_like(part_out), part_out)
    return out


@without_autocast
def streaming_attention_blockwise(q, k, v, sink_k, sink_v, ring_k, ring_v, length, sinks, window, scale,
                                  block=CPU_BLOCK):
    """As `streaming_attention_reference`, in blocks of `block` queries; o in q's dtype."""
    chunk = q.shape[2]
    device = q.device
    parts = []
    cached_sinks = min(sinks, length)
    if cached_sinks:
        parts.append(_cache_part(q, sink_k[:, :, :cached_sinks], sink_v[:, :, :cached_sinks],
                                 torch.arange(cached_sinks, device=device), length, sinks, window, scale, block))
    if length > sinks:
        parts.append(_cache_part(q, ring_k, ring_v, ring_positions(length, sinks, window, device), length, sinks,
                                 window, scale, block))
    chunk_sinks = torch.arange(max(0, min(sinks - length, chunk)), device=device)  # chunk positions < sinks
    o_chunk, lse_chunk = hybrid_fwd_blockwise(q, k, v, window - 1, 0, True, chunk_sinks, False, scale, block=block)
    if not parts:
        return o_chunk
    parts.append((o_chunk.float(), lse_chunk))
    return _merge(parts).to(q.dtype)
