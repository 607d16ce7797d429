"""Memory-efficient sliding-window attention in plain PyTorch, for CPU tensors.

Queries are processed in blocks of `block` rows; each block multiplies only against the keys inside its band, so
work grows with Tq x (window + block) and the largest temporary is (B, H, block, window + block) in float32.
Never a Tq x Tk matrix. Low-precision inputs are computed in float32 and cast back. The scale and the mask (as an
additive 0 / -inf bias) ride in the score matmul itself (`baddbmm`); a kv head's query heads share one matmul.
NaN/inf reach only the rows that see them (kernels/nonfinite.py).
"""
import torch

from ..autocast import without_autocast
from ..nonfinite import output_grad_products, poison_output, poison_scores, split_finite
from ..patterns import block_visibility, visible_key_range

CPU_BLOCK = 128


class _BlockBiases:
    """Additive mask (group * rows, keys) per block geometry; interior blocks share one, so it is built once."""

    def __init__(self, left, right, group, device):
        self.left, self.right, self.group, self.device = left, right, group, device
        self.cache = {}

    def __call__(self, pos_first, rows, key_lo, keys):
        geometry = (pos_first - key_lo, rows, keys)
        if geometry not in self.cache:
            visible = block_visibility(pos_first, rows, key_lo, keys, self.left, self.right, self.device)
            bias = torch.zeros(rows, keys, device=self.device).masked_fill_(~visible, float("-inf"))
            self.cache[geometry] = bias.repeat(self.group, 1)
        return self.cache[geometry]


def _blocks(tq, tk, left, right, block):
    """Yield (row_lo, row_hi, key_lo, key_hi) for each query block with a non-empty key range."""
    offset = tk - tq
    for row_lo in range(0, tq, block):
        row_hi = min(row_lo + block, tq)
        key_lo, key_hi = visible_key_range(row_lo + offset, row_hi - 1 + offset, left, right, tk)
        if key_hi > key_lo:
            yield row_lo, row_hi, key_lo, key_hi


def _grouped_rows(x, kv_heads, rows):
    """(B, H, T, D) -> float32 (B * Hkv, G * len(rows), D): a kv head's query heads stacked along the rows."""
    batch, heads, _, dim = x.shape
    return x[:, :, rows].float().reshape(batch * kv_heads, heads // kv_heads * (rows.stop - rows.start), dim)


def _ungroup_rows(x, batch, heads, rows, dim):
    """Inverse of `_grouped_rows`: (B * Hkv, G * M, D) -> (B, H, M, D)."""
    return x.reshape(batch, heads, rows.stop - rows.start, dim)


@without_autocast
def sliding_window_fwd_blockwise(q, k, v, left, right, scale, block=CPU_BLOCK):
    """q (B, H, Tq, D), k/v (B, Hkv, Tk, D) -> (o (B, H, Tq, D) in q's dtype, lse (B, H, Tq) float32)."""
    batch, heads, tq, dim = q.shape
    kv_heads, tk = k.shape[1], k.shape[2]
    group = heads // kv_heads
    out = torch.zeros(batch, heads, tq, dim, dtype=q.dtype, device=q.device)
    lse = torch.full((batch, heads, tq), float("-inf"), dtype=torch.float32, device=q.device)
    biases = _BlockBiases(left, right, group, q.device)
    for row_lo, row_hi, key_lo, key_hi in _blocks(tq, tk, left, right, block):
        rows, keys = slice(row_lo, row_hi), slice(key_lo, key_hi)
        bias = biases(row_lo + tk - tq, row_hi - row_lo, key_lo, key_hi - key_lo)
        k_blk, k_bad = split_finite(k[:, :, keys].float().flatten(0, 1))  # (B * Hkv, N, D)
        v_blk, v_bad = split_finite(v[:, :, keys].float().flatten(0, 1))
        q_blk, q_bad = split_finite(_grouped_rows(q, kv_heads, rows))
        scores = torch.baddbmm(bias, q_blk, k_blk.transpose(1, 2), alpha=scale)
        scores = poison_scores(scores, bias, q_bad, k_bad)
        row_max = scores.amax(dim=-1, keepdim=True)
        row_max.masked_fill_(torch.isinf(row_max), 0.0)  # rows that see nothing in this block keep weights 0
        weights = scores.sub_(row_max).exp_()
        total = weights.sum(dim=-1, keepdim=True)
        o_blk = poison_output(torch.bmm(weights, v_blk), bias, v_bad).div_(total.clamp(min=torch.finfo(torch.float32).tiny))
        out[:, :, rows] = _ungroup_rows(o_blk, batch, heads, rows, dim)
        lse[:, :, rows] = (row_max + torch.log(total)).reshape(batch, heads, row_hi - row_lo)
    return out, lse


@without_autocast
def sliding_window_bwd_blockwise(q, k, v, o, lse, grad_o, grad_lse, left, right, scale, block=CPU_BLOCK):
    """Gradients (dq, dk, dv) of o and lse, recomputing the probabilities block by block from lse.

    grad_lse may be None. dk/dv are accumulated in float32 buffers of k's size, summed over each kv head's group.
    """
    batch, heads, tq, dim = q.shape
    kv_heads, tk = k.shape[1], k.shape[2]
    group = heads // kv_heads
    dq = torch.zeros(batch, heads, tq, dim, dtype=q.dtype, device=q.device)
    dk = torch.zeros(batch * kv_heads, tk, dim, dtype=torch.float32, device=q.device)
    dv = torch.zeros_like(dk)
    biases = _BlockBiases(left, right, group, q.device)
    for row_lo, row_hi, key_lo, key_hi in _blocks(tq, tk, left, right, block):
        rows, keys = slice(row_lo, row_hi), slice(key_lo, key_hi)
        bias = biases(row_lo + tk - tq, row_hi - row_lo, key_lo, key_hi - key_lo)
        q_blk = split_finite(_grouped_rows(q, kv_heads, rows))[0]
        grad_o_blk = _grouped_rows(grad_o, kv_heads, rows)
        k_blk = split_finite(k[:, :, keys].float().flatten(0, 1))[0]
        v_blk = split_finite(v[:, :, keys].float().flatten(0, 1))[0]
        row_lse = lse[:, :, rows].reshape(batch * kv_heads, group * (row_hi - row_lo), 1)
        row_lse = row_lse.masked_fill(torch.isinf(row_lse), 0.0)  # rows that see no key: all scores are -inf
        # dS = P * (dP - delta) with delta = rowsum(O * dO) - dlse: the lse gradient folds into delta.
        delta = output_grad_products(_grouped_rows(o, kv_heads, rows), grad_o_blk).sum(-1, keepdim=True)
        if grad_lse is not None:
            delta -= grad_lse[:, :, rows].reshape(batch * kv_heads, group * (row_hi - row_lo), 1)
        probs = torch.baddbmm(bias, q_blk, k_blk.transpose(1, 2), alpha=scale).sub_(row_lse).exp_()
        dv[:, keys] += torch.bmm(probs.transpose(1, 2), grad_o_blk)
        grad_scores = probs.mul_(torch.bmm(grad_o_blk, v_blk.transpose(1, 2)).sub_(delta))
        dq[:, :, rows] = _ungroup_rows(torch.bmm(grad_scores, k_blk).mul_(scale), batch, heads, rows, dim)
        dk[:, keys] += torch.bmm(grad_scores.transpose(1, 2), q_blk).mul_(scale)
    shape = (batch, kv_heads, tk, dim)
    return dq, dk.view(shape).to(k.dtype), dv.view(shape).to(v.dtype)
