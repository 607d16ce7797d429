"""`hybridrag::hybrid_attention_fwd` / `_bwd`: the hybrid attention kernels as torch.library custom ops, so that
torch.compile (fullgraph included) and torch.export see one opaque op with a fake (meta) implementation instead of
tracing into the launchers, and autograd composes through `register_autograd`.

Every tensor argument is already checked and laid out by `hybridrag.ops.hybrid`; the ops only dispatch to the
backend's forward or backward."""
import torch

from hybridrag.kernels.hybrid.cpu import attention_mass_cpu, hybrid_bwd_cpu, hybrid_fwd_cpu

from .validation import unit_last_stride


def backend_functions(backend):
    """(forward, backward, mass) of a concrete backend ("triton" or "cpu"). Triton's mass takes the rows' lse from
    the forward; the CPU's computes it itself (see hybridrag.ops.hybrid.attention_mass)."""
    if backend == "triton":
        # Imported on first use: CPU-only installs need not have Triton.
        from hybridrag.kernels.hybrid import triton_kernels
        return (triton_kernels.hybrid_fwd_triton, triton_kernels.hybrid_bwd_triton,
                triton_kernels.attention_mass_triton)
    return hybrid_fwd_cpu, hybrid_bwd_cpu, attention_mass_cpu


# Defined with the low-level torch.library API rather than @torch.library.custom_op, whose wrapper imports
# torch._dynamo on the first eager call (about a second and 150 MB for every process that calls the op once).
torch.library.define(
    "hybridrag::hybrid_attention_fwd",
    "(Tensor q, Tensor k, Tensor v, Tensor landmarks, Tensor? memory_k, Tensor? memory_v, Tensor? kv_start, "
    "Tensor? key_mask, int left, int right, bool causal, bool global_queries, float scale, str backend) "
    "-> (Tensor, Tensor)")
torch.library.define(
    "hybridrag::hybrid_attention_bwd",
    "(Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor grad_out, Tensor? grad_lse, Tensor landmarks, "
    "Tensor? memory_k, Tensor? memory_v, Tensor? kv_start, Tensor? key_mask, int left, int right, bool causal, "
    "bool global_queries, float scale, str backend) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")


@torch.library.impl("hybridrag::hybrid_attention_fwd", "CompositeExplicitAutograd")
def _forward(q, k, v, landmarks, memory_k, memory_v, kv_start, key_mask, left, right, causal, global_queries, scale,
             backend):
    """(o (B, H, Tq, D) contiguous in q's dtype, lse (B, H, Tq) float32)."""
    forward_fn = backend_functions(backend)[0]
    return forward_fn(q, k, v, left, right, causal, landmarks, global_queries, scale, memory_k, memory_v, kv_start,
                      key_mask)


@torch.library.register_fake("hybridrag::hybrid_attention_fwd")
def _(q, k, v, landmarks, memory_k, memory_v, kv_start, key_mask, left, right, causal, global_queries, scale,
      backend):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.impl("hybridrag::hybrid_attention_bwd", "CompositeExplicitAutograd")
def _backward_kernels(q, k, v, out, lse, grad_out, grad_lse, landmarks, memory_k, memory_v, kv_start, key_mask, left,
                      right, causal, global_queries, scale, backend):
    """(dq, dk, dv, dmemory_k, dmemory_v); the memory gradients are empty (0,) tensors without memory tokens."""
    backward_fn = backend_functions(backend)[1]
    dq, dk, dv, dmemory_k, dmemory_v = backward_fn(q, k, v, out, lse, grad_out, grad_lse, left, right, causal,
                                                   landmarks, global_queries, scale, memory_k, memory_v, kv_start,
                                                   key_mask)
    if dmemory_k is None:
        dmemory_k, dmemory_v = q.new_empty(0), q.new_empty(0)
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dmemory_k.contiguous(), dmemory_v.contiguous()


@torch.library.register_fake("hybridrag::hybrid_attention_bwd")
def _(q, k, v, out, lse, grad_out, grad_lse, landmarks, memory_k, memory_v, kv_start, key_mask, left, right, causal,
      global_queries, scale, backend):
    memory = (q.new_empty(0), q.new_empty(0)) if memory_k is None else \
        (memory_k.new_empty(memory_k.shape), memory_v.new_empty(memory_v.shape))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), *memory


def _setup_context(ctx, inputs, output):
    q, k, v, landmarks, memory_k, memory_v, kv_start, key_mask, *constants = inputs
    ctx.save_for_backward(q, k, v, landmarks, memory_k, memory_v, kv_start, key_mask, *output)
    ctx.constants = constants


def _backward(ctx, grad_out, grad_lse):
    q, k, v, landmarks, memory_k, memory_v, kv_start, key_mask, out, lse = ctx.saved_tensors
    grad_out = torch.zeros_like(out) if grad_out is None else unit_last_stride(grad_out)
    grad_lse = None if grad_lse is None else grad_lse.contiguous()
    dq, dk, dv, dmemory_k, dmemory_v = torch.ops.hybridrag.hybrid_attention_bwd(
        q, k, v, out, lse, grad_out, grad_lse, landmarks, memory_k, memory_v, kv_start, key_mask, *ctx.constants)
    memory_grads = (None, None) if memory_k is None else (dmemory_k, dmemory_v)
    return dq, dk, dv, None, *memory_grads, None, None, None, None, None, None, None, None


torch.library.register_autograd("hybridrag::hybrid_attention_fwd", _backward, setup_context=_setup_context)
hybrid_attention_fwd = torch.ops.hybridrag.hybrid_attention_fwd
