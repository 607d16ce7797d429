"""`quantize_int8` and `int8_matmul`: int8 weights with float activations (W8A16) or int8 activations (W8A8)."""
import weakref

import torch
from torch import nn

from hybridrag.kernels.int8 import MAX_INT8_REDUCTION, dequantize_weight, int8_matmul_reference, quantize_weight
from hybridrag.kernels.int8.cpu import int8pack_layout, takes_cpp, w8a16_route

from .backend import resolve_backend
from .library_int8 import backend_functions, int8_matmul_fwd
from .validation import check_interpreter_dtype, check_tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ACTIVATIONS = ("fp", "int8")
ACCUMULATE = ("fp32", "fp16")
CPU_CACHES = {None: None, "bf16": torch.bfloat16, "fp32": torch.float32}


def check_cpu_cache(cpu_cache):
    """cpu_cache must be None, "bf16" or "fp32"."""
    if not (cpu_cache is None or isinstance(cpu_cache, str)) or cpu_cache not in CPU_CACHES:
        raise ValueError(f"cpu_cache must be one of {tuple(CPU_CACHES)}, got {cpu_cache!r}")


class QuantizedWeight(nn.Module):
    """An int8 weight: `data` int8 (N, K), `scale` float32 (N,) per output channel or (N, K // group_size) per group
    of K, and `group_size` (None for per channel). W ~= data * scale. A module so that it saves and loads through
    `state_dict` (data and scale are buffers, group_size rides in the extra state).

    cpu_cache: None (default), "bf16" or "fp32": opt in to keeping the dequantized (N, K) weight in that dtype for
    W8A16 calls on the CPU backend, which then run as one dense matmul on it (the speed of a float layer, see
    `int8_matmul`; bfloat16 decode sizes keep `_weight_int8pack_mm`, faster still). Memory: N * K * 2 bytes ("bf16") or N * K * 4 bytes ("fp32") more, on top of the int8 weight,
    built on the first such call and rebuilt when data or scale change; a device or dtype move drops it. "bf16"
    takes bfloat16 x only (other dtypes would lose bits on the way in); "fp32" takes any float x. Not saved in the
    state_dict.

    Scales are finite and positive as quantize_int8 makes them; a NaN scale makes every output that uses it NaN on
    every backend (see `int8_matmul`); infinite scales are not supported."""

    _cpu_cache = _dense = _dense_key = None  # defaults for QuantizedWeights pickled before the cache existed

    def __init__(self, data, scale, group_size=None, cpu_cache=None):
        super().__init__()
        self.register_buffer("data", data)
        self.register_buffer("scale", scale)
        self.group_size = group_size
        self.cpu_cache = cpu_cache

    @property
    def cpu_cache(self):
        return self._cpu_cache

    @cpu_cache.setter
    def cpu_cache(self, value):
        check_cpu_cache(value)
        self._cpu_cache = value
        self._dense = self._dense_key = None

    def cached_dense(self):
        """The dequantized (N, K) weight in the cpu_cache dtype (requires cpu_cache set), kept between calls and
        rebuilt when `data` or `scale` is replaced or changed in place."""
        key = (self.data._version, self.scale._version, self._cpu_cache)
        current = self._dense_key
        if current is None or current[0]() is not self.data or current[1]() is not self.scale or current[2] != key:
            self._dense = None  # free the old copy before building the new one
            self._dense = self.dequantize(CPU_CACHES[self._cpu_cache])
            self._dense_key = (weakref.ref(self.data), weakref.ref(self.scale), key)
        return self._dense

    @property
    def out_features(self):
        return self.data.shape[0]

    @property
    def in_features(self):
        return self.data.shape[1]

    def dequantize(self, dtype=torch.float32):
        """The (N, K) weight it stands for, in `dtype` (a full-size copy)."""
        return dequantize_weight(self.data, self.scale, self.group_size, dtype)

    def _apply(self, fn, recurse=True):
        # .to(device) moves both buffers; dtype casts (.half(), .to(torch.bfloat16)) must not touch the float32 scales
        # (or the int8 data, which fn already leaves alone): put the old scales back, moved to the new device.
        scale = self.scale
        self._dense = self._dense_key = None
        super()._apply(fn, recurse)
        if self.scale.dtype != scale.dtype:
            self.scale = scale.to(self.scale.device)
        return self

    def __getstate__(self):
        state = super().__getstate__()
        return {**state, "_dense": None, "_dense_key": None}  # the cache holds weak references: rebuilt on use

    def get_extra_state(self):
        return {"group_size": self.group_size}

    def set_extra_state(self, state):
        self.group_size = state["group_size"]

    def extra_repr(self):
        grouping = "per channel" if self.group_size is None else f"group_size={self.group_size}"
        cache = "" if self.cpu_cache is None else f", cpu_cache={self.cpu_cache!r}"
        return f"out_features={self.out_features}, in_features={self.in_features}, {grouping}{cache}"


def _check_group_size(group_size, k):
    if group_size is None:
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int or None, got {type(group_size).__name__}")
    if group_size < 1 or k % group_size != 0:
        raise ValueError(f"group_size must be a positive divisor of K={k} (the weight's in_features), "
                         f"got {group_size}")


def _check_weight_shape(name, weight):
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"{name} must have at least one output and one input feature, got shape "
                         f"{tuple(weight.shape)} (out_features, in_features)")


def _check_finite(name, weight, scale):
    """quantize_weight gives a row that is not finite in float32 a NaN scale: refuse it, naming its first element.
    The check reads the N (x groups) scales, not the weight, and syncs once, at quantize time only."""
    if weight.device.type == "meta":  # no values (Int8Linear.from_linear builds its layer there first)
        return
    bad = ~torch.isfinite(scale) if scale.dim() == 1 else ~torch.isfinite(scale).all(dim=1)
    if not bad.any():
        return
    rows = bad.nonzero().flatten()
    row = int(rows[0])
    col = int((~torch.isfinite(weight[row].detach().float())).nonzero()[0])
    value = weight[row, col].item()
    beyond = " (beyond float32, the scales' dtype)" if value == value and abs(value) != float("inf") else ""
    raise ValueError(f"{name} must be finite, but {len(rows)} of its {weight.shape[0]} rows (output channels) are "
                     f"not; the first: {name}[{row}, {col}] = {value}{beyond}. int8 cannot represent such a row "
                     f"(nn.Linear would output NaN or inf in that column); fix the weight before quantizing")


def quantize_named(name, weight, group_size=None):
    """quantize_int8 with `name` for the weight in its error messages (e.g. "linear.weight")."""
    check_tensor(name, weight)
    _check_weight_shape(name, weight)
    if not weight.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {weight.dtype}")
    _check_group_size(group_size, weight.shape[1])
    data, scale = quantize_weight(weight, group_size)
    _check_finite(name, weight, scale)
    return QuantizedWeight(data, scale, group_size)


def quantize_int8(weight, *, group_size=None):
    """Symmetric int8 quantization of a (N, K) weight, round to nearest, clamped to [-127, 127].

    Args:
        weight: (N, K) float16, bfloat16, float32 or float64 (e.g. an nn.Linear's weight: out x in), N, K >= 1,
            every value finite in float32.
        group_size: None for one scale per output channel, or g dividing K for one scale per g inputs.

    Returns:
        QuantizedWeight(data int8 (N, K), scale float32 (N,) or (N, K // g), group_size) on weight's device.

    Raises ValueError for a weight holding NaN or +-inf (or float64 values beyond float32), naming the first such
    element: int8 cannot represent that output channel, and a non-finite weight is almost always a bug upstream
    (a diverged training run, a bad checkpoint), best caught here rather than as NaN outputs later. This reads the
    scales once (one device sync, at quantize time only).
    """
    return quantize_named("weight", weight, group_size)


def _check_quantized(qweight):
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(f"qweight must be a QuantizedWeight (from hybridrag.quantize_int8), "
                        f"got {type(qweight).__name__}")
    data, scale, group_size = qweight.data, qweight.scale, qweight.group_size
    if data.dtype != torch.int8 or data.dim() != 2:
        raise TypeError(f"qweight.data must be a 2-D int8 tensor, got dtype {data.dtype} and shape "
                        f"{tuple(data.shape)}")
    _check_group_size(group_size, data.shape[1])
    groups = () if group_size is None else (data.shape[1] // group_size,)
    if scale.dtype != torch.float32 or scale.shape != (data.shape[0], *groups):
        raise ValueError(f"qweight.scale must be float32 of shape {(data.shape[0], *groups)}, got {scale.dtype} "
                         f"{tuple(scale.shape)}")


def _check_matmul_inputs(x, qweight, bias, activations, accumulate, backend):
    check_tensor("x", x)
    _check_quantized(qweight)
    dtypes = FLOAT_DTYPES + ((torch.float64,) if backend == "reference" else ())
    if x.dtype not in dtypes:
        raise TypeError(f"x must have dtype in ({', '.join(str(d).removeprefix('torch.') for d in dtypes)}), "
                        f"got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != qweight.in_features:
        raise ValueError(f"x must have last dim {qweight.in_features} (the weight's in_features), "
                         f"got shape {tuple(x.shape)}")
    if qweight.data.device != x.device:
        raise ValueError(f"qweight is on {qweight.data.device} but x is on {x.device}")
    if bias is not None:
        check_tensor("bias", bias)
        if bias.shape != (qweight.out_features,):
            raise ValueError(f"bias must have shape ({qweight.out_features},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias has dtype {bias.dtype} but x has {x.dtype}; pass one dtype")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
    check_interpreter_dtype(backend, x)
    if qweight.cpu_cache == "bf16" and backend == "cpu" and activations == "fp" and x.dtype != torch.bfloat16:
        raise TypeError(f"qweight.cpu_cache='bf16' takes bfloat16 x (x is cast to the cache's dtype), got {x.dtype}; "
                        "use cpu_cache='fp32' or None")
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
    if accumulate not in ACCUMULATE:
        raise ValueError(f"accumulate must be one of {ACCUMULATE}, got {accumulate!r}")
    if activations == "int8" and qweight.in_features > MAX_INT8_REDUCTION:  # every backend's W8A8 sums in int32
        raise ValueError(f"activations='int8' accumulates in int32, exact for K <= {MAX_INT8_REDUCTION}; got "
                         f"K={qweight.in_features}; use activations='fp'")
    if activations == "int8" and qweight.group_size is not None:
        raise ValueError(f"activations='int8' (W8A8) needs a per-channel weight (group_size=None), "
                         f"got group_size={qweight.group_size}")
    if accumulate == "fp16":
        if x.dtype != torch.float16 or activations != "fp":
            raise ValueError(f"accumulate='fp16' needs float16 x with activations='fp', got {x.dtype} with "
                             f"activations={activations!r}")
        if backend != "triton":
            raise ValueError(f"accumulate='fp16' is a Triton kernel option; backend {backend!r} accumulates in "
                             "float32")


def cpu_route(x, qweight, activations="fp"):
    """Which CPU computation `int8_matmul(x, qweight, activations=..., backend="cpu")` runs for x (M, K):
    "int_mm" (W8A8), or the W8A16 route of `hybridrag.kernels.int8.cpu.w8a16_route` ("cpp", "int8pack", "bf16"
    or "fp32"), where a qweight with a cpu_cache takes "cached" instead of "bf16" and "fp32" ("cpp" and "int8pack",
    decode sizes reading one byte per weight, measured faster than the dense matmul at N = K = 1024 and 4096).
    Chosen from dtypes, sizes, layout and the CPU kernels in use (`hybridrag.kernels.cpp`) only."""
    if activations == "int8":
        return "int_mm"
    route = w8a16_route(x, qweight.data, qweight.group_size)
    return "cached" if qweight.cpu_cache is not None and route not in ("cpp", "int8pack") else route


def _takes_cache(x, qweight, activations):
    """Whether x (M, K) on a qweight with a cpu_cache takes the "cached" route (`cpu_route`). Under torch.compile the
    address of qweight.data, which int8pack needs 32-byte aligned, cannot be read: the layouts int8pack takes go to
    the op, which checks the address when it runs (a misaligned weight, which quantize_int8 never makes, then takes
    "fp32" there where eager takes "cached")."""
    if not torch.compiler.is_compiling():
        return cpu_route(x, qweight, activations) == "cached"
    return (activations == "fp" and not takes_cpp(x, qweight.data)
            and not int8pack_layout(x, qweight.data, qweight.group_size))


def _cached_matmul(x, qweight, bias):
    """x (M, K) @ the cached dense weight .T + bias, in the cache's dtype (x and bias converted exactly), autograd to
    x and bias. Under torch.compile the graph dequantizes the weight each call instead (the same values; a graph
    keeps no Python-side cache)."""
    dtype = CPU_CACHES[qweight.cpu_cache]
    dense = qweight.dequantize(dtype) if torch.compiler.is_compiling() else qweight.cached_dense()
    with torch.autocast("cpu", enabled=False):
        out = nn.functional.linear(x.to(dense.dtype), dense, None if bias is None else bias.to(dense.dtype))
    return out.to(x.dtype)


def int8_matmul(x, qweight, bias=None, *, activations="fp", accumulate="fp32", backend="auto"):
    """x @ dequant(qweight).T + bias with an int8 weight.

    Args:
        x: (..., K) float16, bfloat16 or float32.
        qweight: QuantizedWeight from `quantize_int8` ((N, K) int8 and its scales).
        bias: (N,) in x's dtype, or None.
        activations: "fp" (W8A16: the weight is dequantized in registers) or "int8" (W8A8: x is quantized per token,
            int8 x int8 products accumulate in int32; needs a per-channel weight).
        accumulate: "fp32", or "fp16" (Triton only, float16 x, W8A16): faster on some GPUs, less accurate.
        backend: "auto" | "triton" | "cpu" | "reference".

    Returns:
        (..., N) in x's dtype. Gradients flow to x and bias, never to the int8 weight (adapters on a frozen base);
        W8A8's gradient to x passes straight through the activation quantization.

    Non-finite values give the same NaN / +-inf outputs on every backend, carried by the arithmetic and the scales
    (no host sync, no extra pass over x):
        W8A16: x is not quantized, so the output is non-finite exactly where x @ dequant(qweight).T + bias is, with
            the same NaN / +inf / -inf (nn.Linear with the dequantized weight): a NaN in row i of x makes row i NaN;
            an inf makes column n +-inf by the sign of the int8 weight it meets, NaN where that weight is 0 or
            opposite infinities meet.
        W8A8: a row of x holding NaN or inf cannot be quantized to int8: its scale is NaN and its whole output
            row is NaN (nn.Linear would give +-inf in some columns; one documented answer for every backend).
        A NaN weight scale (a hand-built QuantizedWeight; quantize_int8 refuses non-finite weights) makes its output
        column NaN. A NaN or inf bias makes its column non-finite as it would in nn.Linear.

    CPU (backend "cpu"): W8A8 on `torch._int_mm`; W8A16 by route (`cpu_route`): M <= 8 on the C++ kernel
    (csrc/int8_matmul.cpp, the weight widened in registers; `hybridrag.kernels.cpp` says when it is in use), else
    bfloat16 x with M <= 8 and a per-channel weight on `torch._weight_int8pack_mm`, other bfloat16 x widening the weight to bfloat16 a block at a
    time, float16 and float32 x in float32 the same way (bfloat16 x with M <= 8 that `_weight_int8pack_mm` cannot
    take too); or, when the qweight has a `cpu_cache`, one dense matmul on its cached dequantized weight.

    Memory: the output; the CPU path a float32 (M, N) accumulator and one widened-weight buffer of 4 MiB
    (`hybridrag.kernels.int8.cpu`), or the qweight's cache; the reference a float32 (N, K) copy of the weight.
    """
    check_tensor("x", x)
    backend = resolve_backend(backend, x.device)
    _check_matmul_inputs(x, qweight, bias, activations, accumulate, backend)
    leading = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
    if backend == "reference":
        out = int8_matmul_reference(x2d, qweight.data, qweight.scale, qweight.group_size, bias, activations)
    elif backend == "cpu" and qweight.cpu_cache is not None and _takes_cache(x2d, qweight, activations):
        out = _cached_matmul(x2d, qweight, bias)
    elif not needs_grad and not torch.compiler.is_compiling():
        # Nothing to differentiate: the backend's forward without the op's dispatch; compiled code takes the op,
        # which torch.compile sees as one node with a fake implementation.
        out = backend_functions(backend)[0](x2d, qweight.data, qweight.scale, qweight.group_size, bias, activations,
                                            accumulate)
    else:
        out = int8_matmul_fwd(x2d, qweight.data, qweight.scale, bias, qweight.group_size, activations, accumulate,
                              backend)
    return out.reshape(*leading, qweight.out_features)
