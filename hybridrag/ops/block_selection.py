"""`selected_block_attention`: each query also attends to every token of the top-k earlier key blocks it scores
highest (block retrieval, as in Landmark Attention and the selection branch of Native Sparse Attention). A
block's score is the Quest bound on its best key, from the per-channel max and min of its keys, so a block holding one
matching token scores high even when the rest of it does not. PyTorch, chunked: no Tq x Tk matrix."""
import torch
from torch.utils.checkpoint import checkpoint

from .validation import check_attention_inputs, check_key_mask, check_scale

SELECTION_CHUNK = 1024  # queries scored against the blocks before them at a time: (B, H, 1024, <= T / s) float32
ATTENTION_CHUNK = 4096  # at most this many queries gather their chosen keys at a time (fewer chunks: fewer
# full-size gradient buffers in the backward)
GATHER_BUDGET = 2 ** 22  # and at most this many gathered elements: 16 MiB of float32 keys (as much again of values)


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
    kmax, kmin = block_key_bounds(k, block_size, key_mask)
    # one matmul per chunk: [q+, q-] . [kmax, kmin] is the bound; (B, H, L, 2D) with the key heads repeated
    bounds = torch.cat([kmax, kmin], dim=-1).repeat_interleave(group, dim=1)
    count = bounds.shape[2]
    top = min(top_k, count)
    indices = torch.zeros((batch, kv_heads, length, top), dtype=torch.int64, device=q.device)
    valid = torch.zeros((batch, kv_heads, length, top), dtype=torch.bool, device=q.device)
    if count == 0:  # shorter than one block: nothing to choose
        return indices, valid
    block_ids = torch.arange(count, device=q.device)
    real = None if key_mask is None else key_mask[:, :count * block_size].reshape(batch, count, block_size).any(-1)
    for start in range(0, length, SELECTION_CHUNK):
        rows = q[:, :, start:start + SELECTION_CHUNK].float() * scale  # (B, H, c, D); scale > 0
        stop = start + rows.shape[2]
        columns = min(count, (stop - 1) // block_size)  # the blocks before the chunk's last query's own
        if columns == 0:  # every query of the chunk is in the first block: nothing to choose
            continue
        own_block = torch.arange(start, stop, device=q.device) // block_size
        allowed = block_ids[:columns] < own_block[:, None]  # (c, columns)
        allowed = allowed if real is None else allowed & real[:, None, None, :columns]
        bound = torch.cat([rows.clamp(min=0), rows.clamp(max=0)], dim=-1) @ bounds[:, :, :columns].transpose(-1, -2)
        bound = bound.masked_fill_(~allowed, float("-inf"))
        if group == 1:  # one query head per key head: the softmax keeps the bounds' order, so rank them directly
            totals = bound
        else:
            shares = torch.softmax(bound, dim=-1).nan_to_num_(0.0)  # a row with no earlier block: 0
            totals = shares.view(batch, kv_heads, group, rows.shape[2], columns).sum(2)
            totals = totals.masked_fill_(~allowed, float("-inf"))
        best, chosen = totals.topk(min(top, columns), dim=-1)
        indices[:, :, start:stop, :chosen.shape[-1]] = chosen
        valid[:, :, start:stop, :chosen.shape[-1]] = best > float("-inf")
    return indices, valid


def _attend_chunk(rows, key_blocks, value_blocks, chosen, readable, scale):
    """rows (B, Hkv, G, c, D) of c queries against their own chosen blocks `chosen` (B, Hkv, c, k) of key_blocks /
    value_blocks (B, Hkv, L, s, D); readable (B, Hkv, c, k * s) bool, the gathered keys a query may read
    -> (B, Hkv, G, c, D) float32."""
    batch, kv_heads, count, block_size, dim = key_blocks.shape
    # whole blocks, not token positions: one index per block, and a cheap index_add in the backward
    flat = chosen + count * torch.arange(batch * kv_heads, device=chosen.device).view(batch, kv_heads, 1, 1)
    keys = key_blocks.reshape(-1, block_size, dim)[flat].flatten(-3, -2).float()  # (B, Hkv, c, k*s, D)
    values = value_blocks.reshape(-1, block_size, dim)[flat].flatten(-3, -2).float()
    scores = torch.einsum("bhgcd,bhcud->bhgcu", rows.float(), keys) * scale
    scores = scores.masked_fill(~readable[:, :, None], float("-inf"))
    peak = scores.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min).detach()
    weights = torch.exp(scores - peak)  # a row with nothing readable: all 0, so its output is 0
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    # a value its query may not read (padding, which may hold NaN: 0 * NaN = NaN) is zeroed
    values = values.masked_fill(~readable[..., None], 0.0)
    return torch.einsum("bhgcu,bhcud->bhgcd", weights, values)


def selected_block_attention(q, k, v, block_size, top_k, *, scale=None, key_mask=None):
    """Each query attends, in a softmax of its own, to the tokens of the top_k earlier blocks it chose
    (`select_blocks`); the choice itself carries no gradient.

    q (B, H, T, D), k and v (B, Hkv, T, D) (H a multiple of Hkv), block_size s, top_k k, key_mask (B, T) bool
    (False = padding, never attended) -> (B, H, T, D) in q's dtype. A query with no earlier block (the first block)
    gets 0. Each query gathers the k * s keys and values of its own choices (shared by the H / Hkv query heads of a
    key head) and reads nothing else. Memory: the choices (B, Hkv, T, k), and per chunk of queries the gathered keys
    and values (B, Hkv, chunk, k * s, D) float32 (chunk sized to GATHER_BUDGET elements) and the scores (B, H,
    chunk, k * s), recomputed in the backward (checkpointed): O(T * k + GATHER_BUDGET) beside the inputs.
    """
    _check(q, k, v, block_size, top_k, key_mask)
    batch, heads, length, dim = q.shape
    kv_heads, group = k.shape[1], heads // k.shape[1]
    scale = check_scale(scale, dim)
    if length < block_size:
        return torch.zeros_like(q)
    count = length // block_size
    indices, valid = select_blocks(q, k, block_size, top_k, scale, key_mask)
    top = indices.shape[-1]
    offsets = torch.arange(block_size, device=q.device)
    key_blocks = k[:, :, :count * block_size].unflatten(2, (count, block_size))  # (B, Hkv, L, s, D)
    value_blocks = v[:, :, :count * block_size].unflatten(2, (count, block_size))
    rows = q.view(batch, kv_heads, group, length, dim)
    differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    step = max(1, min(ATTENTION_CHUNK, GATHER_BUDGET // (batch * kv_heads * top * block_size * max(dim, group))))
    out = []
    for start in range(0, length, step):
        part = slice(start, start + step)
        chosen = indices[:, :, part]
        readable = valid[:, :, part].repeat_interleave(block_size, dim=-1)  # (B, Hkv, c, k*s)
        if key_mask is not None:
            positions = (chosen[..., None] * block_size + offsets).flatten(-2)
            readable = readable & key_mask[torch.arange(batch, device=q.device)[:, None, None, None], positions]
        args = (rows[:, :, :, part], key_blocks, value_blocks, chosen, readable, scale)
        out.append(checkpoint(_attend_chunk, *args, use_reentrant=False) if differentiable else _attend_chunk(*args))
    return torch.cat(out, dim=3).view(batch, heads, length, dim).to(q.dtype)
