"""TinyCausalLM: a small pre-norm causal transformer on hybridrag.nn.SlidingWindowAttention, for tests, examples
and the learned-retrieval benchmark. It has the trainer's model contract:

    model(input_ids (B, T), attention_mask (B, T) or None, labels (B, T) or None) -> {"logits" (B, T, V), "loss"}

The loss is the mean cross-entropy over the label tokens != -100, labels shifted one left (position t predicts
token t + 1), as transformers' causal LMs do.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ..nn import SlidingWindowAttention
from ..nn.common import _check_positive_int
from .data import IGNORE_INDEX


class _Block(nn.Module):
    def __init__(self, dim, heads, window, dropout):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = SlidingWindowAttention(dim, heads, window=window)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, key_mask):
        x = x + self.dropout(self.attention(self.norm1(x), key_mask=key_mask))
        return x + self.dropout(self.mlp(self.norm2(x)))


class TinyCausalLM(nn.Module):
    """Token + learned position embeddings, `layers` blocks, a final norm and an untied LM head.

    Args: vocab_size, dim (hidden size), layers, heads (dim // heads must be a head dim the kernels take, >= 16),
    max_len (positions), window (-1 = full causal attention, or the w most recent tokens), dropout.
    Padding anywhere (attention_mask 0) is never attended to.
    """

    def __init__(self, vocab_size, dim=64, layers=2, heads=4, max_len=128, window=-1, dropout=0.0):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("dim", dim), ("layers", layers), ("heads", heads),
                            ("max_len", max_len)):
            _check_positive_int(name, value)
        self.vocab_size, self.max_len = vocab_size, max_len
        self.embed = nn.Embedding(vocab_size, dim)
        self.position = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads, window, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.gradient_checkpointing = False

    def gradient_checkpointing_enable(self):
        self.gradient_checkpointing = True

    def forward(self, input_ids, attention_mask=None, labels=None):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(f"input_ids must be a (B, T) int64 tensor, got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        if input_ids.shape[1] > self.max_len:
            raise ValueError(f"input_ids has {input_ids.shape[1]} positions, more than max_len={self.max_len}")
        key_mask = None if attention_mask is None else attention_mask.bool()
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embed(input_ids) + self.position(positions)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, key_mask, use_reentrant=False)
            else:
                x = block(x, key_mask)
        logits = self.head(self.norm(x))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                          ignore_index=IGNORE_INDEX)
        return out
