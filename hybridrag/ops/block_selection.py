"""`selected_block_attention`: each block of queries also attends to every token of the top-k earlier key blocks it
scores highest (block retrieval, as in Landmark Attention and the selection branch of Native Sparse Attention). A
block's score is the Quest bound on its best key, from the per-channel max and min of its keys, so a block holding one
matching token scores high even when the rest of it does not. PyTorch, chunked: no Tq x Tk matrix."""
import torch
from torch.utils.checkpoint import checkpoint

from .validation import check_attention_inputs, check_key_mask, check_scale

SELECTION_CHUNK = 1024  # queries scored against every block at a time: (B, H, 1024, T / s) float32
ATTENTION_CHUNK = 512  # queries whose chosen keys are gathered at a time: (B, Hkv, 512, top_k * s, D)


def _check(q, k, v, block_size, top_k, key_mask):
    check_attention_inputs(q, k, v)
    check_key_mask(key_mask, k)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must hold the same positions (self-attention), got Tq={q.shape[2]} and "
                         f"Tk={k.shape[2]}")
    for name, value in (("block_size", block_size), ("top_k", top_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def block_key_bounds(k, block_size, key_mask=None):
    """Per-channel max and min of each complete block's keys: k (B, Hkv, T, D) -> two (B, Hkv, T // s, D) float32;
    padded keys (key_mask False) take no part; a block of padding only gets -inf / +inf (it never scores)."""
    batch, heads, _, dim = k.shape
    count = k.shape[2] // block_size
    blocks = k[:, :, :count * block_size].float().reshape(batch, heads, count, block_size, dim)
    if key_mask is None:
        return blocks.amax(3), blocks.amin(3)
    real = key_mask[:, None, :count * block_size].reshape(batch, 1, count, block_size, 1)
    return blocks.masked_fill(~real, float("-inf")).amax(3), blocks.masked_fill(~real, float("inf")).amin(3)


@torch.no_grad()
def select_blocks(q, k, block_size, top_k, scale, key_mask=None):
    """The top-k earlier blocks of every query.

    q (B, H, T, D), k (B, Hkv, T, D). The query at t may choose a complete key block j < t // s only (causal: the
    blocks before its own, which its window covers). It scores block j by the Quest bound sum_d max(q_d * kmax_jd,
    q_d * kmin_jd) (>= its best q . k in the block); a softmax over the blocks it may choose turns the bounds into
    shares, summed over the heads that share a key head.
    -> (indices (B, Hkv, T, k) int64, valid (B, Hkv, T, k) bool) with k = min(top_k, T // s); a query with fewer than
    k earlier blocks marks the rest invalid. Memory: (B, H, SELECTION_CHUNK, T / s) float32 at a time.
    """
    batch, heads, length, _ = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    kmax, kmin = (t.repeat_interleave(group, dim=1) for t in block_key_bounds(k, block_size, key_mask))
    count = kmax.shape[2]
    top = min(top_k, count)
    indices = torch.zeros((batch, kv_heads, length, top), dtype=torch.int64, device=q.device)
    valid = torch.zeros((batch, kv_heads, length, top), dtype=torch.bool, device=q.device)
    if count == 0:  # shorter than one block: nothing to choose
        return indices, valid
    block_ids = torch.arange(count, device=q.device)
    real = None if key_mask is None else key_mask[:, :count * block_size].reshape(batch, count, block_size).any(-1)
    for start in range(0, length, SELECTION_CHUNK):
        rows = q[:, :, start:start + SELECTION_CHUNK].float()  # (B, H, c, D)
        own_block = torch.arange(start, start + rows.shape[2], device=q.device) // block_size
        allowed = block_ids < own_block[:, None]  # (c, L)
        allowed = allowed if real is None else allowed & real[:, None, None, :]
        bound = rows.clamp(min=0) @ kmax.transpose(-1, -2) + rows.clamp(max=0) @ kmin.transpose(-1, -2)
        bound = (bound * scale).masked_fill(~allowed, float("-inf"))
        shares = torch.softmax(bound, dim=-1).nan_to_num_(0.0)  # a row with no earlier block: 0
        totals = shares.view(batch, kv_heads, group, rows.shape[2], count).sum(2)
        totals = totals.masked_fill(~allowed, float("-inf"))
        best, chosen = totals.topk(top, dim=-1)
        indices[:, :, start:start + rows.shape[2]] = chosen
        valid[:, :, start:start + rows.shape[2]] = best > float("-inf")
    return indices, valid


def _union_of_choices(indices, valid, block_size, count):
    """The blocks any query of each query block chose, as a fixed number of slots, and which slots each query may
    read (its own choices only: the union just shares one gather among the block's queries).

    indices, valid (B, Hkv, T, k) -> (slots (B, Hkv, n, U) int64 block ids, allowed (B, Hkv, n, s, U) bool) with
    n = ceil(T / s) and U = min(s * k, count); a slot no query chose is allowed to none."""
    batch, kv_heads, length, top = indices.shape
    blocks = -(-length // block_size)
    pad = blocks * block_size - length
    indices = torch.nn.functional.pad(indices, (0, 0, 0, pad)).view(batch, kv_heads, blocks, block_size, top)
    valid = torch.nn.functional.pad(valid, (0, 0, 0, pad)).view(batch, kv_heads, blocks, block_size, top)
    chosen = torch.where(valid, indices, count).flatten(-2)  # invalid choices land in an extra column
    flags = torch.zeros((batch, kv_heads, blocks, count + 1), device=indices.device)
    flags.scatter_(-1, chosen, 1.0)
    flag, slots = flags[..., :count].topk(min(block_size * top, count), dim=-1)  # chosen blocks first
    allowed = ((indices[..., None] == slots[:, :, :, None, None, :]) & valid[..., None]).any(-2)
    return slots, allowed & (flag > 0)[:, :, :, None, :]


def _attend_chunk(rows, key_blocks, value_blocks, slots, usable, scale):
    """rows (B, Hkv, G, n, s, D) of n query blocks against the slots (B, Hkv, n, U) of key_blocks / value_blocks
    (B, Hkv, L, s, D), usable (B, Hkv, n, s, U * s) bool -> (B, Hkv, G, n, s, D) float32."""
    batch, kv_heads, count, block_size, dim = key_blocks.shape
    # whole blocks, not token positions: one index per block, and a cheap index_add in the backward
    flat = slots + count * torch.arange(batch * kv_heads, device=slots.device).view(batch, kv_heads, 1, 1)
    keys = key_blocks.reshape(-1, block_size, dim)[flat].flatten(-3, -2).float()  # (B, Hkv, n, U*s, D)
    values = value_blocks.reshape(-1, block_size, dim)[flat].flatten(-3, -2).float()
    scores = torch.einsum("bhgnsd,bhnud->bhgnsu", rows.float(), keys) * scale
    scores = scores.masked_fill(~usable[:, :, None], float("-inf"))
    peak = scores.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min).detach()
    weights = torch.exp(scores - peak)  # a row with nothing usable: all 0, so its output is 0
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    # a value no row of the block may read (padding, which may hold NaN: 0 * NaN = NaN) is zeroed
    values = values.masked_fill(~usable.any(-2)[..., None], 0.0)
    return torch.einsum("bhgnsu,bhnud->bhgnsd", weights, values)


def selected_block_attention(q, k, v, block_size, top_k, *, scale=None, key_mask=None):
    """Each query attends, in a softmax of its own, to the tokens of the top_k earlier blocks it chose
    (`select_blocks`); the choice itself carries no gradient.

    q (B, H, T, D), k and v (B, Hkv, T, D) (H a multiple of Hkv), block_size s, top_k k, key_mask (B, T) bool
    (False = padding, never attended) -> (B, H, T, D) in q's dtype. A query with no earlier block (the first block)
    gets 0. Each block of s queries gathers the U = min(s * k, T // s) blocks its queries chose, once, and each query
    reads its own k of them. Memory: the choices (B, Hkv, T, k) and (B, Hkv, T, U) bool, and per chunk of
    ATTENTION_CHUNK queries the gathered keys and values (B, Hkv, chunk / s, U * s, D) and the scores (B, H, chunk,
    U * s), recomputed in the backward (checkpointed): O(T * U + chunk * U * s * D) beside the inputs.
    """
    _check(q, k, v, block_size, top_k, key_mask)
    batch, heads, length, dim = q.shape
    kv_heads, group = k.shape[1], heads // k.shape[1]
    scale = check_scale(scale, dim)
    if length < block_size:
        return torch.zeros_like(q)
    count, blocks = length // block_size, -(-length // block_size)
    indices, valid = select_blocks(q, k, block_size, top_k, scale, key_mask)
    slots, allowed = _union_of_choices(indices, valid, block_size, count)
    usable = allowed.repeat_interleave(block_size, dim=-1)  # (B, Hkv, n, s, U*s)
    if key_mask is not None:
        positions = (slots[..., None] * block_size + torch.arange(block_size, device=q.device)).flatten(-2)
        batch_ids = torch.arange(batch, device=q.device)[:, None, None, None]
        usable = usable & key_mask[batch_ids, positions][:, :, :, None]  # (B, Hkv, n, 1, U*s)
    key_blocks = k[:, :, :count * block_size].unflatten(2, (count, block_size))  # (B, Hkv, L, s, D)
    value_blocks = v[:, :, :count * block_size].unflatten(2, (count, block_size))
    rows = torch.nn.functional.pad(q, (0, 0, 0, blocks * block_size - length))
    rows = rows.view(batch, kv_heads, group, blocks, block_size, dim)
    differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    step = max(1, ATTENTION_CHUNK // block_size)
    out = []
    for start in range(0, blocks, step):
        part = slice(start, start + step)
        args = (rows[:, :, :, part], key_blocks, value_blocks, slots[:, :, part], usable[:, :, part], scale)
        out.append(checkpoint(_attend_chunk, *args, use_reentrant=False) if differentiable else _attend_chunk(*args))
    out = torch.cat(out, dim=3).view(batch, heads, blocks * block_size, dim)
    return out[:, :, :length].to(q.dtype)
