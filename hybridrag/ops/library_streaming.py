"""`hybridrag::streaming_attention`: the streaming kernels as a functional torch.library custom op (inference only,
no autograd). It reads the cache tensors and returns o; appending the chunk to the cache is left to the caller
(`StreamingKVCache.append`, in Python), so the op mutates nothing. `length` is a SymInt, so that torch.compile can
keep the stream position symbolic instead of compiling a graph per position. Inputs are checked by
`hybridrag.ops.streaming`; the op only dispatches."""
import torch

from hybridrag.kernels.streaming.cpu import streaming_attention_cpu


def backend_function(backend):
    """The forward of a concrete backend ("triton" or "cpu")."""
    if backend == "triton":
        # Imported on first use: CPU-only installs need not have Triton.
        from hybridrag.kernels.streaming import triton_kernels
        return triton_kernels.streaming_attention_triton
    return streaming_attention_cpu


torch.library.define(
    "hybridrag::streaming_attention",
    "(Tensor q, Tensor k, Tensor v, Tensor sink_k, Tensor sink_v, Tensor ring_k, Tensor ring_v, SymInt length, "
    "int sinks, int window, float scale, str backend) -> Tensor")


@torch.library.impl("hybridrag::streaming_attention", "CompositeExplicitAutograd")
def _forward(q, k, v, sink_k, sink_v, ring_k, ring_v, length, sinks, window, scale, backend):
    """q (B, H, C, D) at positions length .. length + C - 1, the chunk's k/v (B, Hkv, C, D), the cache after `length`
    tokens (sink_k/v (B, Hkv, sinks, D), ring_k/v (B, Hkv, window, D)) -> o (B, H, C, D) contiguous in q's dtype."""
    return backend_function(backend)(q, k, v, sink_k, sink_v, ring_k, ring_v, length, sinks, window,
                                     scale).contiguous()


@torch.library.register_fake("hybridrag::streaming_attention")
def _(q, k, v, sink_k, sink_v, ring_k, ring_v, length, sinks, window, scale, backend):
    return q.new_empty(q.shape)


streaming_attention_op = torch.ops.hybridrag.streaming_attention
