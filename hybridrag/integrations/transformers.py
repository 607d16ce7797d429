"""transformers integration: `attn_implementation="hybridrag"` runs any decoder model's attention on our kernels.

    from hybridrag.integrations.transformers import register, apply_hybrid_attention, capture_attention_mass
    register()                                        # once; then either
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="hybridrag")
    model.set_attn_implementation("hybridrag")        # or switch a loaded model
    apply_hybrid_attention(model, landmark_stride=64, num_memory_tokens=4)   # HybridAttention in one call

What runs: causal self-attention, each layer's own `sliding_window` (None = full causal), grouped-query heads without
expanding K/V, any 2-D padding mask (holes anywhere: left, right, or tokens after right padding; passed to the
kernels as `key_mask`), packed sequences (restarting `position_ids`, as `DataCollatorWithFlattening` makes them, or
flash-attn's `cu_seq_lens_q/k` keyword arguments; run as the kernels' varlen), KV caches (queries aligned to the end
of the keys; static caches are cut to the written keys), training, `torch.compile(fullgraph=True)` including
static-cache decoding, and `output_attentions=True` (through the dense reference, with its O(T^2) memory, up to
`OUTPUT_ATTENTIONS_LIMIT` bytes). Anything else the kernels cannot do exactly is refused with a ValueError that
names it: logit softcapping, attention dropout in training, attention sinks (`s_aux`), custom 4-D masks, other mask
patterns (chunked attention, bidirectional blocks), paged caches and non-causal modules. On CPU, a float32 model
without hybrid settings, padding or packing runs its prefill and decode steps through torch's sdpa
(`hybridrag.ops.hybrid.plain_causal_attention`: the tiled path's results and NaN/inf semantics).

Needs transformers >= 5.4 (the mask interface with `q_length`/`q_offset`; tested with 5.4.0, 5.23.0 and 5.24.0).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from packaging.version import Version
from torch import nn

from .._optional import import_optional

transformers = import_optional("transformers", "transformers>=5.4", extra="transformers")

from transformers import AttentionInterface  # noqa: E402
from transformers.masking_utils import (AttentionMaskInterface, bidirectional_mask_function,  # noqa: E402
                                        causal_mask_function)

from ..ops import hybrid_attention, hybrid_attention_weights  # noqa: E402
from ..ops.hybrid import plain_causal_attention  # noqa: E402
from .capture import AttentionMassRecord, active_capture, capture_attention_mass  # noqa: E402

MIN_TRANSFORMERS = "5.4"  # the mask interface passes q_length/q_offset (5.3 and earlier pass cache_position)
if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
    raise ImportError(f"hybridrag.integrations.transformers needs transformers >= {MIN_TRANSFORMERS}, "
                      f"found {transformers.__version__}")

NAME = "hybridrag"
SETTINGS_ATTR = "hybridrag_settings"  # per-attention-module HybridAttentionSettings, set by apply_hybrid_attention
_HOOK_ATTR = "_hybridrag_cache_hook"

# output_attentions=True forms the dense weights (B, H, Tq, Tk) through the reference path: refused above this many
# bytes per layer call. Raise it (hybridrag.integrations.transformers.OUTPUT_ATTENTIONS_LIMIT = ...) to allow more.
OUTPUT_ATTENTIONS_LIMIT = 2**30

# Keyword arguments that change the attention in ways the kernels do not compute: refused when not None.
_REFUSED_KWARGS = {
    "position_bias": "an additive position bias (relative attention bias)",
    "cache": "a paged KV cache (continuous batching)",
    "block_table": "a paged KV cache block table (continuous batching)",
}

__all__ = ["register", "apply_hybrid_attention", "capture_attention_mass", "AttentionMassRecord",
           "hybrid_attention_forward", "hybrid_attention_mask", "HybridAttentionSettings", "PackedSequences",
           "OUTPUT_ATTENTIONS_LIMIT"]


@dataclass(frozen=True)
class HybridAttentionSettings:
    """What `apply_hybrid_attention` attaches to each attention module (the memory tokens are its parameters).

    window: None keeps the layer's own `sliding_window` (None there = full causal); an int w (the w most recent
        keys, the query's own included) or -1 (full causal) replaces it.
    landmark_stride: None, or s: keys 0, s, 2s, ... (key indices, padding included) are seen by every later query.
    global_queries: a query sitting on a landmark position sees every earlier key.
    sinks: the first `sinks` keys are landmarks too (StreamingLLM's attention sinks), with or without a stride.
    """
    window: int = None
    landmark_stride: int = None
    global_queries: bool = True
    sinks: int = 0


@dataclass(frozen=True)
class PackedSequences:
    """What the mask function hands the attention function for packed inputs: (B, T) integer sequence ids, equal
    within a sequence (transformers' packed_sequence_mask)."""
    sequence_ids: torch.Tensor


def _refuse(what, fix):
    raise ValueError(f"attn_implementation='{NAME}' does not support {what}; {fix}")


def _check_supported(module, dropout, softcap, is_causal, s_aux, kwargs):
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", None)
    if causal is not True:
        _refuse(f"non-causal attention ({type(module).__name__} has is_causal={causal!r}: an encoder, cross-attention "
                "or bidirectional layer)", "use 'sdpa' or 'eager' for such models")
    if softcap is not None and softcap != 0:
        _refuse(f"attention logit softcapping (softcap={softcap!r}, e.g. Gemma2's attn_logit_softcapping)",
                "set the config's attn_logit_softcapping to None or use 'eager'")
    if dropout is not None and dropout > 0 and module.training:
        _refuse(f"attention dropout in training (dropout={dropout!r})",
                "set the config's attention_dropout to 0.0 or call model.eval()")
    if s_aux is not None:
        _refuse("attention sinks (s_aux, e.g. gpt-oss)", "use 'eager' for such models")
    for name, what in _REFUSED_KWARGS.items():
        if kwargs.get(name) is not None:
            _refuse(f"{what} ({name} was given)", "pass a 2-D padding mask instead, or use another attn_implementation")


def _keys_and_mask(attention_mask, key, value):
    """From the (B, L) padding mask: k/v cut to the L keys the mask covers (static caches), key_mask (B, L) bool."""
    if attention_mask is None:
        return key, value, None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        shape = tuple(attention_mask.shape) if hasattr(attention_mask, "shape") else type(attention_mask).__name__
        raise ValueError(f"attn_implementation='{NAME}' takes a 2-D (batch, keys) padding mask, got attention_mask "
                         f"{shape}; custom 4-D masks are not supported")
    if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
        raise TypeError(f"attention_mask must be a bool or integer 0/1 padding mask, got dtype {attention_mask.dtype}")
    batch, tk = key.shape[0], key.shape[2]
    if attention_mask.shape[0] != batch or attention_mask.shape[1] > tk:
        raise ValueError(f"attention_mask must have shape ({batch}, <= {tk}) (batch, keys), "
                         f"got {tuple(attention_mask.shape)}")
    length = attention_mask.shape[1]
    if length < tk:  # a static cache: the keys after the mask are slots not written yet
        key, value = key[:, :, :length], value[:, :, :length]
    return key, value, attention_mask.bool()


def _window(sliding_window, settings):
    window = settings.window if settings is not None and settings.window is not None else sliding_window
    if window is None:
        return -1
    if isinstance(window, bool) or not isinstance(window, int) or (window < 1 and window != -1):
        raise ValueError(f"sliding_window must be a positive int or None, got {window!r}")
    return window


def _landmarks(settings, key):
    """The settings' landmarks for keys (B, Hkv, Tk, D): the stride (an int), or with sinks the sorted positions."""
    if not settings.sinks:
        return settings.landmark_stride
    tk = key.shape[2]
    positions = torch.arange(min(settings.sinks, tk), device=key.device)
    if settings.landmark_stride is not None:
        positions = torch.cat([positions, torch.arange(0, tk, settings.landmark_stride, device=key.device)])
    return torch.unique(positions)  # sorted, no repeats


def _pattern(module, key, sliding_window, scaling):
    """hybrid_attention's keyword arguments for this module: window, landmarks, memory tokens, scale."""
    settings = getattr(module, SETTINGS_ATTR, None)
    pattern = dict(landmarks=None, global_queries=True, memory_k=None, memory_v=None, causal=True, scale=scaling)
    if settings is not None:
        pattern.update(landmarks=_landmarks(settings, key), global_queries=settings.global_queries)
        memory_k, memory_v = getattr(module, "memory_k", None), getattr(module, "memory_v", None)
        if memory_k is not None:
            pattern.update(memory_k=memory_k.to(key.dtype), memory_v=memory_v.to(key.dtype))
    return _window(sliding_window, settings), pattern


def _packed_offsets(attention_mask, kwargs, query):
    """(cu_seqlens_q, cu_seqlens_k, max_q, max_k) of packed inputs, or None when the inputs are not packed."""
    if kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None:
        if query.shape[0] != 1:
            raise ValueError(f"cu_seq_lens_q/cu_seq_lens_k describe one packed row, got a batch of {query.shape[0]}")
        return (kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k"), kwargs.get("max_length_q"),
                kwargs.get("max_length_k"))
    if not isinstance(attention_mask, PackedSequences):
        return None
    ids = attention_mask.sequence_ids
    batch, length = ids.shape
    starts = torch.ones_like(ids, dtype=torch.bool)  # each batch row starts a sequence of its own
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    offsets = torch.cat([starts.flatten().nonzero().flatten(),
                         torch.tensor([batch * length], device=ids.device)]).to(torch.int32)
    return offsets, offsets, None, None


def _packed_forward(query, key, value, offsets, window, pattern):
    """Packed rows as one varlen call: (B, H, T, D) -> (1, H, B * T, D) (a copy when B > 1) and back."""
    batch, heads, length, dim = query.shape
    if batch > 1:
        query, key, value = (t.transpose(0, 1).reshape(1, t.shape[1], batch * length, dim)
                             for t in (query, key, value))
    cu_q, cu_k, max_q, max_k = offsets
    out = hybrid_attention(query, key, value, window, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                           max_seqlen_k=max_k, **pattern)
    return out.reshape(heads, batch, length, dim).permute(1, 2, 0, 3).contiguous()  # (B, T, H, D)


def _attention_with_weights(query, key, value, key_mask, window, pattern, tk):
    """(o (B, Tq, H, D), weights (B, H, Tq, tk)) through the dense reference, for output_attentions=True."""
    memory = 0 if pattern["memory_k"] is None else pattern["memory_k"].shape[2]
    size = query.shape[0] * query.shape[1] * query.shape[2] * (key.shape[2] + memory) * query.element_size()
    if size > OUTPUT_ATTENTIONS_LIMIT:
        raise ValueError(f"output_attentions=True forms the {tuple(query.shape[:3]) + (key.shape[2],)} attention "
                         f"weights ({size / 2**20:.0f} MiB), over OUTPUT_ATTENTIONS_LIMIT = "
                         f"{OUTPUT_ATTENTIONS_LIMIT / 2**20:.0f} MiB; raise hybridrag.integrations.transformers."
                         "OUTPUT_ATTENTIONS_LIMIT, or use capture_attention_mass, which needs no T x T matrix")
    out, weights = hybrid_attention_weights(query, key, value, window, key_mask=key_mask, **pattern)
    weights = weights[..., :key.shape[2]]  # the memory tokens' columns are not positions of the sequence
    if key.shape[2] < tk:  # static-cache slots not written yet: zero weight, as eager gives them
        weights = F.pad(weights, (0, tk - key.shape[2]))
    return out.transpose(1, 2).contiguous(), weights


def _plain_module(module):
    """Whether the module has no hybridrag settings (read from its __dict__, where setattr puts them: getattr of a
    missing name costs an nn.Module a raised AttributeError)."""
    return module.__dict__.get(SETTINGS_ATTR) is None and getattr(type(module), SETTINGS_ATTR, None) is None


def hybrid_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                             sliding_window=None, softcap=None, is_causal=None, s_aux=None, **kwargs):
    """The function transformers calls for attn_implementation="hybridrag".

    Args:
        module: the attention module; its `hybridrag_settings`, `memory_k` and `memory_v` (set by
            `apply_hybrid_attention`) add landmarks, a window override and memory tokens.
        query: (B, H, Tq, D); key, value: (B, Hkv, Tk, D) after the cache update, Hkv dividing H.
        attention_mask: None, the (B, L <= Tk) padding mask from `hybrid_attention_mask`, or `PackedSequences`.
        sliding_window: the layer's window (the w most recent keys, the query's own included) or None (full causal).

    Returns:
        (attn_output (B, Tq, H, D), None), or the (B, H, Tq, Tk) attention weights in place of None with
        output_attentions=True.
    """
    _check_supported(module, dropout, softcap, is_causal, s_aux, kwargs)
    compiling = torch.compiler.is_compiling()
    capture = None if compiling else active_capture()  # dynamo cannot read a ContextVar
    if not compiling and attention_mask is None and capture is None and _plain_module(module) \
            and kwargs.get("cu_seq_lens_q") is None and kwargs.get("cu_seq_lens_k") is None \
            and not kwargs.get("output_attentions") and query.shape[2] <= key.shape[2]:
        # A model without hybrid settings, padding or packing: the plain causal call, in as few calls as it takes
        # (a decode step pays for each). None: not a call it runs; the general path below computes it.
        out = plain_causal_attention(query, key, value, _window(sliding_window, None), scaling)
        if out is not None:
            return out.transpose(1, 2).contiguous(), None
    window, pattern = _pattern(module, key, sliding_window, scaling)
    offsets = _packed_offsets(attention_mask, kwargs, query)
    if offsets is not None:
        for wanted, name in ((kwargs.get("output_attentions"), "output_attentions=True"),
                             (capture is not None, "capture_attention_mass")):
            if wanted:
                _refuse(f"{name} with packed sequences", "run the sequences as a padded batch")
        return _packed_forward(query, key, value, offsets, window, pattern), None
    tk = key.shape[2]
    key, value, key_mask = _keys_and_mask(attention_mask, key, value)
    if query.shape[2] > key.shape[2]:
        raise ValueError(f"query has {query.shape[2]} positions but there are only {key.shape[2]} keys; queries must "
                         "be the last Tq of the keys")
    if capture is not None:
        capture.add(module, query, key, window, key_mask=key_mask,
                    **{name: arg for name, arg in pattern.items() if name != "memory_v"})
    if kwargs.get("output_attentions"):
        return _attention_with_weights(query, key, value, key_mask, window, pattern, tk)
    out = hybrid_attention(query, key, value, window, key_mask=key_mask, **pattern)
    return out.transpose(1, 2).contiguous(), None


def _closure(fn):
    cells = getattr(fn, "__closure__", None) or ()
    return dict(zip(fn.__code__.co_freevars, (cell.cell_contents for cell in cells)))


def _qualname(fn):
    return getattr(fn, "__qualname__", "")


def _is_runnable_pattern(mask_function):
    """True for the two patterns the kernels run: causal, and causal and a sliding window."""
    if mask_function is causal_mask_function:
        return True
    if _qualname(mask_function) != "and_masks.<locals>.and_mask":
        return False
    parts = list(_closure(mask_function).get("mask_functions", ()))
    if len(parts) != 2 or causal_mask_function not in parts:
        return False
    parts.remove(causal_mask_function)
    return _qualname(parts[0]) == "sliding_window_overlay.<locals>.inner_mask"


_PACKED_PARTS = ["packed_sequence_mask_function.<locals>.inner_mask",
                 "remap_positions_for_packed_sequence.<locals>.inner_mask"]


def _is_packed_pattern(mask_function):
    """True for transformers' packed pattern: a runnable pattern on remapped positions, and the same-sequence mask."""
    if _qualname(mask_function) != "and_masks.<locals>.and_mask":
        return False
    parts = list(_closure(mask_function).get("mask_functions", ()))
    names = [_qualname(part) for part in parts]
    if sorted(names) != _PACKED_PARTS:
        return False
    return _is_runnable_pattern(_closure(parts[names.index(_PACKED_PARTS[1])]).get("mask_function"))


@torch.compiler.assume_constant_result
def _pattern_kind(mask_function):
    """"runnable", "packed" or "other". A compiled graph takes it as a constant: the pattern is the model's (its
    closures are rebuilt each call but keep their structure), and dynamo cannot read closure cells."""
    if _is_runnable_pattern(mask_function):
        return "runnable"
    return "packed" if _is_packed_pattern(mask_function) else "other"


def _packed_sequence_ids(mask_function):
    """The (B, T) sequence ids held by transformers' packed pattern."""
    parts = _closure(mask_function)["mask_functions"]
    inner = next(part for part in parts if _qualname(part) == _PACKED_PARTS[0])
    return _closure(inner)["packed_sequence_mask"]


def _mask_length(q_length, kv_length, q_offset, kv_offset, attention_mask):
    """How many of the kv_length keys are written (L < kv_length only for static caches)."""
    if isinstance(q_offset, torch.Tensor) and attention_mask is not None:
        # Static caches hand a tensor q_offset so that compiled decoding does not specialise on it; reading it would
        # break the graph, and the 2-D mask (positions 0 .. q_offset + q_length - 1) says the same through its shape.
        return attention_mask.shape[-1] - kv_offset
    return int(q_offset) + q_length - kv_offset


def hybrid_attention_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0,
                          mask_function=causal_mask_function, attention_mask=None, **kwargs):
    """The mask function transformers calls for attn_implementation="hybridrag" (like flash-attention's).

    Keys are at absolute positions kv_offset .. kv_offset + kv_length - 1, queries at q_offset .. q_offset + q_length
    - 1; attention_mask is (batch_size, >= kv_offset + L) over absolute positions (or (batch_size, L), already cut).
    Returns None when no key is padding (checked in eager mode only: a compiled graph keeps the mask rather than
    branch on its values), `PackedSequences` for packed inputs, else the (batch_size, L) bool padding mask of the
    first L keys, where L = q_offset + q_length - kv_offset (L < kv_length only for static caches, whose later
    slots are not written). The window itself comes from each layer's `sliding_window`, not from this mask.
    """
    if "allow_is_bidirectional_skip" in kwargs or mask_function is bidirectional_mask_function:
        _refuse("bidirectional (non-causal) masks (config.is_causal=False, use_bidirectional_attention or an "
                "encoder)", "use 'sdpa' or 'eager' for such models")
    kind = _pattern_kind(mask_function)
    if kind == "packed":
        return PackedSequences(_packed_sequence_ids(mask_function))
    if kind != "runnable":
        name = getattr(mask_function, "__qualname__", type(mask_function).__name__)
        _refuse(f"the mask pattern {name} (chunked attention, bidirectional token blocks or a custom "
                "or_mask_function/and_mask_function)", "only causal, causal sliding-window and packed-sequence "
                "masks run")
    length = _mask_length(q_length, kv_length, q_offset, kv_offset, attention_mask)
    if not 0 < length <= kv_length:
        raise ValueError(f"queries end at position {kv_offset + length} but the {kv_length} keys start at "
                         f"{kv_offset}: attn_implementation='{NAME}' needs the queries to be the last keys")
    if attention_mask is None:
        if length == kv_length:
            return None
        return torch.ones(batch_size, length, dtype=torch.bool, device=kwargs.get("device", "cpu"))
    if attention_mask.shape[-1] >= kv_offset + length:  # a mask over absolute positions 0, 1, ...
        mask = attention_mask[:, kv_offset:kv_offset + length].bool()
    elif attention_mask.shape[-1] == length:  # already cut to these keys (generate prepares masks once per step)
        mask = attention_mask.bool()
    else:
        raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions but the keys reach position "
                         f"{kv_offset + length - 1}")
    if not torch.compiler.is_compiling() and length == kv_length and bool(mask.all()):
        return None  # no padding: the kernels' unmasked path
    return mask


def register(name=NAME):
    """Register the attention and mask functions as attn_implementation=`name` (default "hybridrag"). Returns name."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    AttentionInterface.register(name, hybrid_attention_forward)
    AttentionMaskInterface.register(name, hybrid_attention_mask)
    return name


def _check_int(name, value, low, allow_none=False, allow_minus_one=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int{' or None' if allow_none else ''}, got {type(value).__name__}")
    if value < low and not (allow_minus_one and value == -1):
        raise ValueError(f"{name} must be >= {low}{' or -1' if allow_minus_one else ''}, got {value}")


def _is_attention_module(module):
    return (type(module).__name__.endswith("Attention") and hasattr(module, "layer_idx")
            and hasattr(module, "head_dim") and hasattr(module, "is_causal") and hasattr(module, "config"))


def _kv_heads(module):
    k_proj = getattr(module, "k_proj", None)
    if isinstance(k_proj, nn.Linear) and k_proj.out_features % module.head_dim == 0:
        return k_proj.out_features // module.head_dim
    config = module.config
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _set_memory_tokens(module, count, std):
    for attr in ("memory_k", "memory_v"):
        if attr in module._parameters:
            del module._parameters[attr]
    if count == 0:
        return
    weight = next(module.parameters())
    shape = (1, _kv_heads(module), count, module.head_dim)
    for attr in ("memory_k", "memory_v"):
        module.register_parameter(attr, nn.Parameter(torch.randn(shape, device=weight.device).mul_(std)
                                                     .to(weight.dtype)))


def _cache_argument(kwargs):
    """The KV cache handed to an attention module's forward: `cache=` from transformers 5.24 on (its
    `deprecate_kwarg` renames the old spelling), `past_key_values=` before."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def _check_cache_keeps_keys(module, args, kwargs):
    """Forward pre-hook: refuse a sliding-window cache layer that has dropped keys the settings still need."""
    settings = getattr(module, SETTINGS_ATTR, None)
    if settings is None or (settings.landmark_stride is None and settings.window is None and not settings.sinks):
        return  # the layer's own window: its cache keeps what it needs
    layers = getattr(_cache_argument(kwargs), "layers", None)
    index = getattr(module, "layer_idx", None)
    if layers is None or index is None or index >= len(layers) or not getattr(layers[index], "is_sliding", False):
        return
    layer = layers[index]
    # get_max_length in recent transformers, get_max_cache_shape in 5.4
    kept = (layer.get_max_length if hasattr(layer, "get_max_length") else layer.get_max_cache_shape)()
    if layer.get_seq_length() < kept:
        return  # nothing dropped yet
    if settings.landmark_stride is not None or settings.sinks or settings.window == -1 or settings.window > kept:
        raise ValueError(f"layer {index}'s KV cache keeps only the last {kept} keys, but its hybridrag settings "
                         f"(window={settings.window}, landmark_stride={settings.landmark_stride}) need older ones; "
                         "generate with past_key_values=DynamicCache() (no config: every layer keeps every key)")


def apply_hybrid_attention(model, *, landmark_stride=None, num_memory_tokens=0, global_queries=True, window=None):
    """Turn a loaded transformers decoder's attention into HybridAttention (window + landmarks + memory tokens).

    Registers "hybridrag" if needed, switches the model to it, and attaches to every attention module a
    `HybridAttentionSettings` (`module.hybridrag_settings`) and, with num_memory_tokens = M > 0, learned memory
    tokens `module.memory_k`, `module.memory_v`: nn.Parameters (1, Hkv, M, D) in the module's dtype and device.

    Args:
        landmark_stride: None, or s >= 1: keys 0, s, 2s, ... are landmarks every later query sees.
        num_memory_tokens: M >= 0 memory keys/values per layer that every query sees.
        global_queries: with landmarks, a query on a landmark position sees every earlier key.
        window: None keeps each layer's own sliding_window; an int w >= 1 or -1 (full causal) sets every layer.

    Memory tokens start at N(0, initializer_range^2) (0.02 without one): their logits are near 0 and their values
    near 0, so they add little to the outputs, but each still adds about 1 to every softmax denominator, shrinking
    outputs by Z / (Z + M) (most at the first positions, where Z is small). With M = 0, landmark_stride=None and
    window=None the model computes what it computed before. The memory parameters are in `model.state_dict()`.
    Landmarks, window=-1 or a window larger than a layer's sliding window need every past key: generate with a
    cache that keeps them (`DynamicCache()`); a sliding-window cache layer that has dropped keys raises.

    Returns:
        model, changed in place.
    """
    if not isinstance(model, nn.Module) or not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    _check_int("landmark_stride", landmark_stride, 1, allow_none=True)
    _check_int("num_memory_tokens", num_memory_tokens, 0)
    _check_int("window", window, 1, allow_none=True, allow_minus_one=True)
    if not isinstance(global_queries, bool):
        raise TypeError(f"global_queries must be a bool, got {type(global_queries).__name__}")
    modules = [module for module in model.modules() if _is_attention_module(module)]
    if not modules:
        raise ValueError(f"found no attention module (a *Attention module with layer_idx, head_dim, is_causal and "
                         f"config) in {type(model).__name__}")
    if NAME not in AttentionInterface._global_mapping or NAME not in AttentionMaskInterface._global_mapping:
        register()
    model.set_attn_implementation(NAME)
    if model.config._attn_implementation != NAME:
        raise TypeError(f"{type(model).__name__} did not switch to attn_implementation='{NAME}' (it is "
                        f"{model.config._attn_implementation!r}); it does not dispatch through AttentionInterface")
    settings = HybridAttentionSettings(window=window, landmark_stride=landmark_stride, global_queries=global_queries)
    std = getattr(model.config, "initializer_range", None) or 0.02
    for module in modules:
        setattr(module, SETTINGS_ATTR, settings)
        _set_memory_tokens(module, num_memory_tokens, std)
        if getattr(module, _HOOK_ATTR, None) is None:
            setattr(module, _HOOK_ATTR, module.register_forward_pre_hook(_check_cache_keeps_keys, with_kwargs=True))
    return model
