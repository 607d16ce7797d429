"""Backend choice shared by every op: "auto" | "triton" | "cpu" | "reference"."""
import os

from hybridrag.kernels.targets import interpreting

BACKENDS = ("auto", "triton", "cpu", "reference")


_DEFAULT_BACKEND = []  # filled on first use (a list, not functools.lru_cache, which torch.compile warns about)


def default_backend():
    """The backend "auto" stands for unless HYBRIDRAG_BACKEND names another; read once, on first use."""
    if not _DEFAULT_BACKEND:
        value = os.environ.get("HYBRIDRAG_BACKEND", "auto")
        if value not in BACKENDS:
            raise ValueError(f"HYBRIDRAG_BACKEND must be one of {BACKENDS}, got {value!r}")
        _DEFAULT_BACKEND.append(value)
    return _DEFAULT_BACKEND[0]


default_backend.cache_clear = _DEFAULT_BACKEND.clear  # read the variable again on the next use (tests)


def resolve_backend(backend, device):
    """Return the concrete backend ("triton", "cpu" or "reference") for tensors on `device`.

    auto: CUDA -> triton, CPU -> cpu. An explicit choice that cannot run on `device` raises; nothing falls back.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = default_backend()
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "cpu"
    if backend == "triton" and device.type != "cuda" and not interpreting():
        raise ValueError(f"backend='triton' needs CUDA tensors, got tensors on {device}; use backend='cpu' for CPU "
                         "tensors, or set TRITON_INTERPRET=1 before importing triton to run the kernels interpreted")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}; use backend='auto' or 'triton'")
    return backend
