"""Memory-efficient hybrid attention (window + landmarks + memory tokens) in plain PyTorch, for CPU tensors.

The (row, key) pairs are split into tiles so that each query row lies in exactly one tile with every key it sees:
- a block of `block` rows against its band, the landmark keys outside the band, and the memory tokens (rows that sit
  on a landmark with global_queries=True are hidden here);
- a block of those global rows against every key up to the last row's position, and the memory tokens.
Each tile is one softmax; the backward recomputes its probabilities from the lse. The largest temporary is
(B, H, block, window + block + L + M) for row blocks and (B, H, block, Tk + M) for global rows, in float32: never
a Tq x Tk matrix. Low-precision inputs are computed in float32 and cast back. NaN/inf reach only the rows that see
them (kernels/nonfinite.py).
"""
from dataclasses import dataclass

import torch

from ..autocast import without_autocast
from ..nonfinite import output_grad_products, poison_output, poison_scores, split_finite
from ..patterns import global_query_rows, hybrid_visibility, landmark_flags, visible_key_range

CPU_BLOCK = 128


@dataclass
class Tile:
    rows: torch.Tensor  # (R,) query rows
    band: slice  # main keys key_lo:key_hi
    extra: torch.Tensor  # (X,) main keys outside the band (landmarks)
    bias: torch.Tensor  # (B or 1, R, band + X + M) additive 0 / -inf


def _tiles(tq, tk, left, right, causal, landmarks, global_queries, memory, kv_start, key_mask, block, device):
    """The tiles of one call, in the order rows are written."""
    offset = tk - tq
    key_is_landmark = landmark_flags(torch.arange(tk, device=device), landmarks)
    global_rows = global_query_rows(landmarks, tq, tk) if global_queries else landmarks[:0]
    for row_lo in range(0, tq, block):
        row_hi = min(row_lo + block, tq)
        rows = torch.arange(row_lo, row_hi, device=device)
        key_lo, key_hi = visible_key_range(row_lo + offset, row_hi - 1 + offset, left, right, tk)
        reach = row_hi + offset if causal else tk  # keys past the last row's position are hidden when causal
        extra = landmarks[((landmarks < key_lo) | (landmarks >= key_hi)) & (landmarks < reach)]
        keys = torch.cat([torch.arange(key_lo, key_hi, device=device), extra])
        visible = hybrid_visibility(rows + offset, keys, left, right, causal, key_is_landmark[keys],
                                    torch.zeros_like(rows, dtype=torch.bool), kv_start, key_mask)
        yield _tile(rows, slice(key_lo, key_hi), extra, visible, memory, hidden_rows=landmark_flags(rows, global_rows))
    for start in range(0, global_rows.numel(), block):
        rows = global_rows[start:start + block]
        key_hi = int(rows[-1]) + offset + 1 if causal else tk
        keys = torch.arange(key_hi, device=device)
        visible = hybrid_visibility(rows + offset, keys, left, right, causal, key_is_landmark[keys],
                                    torch.ones_like(rows, dtype=torch.bool), kv_start, key_mask)
        yield _tile(rows, slice(0, key_hi), landmarks[:0], visible, memory)


def _tile(rows, band, extra, visible, memory, hidden_rows=None):
    """Append the memory columns (seen by every row), hide `hidden_rows` entirely, and turn it into a bias."""
    visible = visible if visible.dim() == 3 else visible[None]
    visible = torch.cat([visible, visible.new_ones(visible.shape[:2] + (memory,))], dim=-1)
    if hidden_rows is not None:
        visible = visible & ~hidden_rows[None, :, None]
    bias = torch.zeros(visible.shape, device=visible.device).masked_fill_(~visible, float("-inf"))
    return Tile(rows, band, extra, bias)


class _Operands:
    """Float32 views of one call's tensors, grouped so a kv head's query heads share one matmul."""

    def __init__(self, q, k, v, memory_k, memory_v):
        self.batch, self.heads, self.tq, self.dim = q.shape
        self.kv_heads = k.shape[1]
        self.group = self.heads // self.kv_heads
        self.q, self.k, self.v = q, k, v
        batch = self.batch
        self.memory_k = None if memory_k is None else memory_k.expand(batch, -1, -1, -1).float().flatten(0, 1)
        self.memory_v = None if memory_v is None else memory_v.expand(batch, -1, -1, -1).float().flatten(0, 1)
        self.memory = 0 if memory_k is None else memory_k.shape[2]

    def rows(self, x, rows):
        """(B, H, T, D) -> float32 (B * Hkv, G * R, D)."""
        return x[:, :, rows].float().reshape(self.batch * self.kv_heads, self.group * len(rows), x.shape[-1])

    def row_stat(self, x, rows):
        """(B, H, T) -> (B * Hkv, G * R, 1)."""
        return x[:, :, rows].reshape(self.batch * self.kv_heads, self.group * len(rows), 1)

    def keys(self, x, memory, tile):
        """(B * Hkv, band + X + M, D) float32: the tile's keys (or values) in bias column order."""
        parts = [x[:, :, tile.band], x[:, :, tile.extra]]
        parts = [p.float().flatten(0, 1) for p in parts]
        if memory is not None:
            parts.append(memory)
        return torch.cat(parts, dim=1)

    def bias(self, tile):
        """(B * Hkv or 1, G * R, N) from the tile's (B or 1, R, N) bias."""
        bias = tile.bias
        kv_heads = self.kv_heads if bias.shape[0] > 1 else 1  # a batch-independent bias broadcasts over B * Hkv
        bias = bias[:, None, None].expand(bias.shape[0], kv_heads, self.group, *bias.shape[1:])
        return bias.reshape(bias.shape[0] * kv_heads, self.group * bias.shape[-2], bias.shape[-1])

    def ungroup(self, x):
        return x.reshape(self.batch, self.heads, x.shape[1] // self.group, x.shape[-1])


@without_autocast
def hybrid_fwd_blockwise(q, k, v, left, right, causal, landmarks, global_queries, scale, memory_k=None,
                         memory_v=None, kv_start=None, key_mask=None, block=CPU_BLOCK):
    """q (B, H, Tq, D), k/v (B, Hkv, Tk, D), memory_k/v (B or 1, Hkv, M, D) or None, landmarks (L,) sorted int64,
    kv_start (B,) or None, key_mask (B, Tk) bool or None -> (o (B, H, Tq, D) in q's dtype, lse (B, H, Tq)
    float32). With v None, only lse is
    computed (o is None)."""
    ops = _Operands(q, k, v, memory_k, memory_v)
    out = None if v is None else torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
    for tile in _tiles(q.shape[2], k.shape[2], left, right, causal, landmarks, global_queries, ops.memory, kv_start,
                       key_mask, block, q.device):
        keys, k_bad = split_finite(ops.keys(k, ops.memory_k, tile))
        q_tile, q_bad = split_finite(ops.rows(q, tile.rows))
        bias = ops.bias(tile)
        scores = torch.baddbmm(bias, q_tile, keys.transpose(1, 2), alpha=scale)
        scores = poison_scores(scores, bias, q_bad, k_bad)
        row_max = scores.amax(dim=-1, keepdim=True)
        row_max.masked_fill_(torch.isinf(row_max), 0.0)  # rows that see nothing keep weights 0
        weights = scores.sub_(row_max).exp_()
        total = weights.sum(dim=-1, keepdim=True)
        if out is not None:
            values, v_bad = split_finite(ops.keys(v, ops.memory_v, tile))
            o_tile = poison_output(torch.bmm(weights, values), bias, v_bad)
            o_tile.div_(total.clamp(min=torch.finfo(torch.float32).tiny))
            out[:, :, tile.rows] = ops.ungroup(o_tile).to(q.dtype)
        lse[:, :, tile.rows] = ops.ungroup(row_max + torch.log(total)).squeeze(-1)
    return out, lse


@without_autocast
def hybrid_bwd_blockwise(q, k, v, out, lse, grad_out, grad_lse, left, right, causal, landmarks, global_queries, scale,
                         memory_k=None, memory_v=None, kv_start=None, key_mask=None, block=CPU_BLOCK):
    """Gradients (dq, dk, dv, dmemory_k, dmemory_v) of out and lse (grad_lse may be None); the memory gradients are
    None without memory and are summed over the batch when memory_k has batch 1."""
    ops = _Operands(q, k, v, memory_k, memory_v)
    batch, kv_heads, tk, dim = k.shape
    dq = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(batch * kv_heads, tk, dim, dtype=torch.float32, device=q.device)
    dv = torch.zeros_like(dk)
    dmem_k = torch.zeros(batch * kv_heads, ops.memory, dim, dtype=torch.float32, device=q.device)
    dmem_v = torch.zeros_like(dmem_k)
    for tile in _tiles(q.shape[2], tk, left, right, causal, landmarks, global_queries, ops.memory, kv_start, key_mask,
                       block, q.device):
        q_tile, grad_o_tile = split_finite(ops.rows(q, tile.rows))[0], ops.rows(grad_out, tile.rows)
        keys = split_finite(ops.keys(k, ops.memory_k, tile))[0]
        values = split_finite(ops.keys(v, ops.memory_v, tile))[0]
        row_lse = ops.row_stat(lse, tile.rows)
        row_lse = row_lse.masked_fill(torch.isinf(row_lse), 0.0)  # rows that see no key: all scores are -inf
        # dS = P * (dP - delta) with delta = rowsum(O * dO) - dlse: the lse gradient folds into delta.
        delta = output_grad_products(ops.rows(out, tile.rows), grad_o_tile).sum(-1, keepdim=True)
        if grad_lse is not None:
            delta -= ops.row_stat(grad_lse, tile.rows)
        probs = torch.baddbmm(ops.bias(tile), q_tile, keys.transpose(1, 2), alpha=scale).sub_(row_lse).exp_()
        grad_values = torch.bmm(probs.transpose(1, 2), grad_o_tile)
        grad_scores = probs.mul_(torch.bmm(grad_o_tile, values.transpose(1, 2)).sub_(delta))
        dq[:, :, tile.rows] = ops.ungroup(torch.bmm(grad_scores, keys).mul_(scale)).to(q.dtype)
        grad_keys = torch.bmm(grad_scores.transpose(1, 2), q_tile).mul_(scale)
        band = tile.band.stop - tile.band.start
        extra = band + tile.extra.numel()
        for grad, main, memory in ((grad_keys, dk, dmem_k), (grad_values, dv, dmem_v)):
            main[:, tile.band] += grad[:, :band]
            main.index_add_(1, tile.extra, grad[:, band:extra])
            memory += grad[:, extra:]
    shape = (batch, kv_heads, tk, dim)
    dk, dv = dk.view(shape).to(k.dtype), dv.view(shape).to(v.dtype)
    if memory_k is None:
        return dq, dk, dv, None, None
    dmem_k = dmem_k.view(batch, kv_heads, ops.memory, dim)
    dmem_v = dmem_v.view(batch, kv_heads, ops.memory, dim)
    if memory_k.shape[0] != batch:  # one set of memory tokens shared by the batch
        dmem_k, dmem_v = dmem_k.sum(0, keepdim=True), dmem_v.sum(0, keepdim=True)
    return dq, dk, dv, dmem_k.to(memory_k.dtype), dmem_v.to(memory_v.dtype)


@without_autocast
def attention_mass_blockwise(q, k, lse, segments, num_segments, row_weights, left, right, causal, landmarks,
                             global_queries, scale, memory_k=None, kv_start=None, key_mask=None, block=CPU_BLOCK):
    """(B, H, S) float32: sum over rows of row_weights (B, Tq) times the probability each row gives to the keys of
    each segment (segments (B, Tk), -1 = none), with probabilities recomputed tile by tile from lse (B, H, Tq)."""
    ops = _Operands(q, k, None, memory_k, None)
    batch, heads = q.shape[:2]
    mass = torch.zeros(batch, heads, num_segments + 1, dtype=torch.float32, device=q.device)
    bins = torch.where(segments < 0, num_segments, segments).long()
    for tile in _tiles(q.shape[2], k.shape[2], left, right, causal, landmarks, global_queries, ops.memory, kv_start,
                       key_mask, block, q.device):
        row_lse = ops.row_stat(lse, tile.rows)
        row_lse = row_lse.masked_fill(torch.isinf(row_lse), 0.0)
        q_tile = split_finite(ops.rows(q, tile.rows))[0]
        keys = split_finite(ops.keys(k, ops.memory_k, tile))[0]
        scores = torch.baddbmm(ops.bias(tile), q_tile, keys.transpose(1, 2), alpha=scale)
        probs = scores.sub_(row_lse).exp_().view(batch, heads, len(tile.rows), scores.shape[-1])
        key_mass = torch.einsum("br,bhrn->bhn", row_weights[:, tile.rows].float(), probs)
        keys = torch.cat([torch.arange(tile.band.start, tile.band.stop, device=q.device), tile.extra])
        mass.scatter_add_(2, bins[:, keys][:, None].expand(-1, heads, -1), key_mass[..., :keys.numel()])
    return mass[..., :num_segments]
