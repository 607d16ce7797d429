"""Drop-in `nn.Linear` with an int8 weight: `Int8Linear` (and `Int8Linear.from_linear`) over `hr.int8_matmul`."""
import math

import torch
from torch import nn

from ..ops import int8_matmul, quantize_int8
from ..ops.int8 import FLOAT_DTYPES, check_cpu_cache, quantize_named
from .common import _check_backend, _check_flag, _check_positive_int

MODES = ("w8a16", "w8a8")
_ACTIVATIONS = {"w8a16": "fp", "w8a8": "int8"}


def _dtype_names(dtypes):
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def _check_mode(mode, group_size):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "w8a8" and group_size is not None:
        raise ValueError(f"mode='w8a8' needs a per-channel weight (group_size=None), got group_size={group_size}")


def _check_cpu_cache(cpu_cache, mode, dtype=None):
    """cpu_cache: None, "bf16" (bfloat16 layers only) or "fp32"; W8A16 only. dtype None: any (quantize_model)."""
    check_cpu_cache(cpu_cache)
    if cpu_cache is not None and mode != "w8a16":
        raise ValueError(f"cpu_cache keeps a dequantized weight for mode='w8a16'; got cpu_cache={cpu_cache!r} with "
                         f"mode={mode!r}")
    if cpu_cache == "bf16" and dtype is not None and dtype != torch.bfloat16:
        raise ValueError(f"cpu_cache='bf16' needs a bfloat16 layer (its inputs are cast to the cache's dtype), got "
                         f"dtype {dtype}; use cpu_cache='fp32'")


def _check_group_size(group_size, in_features):
    if group_size is None:
        return
    _check_positive_int("group_size", group_size)
    if in_features % group_size != 0:
        raise ValueError(f"group_size ({group_size}) must divide in_features ({in_features})")


def _check_dtype(dtype, what="dtype"):
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what} must be one of ({_dtype_names(FLOAT_DTYPES)}), got {dtype}")


class Int8Linear(nn.Module):
    """`y = x @ W.T + b` with W held as int8 and float32 scales (symmetric, round to nearest): a drop-in for
    `nn.Linear` built by `Int8Linear.from_linear(linear)` or `hybridrag.nn.quantize_model(model)`.

    Args:
        in_features, out_features: K and N, as in nn.Linear.
        bias: whether the layer has a float bias (a trainable Parameter in `dtype`).
        mode: "w8a16" (float activations; the weight is dequantized inside the matmul) or "w8a8" (activations are
            quantized per token to int8 as well, int8 x int8 products accumulate in int32; per-channel weights only).
        group_size: None for one weight scale per output channel, or g dividing in_features for one scale per g
            inputs of each output channel (more accurate, more scales; W8A16 only).
        backend: passed to `hr.int8_matmul`: "auto" | "triton" | "cpu" | "reference".
        cpu_cache: None (default), "bf16" or "fp32" (W8A16): opt in to keeping the dequantized weight in that dtype
            for calls on the CPU backend, which then run as one dense matmul (a float layer's speed: on CPU the
            uncached W8A16 path, see `hr.int8_matmul`, is slower than a bfloat16 nn.Linear for M > 8). It costs
            N * K * 2 bytes ("bf16", bfloat16 layers only) or N * K * 4 bytes ("fp32") more, built on the first CPU
            call; not saved in the state_dict.
        device: for the int8 weight, its scales and the bias.
        dtype: the compute dtype: bias, output, and the dtype the input must have (float16, bfloat16 or float32;
            default torch.get_default_dtype()).

    A layer made by the constructor is initialised like nn.Linear (Kaiming-uniform weight, then quantized; uniform
    bias); `from_linear` and `load_state_dict` give it real weights.

    Shapes:
        forward(x (..., in_features)) -> (..., out_features) in the compute dtype.
        x must have the compute dtype: another dtype raises a TypeError (like nn.Linear, nothing is cast behind your
        back), except under `torch.autocast` for x's device, where x is cast to the compute dtype and the matmul runs
        with autocast off, so the output is in the compute dtype, not the autocast dtype.

    Non-finite inputs give the same non-finite outputs on every backend (see `hr.int8_matmul`): in W8A16 exactly
    where nn.Linear with the dequantized weight gives NaN or +-inf; in W8A8 a NaN or inf in row i of x makes output
    row i NaN. Weights holding NaN or inf are refused when quantized.

    Training: gradients flow to x and to the bias; the int8 weight and its scales are buffers and get none (a frozen
    base, e.g. under adapters). In W8A8 the gradient to x passes straight through the activation quantization.

    Memory:
        N * K bytes for the int8 weight, plus N float32 scales (per channel) or N * (K / g) (group-wise), plus the
        bias (N values in the compute dtype): about a quarter of a float32 nn.Linear, half of a float16 one; plus the
        cpu_cache when set. Per call on CPU: a float32 (M, N) accumulator and one widened weight block (~1 MiB).

    state_dict: `qweight.data` (int8), `qweight.scale` (float32), `qweight._extra_state` (the group size), `bias`.
    Load it into an Int8Linear made with the same in/out features, bias and group_size. `.to(dtype)` / `.half()`
    change the compute dtype (and the bias) but never the int8 weight or its float32 scales.
    """

    def __init__(self, in_features, out_features, bias=True, *, mode="w8a16", group_size=None, backend="auto",
                 cpu_cache=None, device=None, dtype=None):
        super().__init__()
        _check_positive_int("in_features", in_features)
        _check_positive_int("out_features", out_features)
        _check_flag("bias", bias)
        _check_mode(mode, group_size)
        _check_group_size(group_size, in_features)
        _check_backend(backend)
        dtype = torch.get_default_dtype() if dtype is None else dtype
        _check_dtype(dtype)
        _check_cpu_cache(cpu_cache, mode, dtype)
        self.in_features = in_features
        self.out_features = out_features
        self.mode = mode
        self.backend = backend
        self.dtype = dtype

        # nn.Linear's initialisation, drawn in float32 and quantized (a float copy of the weight, only here).
        weight = torch.empty(out_features, in_features, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        self.qweight = quantize_int8(weight, group_size=group_size)
        self.qweight.cpu_cache = cpu_cache
        if bias:
            bound = 1 / math.sqrt(in_features)
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

    @property
    def group_size(self):
        return self.qweight.group_size

    @property
    def cpu_cache(self):
        return self.qweight.cpu_cache

    @classmethod
    def from_linear(cls, linear, *, mode="w8a16", group_size=None, backend="auto", cpu_cache=None):
        """An Int8Linear holding `linear`'s weight quantized to int8 and a copy of its bias (same requires_grad), on
        linear's device, computing in linear's dtype. `linear` itself is left as it was.

        Raises TypeError for a non-nn.Linear or a weight dtype other than float16/bfloat16/float32, and ValueError for
        a group_size that does not divide in_features, a mode that cannot take it, a cpu_cache the layer cannot
        use, or a weight holding NaN or inf (named by its first such element, see `hr.quantize_int8`)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight
        _check_dtype(weight.dtype, "linear's weight dtype")
        # Built on the meta device (nothing allocated, no init drawn), then given the real weight and bias.
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, mode=mode,
                    group_size=group_size, backend=backend, cpu_cache=cpu_cache, device="meta", dtype=weight.dtype)
        layer.qweight = quantize_named("linear.weight", weight.detach(), group_size)
        layer.qweight.cpu_cache = cpu_cache
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().to(weight.dtype, copy=True),
                                      requires_grad=linear.bias.requires_grad)
        return layer

    def extra_repr(self):
        grouping = "per channel" if self.group_size is None else f"group_size={self.group_size}"
        cache = "" if self.cpu_cache is None else f", cpu_cache={self.cpu_cache!r}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"mode={self.mode!r}, {grouping}, dtype={self.dtype}, backend={self.backend!r}{cache}")

    def forward(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        autocasting = torch.is_autocast_enabled(x.device.type)
        if x.dtype != self.dtype:
            if not (autocasting and x.dtype.is_floating_point):
                raise TypeError(f"x has dtype {x.dtype} but this Int8Linear computes in {self.dtype}; cast x (or "
                                f"the layer, with .to(dtype)) first")
            x = x.to(self.dtype)
        activations = _ACTIVATIONS[self.mode]
        if autocasting:  # the op's CPU path uses matmul, which autocast would otherwise run in its own dtype
            with torch.autocast(x.device.type, enabled=False):
                return int8_matmul(x, self.qweight, self.bias, activations=activations, backend=self.backend)
        return int8_matmul(x, self.qweight, self.bias, activations=activations, backend=self.backend)

    def _apply(self, fn, recurse=True):
        # Module.to / .half / .cuda / ...: the bias follows any dtype change (QuantizedWeight keeps its int8 data and
        # float32 scales); track the compute dtype through the same fn.
        device = self.qweight.scale.device
        super()._apply(fn, recurse)
        self.dtype = fn(torch.empty(0, dtype=self.dtype, device=device)).dtype
        return self
