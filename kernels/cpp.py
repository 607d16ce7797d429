"""The C++ CPU kernels of csrc/, built with ninja through `torch.utils.cpp_extension` the first time a CPU op wants
them (about a minute on 2 cores; then loaded from the torch extensions cache, $TORCH_EXTENSIONS_DIR or
~/.cache/torch_extensions, in well under a second) and registered as torch ops under `torch.ops.hybridrag_cpu`.

`python -m hybridrag.kernels.build` builds them ahead of time (install.sh does), so nobody waits at a first call.

Which CPU kernels the "cpu" backend runs: "auto" (default: the C++ kernel where it builds; where it cannot, one
warning says why and the PyTorch path runs), "cpp" (the C++ kernel or an error saying what to install) or
"blockwise" (the PyTorch path only). `set_cpu_kernels` or $HYBRIDRAG_CPU_KERNELS chooses.

Compiled with -O3 -march=native -fopenmp: for the machine that builds them (the cache is per machine).
"""
import hashlib
import importlib.resources
import os
import threading
import warnings

import torch

CPU_KERNELS = ("auto", "cpp", "blockwise")
ENV = "HYBRIDRAG_CPU_KERNELS"
NAME = "hybridrag_cpu"
SOURCES = ("int8_matmul.cpp", "window_attention.cpp", "hybrid_attention.cpp", "hybrid_mass.cpp", "streaming_decode.cpp")
HEADERS = ("attention_checks.h", "gemm.h", "hybrid_pattern.h", "online_softmax.h", "tensor_rows.h", "vector_math.h")
FLAGS = ["-O3", "-march=native", "-fopenmp"]

_lock = threading.Lock()
_choice = None  # read from ENV on first use
_built = None  # None: not tried; True: loaded; else the build's error text


def _check_choice(value, name):
    if not isinstance(value, str) or value not in CPU_KERNELS:
        raise ValueError(f"{name} must be one of {CPU_KERNELS}, got {value!r}")
    return value


def cpu_kernels():
    """The CPU kernels in use: "auto", "cpp" or "blockwise" ($HYBRIDRAG_CPU_KERNELS, read once, else "auto")."""
    global _choice
    if _choice is None:
        _choice = _check_choice(os.environ.get(ENV, "auto"), f"${ENV}")
    return _choice


def set_cpu_kernels(choice):
    """Choose the CPU kernels: "auto", "cpp" or "blockwise". With "cpp" the kernels are built now, and a build that
    fails raises here. Returns the previous choice."""
    global _choice
    previous = cpu_kernels()
    _choice = _check_choice(choice, "choice")
    if choice == "cpp":
        cpp_ops()
    return previous


def source_paths(names=SOURCES):
    """The C++ sources, as paths of the installed package (hybridrag.csrc) or the checkout's csrc/."""
    folder = importlib.resources.files("hybridrag.csrc")
    return [str(folder / name) for name in names]


def _headers_flag():
    """A -D flag holding the headers' digest: torch rebuilds a JIT extension when its sources or flags change, and
    does not read the headers the sources include."""
    digest = hashlib.sha256()
    for path in source_paths(HEADERS):
        with open(path, "rb") as file:
            digest.update(file.read())
    return f"-DHYBRIDRAG_HEADERS_DIGEST={digest.hexdigest()[:16]}"


def build(verbose=False):
    """Build (or load from the cache) and register the ops; raises what the build raised."""
    from torch.utils.cpp_extension import load

    load(name=NAME, sources=source_paths(), extra_cflags=FLAGS + [_headers_flag()], extra_ldflags=["-fopenmp"],
         is_python_module=False, verbose=verbose)


def _register_fakes():
    """Shapes for torch.compile's fake tensors (the C++ library defines the ops and their CPU kernels)."""
    @torch.library.register_fake(f"{NAME}::w8a16_matmul")
    def _(x, data, scale, group_size):
        return x.new_empty((x.shape[0], data.shape[0]))

    @torch.library.register_fake(f"{NAME}::window_attention_fwd")
    def _(q, k, v, left, right, scale):
        return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32), True

    @torch.library.register_fake(f"{NAME}::hybrid_attention_fwd")
    def _(q, k, v, landmarks, memory_k, memory_v, kv_start, key_mask, left, right, causal, global_queries, scale):
        return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32), True

    @torch.library.register_fake(f"{NAME}::hybrid_attention_bwd")
    def _(q, k, v, out, lse, grad_out, grad_lse, landmarks, memory_k, memory_v, kv_start, key_mask, left, right,
          causal, global_queries, scale):
        memory = (k.shape[0], k.shape[1], 0 if memory_k is None else memory_k.shape[2], k.shape[3])
        return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
                q.new_empty(memory, dtype=torch.float32), q.new_empty(memory, dtype=torch.float32), True)

    @torch.library.register_fake(f"{NAME}::hybrid_attention_mass")
    def _(q, k, segments, num_segments, row_weights, landmarks, memory_k, kv_start, key_mask, left, right, causal,
          global_queries, scale):
        return q.new_empty((q.shape[0], q.shape[1], num_segments), dtype=torch.float32), True

    @torch.library.register_fake(f"{NAME}::streaming_decode")
    def _(q, k, v, sink_k, sink_v, ring_k, ring_v, length, sinks, window, scale):
        return q.new_empty(q.shape), True

    @torch.library.register_fake(f"{NAME}::streaming_decode_append")
    def _(q, k, v, sink_k, sink_v, ring_k, ring_v, length, sinks, window, scale):
        return q.new_empty(q.shape), True

    @torch.library.register_fake(f"{NAME}::window_attention_bwd")
    def _(q, k, v, out, lse, grad_out, grad_lse, left, right, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), True


def _try_build():
    """True once the ops are loaded, else the build's error text (tried once per process)."""
    global _built
    if _built is not None:  # the common case, without the lock
        return _built
    with _lock:
        if _built is None:
            try:
                build()
                _register_fakes()
                _built = True
            except Exception as error:  # noqa: BLE001 - a compiler's failure comes as many types; its text is kept
                _built = f"{type(error).__name__}: {str(error).strip()[-2000:]}"
    return _built


def cpp_ops():
    """`torch.ops.hybridrag_cpu` when the C++ kernels are in use, else None ("blockwise", or "auto" where they do
    not build: warned once). With "cpp", a build that fails is a RuntimeError."""
    choice = cpu_kernels()
    if choice == "blockwise":
        return None
    built = _try_build()
    if built is True:
        return torch.ops.hybridrag_cpu
    advice = ("it needs a C++ compiler (c++ or $CXX; apt-get install g++) and ninja (pip install ninja); "
              f"{ENV}=blockwise uses the PyTorch path without asking")
    if choice == "cpp":
        raise RuntimeError(f"the C++ CPU kernels did not build: {advice}. The build said: {built}")
    warnings.warn(f"hybridrag: the C++ CPU kernels did not build, so the CPU backend runs its PyTorch path; {advice}. "
                  f"The build said: {built[-500:]}", RuntimeWarning, stacklevel=3)
    global _choice
    _choice = "blockwise"  # said once: the rest of the process runs the PyTorch path without trying again
    return None
