"""LoRA adapters over any linear-like module (nn.Linear, Int8Linear, ...): y = base(x) + (alpha / r) * B(A(dropout(x))).

    names = apply_lora(model, rank=8, alpha=16, targets=("q_proj", "v_proj"))   # freezes everything else
    lora_state_dict(model)            # only the adapters' tensors ("...q_proj.lora_a", "...q_proj.lora_b")
    load_lora_state_dict(model, sd)   # exact keys and shapes, or a ValueError
    merge_lora(model)                 # folds B @ A into each base and removes the wrappers

A is drawn like nn.Linear's weight and B starts at zero, so a fresh adapter leaves the model's output unchanged.
The base module only needs `in_features`, `out_features` and a forward over (..., in_features); its parameters and
buffers are frozen (Int8Linear keeps its int8 weight as buffers, which never get a gradient anyway).
"""
import math

import torch
from torch import nn

from .common import check_positive

__all__ = ["LoRALinear", "apply_lora", "lora_state_dict", "load_lora_state_dict", "merge_lora", "lora_modules",
           "set_lora_enabled", "DEFAULT_TARGETS"]

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ADAPTER_KEYS = ("lora_a", "lora_b")


class LoRALinear(nn.Module):
    """A frozen linear-like `base` plus a trainable low-rank update (see the module docstring).

    Args: base (has in_features, out_features), rank r >= 1, alpha > 0 (the update is scaled by alpha / r),
    dropout in [0, 1) on the adapter's input. The adapter's dtype and device follow the base's bias, weight or
    first tensor. `enabled = False` gives the base's output alone (the frozen reference model of RL).
    """

    def __init__(self, base, rank=8, alpha=16.0, dropout=0.0):
        super().__init__()
        for name in ("in_features", "out_features"):
            if not isinstance(getattr(base, name, None), int):
                raise TypeError(f"base must be a linear-like module with int {name}, got {type(base).__name__}")
        check_positive("rank", rank)
        check_positive("alpha", alpha, float)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.base, self.rank, self.alpha, self.scaling = base, rank, float(alpha), float(alpha) / rank
        for tensor in base.parameters():
            tensor.requires_grad_(False)
        reference = next((t for t in (*base.parameters(), *base.buffers()) if t.is_floating_point()), None)
        dtype = getattr(base, "dtype", None) if isinstance(getattr(base, "dtype", None), torch.dtype) else None
        dtype = dtype or (reference.dtype if reference is not None else torch.get_default_dtype())
        device = reference.device if reference is not None else None
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=dtype, device=device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    def delta_weight(self):
        """The (out, in) update scaling * B @ A, float32."""
        return (self.lora_b.float() @ self.lora_a.float()) * self.scaling

    def forward(self, x):
        out = self.base(x)
        if not self.enabled:
            return out
        update = (self.dropout(x).to(self.lora_a.dtype) @ self.lora_a.T) @ self.lora_b.T
        return out + (update * self.scaling).to(out.dtype)

    def extra_repr(self):
        return f"rank={self.rank}, alpha={self.alpha}, enabled={self.enabled}"


def lora_modules(model):
    """{qualified name: LoRALinear} of `model`."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def _layer_index(name):
    """The decoder layer a module name sits in ("model.layers.7.self_attn.q_proj" -> 7), else None."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def apply_lora(model, *, rank=8, alpha=16.0, dropout=0.0, targets=DEFAULT_TARGETS, layers=None):
    """Wrap every module whose last name part is in `targets` (and, when `layers` is given, that sits in one of
    those decoder layer indices) in a LoRALinear, in place; freeze every other parameter. Returns the wrapped names.
    ValueError when nothing matches or the model has adapters already."""
    if isinstance(targets, str) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"targets must be a non-empty list of module names such as {list(DEFAULT_TARGETS)}, "
                         f"got {targets!r}")
    if layers is not None:
        layers = set(layers)
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
            raise ValueError(f"layers must be None or decoder layer indices (ints >= 0), got {sorted(layers)!r}")
    if lora_modules(model):
        raise ValueError("the model already holds LoRA adapters; apply_lora once per model")
    chosen = [(name, module) for name, module in model.named_modules()
              if name and name.rsplit(".", 1)[-1] in targets
              and (layers is None or _layer_index(name) in layers)]
    if not chosen:
        raise ValueError(f"no module of {type(model).__name__} matches targets {list(targets)}"
                         + ("" if layers is None else f" in layers {sorted(layers)}"))
    for tensor in model.parameters():
        tensor.requires_grad_(False)
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(module, rank, alpha, dropout))
    return [name for name, _ in chosen]


def set_lora_enabled(model, enabled):
    """Switch every adapter of `model` on or off (off: the base model's outputs)."""
    for module in lora_modules(model).values():
        module.enabled = bool(enabled)


def lora_state_dict(model):
    """The adapters' tensors (detached CPU copies), keyed by "<module name>.lora_a" / ".lora_b"."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} holds no LoRA adapter (apply_lora first)")
    return {f"{name}.{key}": getattr(module, key).detach().cpu().clone()
            for name, module in modules.items() for key in _ADAPTER_KEYS}


def load_lora_state_dict(model, state):
    """Copy `state` (lora_state_dict's layout) into the model's adapters; the keys and shapes must match exactly."""
    mine = {f"{name}.{key}": getattr(module, key) for name, module in lora_modules(model).items()
            for key in _ADAPTER_KEYS}
    if set(mine) != set(state):
        raise ValueError(f"the adapter state does not fit the model: only in the state "
                         f"{sorted(set(state) - set(mine))[:4]}, only in the model "
                         f"{sorted(set(mine) - set(state))[:4]}")
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in mine.items() if state[k].shape != v.shape]
    if wrong:
        raise ValueError(f"adapter shapes differ (name, state, model): {wrong[:4]}")
    with torch.no_grad():
        for key, tensor in mine.items():
            tensor.copy_(state[key])


def _merged(module):
    base, delta = module.base, module.delta_weight()
    if isinstance(base, nn.Linear):
        with torch.no_grad():
            base.weight += delta.to(base.weight.dtype)
        return base
    from ..nn import Int8Linear
    if isinstance(base, Int8Linear):  # dequantize, add, quantize again: the merged weight is rounded to int8
        weight = base.qweight.dequantize(torch.float32) + delta.to(base.qweight.scale.device)
        linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=weight.device, dtype=torch.float32)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if base.bias is not None:
                linear.bias.copy_(base.bias.float())
        merged = Int8Linear.from_linear(linear.to(base.dtype), mode=base.mode, group_size=base.group_size,
                                        backend=base.backend, cpu_cache=base.cpu_cache)
        return merged
    raise TypeError(f"merge_lora knows nn.Linear and Int8Linear bases, got {type(base).__name__}; keep the adapters "
                    "unmerged")


def merge_lora(model):
    """Fold every adapter into its base (nn.Linear: exact up to rounding; Int8Linear: requantized) and put the base
    back in the adapter's place. Returns the merged names."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} holds no LoRA adapter to merge")
    for name, module in modules.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _merged(module))
    return list(modules)
