"""`HierarchicalConfig`: the sizes and switches of `HierarchicalHybridRAG`, checked when built.

Every error is a ValueError or TypeError naming the field, what it must be and what it got. `to_dict()` gives plain
JSON that `from_dict` reads back equal; `from_dict` refuses unknown keys.
"""
import dataclasses
import math
from dataclasses import dataclass

LOCAL_ATTENTIONS = ("sliding", "hybrid")
BACKENDS = ("auto", "triton", "cpu", "reference")
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256  # the attention kernels' range (hybridrag.ops.validation)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name, value, minimum):
    if not _is_int(value):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} ({value!r})")


def _check_float(name, value, low, high, *, high_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} ({value!r})")
    if not (math.isfinite(value) and low <= value and (value < high if high_open else value <= high)):
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value}")


def _check_choice(name, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


@dataclass
class HierarchicalConfig:
    """Sizes of the three stages of `HierarchicalHybridRAG` (see its docstring for the data flow).

    vocab_size, hidden_size: token vocabulary and model width.
    num_local_layers: stage 1 blocks (per segment, local attention).
    num_cross_layers: stage 2 blocks (SparseGlobalAttention over the landmark states of every segment).
    num_synthesis_layers: stage 3 blocks (window + every earlier landmark, over the whole sequence).
    num_heads, num_kv_heads (default num_heads; must divide it), head_dim (default hidden_size // num_heads; the
        kernels take 16..256, even for RoPE).
    segment_length: tokens per segment in stage 1. window_size: the local window in tokens (the w most recent tokens,
        itself included), <= segment_length.
    local_attention: "sliding" (SlidingWindowAttention) or "hybrid" (HybridAttention: the window, landmarks at
        landmark_stride inside each segment, and num_memory_tokens learned memory tokens).
    num_landmark_tokens: landmarks per segment; must divide segment_length. landmark_stride =
        segment_length // num_landmark_tokens; the landmark of each block of landmark_stride tokens is its last token.
    selected_blocks: stage 3 block retrieval (experimental; default 0, off): each query also reads every token of
        the selected_blocks earlier blocks of landmark_stride tokens it scores highest (BlockSelectionAttention). Plain
        PyTorch, so slower. With stage_gates it makes the model learn cross-segment recall (benchmarks/
        hierarchical_recall.py, recorded at 6b93043: 0.500 held-out accuracy against chance without it).
    stage_gates: stage 1's and stage 2's outputs enter as x + g * (stage(x) - x) with a learned scalar g per stage
        that starts at 0 (experimental; default False): the model starts as embeddings into stage 3 and opens the
        earlier stages as they help. On benchmarks/hierarchical_recall's task with selected_blocks=4, the gates are
        what lets the model learn (0.500 recorded; probes without them stayed at chance for 400 steps), and they
        stayed near 0 in probes.
    cross_window: stage 2 window, in landmarks. cross_landmark_stride: stage 2 global landmarks every that many
        landmarks (default num_landmark_tokens: one per segment).
    intermediate_size: SwiGLU MLP width (default 4 * hidden_size, set in __post_init__).
    dropout: on the residual branches and embeddings, in [0, 1).
    retrieval: stage 3 gets a RetrievalCrossAttention layer over passages given to forward; max_retrieved: at most
        that many passages per row.
    gradient_checkpointing: recompute each block in the backward (torch.utils.checkpoint) while training.
    tie_word_embeddings: the LM head shares the token embedding matrix.
    rope_base, norm_eps, initializer_range, backend ("auto" | "triton" | "cpu" | "reference", for every kernel call).
    """

    vocab_size: int = 256
    hidden_size: int = 64
    num_local_layers: int = 2
    num_cross_layers: int = 1
    num_synthesis_layers: int = 1
    num_heads: int = 4
    num_kv_heads: int | None = None
    head_dim: int | None = None
    segment_length: int = 64
    window_size: int = 32
    local_attention: str = "sliding"
    num_memory_tokens: int = 0
    num_landmark_tokens: int = 4
    cross_window: int = 16
    selected_blocks: int = 0
    stage_gates: bool = False
    cross_landmark_stride: int | None = None
    intermediate_size: int | None = None
    dropout: float = 0.0
    retrieval: bool = False
    max_retrieved: int = 4
    gradient_checkpointing: bool = False
    tie_word_embeddings: bool = True
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    backend: str = "auto"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_heads", "segment_length", "window_size",
                     "num_landmark_tokens", "cross_window", "max_retrieved"):
            _check_int(name, getattr(self, name), 1)
        for name in ("num_local_layers", "num_cross_layers", "num_synthesis_layers", "num_memory_tokens",
                     "selected_blocks"):
            _check_int(name, getattr(self, name), 0)
        for name in ("num_kv_heads", "head_dim", "cross_landmark_stride", "intermediate_size"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        for name in ("retrieval", "gradient_checkpointing", "tie_word_embeddings", "stage_gates"):
            _check_bool(name, getattr(self, name))
        _check_choice("local_attention", self.local_attention, LOCAL_ATTENTIONS)
        _check_choice("backend", self.backend, BACKENDS)
        _check_float("dropout", self.dropout, 0.0, 1.0, high_open=True)
        _check_float("rope_base", self.rope_base, 1.0, math.inf)
        _check_float("norm_eps", self.norm_eps, 0.0, 1.0)
        _check_float("initializer_range", self.initializer_range, 0.0, 1.0)

        if self.num_local_layers + self.num_synthesis_layers == 0:
            raise ValueError("num_local_layers + num_synthesis_layers must be >= 1 (a model with no token-level "
                             f"block), got {self.num_local_layers} + {self.num_synthesis_layers}")
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads must divide num_heads ({self.num_heads}), got {self.num_kv_heads}")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size must be divisible by num_heads ({self.num_heads}) when head_dim is "
                                 f"not given, got {self.hidden_size}")
            self.head_dim = self.hidden_size // self.num_heads
        if not MIN_HEAD_DIM <= self.head_dim <= MAX_HEAD_DIM or self.head_dim % 2:
            raise ValueError(f"head_dim must be an even int in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}] (the kernels' range, "
                             f"RoPE), got {self.head_dim}")
        if self.window_size > self.segment_length:
            raise ValueError(f"window_size must be <= segment_length ({self.segment_length}), got "
                             f"{self.window_size}")
        if self.segment_length % self.num_landmark_tokens:
            raise ValueError(f"num_landmark_tokens must divide segment_length ({self.segment_length}), got "
                             f"{self.num_landmark_tokens}")
        if self.num_memory_tokens and self.local_attention != "hybrid":
            raise ValueError(f"num_memory_tokens needs local_attention='hybrid', got num_memory_tokens="
                             f"{self.num_memory_tokens} with local_attention={self.local_attention!r}")
        if self.cross_landmark_stride is None:
            self.cross_landmark_stride = self.num_landmark_tokens
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size

    @property
    def landmark_stride(self):
        """Tokens per landmark: segment_length // num_landmark_tokens."""
        return self.segment_length // self.num_landmark_tokens

    def to_dict(self):
        """Plain JSON-able dict of every field (derived defaults filled in)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data):
        """A config from a dict of fields; unknown keys raise ValueError (never ignored)."""
        if not isinstance(data, dict):
            raise TypeError(f"from_dict takes a dict of HierarchicalConfig fields, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown HierarchicalConfig field(s) {unknown}; the fields are {sorted(known)}")
        return cls(**data)
