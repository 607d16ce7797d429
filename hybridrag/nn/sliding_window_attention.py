"""Drop-in sliding-window self-attention layer: q/k/v/o projections, optional RoPE, `hr.sliding_window_attention`."""
import torch
from torch import nn

from hybridrag.kernels.patterns import resolve_window

from ..ops import sliding_window_attention
from .common import (_check_backend, _check_flag, _check_hidden_states, _check_rope, _head_layout, _merge_heads,
                     _qkvo_projections, _split_heads)
from .rotary import RotaryEmbedding


class SlidingWindowAttention(nn.Module):
    """Multi-head (or grouped-query) self-attention in which each token sees only a band of nearby tokens.

    Args:
        hidden_size: model width; input and output last dim.
        num_heads: query heads H.
        window: an int w (each token sees the w most recent tokens, itself included; needs causal=True; -1 = all
            earlier tokens) or a (left, right) tuple with -1 unbounded (token at p sees p - left .. p + right).
            The same meaning as `hr.sliding_window_attention` and `sliding_window` in transformers' Mistral configs.
        num_kv_heads: key/value heads Hkv (default H); must divide H. K/V are never expanded to H heads.
        causal: whether a token may not see later tokens (clips the right side of the band to 0).
        head_dim: per-head dim D (default hidden_size // num_heads, which must then divide exactly).
        bias: bias on all four projections (q, k, v, o).
        rope: apply rotary position embeddings (rotate-half, as in Llama/Mistral) to q and k.
        rope_base: RoPE base (`rope_theta`).
        backend: passed to the op: "auto" | "triton" | "cpu" | "reference".
        device, dtype: for the projection weights.

    Shapes:
        forward(hidden_states (B, T, hidden_size), position_ids (B, T) or (T,) integer, default arange(T))
        -> (B, T, hidden_size) in hidden_states' dtype. position_ids only feed RoPE (ignored when rope=False);
        the window is always over the T tokens of this call, in order.
        Inside: q (B, H, T, D), k/v (B, Hkv, T, D), passed to the op as strided views (no copies).

    Memory and work:
        Activations are O(B * T * hidden_size) (the projections, q/k/v/o and the RoPE temporaries).
        Attention does O(B * H * T * window * D) work and never builds a T x T matrix (with the "reference" backend
        it does: that backend is for tests). An unbounded window (-1) is full attention, O(B * H * T^2 * D) work.
    """

    def __init__(self, hidden_size, num_heads, window, num_kv_heads=None, causal=True, head_dim=None, bias=False,
                 rope=True, rope_base=10000.0, backend="auto", device=None, dtype=None):
        super().__init__()
        num_kv_heads, head_dim = _head_layout(hidden_size, num_heads, num_kv_heads, head_dim)
        _check_flag("causal", causal)
        _check_rope(rope, head_dim)
        resolve_window(window, causal)  # the op's own check: raises TypeError/ValueError naming the window
        _check_backend(backend)
        self.window = tuple(window) if isinstance(window, list) else window
        self.causal = causal
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.backend = backend

        self.q_proj, self.k_proj, self.v_proj, self.o_proj = _qkvo_projections(
            hidden_size, num_heads, num_kv_heads, head_dim, bias=bias, device=device, dtype=dtype)
        self.rotary = RotaryEmbedding(head_dim, base=rope_base, device=device) if rope else None

    def extra_repr(self):
        return (f"hidden_size={self.hidden_size}, window={self.window!r}, causal={self.causal}, "
                f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"backend={self.backend!r}")

    def forward(self, hidden_states, position_ids=None, *, key_mask=None):
        _check_hidden_states(hidden_states, self.hidden_size)
        length = hidden_states.shape[1]
        # (B, T, H*D) -> (B, H, T, D) views with unit last stride; the op takes any such strides.
        q = _split_heads(self.q_proj(hidden_states), self.num_heads, self.head_dim)
        k = _split_heads(self.k_proj(hidden_states), self.num_kv_heads, self.head_dim)
        v = _split_heads(self.v_proj(hidden_states), self.num_kv_heads, self.head_dim)
        if self.rotary is not None:
            if position_ids is None:
                position_ids = torch.arange(length, device=hidden_states.device)
            q, k = self.rotary(q, k, position_ids)
        o = sliding_window_attention(q, k, v, self.window, causal=self.causal, key_mask=key_mask, backend=self.backend)
        return self.o_proj(_merge_heads(o))
