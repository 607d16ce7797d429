"""Passage KV caches: each retrieved passage's keys and values computed once, after the prompt's shared prefix, and
stitched in front of a question at answer time (the TurboRAG idea, with APE's shared prefix and the hybrid pattern
inside each passage).

Retrieved passages barely attend to each other, so the prompt's attention is close to block-diagonal: a passage's
KV cache does not depend on the passages around it. `encode_passage` runs a passage after the prefix's cache (or
alone) under the hybrid pattern (a sliding window, the first tokens as sinks, optional landmarks): it attends to the
prefix and to itself, at positions P .. P + L - 1, and keeps its own rows. Encoded after the prefix, each passage
shares the prompt's attention sink (its first tokens) instead of growing one of its own at position 0, which a
question over k passages would otherwise see k times. `stitch` lays the cached parts end to end and re-rotates
each one's keys from where it was encoded to its offset (RoPE composes: R(p + o) = R(o) R(p)), so the question rows
that follow see every passage at the position it holds in the prompt, as StreamingLLM re-rotates its cache. Only
the question and answer rows are computed at answer time: prefill work falls from the whole prompt to the question.

Memory: a passage of L tokens holds 2 x layers x Hkv x L x D elements in the model's dtype (SmolLM2-135M, float32:
30 layers x 3 kv heads x 64 x 2 x 4 bytes = 46 KiB a token); the store (passage_store) bounds how many are kept.
"""
import contextlib
import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..integrations.transformers import SETTINGS_ATTR, HybridAttentionSettings, _is_attention_module
from .growing_cache import GrowingCache, GrowingLayer


@dataclass
class PassageKV:
    """One passage's cache: keys and values per layer, each (1, Hkv, L, D), keys rotated for positions start ..
    start + L - 1 (start: the length of the prefix it was encoded after)."""

    keys: list
    values: list
    start: int = 0

    @property
    def length(self):
        return self.keys[0].shape[2]

    def head(self, n):
        """The PassageKV of the passage's first n tokens (causal: their rows do not depend on the later ones)."""
        return PassageKV([k[:, :, :n] for k in self.keys], [v[:, :, :n] for v in self.values], self.start)

    @property
    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


@contextlib.contextmanager
def passage_pattern(model, window, sinks, landmark_stride):
    """Inside the block every attention layer of `model` (attn_implementation="hybridrag") uses the passage pattern:
    the `window` most recent keys (-1 = all), the first `sinks` keys and keys 0, s, 2s, ... as landmarks."""
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation != "hybridrag" and (window != -1 or sinks or landmark_stride is not None):
        raise ValueError(f"the passage pattern (window={window}, sinks={sinks}, landmark_stride={landmark_stride}) "
                         f"runs on attn_implementation='hybridrag', but the model uses {implementation!r}: switch "
                         "it, or set attention.window_size=-1, num_landmark_tokens=0, landmark_stride=None")
    settings = HybridAttentionSettings(window=window, landmark_stride=landmark_stride, sinks=sinks,
                                       global_queries=False)
    modules = [m for m in model.modules() if _is_attention_module(m)]
    saved = [getattr(m, SETTINGS_ATTR, None) for m in modules]
    for module in modules:
        setattr(module, SETTINGS_ATTR, settings)
    try:
        yield
    finally:
        for module, previous in zip(modules, saved):
            setattr(module, SETTINGS_ATTR, previous)


def cache_argument(model):
    """The name forward takes a KV cache under: `cache` from transformers 5.24, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def encode_passage(model, token_ids, prefix=None):
    """PassageKV of token_ids (1, L) run through `model` alone (positions 0 .. L - 1) or after `prefix` (a PassageKV
    starting at 0: the passage attends to it, sits at positions P .. P + L - 1, and keeps only its own rows).
    Memory: the prefix's cache and the passage's."""
    if prefix is not None and prefix.start != 0:
        raise ValueError(f"prefix must start at position 0, got start={prefix.start}")
    cache = DynamicCache() if prefix is None else DynamicCache(ddp_cache_data=list(zip(prefix.keys, prefix.values)))
    start = 0 if prefix is None else prefix.length
    with torch.no_grad():
        model(input_ids=token_ids, use_cache=True, **{cache_argument(model): cache})
    return PassageKV([layer.keys[:, :, start:].clone() for layer in cache.layers],
                     [layer.values[:, :, start:].clone() for layer in cache.layers], start)


def _rotation(rotary, shifts, like):
    """(cos, sin), each (1, 1, L, D) in like's dtype, that re-rotate keys by `shifts` (L,) positions."""
    cos, sin = rotary(like, shifts[None].to(like.device))  # (1, L, D)
    return cos[:, None].to(like.dtype), sin[:, None].to(like.dtype)


def _rotate_into(keys, cos, sin, out):
    """out = keys * cos + rotate_half(keys) * sin (RoPE's rotation, rotate_half(x) = (-x2, x1)), written half by
    half into out: no rotated copy and no concatenation."""
    half = keys.shape[-1] // 2
    first, second = keys[..., :half], keys[..., half:]
    torch.mul(first, cos[..., :half], out=out[..., :half]).sub_(second * sin[..., :half])
    torch.mul(second, cos[..., half:], out=out[..., half:]).add_(first * sin[..., half:])


def shift_keys(keys, offset, rotary):
    """keys (1, Hkv, L, D) rotated for positions p, re-rotated for positions p + offset (RoPE: R(p + o) = R(o) R(p))."""
    if offset == 0:
        return keys
    out = torch.empty_like(keys)
    _rotate_into(keys, *_rotation(rotary, torch.full((keys.shape[2],), offset, dtype=torch.long), keys), out)
    return out


def check_rotary(model):
    """The model's rotary embedding, refusing one whose rotation does not compose exactly (scaled attention)."""
    rotary = getattr(getattr(model, "model", model), "rotary_emb", None)
    if rotary is None:
        raise ValueError(f"{type(model).__name__} has no model.rotary_emb: passage caches need a RoPE model "
                         "(Llama, Mistral, Qwen2, ...); set passage_cache=False")
    if getattr(rotary, "attention_scaling", 1.0) != 1.0:
        raise ValueError(f"the model's RoPE scales attention by {rotary.attention_scaling}: re-rotated passage keys "
                         "would be scaled twice; set passage_cache=False")
    return rotary


def stitch(parts, rotary, room=0):
    """A GrowingCache holding the PassageKVs `parts` end to end, each re-rotated to its offset (one rotation for
    every layer: the shifts are the same in each), with room for `room` more positions (the question and the
    answer) before a layer's buffer grows. Memory: per layer, buffers of total + room positions; the rotation's
    cos and sin (T x D each) and one layer's keys laid end to end, on the way."""
    shifts, total = [], 0
    for part in parts:
        shifts.append(torch.full((part.length,), total - part.start, dtype=torch.long))
        total += part.length
    shifts = torch.cat(shifts)
    like = parts[0].keys[0]
    rotation = _rotation(rotary, shifts, like) if bool(shifts.any()) else None
    shape = (*like.shape[:2], total + room, like.shape[-1])
    layers = []
    for layer in range(len(parts[0].keys)):
        key_buffer, value_buffer = like.new_empty(shape), like.new_empty(shape)
        torch.cat([p.values[layer] for p in parts], dim=2, out=value_buffer[:, :, :total])
        keys = [p.keys[layer] for p in parts]
        if rotation is None:
            torch.cat(keys, dim=2, out=key_buffer[:, :, :total])
        else:
            _rotate_into(torch.cat(keys, dim=2), *rotation, key_buffer[:, :, :total])
        layers.append(GrowingLayer.over(key_buffer, value_buffer, total))
    return GrowingCache(layers)
