"""The hybrid convolutional-transformer encoder: multi-scale convolutions and transformer blocks on the project's
attention kernels (window or hybrid), int8 attention and feed-forward weights, `encode(texts)` -> (N, d).

    from hybridrag.encoders import HybridEncoder, HybridEncoderConfig, QuantizationConfig
    encoder = HybridEncoder(HybridEncoderConfig(hidden_size=256, num_heads=4))
    vectors = encoder.encode(["a text", "another"])      # float32 (2, output_dim), rows L2-normalised

See hybridrag.encoders.model for the architecture, padding rules and memory.
"""
from .config import HybridEncoderConfig, QuantizationConfig
from .model import HybridEncoder, MultiScaleConv

__all__ = ["HybridEncoder", "HybridEncoderConfig", "QuantizationConfig", "MultiScaleConv"]
