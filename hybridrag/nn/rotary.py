"""Rotary position embedding (RoPE), the rotate-half form used by Llama, Mistral and Qwen.

For head_dim D and a position p, `inv_freq = 1 / base ** (arange(0, D, 2) / D)`, `freqs = p * inv_freq`,
`emb = cat(freqs, freqs)` and `x_rot = x * cos(emb) + rotate_half(x) * sin(emb)` with
`rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])`: numerically the same as transformers'
`apply_rotary_pos_emb` in float32.
"""
import torch
from torch import nn


def rotate_half(x):
    """Rotate half the last dim: (x1, x2) -> (-x2, x1), with x1, x2 the two halves of x's last dim."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _inv_freq(head_dim, base, device=None):
    """(head_dim // 2,) float32 inverse frequencies 1 / base ** (2i / head_dim)."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE applied to queries and keys.

    Args:
        head_dim: the per-head dimension D; must be even.
        base: the RoPE base (`rope_theta` in transformers' configs).

    forward(q, k, position_ids):
        q: (B, H, T, D), k: (B, Hkv, T, D), any dtype, any strides.
        position_ids: (B, T) or (T,), an integer tensor of absolute positions.
        Returns (q_rot, k_rot) with q's and k's shapes and dtypes. cos/sin and the rotation are computed in
        float32 and the results cast back, so low-precision inputs are rotated with float32 angles.

    Memory: cos/sin are (B, T, D) float32 (or (T, D) for 1-d position_ids), computed on each call from
    position_ids; nothing is cached, so memory does not grow with the longest sequence seen.
    `inv_freq` is a non-persistent float32 buffer (not in the state dict). If the module is cast to a low-precision
    dtype (`module.half()`), the buffer is cast too; forward then recomputes float32 frequencies rather than use
    the rounded ones.
    """

    def __init__(self, head_dim, base=10000.0, device=None):
        super().__init__()
        if isinstance(head_dim, bool) or not isinstance(head_dim, int):
            raise TypeError(f"head_dim must be an int, got {type(head_dim).__name__}")
        if head_dim <= 0 or head_dim % 2 != 0:
            raise ValueError(f"head_dim must be a positive even number for rotary embeddings, got {head_dim}")
        if isinstance(base, bool) or not isinstance(base, (int, float)) or not base > 0:
            raise ValueError(f"base must be a positive number, got {base!r}")
        self.head_dim = head_dim
        self.base = float(base)
        self.register_buffer("inv_freq", _inv_freq(head_dim, self.base, device=device), persistent=False)

    def extra_repr(self):
        return f"head_dim={self.head_dim}, base={self.base}"

    def _float32_inv_freq(self, device):
        if self.inv_freq.dtype == torch.float32 and not self.inv_freq.is_meta:
            return self.inv_freq.to(device)
        return _inv_freq(self.head_dim, self.base, device=device)

    def cos_sin(self, position_ids, device=None):
        """position_ids (B, T) or (T,) -> cos, sin of shape (B, T, D) or (T, D), float32."""
        device = position_ids.device if device is None else device
        freqs = position_ids.to(device=device, dtype=torch.float32)[..., None] * self._float32_inv_freq(device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def forward(self, q, k, position_ids):
        for name, x in (("q", q), ("k", k)):
            if x.dim() != 4:
                raise ValueError(f"{name} must be (B, heads, T, head_dim), got shape {tuple(x.shape)}")
            if x.shape[-1] != self.head_dim:
                raise ValueError(f"{name} has head_dim {x.shape[-1]}, expected {self.head_dim}")
        if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
            raise ValueError(f"k (B, Hkv, T, D) = {tuple(k.shape)} does not match q's batch and length "
                             f"{tuple(q.shape)}")
        if not isinstance(position_ids, torch.Tensor):
            raise TypeError(f"position_ids must be a tensor, got {type(position_ids).__name__}")
        if position_ids.dtype.is_floating_point or position_ids.dtype.is_complex or position_ids.dtype == torch.bool:
            raise TypeError(f"position_ids must be an integer tensor, got dtype {position_ids.dtype}")
        batch, _, length, _ = q.shape
        if position_ids.dim() == 1:
            ok = position_ids.shape[0] == length
        elif position_ids.dim() == 2:
            ok = position_ids.shape[1] == length and position_ids.shape[0] in (1, batch)
        else:
            ok = False
        if not ok:
            raise ValueError(f"position_ids must be ({batch}, {length}) or ({length},), "
                             f"got shape {tuple(position_ids.shape)}")

        cos, sin = self.cos_sin(position_ids, device=q.device)
        if cos.dim() == 3:  # (B, T, D) -> (B, 1, T, D), broadcast over heads
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q_rot = self._rotate(q, cos, sin)
        k_rot = self._rotate(k, cos, sin)
        return q_rot, k_rot

    @staticmethod
    def _rotate(x, cos, sin):
        x32 = x.float()
        return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)
