"""Where a rolling KV cache keeps each position. The first `sinks` positions live in the sink slots for good; every
later position q lives in ring slot (q - sinks) % window until a newer position takes the slot. A query at position p
sees key j iff j <= p and (j < sinks or j >= p - window + 1): hybrid attention with an int window and the sinks as
landmarks, global_queries=False."""
import torch


def ring_positions(length, sinks, window, device=None):
    """(window,) int64: the position each ring slot holds after `length` tokens, -1 for a slot not yet written."""
    slot = torch.arange(window, device=device)
    newest = length - 1 - sinks - slot  # how far the newest position of this slot's residue class is past slot
    positions = sinks + slot + window * torch.div(newest, window, rounding_mode="floor")
    return torch.where(newest >= 0, positions, torch.full_like(positions, -1))


def stream_visibility(query_pos, key_pos, sinks, window):
    """(R, N) bool: key positions (N,) (-1 = empty slot) visible from query positions (R,)."""
    p, j = query_pos[:, None], key_pos[None, :]
    return (j >= 0) & (j <= p) & ((j < sinks) | (j >= p - window + 1))
