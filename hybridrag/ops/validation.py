"""Input checks shared by the ops. They read metadata only and raise before any kernel runs."""
import numpy as np
import torch

ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REFERENCE_DTYPES = ATTENTION_DTYPES + (torch.float64,)  # the reference also serves as the float64 truth
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256


def check_int(name, value, minimum, *, numpy_ints=False):
    """An int (not bool; numpy integers too with numpy_ints=True) >= minimum, returned as int."""
    types = (int, np.integer) if numpy_ints else int
    if isinstance(value, bool) or not isinstance(value, types):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


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


def unit_last_strides(*tensors):
    """unit_last_stride of each tensor, None left as None."""
    return [None if t is None else unit_last_stride(t) for t in tensors]


def check_memory_tokens(memory_k, memory_v, k):
    """memory_k/v: both None, or (B or 1, Hkv, M, D) with M >= 1 in k's dtype and device."""
    if (memory_k is None) != (memory_v is None):
        raise ValueError("pass memory_k and memory_v together (or neither), got only "
                         f"{'memory_k' if memory_v is None else 'memory_v'}")
    if memory_k is None:
        return
    batch, kv_heads, _, dim = k.shape
    for name, t in (("memory_k", memory_k), ("memory_v", memory_v)):
        check_tensor(name, t)
        if t.dim() != 4 or t.shape[0] not in (1, batch) or t.shape[1] != kv_heads or t.shape[3] != dim \
                or t.shape[2] == 0:
            raise ValueError(f"{name} must have shape (1 or {batch}, {kv_heads}, M >= 1, {dim}) (batch, kv heads, "
                             f"tokens, head_dim), got {tuple(t.shape)}")
        if t.dtype != k.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but k has {k.dtype}; pass one dtype")
        if t.device != k.device:
            raise ValueError(f"{name} is on {t.device} but k is on {k.device}")
    if memory_k.shape != memory_v.shape:
        raise ValueError(f"memory_k and memory_v must have one shape, got {tuple(memory_k.shape)} and "
                         f"{tuple(memory_v.shape)}")


def _reading_is_free(t):
    """Whether reading t's values here costs no graph break and no illegal sync (compile, CUDA graph capture)."""
    if torch.compiler.is_compiling():
        return False
    return t.device.type != "cuda" or not torch.cuda.is_current_stream_capturing()


def check_kv_start(kv_start, k):
    """kv_start: None or an integer tensor (B,) on k's device with values in [0, Tk] (keys before kv_start[b] are
    padding). The values are checked where they can be read (one (B,) copy to the host on a GPU; not while compiling
    or capturing a CUDA graph, where they are clamped to [0, Tk], which means the same). Returns int32."""
    if kv_start is None:
        return None
    check_tensor("kv_start", kv_start)
    if kv_start.dtype.is_floating_point or kv_start.dtype.is_complex or kv_start.dtype == torch.bool:
        raise TypeError(f"kv_start must be an integer tensor, got dtype {kv_start.dtype}")
    if kv_start.shape != (k.shape[0],):
        raise ValueError(f"kv_start must have shape ({k.shape[0]},) (one start per batch row), "
                         f"got {tuple(kv_start.shape)}")
    if kv_start.device != k.device:
        raise ValueError(f"kv_start is on {kv_start.device} but k is on {k.device}")
    tk = k.shape[2]
    if kv_start.numel() and _reading_is_free(kv_start):
        low, high = torch.stack(torch.aminmax(kv_start)).tolist()
        if low < 0 or high > tk:
            raise ValueError(f"kv_start values must lie in [0, {tk}] (Tk = {tk}), got {low} .. {high}")
    return kv_start.clamp(0, tk).to(torch.int32).contiguous()  # clamped before the cast: int32 never wraps


def check_flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def check_per_position(name, values, t, t_name, axis):
    """values: (B, T) over the batch and sequence axes of t (named t_name; `axis` names its sequence axis, "Tq" or
    "Tk"), on t's device. Shape and device only."""
    if values.shape != (t.shape[0], t.shape[2]):
        raise ValueError(f"{name} must have shape ({t.shape[0]}, {t.shape[2]}) (batch, {axis}), "
                         f"got {tuple(values.shape)}")
    if values.device != t.device:
        raise ValueError(f"{name} is on {values.device} but {t_name} is on {t.device}")


def check_row_mask(name, mask, t, t_name, axis):
    """mask: a bool tensor (B, T) per position of t (check_per_position). Metadata only."""
    check_tensor(name, mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got dtype {mask.dtype}")
    check_per_position(name, mask, t, t_name, axis)
    return mask


def check_key_mask(key_mask, k):
    """key_mask: None or a bool tensor (B, Tk) on k's device (False = the key is never seen). Metadata only."""
    return None if key_mask is None else check_row_mask("key_mask", key_mask, k, "k", "Tk")


def check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q, k):
    """Packed sequences (flash-attn's varlen meaning): q (1, H, total_q, D), k (1, Hkv, total_k, D), cu_seqlens_*
    (N + 1,) integer tensors starting at 0, non-decreasing, ending at total_*. Returns the sequences' bounds as a
    list of (q_lo, q_hi, k_lo, k_hi) ints; reads both tensors to the host (one sync)."""
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("pass cu_seqlens_q and cu_seqlens_k together (packed sequences), got only "
                         f"{'cu_seqlens_q' if cu_seqlens_k is None else 'cu_seqlens_k'}")
    if q.shape[0] != 1:
        raise ValueError(f"packed sequences take q, k, v with batch 1 ((1, heads, total, head_dim)), got q batch "
                         f"{q.shape[0]}")
    bounds = {}
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, q.shape[2]), ("cu_seqlens_k", cu_seqlens_k, k.shape[2])):
        check_tensor(name, cu)
        if cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be a 1-D int32 or int64 tensor, got dtype {cu.dtype} and shape "
                            f"{tuple(cu.shape)}")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}")
        values = cu.tolist()
        if len(values) < 2 or values[0] != 0 or values[-1] != total:
            raise ValueError(f"{name} must start at 0 and end at the packed length {total}, got {values[:3]} .. "
                             f"{values[-3:]} ({len(values)} entries)")
        if any(b < a for a, b in zip(values, values[1:])):
            raise ValueError(f"{name} must be non-decreasing (sequence lengths >= 0), got {values}")
        bounds[name] = values
    if len(bounds["cu_seqlens_q"]) != len(bounds["cu_seqlens_k"]):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                         f"{len(bounds['cu_seqlens_q']) - 1} and {len(bounds['cu_seqlens_k']) - 1}")
    cq, ck = bounds["cu_seqlens_q"], bounds["cu_seqlens_k"]
    sequences = list(zip(cq, cq[1:], ck, ck[1:]))
    for name, given, longest in (("max_seqlen_q", max_seqlen_q, max(b - a for a, b, _, _ in sequences)),
                                 ("max_seqlen_k", max_seqlen_k, max(b - a for _, _, a, b in sequences))):
        if given is None:
            continue
        if isinstance(given, bool) or not isinstance(given, int):
            raise TypeError(f"{name} must be an int or None, got {type(given).__name__}")
        if given < longest:
            raise ValueError(f"{name} is {given} but the longest sequence has {longest} positions")
    return sequences
