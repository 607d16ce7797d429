"""The hybrid convolutional-transformer encoder: multi-scale convolutions and transformer blocks on the project's
attention kernels (window or hybrid), int8 attention and feed-forward weights, `encode(texts)` -> (N, d).

    from hybridrag.encoders import HybridEncoder, HybridEncoderConfig, QuantizationConfig
    encoder = HybridEncoder(HybridEncoderConfig(hidden_size=256, num_heads=4))
    vectors = encoder.encode(["a text", "another"])      # float32 (2, output_dim), rows L2-normalised

See hybridrag.encoders.model for the architecture, padding rules and memory, hybridrag.encoders.train for
distillation from all-MiniLM-L6-v2 (`python -m hybridrag.encoders train | evaluate`), and
hybridrag.encoders.retrieval for HybridTextEncoder, the knowledge-base encoder ("hybrid-encoder:<checkpoint>").
"""
from .config import HybridEncoderConfig, QuantizationConfig
from .model import HybridEncoder, MultiScaleConv
from .retrieval import HybridTextEncoder
from .train import EncoderTrainingConfig, train_encoder

__all__ = ["HybridEncoder", "HybridEncoderConfig", "QuantizationConfig", "MultiScaleConv", "HybridTextEncoder",
           "EncoderTrainingConfig", "train_encoder"]
