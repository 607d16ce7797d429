"""Drop-in sparse global attention (Longformer / BigBird-style global tokens): a local window plus landmark tokens that
every token sees and that see every token, with optional learnable landmarks, in one `hr.hybrid_attention` call."""
import torch
from torch import nn

from hybridrag.kernels.patterns import resolve_window

from ..ops import hybrid_attention
from .common import (_check_backend, _check_flag, _check_hidden_states, _check_non_negative_int,
                     _check_optional_positive_int, _head_layout, _merge_heads, _qkvo_projections, _split_heads)
from .rotary import RotaryEmbedding

LANDMARK_INIT_STD = 0.02


def _check_position_ids(position_ids, batch, length):
    if not isinstance(position_ids, torch.Tensor):
        raise TypeError(f"position_ids must be a tensor, got {type(position_ids).__name__}")
    if position_ids.dtype.is_floating_point or position_ids.dtype.is_complex or position_ids.dtype == torch.bool:
        raise TypeError(f"position_ids must be an integer tensor, got dtype {position_ids.dtype}")
    shape = tuple(position_ids.shape)
    if not (shape == (length,) or (len(shape) == 2 and shape[0] in (1, batch) and shape[1] == length)):
        raise ValueError(f"position_ids must be ({batch}, {length}) or ({length},), got shape {shape}")


class SparseGlobalAttention(nn.Module):
    """Self-attention in which each token sees a local window plus a set of global landmark tokens, and each landmark
    token sees the whole sequence (global_queries=True). Causal (decoders) or bidirectional (encoders).

    Landmarks are tokens of the sequence at a stride (positions 0, s, 2s, ...), learnable landmark embeddings, or both.

    Learned landmarks (design): the G = num_learned_landmarks embeddings (parameter `landmark_embeddings`,
    (G, hidden_size), initialised from N(0, 0.02^2)) are prepended to the sequence as G extra tokens. They pass through
    the same q/k/v projections, sit at op positions 0..G-1 and are landmarks there, so their keys are seen by every
    token and their queries are global rows that see every key; the stride landmarks, if any, sit at G + 0, G + s, ...
    One `hr.hybrid_attention` call over the G + T tokens does it all, with `window` as the local window; the G landmark
    rows are stripped from the output (or returned with return_landmarks=True).
    - Within one layer the learned landmarks' keys and values come from their states only (the embeddings, or
      `landmark_states` passed in), so what they gather from the sequence reaches the tokens in the *next* layer:
      carry the landmark rows between layers as a residual stream of their own (BigBird / Longformer global tokens):

          lm = layer1.landmark_embeddings[None].expand(B, -1, -1)
          out1, lm_out = layer1(x, landmark_states=lm, return_landmarks=True)
          x, lm = x + out1, lm + lm_out
          out2 = layer2(x, landmark_states=lm)          # layer2 built with the same num_learned_landmarks

    - Causal: the learned landmarks come before every token, so their rows see only learned landmarks and never the
      sequence (anything else would show later tokens to earlier ones); they act as learned prefix ("sink") tokens.
      Stride landmarks still gather every earlier token and pass it on to later tokens.
    - RoPE: the learned landmarks take the G positions just before the first token (p0 - G .. p0 - 1, p0 = the first
      position id of the row), so the layer is unchanged by a shift of every position id, like plain RoPE attention.

    Args:
        hidden_size, num_heads, num_kv_heads, head_dim, rope, rope_base, bias, backend, device, dtype: as in
            `HybridAttention`.
        window: the local window, as in `hr.sliding_window_attention` (an int w needs causal=True; bidirectional
            needs a (left, right) tuple). It is over the G + T tokens, so the first tokens' windows may reach into
            the learned landmarks (seen anyway; each key counts once).
        landmark_stride: every s-th token of the sequence (0, s, 2s, ...) is a landmark.
        num_learned_landmarks: G learnable landmark embeddings (default 0). At least one of the two is needed (without
            landmarks use SlidingWindowAttention).
        causal: a token may not see later tokens.

    Shapes:
        forward(hidden_states (B, T, hidden_size), *, position_ids (B, T) or (T,) integer (default arange(T)),
                landmark_states (B or 1, G, hidden_size) or None (default: landmark_embeddings), return_landmarks=False,
                key_mask (B, T) bool or None: False hides a token from every query, padding anywhere; the learned
                landmarks are always seen)
        -> (B, T, hidden_size), or (that, landmark_out (B, G, hidden_size)) with return_landmarks=True.

    Memory and work:
        With L = G + ceil(T / s) landmarks, attention does O(B * H * D * ((G + T) * (window + L) + L * (G + T)))
        work and never builds a (G + T) x (G + T) matrix (except with the "reference" backend). Prepending copies the
        input once: (B, G + T, hidden_size), and q/k/v/o are over G + T tokens; the op holds the landmark keys/values
        (B, Hkv, L, D) and O(B * H * (G + T)) float32 statistics. The stride part grows as T^2 / s.
    """

    def __init__(self, hidden_size, num_heads, *, num_kv_heads=None, head_dim=None, window, landmark_stride=None,
                 num_learned_landmarks=0, causal=True, rope=True, rope_base=10000.0, bias=False, backend="auto",
                 device=None, dtype=None):
        super().__init__()
        num_kv_heads, head_dim = _head_layout(hidden_size, num_heads, num_kv_heads, head_dim, rope=rope)
        _check_flag("causal", causal)
        resolve_window(window, causal)
        _check_optional_positive_int("landmark_stride", landmark_stride)
        _check_non_negative_int("num_learned_landmarks", num_learned_landmarks)
        if landmark_stride is None and num_learned_landmarks == 0:
            raise ValueError("SparseGlobalAttention needs landmarks: give landmark_stride and/or num_learned_landmarks "
                             "> 0 (got landmark_stride=None, num_learned_landmarks=0); without landmarks use "
                             "SlidingWindowAttention")
        _check_backend(backend)
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.window = tuple(window) if isinstance(window, list) else window
        self.landmark_stride = landmark_stride
        self.num_learned_landmarks = num_learned_landmarks
        self.causal = causal
        self.backend = backend

        factory = {"device": device, "dtype": dtype}
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = _qkvo_projections(
            hidden_size, num_heads, num_kv_heads, head_dim, bias=bias, **factory)
        self.rotary = RotaryEmbedding(head_dim, base=rope_base, device=device) if rope else None
        if num_learned_landmarks:
            self.landmark_embeddings = nn.Parameter(torch.empty(num_learned_landmarks, hidden_size, **factory))
            nn.init.normal_(self.landmark_embeddings, std=LANDMARK_INIT_STD)
        else:
            self.register_parameter("landmark_embeddings", None)

    def extra_repr(self):
        return (f"hidden_size={self.hidden_size}, window={self.window!r}, landmark_stride={self.landmark_stride}, "
                f"num_learned_landmarks={self.num_learned_landmarks}, causal={self.causal}, "
                f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"backend={self.backend!r}")

    def landmarks_for(self, length, device=None):
        """Landmark positions of the op call for `length` tokens, in the extended (G + length) sequence: 0..G-1 for the
        learned landmarks, then G + 0, G + s, ... for the stride. An int stride when there are no learned ones."""
        groups = self.num_learned_landmarks
        if groups == 0:
            return self.landmark_stride
        learned = torch.arange(groups, device=device)
        if self.landmark_stride is None:
            return learned
        return torch.cat([learned, groups + torch.arange(0, length, self.landmark_stride, device=device)])

    def _landmark_states(self, landmark_states, hidden_states):
        batch = hidden_states.shape[0]
        groups = self.num_learned_landmarks
        if landmark_states is None:
            return self.landmark_embeddings.to(hidden_states.dtype)[None].expand(batch, -1, -1)
        if groups == 0:
            raise ValueError("landmark_states was given but the layer has num_learned_landmarks=0")
        if not isinstance(landmark_states, torch.Tensor):
            raise TypeError(f"landmark_states must be a tensor, got {type(landmark_states).__name__}")
        shape = tuple(landmark_states.shape)
        if len(shape) != 3 or shape[0] not in (1, batch) or shape[1:] != (groups, self.hidden_size):
            raise ValueError(f"landmark_states must be (1 or {batch}, {groups}, {self.hidden_size}) "
                             f"(batch, num_learned_landmarks, hidden_size), got shape {shape}")
        if landmark_states.dtype != hidden_states.dtype:
            raise TypeError(f"landmark_states has dtype {landmark_states.dtype} but hidden_states has "
                            f"{hidden_states.dtype}; pass one dtype")
        if landmark_states.device != hidden_states.device:
            raise ValueError(f"landmark_states is on {landmark_states.device} but hidden_states is on "
                             f"{hidden_states.device}")
        return landmark_states.expand(batch, -1, -1)

    def forward(self, hidden_states, *, position_ids=None, landmark_states=None, return_landmarks=False,
                key_mask=None):
        _check_hidden_states(hidden_states, self.hidden_size)
        _check_flag("return_landmarks", return_landmarks)
        batch, length, _ = hidden_states.shape
        device = hidden_states.device
        groups = self.num_learned_landmarks
        if groups:
            hidden_states = torch.cat([self._landmark_states(landmark_states, hidden_states), hidden_states], dim=1)
        elif landmark_states is not None:
            self._landmark_states(landmark_states, hidden_states)  # raises: no learned landmarks
        q = _split_heads(self.q_proj(hidden_states), self.num_heads, self.head_dim)  # over the G + T tokens
        k = _split_heads(self.k_proj(hidden_states), self.num_kv_heads, self.head_dim)
        v = _split_heads(self.v_proj(hidden_states), self.num_kv_heads, self.head_dim)
        if self.rotary is not None:
            if position_ids is None:
                position_ids = torch.arange(length, device=device)
            _check_position_ids(position_ids, batch, length)
            if groups:  # the learned landmarks sit just before the first token
                offsets = torch.arange(-groups, 0, device=position_ids.device)
                position_ids = torch.cat([position_ids[..., :1] + offsets, position_ids], dim=-1)
            q, k = self.rotary(q, k, position_ids)
        if key_mask is not None and groups:  # the learned landmarks are never padding
            if not isinstance(key_mask, torch.Tensor) or key_mask.shape != (batch, length):
                raise ValueError(f"key_mask must be a ({batch}, {length}) bool tensor (batch, tokens), got "
                                 f"{tuple(key_mask.shape) if isinstance(key_mask, torch.Tensor) else key_mask!r}")
            key_mask = torch.cat([key_mask.new_ones(batch, groups), key_mask], dim=1)
        o = hybrid_attention(q, k, v, self.window, landmarks=self.landmarks_for(length, device), global_queries=True,
                             causal=self.causal, key_mask=key_mask, backend=self.backend)
        rows = o if return_landmarks else o[:, :, groups:]
        out = self.o_proj(_merge_heads(rows))
        if return_landmarks:
            return out[:, groups:], out[:, :groups]
        return out
