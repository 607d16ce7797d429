"""`hybridrag::packed_hybrid_attention_fwd` / `_bwd`: hybrid attention over packed sequences (flash-attn's varlen
layout) as torch.library custom ops (the pattern of `library.py`). Each sequence runs as its own batch row on views
of the packed tensors, so no sequence sees another and nothing is copied or padded.

The sequences come as `bounds`, the flat list [q_lo, q_hi, k_lo, k_hi, ...] that `check_cu_seqlens` read from the
offsets (one host read, in the validation); landmark positions count within each sequence (the pattern's positions
below the sequence's length: the same positions an int stride or a tensor gives it), and each sequence takes its
slice of the key mask. Inputs are checked and laid out by `hybridrag.ops.hybrid`; the ops only dispatch."""
import torch

from .library import backend_functions
from .validation import unit_last_stride


def _sequences(bounds, landmarks, key_mask):
    """Yield (rows, keys, landmarks, key_mask) of each sequence with at least one query."""
    for q_lo, q_hi, k_lo, k_hi in zip(*(iter(bounds),) * 4):
        if q_hi > q_lo:
            mask = None if key_mask is None else key_mask[:, k_lo:k_hi]
            yield slice(q_lo, q_hi), slice(k_lo, k_hi), landmarks[landmarks < k_hi - k_lo], mask


torch.library.define(
    "hybridrag::packed_hybrid_attention_fwd",
    "(Tensor q, Tensor k, Tensor v, Tensor landmarks, Tensor? memory_k, Tensor? memory_v, Tensor? key_mask, "
    "int[] bounds, int left, int right, bool causal, bool global_queries, float scale, str backend) "
    "-> (Tensor, Tensor)")
torch.library.define(
    "hybridrag::packed_hybrid_attention_bwd",
    "(Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor grad_out, Tensor? grad_lse, Tensor landmarks, "
    "Tensor? memory_k, Tensor? memory_v, Tensor? key_mask, int[] bounds, int left, int right, bool causal, "
    "bool global_queries, float scale, str backend) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")


@torch.library.impl("hybridrag::packed_hybrid_attention_fwd", "CompositeExplicitAutograd")
def _forward(q, k, v, landmarks, memory_k, memory_v, key_mask, bounds, left, right, causal, global_queries, scale,
             backend):
    """q (1, H, total_q, D), k/v (1, Hkv, total_k, D) -> (o (1, H, total_q, D) contiguous in q's dtype,
    lse (1, H, total_q) float32); rows of sequences without keys stay zeros with lse -inf."""
    forward_fn = backend_functions(backend)[0]
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
    for rows, keys, seq_landmarks, seq_mask in _sequences(bounds, landmarks, key_mask):
        out[:, :, rows], lse[:, :, rows] = forward_fn(q[:, :, rows], k[:, :, keys], v[:, :, keys], left, right,
                                                      causal, seq_landmarks, global_queries, scale, memory_k,
                                                      memory_v, None, seq_mask)
    return out, lse


@torch.library.register_fake("hybridrag::packed_hybrid_attention_fwd")
def _(q, k, v, landmarks, memory_k, memory_v, key_mask, bounds, left, right, causal, global_queries, scale, backend):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.impl("hybridrag::packed_hybrid_attention_bwd", "CompositeExplicitAutograd")
def _backward_kernels(q, k, v, out, lse, grad_out, grad_lse, landmarks, memory_k, memory_v, key_mask, bounds, left,
                      right, causal, global_queries, scale, backend):
    """(dq, dk, dv, dmemory_k, dmemory_v), contiguous; the memory gradients (summed over the sequences, in float32
    until the end) are empty (0,) tensors without memory tokens."""
    backward_fn = backend_functions(backend)[1]
    dq, dk, dv = (torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    memory = memory_k is not None
    dmemory_k, dmemory_v = ((torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (memory_k, memory_v))
                            if memory else (q.new_empty(0), q.new_empty(0)))
    for rows, keys, seq_landmarks, seq_mask in _sequences(bounds, landmarks, key_mask):
        seq_grad_lse = None if grad_lse is None else grad_lse[:, :, rows].contiguous()
        grads = backward_fn(q[:, :, rows], k[:, :, keys], v[:, :, keys], out[:, :, rows],
                            lse[:, :, rows].contiguous(),  # kernels index statistics as (B, H, T)
                            grad_out[:, :, rows], seq_grad_lse, left, right, causal, seq_landmarks, global_queries,
                            scale, memory_k, memory_v, None, seq_mask)
        dq[:, :, rows], dk[:, :, keys], dv[:, :, keys] = grads[:3]
        if memory:
            dmemory_k += grads[3]
            dmemory_v += grads[4]
    if memory:
        dmemory_k, dmemory_v = dmemory_k.to(memory_k.dtype), dmemory_v.to(memory_v.dtype)
    return dq, dk, dv, dmemory_k, dmemory_v


@torch.library.register_fake("hybridrag::packed_hybrid_attention_bwd")
def _(q, k, v, out, lse, grad_out, grad_lse, landmarks, memory_k, memory_v, key_mask, bounds, left, right, causal,
      global_queries, scale, backend):
    memory = (q.new_empty(0), q.new_empty(0)) if memory_k is None else \
        (memory_k.new_empty(memory_k.shape), memory_v.new_empty(memory_v.shape))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), *memory


def _setup_context(ctx, inputs, output):
    q, k, v, landmarks, memory_k, memory_v, key_mask, *constants = inputs
    ctx.save_for_backward(q, k, v, landmarks, memory_k, memory_v, key_mask, *output)
    ctx.constants = constants


def _backward(ctx, grad_out, grad_lse):
    q, k, v, landmarks, memory_k, memory_v, key_mask, out, lse = ctx.saved_tensors
    grad_out = torch.zeros_like(out) if grad_out is None else unit_last_stride(grad_out)
    grad_lse = None if grad_lse is None else grad_lse.contiguous()
    dq, dk, dv, dmemory_k, dmemory_v = torch.ops.hybridrag.packed_hybrid_attention_bwd(
        q, k, v, out, lse, grad_out, grad_lse, landmarks, memory_k, memory_v, key_mask, *ctx.constants)
    memory_grads = (None, None) if memory_k is None else (dmemory_k, dmemory_v)
    return dq, dk, dv, None, *memory_grads, None, None, None, None, None, None, None, None


torch.library.register_autograd("hybridrag::packed_hybrid_attention_fwd", _backward, setup_context=_setup_context)
packed_hybrid_attention_fwd = torch.ops.hybridrag.packed_hybrid_attention_fwd
