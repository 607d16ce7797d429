"""HybridRAGConfig: every layer's config in one object, loadable as a whole from a dict or a JSON/YAML file with one
nested section per layer; `default_config()` is its defaults.

    config = default_config()                       # config.encoder, .quantization, .diffusion, .retention, ...
    config = HybridRAGConfig.from_any("hybrid.yaml")   # None | HybridRAGConfig | dict | JSON/YAML path
    HybridEncoder(config.encoder)

A file holds any subset of the sections, each a mapping of that section's fields (the rest keep their defaults):

    encoder: {hidden_size: 256, num_heads: 4}
    distillation: {measure: entropy, target_agreement: 0.9}

Unknown keys are refused at both levels, never ignored; an error inside a section names it ("encoder: num_heads (5)
must divide hidden_size (384)"). `to_dict()` gives plain JSON that `from_any` reads back equal.

The sections are the layers' own config classes (this module defines none): HybridEncoderConfig and
QuantizationConfig (hybridrag.encoders), DiffusionConfig (hybridrag.diffusion), RetentionConfig
(hybridrag.retention), StreamingConfig (hybridrag.streaming) and DistillationConfig (hybridrag.distillation).
"""
from dataclasses import dataclass, field

from ..config_file import ConfigFile, _build
from ..diffusion.config import DiffusionConfig
from ..distillation.config import DistillationConfig
from ..encoders.config import HybridEncoderConfig, QuantizationConfig
from ..retention.config import RetentionConfig
from ..streaming.config import StreamingConfig

__all__ = ["HybridRAGConfig", "default_config", "SECTIONS"]

SECTIONS = {"encoder": HybridEncoderConfig, "quantization": QuantizationConfig, "diffusion": DiffusionConfig,
            "retention": RetentionConfig, "streaming": StreamingConfig, "distillation": DistillationConfig}


@dataclass
class HybridRAGConfig(ConfigFile):
    """The six sections (each an instance of its class or a dict of its fields): encoder (HybridEncoderConfig),
    quantization (QuantizationConfig), diffusion (DiffusionConfig), retention (RetentionConfig), streaming
    (StreamingConfig), distillation (DistillationConfig)."""

    encoder: HybridEncoderConfig = field(default_factory=HybridEncoderConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    streaming: StreamingConfig = field(default_factory=StreamingConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)

    def __post_init__(self):
        for name, kind in SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, kind):
                continue
            if not isinstance(value, dict):
                raise TypeError(f"{name} must be a dict or a {kind.__name__}, got {type(value).__name__}")
            try:
                section = _build(kind, value, name)
            except (TypeError, ValueError) as error:
                message = str(error)
                if message.startswith(f"{name}:"):
                    raise
                raise type(error)(f"{name}: {message}") from None
            setattr(self, name, section)

    def to_dict(self):
        """{section: that section's to_dict()}: plain JSON; from_any(config.to_dict()) == config."""
        return {name: getattr(self, name).to_dict() for name in SECTIONS}


def default_config():
    """A new HybridRAGConfig of every section's defaults (a fresh object each call: changing it changes no other)."""
    return HybridRAGConfig()
