"""Memory-efficient sliding-window attention in plain PyTorch, for CPU tensors.

Queries are processed in blocks of `block` rows; each block multiplies only against the keys inside its band, so
work grows with Tq x (window + block) and the largest temporary is (B, H, block, window + block) in float32.
Never a Tq x Tk matrix. Low-precision inputs are computed in float32 and cast back.
"""
import torch

from ..patterns import UNBOUNDED, visible_key_range

CPU_BLOCK = 128


def _block_mask(pos_first, rows, key_lo, keys, left, right, device):
    """Visibility (rows, keys) for query positions pos_first.. and keys key_lo..; None when all are visible."""
    pos = torch.arange(pos_first, pos_first + rows, device=device)[:, None]
    key = torch.arange(key_lo, key_lo + keys, device=device)[None, :]
    visible = torch.ones(rows, keys, dtype=torch.bool, device=device)
    if left != UNBOUNDED:
        visible &= key >= pos - left
    if right != UNBOUNDED:
        visible &= key <= pos + right
    return None if bool(visible.all()) else visible


def _blocks(tq, tk, left, right, block):
    """Yield (row_lo, row_hi, key_lo, key_hi) for each query block; key range may be empty."""
    offset = tk - tq
    for row_lo in range(0, tq, block):
        row_hi = min(row_lo + block, tq)
        key_lo, key_hi = visible_key_range(row_lo + offset, row_hi - 1 + offset, left, right, tk)
        yield row_lo, row_hi, key_lo, key_hi


def _scores(q_blk, k_blk, scale, mask):
    """q_blk (B, Hkv, G, M, D), k_blk (B, Hkv, N, D) -> masked scores (B, Hkv, G, M, N) in float32."""
    scores = torch.matmul(q_blk, k_blk.transpose(-1, -2).unsqueeze(2)) * scale
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    return scores


def sliding_window_fwd_blockwise(q, k, v, left, right, scale, block=CPU_BLOCK):
    """q (B, H, Tq, D), k/v (B, Hkv, Tk, D) -> (o (B, H, Tq, D) in q's dtype, lse (B, H, Tq) float32)."""
    batch, heads, tq, dim = q.shape
    kv_heads, tk = k.shape[1], k.shape[2]
    group = heads // kv_heads
    out = torch.zeros(batch, kv_heads, group, tq, dim, dtype=q.dtype, device=q.device)
    lse = torch.full((batch, kv_heads, group, tq), float("-inf"), dtype=torch.float32, device=q.device)
    q_grouped = q.unflatten(1, (kv_heads, group))
    for row_lo, row_hi, key_lo, key_hi in _blocks(tq, tk, left, right, block):
        if key_hi == key_lo:
            continue
        mask = _block_mask(row_lo + tk - tq, row_hi - row_lo, key_lo, key_hi - key_lo, left, right, q.device)
        q_blk = q_grouped[:, :, :, row_lo:row_hi].float()
        k_blk = k[:, :, key_lo:key_hi].float()
        v_blk = v[:, :, key_lo:key_hi].float()
        scores = _scores(q_blk, k_blk, scale, mask)
        row_max = scores.amax(dim=-1, keepdim=True)
        row_max.masked_fill_(torch.isinf(row_max), 0.0)
        weights = torch.exp_(scores.sub_(row_max))
        total = weights.sum(dim=-1, keepdim=True)
        o_blk = torch.matmul(weights, v_blk.unsqueeze(2))
        out[:, :, :, row_lo:row_hi] = o_blk.div_(total.clamp(min=torch.finfo(torch.float32).tiny))
        lse[:, :, :, row_lo:row_hi] = (row_max + torch.log(total)).squeeze(-1)
    return out.flatten(1, 2), lse.flatten(1, 2)


def sliding_window_bwd_blockwise(q, k, v, o, lse, grad_o, grad_lse, left, right, scale, block=CPU_BLOCK):
    """Gradients (dq, dk, dv) of o and lse, recomputing the probabilities block by block from lse.

    grad_lse may be None. dk/dv are accumulated in float32 buffers of k's size, summed over each kv head's group.
    """
    batch, heads, tq, dim = q.shape
    kv_heads, tk = k.shape[1], k.shape[2]
    group = heads // kv_heads
    dq = torch.zeros(batch, kv_heads, group, tq, dim, dtype=q.dtype, device=q.device)
    dk = torch.zeros(batch, kv_heads, tk, dim, dtype=torch.float32, device=q.device)
    dv = torch.zeros_like(dk)
    q_grouped = q.unflatten(1, (kv_heads, group))
    o_grouped, grad_o_grouped = o.unflatten(1, (kv_heads, group)), grad_o.unflatten(1, (kv_heads, group))
    lse_grouped = lse.unflatten(1, (kv_heads, group))
    grad_lse_grouped = None if grad_lse is None else grad_lse.unflatten(1, (kv_heads, group))
    for row_lo, row_hi, key_lo, key_hi in _blocks(tq, tk, left, right, block):
        if key_hi == key_lo:
            continue
        rows = slice(row_lo, row_hi)
        mask = _block_mask(row_lo + tk - tq, row_hi - row_lo, key_lo, key_hi - key_lo, left, right, q.device)
        q_blk = q_grouped[:, :, :, rows].float()
        grad_o_blk = grad_o_grouped[:, :, :, rows].float()
        k_blk = k[:, :, key_lo:key_hi].float()
        v_blk = v[:, :, key_lo:key_hi].float()
        row_lse = lse_grouped[:, :, :, rows]
        row_lse = row_lse.masked_fill(torch.isinf(row_lse), 0.0).unsqueeze(-1)
        # delta = d(loss)/d(lse) folded in: dS = P * (dP - rowsum(O * dO) + dlse)
        delta = (o_grouped[:, :, :, rows].float() * grad_o_blk).sum(-1)
        if grad_lse_grouped is not None:
            delta = delta - grad_lse_grouped[:, :, :, rows]
        probs = torch.exp_(_scores(q_blk, k_blk, scale, mask).sub_(row_lse))
        dv[:, :, key_lo:key_hi] += torch.einsum("bhgmn,bhgmd->bhnd", probs, grad_o_blk)
        grad_probs = torch.matmul(grad_o_blk, v_blk.transpose(-1, -2).unsqueeze(2))
        grad_scores = probs.mul_(grad_probs.sub_(delta.unsqueeze(-1)))
        dq[:, :, :, rows] = torch.matmul(grad_scores, k_blk.unsqueeze(2)).mul_(scale)
        dk[:, :, key_lo:key_hi] += torch.einsum("bhgmn,bhgmd->bhnd", grad_scores, q_blk).mul_(scale)
    return dq.flatten(1, 2), dk.to(k.dtype), dv.to(v.dtype)
