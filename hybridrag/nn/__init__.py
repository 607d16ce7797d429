"""Drop-in layers built on `hybridrag.ops`."""
from .hybrid_attention import HybridAttention
from .int8_linear import Int8Linear
from .lora import LoRALinear, apply_lora, merge_lora, set_lora_enabled
from .quantize import QuantizationReport, quantize_model
from .retrieval_cross_attention import RetrievalCrossAttention
from .rotary import RotaryEmbedding
from .sliding_window_attention import SlidingWindowAttention
from .sparse_global_attention import SparseGlobalAttention
from .streaming_attention import StreamingAttention, stream_chunks

__all__ = ["SlidingWindowAttention", "RotaryEmbedding", "HybridAttention", "SparseGlobalAttention",
           "RetrievalCrossAttention", "Int8Linear", "quantize_model", "QuantizationReport",
           "StreamingAttention", "stream_chunks", "LoRALinear", "apply_lora", "merge_lora", "set_lora_enabled"]
