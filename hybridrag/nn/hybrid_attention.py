"""Drop-in hybrid self-attention layer: a sliding window, landmark (global) tokens and learned memory tokens in one
fused `hr.hybrid_attention` call."""
import torch
from torch import nn

from hybridrag.kernels.patterns import resolve_window

from ..ops import hybrid_attention
from .common import (_check_backend, _check_flag, _check_hidden_states, _check_non_negative_int,
                     _check_optional_positive_int, _head_layout, _merge_heads, _qkvo_projections, _split_heads)
from .rotary import RotaryEmbedding

MEMORY_INIT_STD = 0.02


def evenly_spaced_landmarks(length, count, device=None):
    """`count` landmark positions spread evenly over `length` tokens: floor(i * length / n) for i < n, with
    n = min(count, length). Sorted, strictly increasing int64 (n,), starting at 0 (like a stride: 0, s, 2s, ...)."""
    count = min(count, length)
    return torch.div(torch.arange(count, device=device) * length, count, rounding_mode="floor")


class HybridAttention(nn.Module):
    """Multi-head (or grouped-query) self-attention over a sliding window, landmark tokens and learned memory tokens,
    all in one softmax computed by one fused `hr.hybrid_attention` call.

    A token at position p sees: the tokens in its window; every landmark token (landmarks after p are hidden when
    causal); when global_queries=True and p is itself a landmark, every token (causal still applies); and the
    num_memory_tokens learned memory tokens. Each key counts once (see DESIGN.md, "Attention patterns").

    Args:
        hidden_size: model width; input and output last dim.
        num_heads: query heads H.
        num_kv_heads: key/value heads Hkv (default H); must divide H. K/V are never expanded to H heads.
        head_dim: per-head dim D (default hidden_size // num_heads, which must then divide exactly); 16..256.
        window: an int w (the w most recent tokens, itself included; needs causal=True; -1 = all earlier tokens) or a
            (left, right) tuple with -1 unbounded: the meaning of `hr.sliding_window_attention`.
        landmark_stride: landmarks at positions 0, s, 2s, ... of the call's T tokens.
        num_landmarks: n landmarks spread evenly over the call's T tokens, at floor(i * T / n) for i < min(n, T)
            (computed from T at each call as a sorted LongTensor; `landmarks_for(T)` returns it). Give
            landmark_stride or num_landmarks, not both; neither means no landmarks.
        num_memory_tokens: M learned memory tokens every query sees. They are the parameters memory_k and memory_v
            of shape (1, Hkv, M, D), initialised from N(0, 0.02^2); they are keys/values directly (no projection,
            no RoPE: they have no position) and get gradients like any weight.
        causal: a token may not see later tokens (landmarks included).
        global_queries: a token on a landmark position sees every token (the gather half of landmark attention).
        rope, rope_base: rotate-half rotary embeddings on q and k (not on memory tokens), base `rope_theta`.
        bias: bias on all four projections (q, k, v, o).
        backend: passed to the op: "auto" | "triton" | "cpu" | "reference".
        device, dtype: for the weights (memory tokens included).

    Shapes:
        forward(hidden_states (B, T, hidden_size), *, position_ids (B, T) or (T,) integer (default arange(T)),
        kv_start (B,) integer or None, key_mask (B, T) bool or None) -> (B, T, hidden_size) in hidden_states' dtype.
        position_ids only feed RoPE; the window and the landmark positions are over the T tokens of the call, in
        order. kv_start[b] marks the first real token of row b (left padding): earlier tokens are seen by no query
        (landmarks among them included); key_mask[b, j] = False hides token j from every query (padding anywhere,
        e.g. input_ids.ne(pad)); memory tokens are always seen.
        Inside: q (B, H, T, D), k/v (B, Hkv, T, D) as strided views; memory tokens cast to k's dtype (a no-op unless
        under autocast or a mixed-dtype module).

    Memory and work:
        Activations are O(B * T * hidden_size). With L landmarks, G of them query rows (G = L when global_queries),
        attention does O(B * H * D * (T * (window + L + M) + G * T)) work; besides q/k/v/o it holds the gathered
        landmark and memory keys/values (B, Hkv, L + M, D) and O(B * H * T) float32 softmax statistics, and never a
        T x T matrix (except with the "reference" backend, which is for tests). A stride s gives L = ceil(T / s), so
        the landmark part grows as T^2 / s: pick s that grows with T, or num_landmarks, for long sequences.
    """

    def __init__(self, hidden_size, num_heads, *, num_kv_heads=None, head_dim=None, window, landmark_stride=None,
                 num_landmarks=None, num_memory_tokens=0, causal=True, global_queries=True, rope=True,
                 rope_base=10000.0, bias=False, backend="auto", device=None, dtype=None):
        super().__init__()
        num_kv_heads, head_dim = _head_layout(hidden_size, num_heads, num_kv_heads, head_dim, rope=rope)
        _check_flag("causal", causal)
        _check_flag("global_queries", global_queries)
        resolve_window(window, causal)  # the op's own check: raises TypeError/ValueError naming the window
        _check_optional_positive_int("landmark_stride", landmark_stride)
        _check_optional_positive_int("num_landmarks", num_landmarks)
        if landmark_stride is not None and num_landmarks is not None:
            raise ValueError(f"give landmark_stride or num_landmarks, not both; got landmark_stride={landmark_stride} "
                             f"and num_landmarks={num_landmarks}")
        _check_non_negative_int("num_memory_tokens", num_memory_tokens)
        _check_backend(backend)
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.window = tuple(window) if isinstance(window, list) else window
        self.landmark_stride = landmark_stride
        self.num_landmarks = num_landmarks
        self.num_memory_tokens = num_memory_tokens
        self.causal = causal
        self.global_queries = global_queries
        self.backend = backend

        factory = {"device": device, "dtype": dtype}
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = _qkvo_projections(
            hidden_size, num_heads, num_kv_heads, head_dim, bias=bias, **factory)
        self.rotary = RotaryEmbedding(head_dim, base=rope_base, device=device) if rope else None
        if num_memory_tokens:
            shape = (1, num_kv_heads, num_memory_tokens, head_dim)
            self.memory_k = nn.Parameter(torch.empty(shape, **factory))
            self.memory_v = nn.Parameter(torch.empty(shape, **factory))
            self.reset_memory_tokens()
        else:
            self.register_parameter("memory_k", None)
            self.register_parameter("memory_v", None)

    def reset_memory_tokens(self):
        """Re-draw the memory tokens from N(0, MEMORY_INIT_STD^2)."""
        if self.memory_k is not None:
            nn.init.normal_(self.memory_k, std=MEMORY_INIT_STD)
            nn.init.normal_(self.memory_v, std=MEMORY_INIT_STD)

    def extra_repr(self):
        landmarks = (f"landmark_stride={self.landmark_stride}" if self.landmark_stride is not None else
                     f"num_landmarks={self.num_landmarks}")
        return (f"hidden_size={self.hidden_size}, window={self.window!r}, {landmarks}, "
                f"num_memory_tokens={self.num_memory_tokens}, causal={self.causal}, "
                f"global_queries={self.global_queries}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, backend={self.backend!r}")

    def landmarks_for(self, length, device=None):
        """The `landmarks` argument the op gets for a call over `length` tokens: None, the int stride, or the
        (min(num_landmarks, length),) int64 positions of num_landmarks."""
        if self.num_landmarks is not None:
            return evenly_spaced_landmarks(length, self.num_landmarks, device=device)
        return self.landmark_stride

    def forward(self, hidden_states, *, position_ids=None, kv_start=None, key_mask=None):
        q, k, v = self.project(hidden_states, position_ids)
        return self.o_proj(_merge_heads(self.attend(q, k, v, kv_start=kv_start, key_mask=key_mask)))

    def project(self, hidden_states, position_ids=None):
        """hidden_states (B, T, hidden) -> q (B, H, T, D), k and v (B, Hkv, T, D), rotary applied."""
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
        return q, k, v

    def attend(self, q, k, v, *, kv_start=None, key_mask=None):
        """The layer's attention over projected heads: (B, H, T, D) before o_proj."""
        length = q.shape[2]
        memory_k = memory_v = None
        if self.memory_k is not None:
            memory_k, memory_v = self.memory_k.to(k.dtype), self.memory_v.to(v.dtype)
        return hybrid_attention(q, k, v, self.window, landmarks=self.landmarks_for(length, q.device),
                                global_queries=self.global_queries, memory_k=memory_k, memory_v=memory_v,
                                causal=self.causal, kv_start=kv_start, key_mask=key_mask, backend=self.backend)
