"""Hybrid attention (window + landmark keys + global landmark rows + memory tokens) and attention mass: Triton kernels
(`triton_kernels`), the tiled CPU path (`blockwise`), the plain causal pattern on CPU through torch's sdpa
(`plain_causal`, what hybridrag.ops runs when nothing hybrid is set) and the dense references."""
from .blockwise import attention_mass_blockwise, hybrid_bwd_blockwise, hybrid_fwd_blockwise
from .reference import attention_mass_reference, hybrid_attention_reference, hybrid_attention_weights_reference

__all__ = ["hybrid_attention_reference", "hybrid_attention_weights_reference", "attention_mass_reference",
           "hybrid_fwd_blockwise", "hybrid_bwd_blockwise", "attention_mass_blockwise"]
