"""Gated cross attention from a sequence to retrieved segments, with a learned per-segment relevance bias."""
import torch
import torch.nn.functional as F
from torch import nn

from .common import (_check_backend, _check_flag, _check_hidden_states, _head_layout, _merge_heads, _qkvo_projections,
                     _split_heads)

CROSS_BACKENDS = ("auto", "reference")


class RetrievalCrossAttention(nn.Module):
    """The sequence attends to S retrieved segments of L tokens each; a learned gate decides how much of it enters the
    residual stream, and a learned relevance score per segment biases the attention towards useful segments.

    out = hidden_states + tanh(gate) * o_proj(attention(q_proj(hidden_states), k_proj(retrieved), v_proj(retrieved)))

    - Attention: non-causal cross attention over the flattened S * L retrieved tokens (no RoPE: the retrieved tokens
      are not positions of the sequence). Padding tokens (retrieved_mask False) are zeroed before the projections
      (so NaN/inf there cannot leak) and hidden from every query. A query row that sees no real token at all (every
      segment of its batch row is padding) gets an attention output of zeros, never NaN.
    - Relevance (log-sigmoid form): a linear scorer (`relevance_scorer`, nn.Linear(2 * hidden_size, 1)) reads the
      features [q_mean * s_mean, s_mean] * hidden_size^-0.5 of the query pooled q_mean and the segment's masked mean
      s_mean (float32), giving a logit r; every key of the segment gets the additive bias log(sigmoid(r)), so the
      segment's attention weights are multiplied by its relevance sigmoid(r) in (0, 1) before the softmax normalises.
      Segments are scored independently (unlike log-softmax over segments, which inside the token softmax would cancel
      to a plain logit shift): several segments can all be relevant, and an irrelevant one fades out. The features
      are never materialised ((B, T, S, hidden) would be large); the scorer is evaluated as two small matmuls.
      The scorer starts at zero: every segment gets sigmoid(0) = 1/2, a uniform bias that changes nothing.
      causal=True pools the query over tokens 0..t for row t (a running mean), so no output depends on later tokens
      (decoders); causal=False pools all T tokens (encoders).
    - Gate: tanh(gate) per channel, `gate` (hidden_size,) initialised at 0, so an untrained layer returns
      hidden_states exactly and only the gate gets gradients at the first step (then everything trains), as in
      Flamingo's gated cross attention.

    Args:
        hidden_size: model width; last dim of hidden_states and retrieved.
        num_heads: query heads H.
        num_kv_heads: key/value heads Hkv (default H); must divide H.
        head_dim: per-head dim D (default hidden_size // num_heads, which must then divide exactly).
        causal: how the query is pooled for the relevance (above); the attention itself is never causal.
        bias: bias on the q/k/v/o projections.
        backend: "auto" (torch.nn.functional.scaled_dot_product_attention with an additive mask: PyTorch's fused kernel
            for the device) or "reference" (the same written out with a dense softmax, for tests). There is no Triton
            or C++ kernel for this layer: the keys are the few retrieved tokens, not the sequence.
        device, dtype: for the weights.

    Shapes:
        forward(hidden_states (B, T, hidden_size), retrieved (B, S, L, hidden_size) in hidden_states' dtype,
                retrieved_mask (B, S, L) bool or None (True = real token; default all real), *, return_relevance=False)
        -> (B, T, hidden_size) in hidden_states' dtype, or (that, relevance (B, T, S) float32) with
        return_relevance=True: sigmoid(r), 0 for segments that are all padding (with causal=False the T rows are one
        broadcast row).

    Memory and work:
        Work O(B * H * T * S * L * D). Besides the projections (q (B, T, H*D); k, v (B, S*L, Hkv*D)) it holds the
        additive mask in q's dtype, (B, 1, T, S*L) when causal (per-row relevance) and (B, 1, 1, S*L) otherwise, and
        float32 running query means (B, T, hidden_size) when causal. scaled_dot_product_attention never builds the
        (B, H, T, S*L) score matrix in its fused kernels, but its math fallback (and the "reference" backend) does:
        fine here because S * L (retrieved tokens) is small, which this layer assumes.
    """

    def __init__(self, hidden_size, num_heads, *, num_kv_heads=None, head_dim=None, causal=True, bias=False,
                 backend="auto", device=None, dtype=None):
        super().__init__()
        num_kv_heads, head_dim = _head_layout(hidden_size, num_heads, num_kv_heads, head_dim, kernel_head_dim=False)
        _check_flag("causal", causal)
        _check_backend(backend, CROSS_BACKENDS)
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.causal = causal
        self.backend = backend

        factory = {"device": device, "dtype": dtype}
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = _qkvo_projections(
            hidden_size, num_heads, num_kv_heads, head_dim, bias=bias, **factory)
        self.relevance_scorer = nn.Linear(2 * hidden_size, 1, **factory)
        nn.init.zeros_(self.relevance_scorer.weight)
        nn.init.zeros_(self.relevance_scorer.bias)
        self.gate = nn.Parameter(torch.zeros(hidden_size, **factory))

    def extra_repr(self):
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, causal={self.causal}, backend={self.backend!r}")

    def _check_inputs(self, hidden_states, retrieved, retrieved_mask):
        _check_hidden_states(hidden_states, self.hidden_size)
        if not isinstance(retrieved, torch.Tensor):
            raise TypeError(f"retrieved must be a tensor, got {type(retrieved).__name__}")
        batch = hidden_states.shape[0]
        shape = tuple(retrieved.shape)
        if len(shape) != 4 or shape[0] != batch or shape[3] != self.hidden_size or shape[1] == 0 or shape[2] == 0:
            raise ValueError(f"retrieved must be ({batch}, S, L, {self.hidden_size}) (batch, segments, segment length, "
                             f"hidden_size) with S, L >= 1, got shape {shape}")
        if retrieved.dtype != hidden_states.dtype:
            raise TypeError(f"retrieved has dtype {retrieved.dtype} but hidden_states has {hidden_states.dtype}; "
                            "pass one dtype")
        if retrieved.device != hidden_states.device:
            raise ValueError(f"retrieved is on {retrieved.device} but hidden_states is on {hidden_states.device}")
        if retrieved_mask is None:
            return torch.ones(shape[:3], dtype=torch.bool, device=retrieved.device)
        if not isinstance(retrieved_mask, torch.Tensor):
            raise TypeError(f"retrieved_mask must be a bool tensor or None, got {type(retrieved_mask).__name__}")
        if retrieved_mask.dtype != torch.bool:
            raise TypeError(f"retrieved_mask must be a bool tensor (True = real token), "
                            f"got dtype {retrieved_mask.dtype}")
        if tuple(retrieved_mask.shape) != shape[:3]:
            raise ValueError(f"retrieved_mask must have shape {shape[:3]} (batch, segments, segment length) like "
                             f"retrieved, got {tuple(retrieved_mask.shape)}")
        if retrieved_mask.device != retrieved.device:
            raise ValueError(f"retrieved_mask is on {retrieved_mask.device} but retrieved is on {retrieved.device}")
        return retrieved_mask

    def relevance_logits(self, hidden_states, retrieved, retrieved_mask):
        """Scorer logits r, float32 (B, T, S) when causal else (B, 1, S). retrieved must already be zero where
        retrieved_mask is False."""
        hidden = self.hidden_size
        counts = retrieved_mask.sum(dim=-1, keepdim=True).clamp(min=1)  # (B, S, 1)
        segment_mean = retrieved.float().sum(dim=2) / counts  # (B, S, hidden)
        query = hidden_states.float()
        if self.causal:  # running mean over tokens 0..t
            steps = torch.arange(1, query.shape[1] + 1, device=query.device, dtype=torch.float32)
            query_mean = query.cumsum(dim=1) / steps[:, None]  # (B, T, hidden)
        else:
            query_mean = query.mean(dim=1, keepdim=True)  # (B, 1, hidden)
        weight = self.relevance_scorer.weight.float()[0] * hidden ** -0.5
        w_product, w_segment = weight[:hidden], weight[hidden:]
        # linear scorer over [q_mean * s_mean, s_mean] without the (B, T, S, 2 * hidden) features
        logits = (query_mean * w_product) @ segment_mean.transpose(1, 2)  # (B, T or 1, S)
        return logits + (segment_mean @ w_segment)[:, None, :] + self.relevance_scorer.bias.float()

    def forward(self, hidden_states, retrieved, retrieved_mask=None, *, return_relevance=False):
        retrieved_mask = self._check_inputs(hidden_states, retrieved, retrieved_mask)
        _check_flag("return_relevance", return_relevance)
        batch, length, _ = hidden_states.shape
        _, segments, seg_len, _ = retrieved.shape
        keys_len = segments * seg_len
        retrieved = retrieved.masked_fill(~retrieved_mask[..., None], 0)  # padding cannot leak NaN/inf
        logits = self.relevance_logits(hidden_states, retrieved, retrieved_mask)  # (B, T or 1, S)

        q = _split_heads(self.q_proj(hidden_states), self.num_heads, self.head_dim)
        flat = retrieved.view(batch, keys_len, self.hidden_size)
        k = _split_heads(self.k_proj(flat), self.num_kv_heads, self.head_dim)
        v = _split_heads(self.v_proj(flat), self.num_kv_heads, self.head_dim)

        # additive mask (B, 1, T or 1, S*L): log(sigmoid(r)) on real tokens, -inf on padding; a batch row with no real
        # token is unmasked (any finite row avoids NaN) and its output zeroed below.
        empty = ~retrieved_mask.flatten(1).any(dim=1)  # (B,)
        visible = retrieved_mask | empty[:, None, None]  # (B, S, L)
        bias = F.logsigmoid(logits)[..., None].expand(-1, -1, -1, seg_len)  # (B, T or 1, S, L)
        mask = bias.masked_fill(~visible[:, None], float("-inf")).reshape(batch, 1, -1, keys_len).to(q.dtype)
        if self.backend == "reference":
            group = self.num_heads // self.num_kv_heads
            k_full, v_full = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            scores = (q @ k_full.transpose(-1, -2)) * self.head_dim ** -0.5 + mask
            o = torch.softmax(scores, dim=-1) @ v_full
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.num_kv_heads != self.num_heads)
        o = o.masked_fill(empty[:, None, None, None], 0)
        attn = self.o_proj(_merge_heads(o))
        out = hidden_states + torch.tanh(self.gate).to(attn.dtype) * attn
        if not return_relevance:
            return out
        relevance = torch.sigmoid(logits).masked_fill(~retrieved_mask.any(dim=-1)[:, None, :], 0)
        return out, relevance.expand(batch, length, segments)
