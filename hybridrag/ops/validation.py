"""Input checks shared by the ops. They read metadata only and raise before any kernel runs."""
import torch

ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REFERENCE_DTYPES = ATTENTION_DTYPES + (torch.float64,)  # the reference also serves as the float64 truth
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256


def check_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_attention_inputs(q, k, v, dtypes=ATTENTION_DTYPES):
    """q (B, H, Tq, D), k/v (B, Hkv, Tk, D) with H % Hkv == 0, one dtype and device. Raises TypeError/ValueError."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise TypeError(f"{name} must have dtype in ({names}), got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; pass one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    batch, heads, tq, dim = q.shape
    if k.shape[0] != batch:
        raise ValueError(f"k has batch {k.shape[0]} but q has batch {batch}")
    if k.shape[3] != dim:
        raise ValueError(f"k has head_dim {k.shape[3]} but q has head_dim {dim}")
    if not MIN_HEAD_DIM <= dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {dim}")
    kv_heads = k.shape[1]
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(f"k has {kv_heads} heads, which does not divide q's {heads} heads")
    if tq == 0 or k.shape[2] == 0:
        raise ValueError(f"q and k need at least one position, got Tq={tq} and Tk={k.shape[2]}")


def check_interpreter_dtype(backend, t):
    """The Triton interpreter's bfloat16 dot multiplies raw bit patterns: refuse rather than return garbage."""
    if backend == "triton" and t.device.type == "cpu" and t.dtype == torch.bfloat16:
        raise TypeError("the Triton interpreter cannot run bfloat16 dots (it multiplies their bit patterns); "
                        "use float16/float32 under TRITON_INTERPRET=1, backend='cpu', or CUDA tensors")


def check_scale(scale, head_dim):
    """Default D ** -0.5; otherwise a positive finite float."""
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not (scale > 0 and scale != float("inf")):
        raise ValueError(f"scale must be positive and finite, got {scale}")
    return float(scale)


def unit_last_stride(t):
    """Kernels take any strides but need the last one to be 1; copy only when it is not."""
    return t if t.stride(-1) == 1 else t.contiguous()
