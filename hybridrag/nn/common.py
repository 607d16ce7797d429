"""What the attention layers share: argument checks (metadata only), the q/k/v/o projections and the head reshapes."""
import torch
from torch import nn

from ..ops.backend import BACKENDS
from ..ops.validation import MAX_HEAD_DIM, MIN_HEAD_DIM


def check_positive(name, value, kind=int):
    """A config value that must be an int (kind=int) or a real number (kind=float) > 0, never a bool or NaN: else a
    ValueError naming `name`, what it must be and what it got (the configs of hybridrag.nn.lora and hybridrag.train
    share it)."""
    number = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, number) or not value > 0:
        raise ValueError(f"{name} must be {'an int' if kind is int else 'a number'} > 0, got {value!r}")


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


def _check_optional_positive_int(name, value):
    if value is not None:
        _check_positive_int(name, value)


def _check_non_negative_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def _check_flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")


def _check_rope(rope, head_dim):
    _check_flag("rope", rope)
    if rope and head_dim % 2 != 0:
        raise ValueError(f"head_dim must be even when rope=True, got {head_dim}")


def _head_layout(hidden_size, num_heads, num_kv_heads, head_dim, *, kernel_head_dim=True, rope=False):
    """Check the head layout shared by the attention layers; return (num_kv_heads, head_dim).

    kernel_head_dim: head_dim must lie in the attention kernels' range [MIN_HEAD_DIM, MAX_HEAD_DIM]."""
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
    if kernel_head_dim and not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}] for the attention kernels, "
                         f"got {head_dim}" + ("" if explicit_head_dim else
                                              f" (hidden_size {hidden_size} // num_heads {num_heads})"))
    _check_rope(rope, head_dim)
    return num_kv_heads, head_dim


def _check_backend(backend, allowed=BACKENDS):
    if backend not in allowed:
        raise ValueError(f"backend must be one of {allowed}, got {backend!r}")


def _check_hidden_states(hidden_states, hidden_size, name="hidden_states"):
    """A (B, T, hidden_size) floating-point tensor."""
    if not isinstance(hidden_states, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(hidden_states).__name__}")
    if hidden_states.dim() != 3 or hidden_states.shape[-1] != hidden_size:
        raise ValueError(f"{name} must be (B, T, {hidden_size}), got shape {tuple(hidden_states.shape)}")
    if not hidden_states.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {hidden_states.dtype}")


def _qkvo_projections(hidden_size, num_heads, num_kv_heads, head_dim, *, bias, device=None, dtype=None):
    """The four projections (q_proj, k_proj, v_proj, o_proj), created in that order: q (hidden -> H*D), k and v
    (hidden -> Hkv*D), o (H*D -> hidden). The layer assigns them to attributes of those names (the state_dict keys)."""
    factory = {"device": device, "dtype": dtype}
    return (nn.Linear(hidden_size, num_heads * head_dim, bias=bias, **factory),
            nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias, **factory),
            nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias, **factory),
            nn.Linear(num_heads * head_dim, hidden_size, bias=bias, **factory))


def _split_heads(x, heads, head_dim):
    """(B, T, heads*D) projection output -> (B, heads, T, D) view with unit last stride (no copy)."""
    return x.view(x.shape[0], x.shape[1], heads, head_dim).transpose(1, 2)


def _merge_heads(o):
    """(B, heads, T, D) attention output -> (B, T, heads*D), the o_proj input (a copy unless already laid out so)."""
    batch, heads, length, head_dim = o.shape
    return o.transpose(1, 2).reshape(batch, length, heads * head_dim)
