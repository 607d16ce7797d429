"""Passage KV caches: each retrieved passage's keys and values computed once, on its own, and stitched in front of a
question at answer time (the TurboRAG idea, with the hybrid pattern inside each passage).

Retrieved passages barely attend to each other, so the prompt's attention is close to block-diagonal: a passage's
KV cache does not depend on the passages around it. `encode_passage` runs a passage alone at positions 0 .. L - 1
under the hybrid pattern (a sliding window, the first tokens as sinks, optional landmarks); `stitch` lays the
cached passages end to end and re-rotates each one's keys by its offset (RoPE composes: R(p + o) = R(o) R(p)), so
the question rows that follow see every passage at the position it holds in the prompt, as StreamingLLM re-rotates
its cache. Only the question and answer rows are computed at answer time: prefill work falls from the whole
prompt to the question.

Memory: a passage of L tokens holds 2 x layers x Hkv x L x D elements in the model's dtype (SmolLM2-135M, float32:
30 layers x 3 kv heads x 64 x 2 x 4 bytes = 46 KiB a token); the store keeps at most `capacity` passages.
"""
import contextlib
import hashlib
import inspect
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..integrations.transformers import SETTINGS_ATTR, HybridAttentionSettings, _is_attention_module


@dataclass
class PassageKV:
    """One passage's cache: keys and values per layer, each (1, Hkv, L, D), keys rotated for positions 0 .. L - 1."""

    keys: list
    values: list

    @property
    def length(self):
        return self.keys[0].shape[2]

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


def encode_passage(model, token_ids):
    """PassageKV of token_ids (1, L) run alone (positions 0 .. L - 1) through `model`. Memory: the cache."""
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=token_ids, use_cache=True, **{cache_argument(model): cache})
    return PassageKV([layer.keys.clone() for layer in cache.layers], [layer.values.clone() for layer in cache.layers])


def _rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def shift_keys(keys, offset, rotary):
    """keys (1, Hkv, L, D) rotated for positions p, re-rotated for positions p + offset (RoPE: R(p + o) = R(o) R(p))."""
    if offset == 0:
        return keys
    positions = torch.full((1, keys.shape[2]), offset, dtype=torch.long, device=keys.device)
    cos, sin = rotary(keys, positions)  # (1, L, D)
    cos, sin = cos[:, None].to(keys.dtype), sin[:, None].to(keys.dtype)
    return keys * cos + _rotate_half(keys) * sin


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


def stitch(parts, rotary):
    """A DynamicCache holding the PassageKVs `parts` end to end, each re-rotated to its offset. Memory: one copy of
    every part's keys and values."""
    offsets, total = [], 0
    for part in parts:
        offsets.append(total)
        total += part.length
    layers = []
    for layer in range(len(parts[0].keys)):
        keys = torch.cat([shift_keys(p.keys[layer], o, rotary) for p, o in zip(parts, offsets)], dim=2)
        values = torch.cat([p.values[layer] for p in parts], dim=2)
        layers.append((keys, values))
    return DynamicCache(ddp_cache_data=layers)


class PassageKVStore:
    """A bounded store of PassageKVs for one model and pattern, least recently used evicted past `capacity`.

    Keys: a digest of the token ids, so a passage is computed once whatever document or question brings it.
    Thread-safe (one lock around the table; encoding runs outside it). `hits`, `misses`, `evictions` count.
    """

    def __init__(self, capacity):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        self.capacity = capacity
        self._table = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0
        self.encode_seconds = 0.0

    def __len__(self):
        return len(self._table)

    @property
    def nbytes(self):
        with self._lock:
            return sum(part.nbytes for part in self._table.values())

    @staticmethod
    def key(token_ids):
        return hashlib.sha256(token_ids.cpu().numpy().tobytes()).hexdigest()

    def get(self, model, token_ids, pattern):
        """The PassageKV of token_ids (1, L), encoded under `pattern` (passage_pattern's arguments) if not stored."""
        key = self.key(token_ids)
        with self._lock:
            part = self._table.get(key)
            if part is not None:
                self._table.move_to_end(key)
                self.hits += 1
                return part
            self.misses += 1
        start = time.perf_counter()
        with passage_pattern(model, *pattern):
            part = encode_passage(model, token_ids)
        with self._lock:
            self.encode_seconds += time.perf_counter() - start
            self._table[key] = part
            self._table.move_to_end(key)
            while len(self._table) > self.capacity:
                self._table.popitem(last=False)
                self.evictions += 1
        return part

    def clear(self):
        with self._lock:
            self._table.clear()

    def stats(self):
        return {"passages": len(self), "bytes": self.nbytes, "hits": self.hits, "misses": self.misses,
                "evictions": self.evictions, "encode_seconds": round(self.encode_seconds, 4)}
