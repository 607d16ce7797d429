"""The pre-norm transformer block the hierarchical model stacks, and its block-end landmark attention."""
import torch
import torch.nn.functional as F
from torch import nn

from ..nn import HybridAttention
from ..nn.common import _merge_heads
from ..ops.block_selection import selected_block_attention


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): (..., hidden) -> (..., hidden), three bias-free nn.Linear (int8-quantizable)."""

    def __init__(self, hidden_size, intermediate_size):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    """x + drop(attn(norm(x))), then + drop(mlp(norm(x))). `attention` is any of the hybridrag.nn self-attention
    layers (they all take position_ids= and key_mask= keywords).

    forward(x (B, T, hidden), position_ids (T,) int or None, key_mask (B, T) bool or None) -> (B, T, hidden)."""

    def __init__(self, attention, hidden_size, intermediate_size, dropout, norm_eps):
        super().__init__()
        self.attn_norm = nn.RMSNorm(hidden_size, eps=norm_eps)
        self.attention = attention
        self.mlp_norm = nn.RMSNorm(hidden_size, eps=norm_eps)
        self.mlp = SwiGLU(hidden_size, intermediate_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, position_ids=None, key_mask=None):
        x = x + self.dropout(self.attention(self.attn_norm(x), position_ids=position_ids, key_mask=key_mask))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


def block_end_landmarks(length, stride, device=None):
    """Positions stride - 1, 2 * stride - 1, ... < length: the last token of each block of `stride` tokens, so a
    landmark's state (causal) summarises its whole block. int64 (length // stride,)."""
    return torch.arange(stride - 1, max(length, stride - 1), stride, device=device)  # empty when length < stride


class BlockEndLandmarkAttention(HybridAttention):
    """HybridAttention whose landmarks are the block ends `block_end_landmarks(T, stride)` (HybridAttention's own
    landmark_stride puts them at block starts, 0, s, 2s, ..., which summarise nothing of their block). Every token
    sees its window and every earlier landmark; landmark rows are not global (global_queries=False)."""

    def __init__(self, hidden_size, num_heads, *, stride, **kwargs):
        super().__init__(hidden_size, num_heads, global_queries=False, **kwargs)
        self.block_stride = stride

    def landmarks_for(self, length, device=None):
        return block_end_landmarks(length, self.block_stride, device)

    def extra_repr(self):
        return super().extra_repr() + f", block_end_landmarks every {self.block_stride}"


class BlockSelectionAttention(BlockEndLandmarkAttention):
    """BlockEndLandmarkAttention plus block retrieval: each query also attends to every token of the `top_k`
    earlier blocks of `stride` tokens whose keys it scores highest (`selected_block_attention`: the Quest bound on
    each block's best key, chosen per query, so causal), in a softmax of its own, added through a per-token,
    per-head sigmoid gate (as Native Sparse Attention mixes its branches). The landmark summary says little of
    which token followed which; the selected tokens give a far block back whole.

    forward(hidden_states (B, T, hidden), position_ids, key_mask) -> (B, T, hidden). Memory: the landmark attention's
    plus the choices (B, Hkv, T, top_k) and a chunk's gathered keys and values. Plain PyTorch (no kernel yet): at
    T = 256 a training step of the recall benchmark's model takes about twice as long as without it."""

    def __init__(self, hidden_size, num_heads, *, stride, top_k, **kwargs):
        super().__init__(hidden_size, num_heads, stride=stride, **kwargs)
        self.top_k = top_k
        self.selection_gate = nn.Linear(hidden_size, num_heads)

    def forward(self, hidden_states, *, position_ids=None, kv_start=None, key_mask=None):
        q, k, v = self.project(hidden_states, position_ids)
        o = self.attend(q, k, v, kv_start=kv_start, key_mask=key_mask)
        selected = selected_block_attention(q, k, v, self.block_stride, self.top_k, key_mask=key_mask)
        gate = torch.sigmoid(self.selection_gate(hidden_states)).transpose(1, 2).unsqueeze(-1)  # (B, H, T, 1)
        return self.o_proj(_merge_heads(o + gate * selected))

    def extra_repr(self):
        return super().extra_repr() + f", top_k={self.top_k} selected blocks"
