"""`quantize_model`: swap a model's nn.Linear layers for `Int8Linear` in place, and report what it did."""
import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

from ..ops.int8 import CPU_CACHES, FLOAT_DTYPES
from .common import _check_backend, _check_positive_int
from .int8_linear import Int8Linear, _check_cpu_cache, _check_mode, _dtype_names


@dataclass
class QuantizationReport:
    """What `quantize_model` did.

    replaced: qualified names of the nn.Linear layers now Int8Linear, in module order.
    skipped: qualified name -> why that nn.Linear was left as it was.
    bytes_before, bytes_after: bytes of the model's parameters and buffers (each tensor counted once) before and
        after. bytes_saved = bytes_before - bytes_after; for each replaced (N, K) layer it is
        N * K * (weight element size - 1) - 4 * (number of scales): N per channel, N * K / group_size group-wise.
    unmatched_skip: the `skip` patterns that matched no module name (a likely typo).
    cpu_cache, cpu_cache_bytes: the cpu_cache asked for and the bytes its dequantized weights will take once built
        (N * K * 2 or 4 per replaced layer; not in bytes_after, which counts parameters and buffers).
    """
    mode: str
    group_size: int | None
    replaced: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0
    unmatched_skip: list = field(default_factory=list)
    cpu_cache: str | None = None
    cpu_cache_bytes: int = 0

    @property
    def bytes_saved(self):
        return self.bytes_before - self.bytes_after

    def __str__(self):
        grouping = "per channel" if self.group_size is None else f"group_size={self.group_size}"
        percent = 100.0 * self.bytes_saved / self.bytes_before if self.bytes_before else 0.0
        lines = [f"quantize_model ({self.mode}, {grouping}): replaced {len(self.replaced)} nn.Linear layer(s), "
                 f"skipped {len(self.skipped)}",
                 f"  parameters and buffers: {self.bytes_before:,} -> {self.bytes_after:,} bytes "
                 f"(saved {self.bytes_saved:,}, {percent:.1f}%)"]
        if self.cpu_cache is not None:
            lines.append(f"  cpu_cache={self.cpu_cache!r}: {self.cpu_cache_bytes:,} more bytes once built")
        if self.skipped:
            lines.append("  skipped:")
            lines += [f"    {name or '<the model itself>'}: {reason}" for name, reason in self.skipped.items()]
        if self.unmatched_skip:
            lines.append(f"  skip patterns that matched no module: {', '.join(map(repr, self.unmatched_skip))}")
        return "\n".join(lines)


def _tensor_bytes(model):
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _storage_key(t):
    """Tensors with one key share memory (the same Parameter, or views of one storage)."""
    if t.device.type == "meta" or t.numel() == 0:
        return ("id", id(t))
    return (t.device, t.untyped_storage().data_ptr())


def _parameter_owners(model):
    """storage key -> [(qualified parameter name, id of the owning module)] over every name a parameter has."""
    owners = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False, remove_duplicate=False):
            qualified = f"{module_name}.{param_name}" if module_name else param_name
            owners.setdefault(_storage_key(param), []).append((qualified, id(module)))
    return owners


def _skip_matcher(skip):
    """skip -> (function(names, module) -> reason or None, patterns list or None)."""
    if callable(skip):
        def by_callable(names, module):
            hits = [name for name in names if skip(name, module)]
            return f"skip({hits[0]!r}, module) returned True" if hits else None
        return by_callable, None
    if isinstance(skip, str):
        patterns = [skip]
    else:
        try:
            patterns = list(skip)
        except TypeError:
            raise TypeError(f"skip must be a collection of names / fnmatch patterns, a str, or a callable "
                            f"(name, module) -> bool, got {type(skip).__name__}") from None
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"skip patterns must be str, got {type(pattern).__name__} ({pattern!r})")

    def by_pattern(names, module):
        for name in names:
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):  # the layer's own name and each enclosing module's name
                prefix = ".".join(parts[:depth])
                for pattern in patterns:
                    if fnmatch.fnmatchcase(prefix, pattern):
                        return (f"matches skip pattern {pattern!r}" if prefix == name else
                                f"inside {prefix!r}, which matches skip pattern {pattern!r}")
        return None
    return by_pattern, patterns


def _structural_reason(names, module, owners, group_size, cpu_cache):
    """Why this nn.Linear cannot be replaced (None when it can)."""
    if type(module) is not nn.Linear:
        return f"a subclass of nn.Linear ({type(module).__name__}) whose forward or users may differ"
    if "" in names:
        return "the model itself is an nn.Linear (nothing to replace it in); use Int8Linear.from_linear"
    for param_name in ("weight", "bias"):
        param = getattr(module, param_name)
        if param is None:
            continue
        others = [name for name, owner in owners.get(_storage_key(param), []) if owner != id(module)]
        if others:
            return f"{param_name} is shared with {', '.join(others)} (tied weights)"
    if module.weight.dtype not in FLOAT_DTYPES:
        return f"weight dtype {module.weight.dtype} (int8_matmul takes {_dtype_names(FLOAT_DTYPES)})"
    if group_size is not None and module.in_features % group_size != 0:
        return f"group_size {group_size} does not divide in_features {module.in_features}"
    if cpu_cache == "bf16" and module.weight.dtype != torch.bfloat16:
        return f"cpu_cache='bf16' needs a bfloat16 layer, this one is {module.weight.dtype}"
    return None


def _replacement(name, module, mode, group_size, backend, cpu_cache):
    """Int8Linear.from_linear(module), its errors (a weight holding NaN or inf) naming the layer."""
    try:
        with torch.no_grad():
            return Int8Linear.from_linear(module, mode=mode, group_size=group_size, backend=backend,
                                          cpu_cache=cpu_cache)
    except ValueError as error:
        raise ValueError(f"cannot quantize {name!r}: {error}") from error


def quantize_model(model, mode="w8a16", group_size=None, skip=(), backend="auto", cpu_cache=None):
    """Replace the model's nn.Linear layers by `Int8Linear.from_linear` in place (at any depth) and report it.

    Args:
        model: an nn.Module (e.g. a transformers model). Its nn.Linear submodules are replaced; everything else,
            the module tree and the state_dict keys of other modules stay as they were.
        mode: "w8a16" or "w8a8" (see Int8Linear).
        group_size: None (one scale per output channel) or g > 0 (one scale per g inputs; W8A16 only).
        skip: layers to leave in float. Either a collection of names / fnmatch patterns (a single str is one pattern)
            matched case-sensitively against the full qualified module name, e.g. ("lm_head",) or ("*.mlp.*",); a
            pattern that matches an enclosing module (e.g. "model.layers.0") skips every layer inside it. Or a
            callable(name, module) -> bool, called for each nn.Linear with its qualified name. Default: skip nothing
            (for a transformers causal LM, ("lm_head",) keeps the output head in float, often worth its memory).
        backend: passed to each Int8Linear (and so to `hr.int8_matmul`).
        cpu_cache: None (default), "bf16" or "fp32": each Int8Linear keeps its dequantized weight in that dtype for
            CPU calls (see Int8Linear; W8A16 only): a float layer's CPU speed for N * K * 2 or 4 more bytes per
            layer (the report's cpu_cache_bytes). With "bf16", layers that are not bfloat16 are skipped (reported).

    Layers that are never replaced, each listed in the report's `skipped` with the reason (nothing is skipped
    silently): those matching `skip`; subclasses of nn.Linear (e.g. nn.MultiheadAttention's out_proj, whose owner
    reads `.weight` directly); layers whose weight or bias is shared with another module (tied weights, e.g. an
    lm_head tied to the input embeddings: quantizing it would untie and duplicate it); weights in a dtype the op
    does not take (float64); with group_size, layers whose in_features it does not divide; and with cpu_cache="bf16",
    layers that are not bfloat16.
    A module registered under several names is replaced by one Int8Linear at all of them.

    Returns:
        QuantizationReport (replaced names, skipped names with reasons, bytes before/after/saved); print it for a
        summary.

    Raises ValueError / TypeError for a bad mode, group_size, backend or skip, and ValueError naming the layer for
    a weight holding NaN or inf (see `hr.quantize_int8`), before anything is changed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if group_size is not None:
        _check_positive_int("group_size", group_size)
    _check_mode(mode, group_size)
    _check_backend(backend)
    _check_cpu_cache(cpu_cache, mode)
    matcher, patterns = _skip_matcher(skip)

    report = QuantizationReport(mode=mode, group_size=group_size, bytes_before=_tensor_bytes(model),
                                cpu_cache=cpu_cache)
    names_of = {}  # id(module) -> every qualified name it has, in module order
    modules = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names_of.setdefault(id(module), []).append(name)
        modules[id(module)] = module
    if patterns is not None:
        all_names = [name for names in names_of.values() for name in names]
        report.unmatched_skip = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in all_names)]
    owners = _parameter_owners(model)

    replacements = []
    for key, module in modules.items():
        if not isinstance(module, nn.Linear):
            continue
        names = names_of[key]
        reason = matcher(names, module) or _structural_reason(names, module, owners, group_size, cpu_cache)
        if reason is not None:
            for name in names:
                report.skipped[name] = reason
            continue
        replacements.append((names, _replacement(names[0], module, mode, group_size, backend, cpu_cache)))
        if cpu_cache is not None:
            report.cpu_cache_bytes += module.weight.numel() * CPU_CACHES[cpu_cache].itemsize
    for names, replacement in replacements:  # only once every layer has quantized: an error changes nothing
        for name in names:
            parent_name, _, child_name = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child_name, replacement)
            report.replaced.append(name)
    report.bytes_after = _tensor_bytes(model)
    return report
