"""Drop-in sliding-window self-attention layer: q/k/v/o projections, optional RoPE, `hr.sliding_window_attention`."""
import torch
from torch import nn

from hybridrag.kernels.patterns import resolve_window

from ..ops import sliding_window_attention
from ..ops.backend import BACKENDS
from ..ops.validation import MAX_HEAD_DIM, MIN_HEAD_DIM
from .rotary import RotaryEmbedding


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


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
        _check_positive_int("hidden_size", hidden_size)
        _check_positive_int("num_heads", num_heads)
        if num_kv_heads is None:
            num_kv_heads = num_heads
        _check_positive_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")
        explicit_head_dim = head_dim is not None
        if head_dim is None:
            if hidden_size % num_heads != 0:
                raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}) "
                                 f"when head_dim is not given")
            head_dim = hidden_size // num_heads
        _check_positive_int("head_dim", head_dim)
        if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
            raise ValueError(f"head_dim must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}] for the attention kernels, "
                             f"got {head_dim}" + ("" if explicit_head_dim else
                                                  f" (hidden_size {hidden_size} // num_heads {num_heads})"))
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__} ({causal!r})")
        if not isinstance(rope, bool):
            raise TypeError(f"rope must be a bool, got {type(rope).__name__} ({rope!r})")
        if rope and head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even when rope=True, got {head_dim}")
        resolve_window(window, causal)  # the op's own check: raises TypeError/ValueError naming the window
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.window = tuple(window) if isinstance(window, list) else window
        self.causal = causal
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.backend = backend

        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias, **factory)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias, **factory)
        self.rotary = RotaryEmbedding(head_dim, base=rope_base, device=device) if rope else None

    def extra_repr(self):
        return (f"hidden_size={self.hidden_size}, window={self.window!r}, causal={self.causal}, "
                f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"backend={self.backend!r}")

    def forward(self, hidden_states, position_ids=None):
        if not isinstance(hidden_states, torch.Tensor):
            raise TypeError(f"hidden_states must be a tensor, got {type(hidden_states).__name__}")
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states must be (B, T, {self.hidden_size}), got shape "
                             f"{tuple(hidden_states.shape)}")
        batch, length, _ = hidden_states.shape
        # (B, T, H*D) -> (B, H, T, D) views with unit last stride; the op takes any such strides.
        q = self.q_proj(hidden_states).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.rotary is not None:
            if position_ids is None:
                position_ids = torch.arange(length, device=hidden_states.device)
            q, k = self.rotary(q, k, position_ids)
        o = sliding_window_attention(q, k, v, self.window, causal=self.causal, backend=self.backend)
        return self.o_proj(o.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))
