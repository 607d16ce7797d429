"""Ready-made cascade models (the protocol of hybridrag.distillation.cascade) and the encoder wrapper they need.

- KnowledgeBaseAnswerer(knowledge_base, k=5, mode="dense"): retrieval as a model: result = the ids of the top k
  documents, scores = their scores. A student over a cheap encoder (HashingEncoder, a HybridEncoder, int8) and a
  teacher over all-MiniLM-L6-v2, both hybridrag.retrieval.KnowledgeBase: `retrieval_cascade` builds the pair.
- SystemAnswerer(system, method="hybrid", top_k=None, attention=False): a HybridRAGSystem's answers as a model:
  result = the response text, scores = the retrieved passages' scores, attention_quality with attention=True. A
  student may be base RAG over fewer passages (top_k=1) or an int8 system; the teacher the float system.
- RetrievalEncoder(encoder, name=None): an encoder with .dimension and .encode(texts) (a HybridEncoder) in the
  retrieval encoder interface a KnowledgeBase takes (.name, .dimension, .encode(list) -> float32 (N, d),
  L2-normalised rows).

Layering: this module imports hybridrag.retrieval (downward) only when it builds knowledge bases; the system is used
through its methods (duck typing), never imported, so distillation stays below system.
"""
import hashlib
import json

import numpy as np

from .cascade import TeacherStudentCascade

__all__ = ["KnowledgeBaseAnswerer", "SystemAnswerer", "RetrievalEncoder", "as_retrieval_encoder",
           "retrieval_cascade", "SEARCH_MODES", "SYSTEM_METHODS"]

SEARCH_MODES = ("dense", "bm25", "hybrid")
SYSTEM_METHODS = ("hybrid", "base_rag", "direct")


def _check_count(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class KnowledgeBaseAnswerer:
    """A knowledge base's search as a cascade model.

    answer(query) -> {"result": [document ids, best first], "scores": [their scores], "hits": [SearchResult]}.

    Args:
        knowledge_base: an object with search(query, k, mode, candidates=...) -> [SearchResult] (a
            hybridrag.retrieval.KnowledgeBase).
        k: documents per query (>= 1). The "margin" measure needs two scores: with k = 1 it is inf (always kept).
        mode: "dense" (cosine of the encoder's vectors: what differs between a student's and a teacher's encoder),
            "bm25" or "hybrid".
        candidates: per-retriever candidates that hybrid search fuses.
    """

    def __init__(self, knowledge_base, *, k=5, mode="dense", candidates=50):
        if not callable(getattr(knowledge_base, "search", None)):
            raise TypeError(f"knowledge_base must have a search(query, k, mode) method (a KnowledgeBase), got "
                            f"{type(knowledge_base).__name__}")
        if mode not in SEARCH_MODES:
            raise ValueError(f"mode must be one of {SEARCH_MODES}, got {mode!r}")
        self.knowledge_base = knowledge_base
        self.k = _check_count("k", k)
        self.mode = mode
        self.candidates = _check_count("candidates", candidates)

    def __repr__(self):
        return f"KnowledgeBaseAnswerer({self.knowledge_base!r}, k={self.k}, mode={self.mode!r})"

    def answer(self, query):
        hits = self.knowledge_base.search(query, self.k, self.mode, candidates=self.candidates)
        return {"result": [hit.document.id for hit in hits], "scores": [hit.score for hit in hits], "hits": hits}

    __call__ = answer


class SystemAnswerer:
    """A HybridRAGSystem's answers as a cascade model.

    answer(question) -> {"result": the response text, "scores": the retrieved passages' scores (best first),
    "attention_quality": float in [0, 1] with attention=True (else None), "response": generate_response's whole
    dict}.

    Args:
        system: a HybridRAGSystem with a knowledge base (used through retrieve, generate_response and
            analyze_attention_patterns).
        method: "hybrid", "base_rag" or "direct" (no passages: no scores, so "margin"/"entropy" escalate it).
        top_k: None (the system's retriever.top_k passages) or the passages the answer is generated from. With
            top_k, max(top_k, 2) passages are retrieved so that a margin exists; the answer reads the first top_k,
            and "scores" holds all of them.
        attention: also measure attention_quality (analyze_attention_patterns: needs
            attn_implementation="hybridrag"; one answer, not two). Not with method="direct".
        on_token: None or a callable given each decoded piece of the answer as generate_response's on_token (to
            stream it, or to stop it by raising).

    Students and teachers of one knowledge base: an int8 student is a second system with int8=True given the
    teacher's knowledge base (student.knowledge_base = teacher.knowledge_base); a base-RAG student over fewer
    passages is SystemAnswerer(system, method="base_rag", top_k=1) next to SystemAnswerer(system) as the teacher.
    """

    def __init__(self, system, *, method="hybrid", top_k=None, attention=False, on_token=None):
        for name in ("retrieve", "generate_response", "analyze_attention_patterns"):
            if not callable(getattr(system, name, None)):
                raise TypeError(f"system must be a HybridRAGSystem (with retrieve, generate_response and "
                                f"analyze_attention_patterns); {type(system).__name__} has no {name}")
        if method not in SYSTEM_METHODS:
            raise ValueError(f"method must be one of {SYSTEM_METHODS}, got {method!r}")
        if top_k is not None:
            _check_count("top_k", top_k)
            if method == "direct":
                raise ValueError("top_k applies to methods that retrieve; method='direct' retrieves nothing")
        if not isinstance(attention, bool):
            raise TypeError(f"attention must be True or False, got {attention!r}")
        if attention and method == "direct":
            raise ValueError("attention=True measures the attention on passages; method='direct' has none")
        if on_token is not None and not callable(on_token):
            raise TypeError(f"on_token must be None or a callable(piece), got {type(on_token).__name__}")
        self.system, self.method, self.top_k, self.attention = system, method, top_k, attention
        self.on_token = on_token

    def __repr__(self):
        return f"SystemAnswerer(method={self.method!r}, top_k={self.top_k}, attention={self.attention})"

    def answer(self, question):
        options = {} if self.on_token is None else {"on_token": self.on_token}
        hits = None
        if self.top_k is not None:
            hits = self.system.retrieve(question, max(self.top_k, 2))
            options["retrieved"] = hits[:self.top_k]
        quality = None
        if self.attention:
            analysis = self.system.analyze_attention_patterns(question, method=self.method, **options)
            response, quality = analysis["result"], analysis["attention_quality"]
        else:
            response = self.system.generate_response(question, method=self.method, **options)
        scores = [hit.score for hit in hits] if hits is not None else [p["score"] for p in response["passages"]]
        return {"result": response["response"], "scores": scores, "attention_quality": quality,
                "response": response}

    __call__ = answer


def _state_digest(module):
    """sha256 of a torch module's config (when it has one with to_dict) and every state tensor's name, dtype,
    shape and bytes."""
    import torch

    digest = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None and callable(getattr(config, "to_dict", None)):
        digest.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in module.state_dict().items():
        if not isinstance(tensor, torch.Tensor):
            digest.update(f"{name}={tensor!r}".encode())
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class RetrievalEncoder:
    """An encoder with .dimension and .encode(texts) (e.g. hybridrag.encoders.HybridEncoder) in the interface a
    KnowledgeBase takes: .name, .dimension and .encode(list of str) -> float32 (N, dimension) with L2-normalised
    rows (re-normalised here; a zero row stays zero).

    name: stored in the knowledge base's manifest, which refuses to load with an encoder of another name. None
        names a torch module by a digest of its config and weights taken now ("HybridEncoder-<12 hex>"): a knowledge
        base built with these weights is refused with other weights. Train the encoder first, then wrap it. An
        encoder that is not a torch module needs an explicit name.
    tokenizer: the wrapped encoder's (KnowledgeBase.build(chunk_tokens=...) counts tokens with it), None if none.
    Output that is not (N, dimension) or not finite is a ValueError.
    """

    def __init__(self, encoder, name=None):
        dimension = getattr(encoder, "dimension", None)
        if not callable(getattr(encoder, "encode", None)) or dimension is None:
            raise TypeError(f"encoder must have .dimension and .encode(texts) (a HybridEncoder), got "
                            f"{type(encoder).__name__}")
        self.dimension = _check_count("encoder.dimension", dimension)
        if name is None:
            if not callable(getattr(encoder, "state_dict", None)):
                raise ValueError(f"name is needed for a {type(encoder).__name__} (only a torch module can be named "
                                 "by its weights)")
            name = f"{type(encoder).__name__}-{_state_digest(encoder)[:12]}"
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be None or a non-empty str, got {name!r}")
        self.name = name
        self.encoder = encoder

    def __repr__(self):
        return f"RetrievalEncoder(name={self.name!r}, dimension={self.dimension})"

    @property
    def tokenizer(self):
        return getattr(self.encoder, "tokenizer", None)

    def encode(self, texts, **options):
        """float32 (N, dimension), rows L2-normalised; options (batch_size, show_progress) are accepted for the
        encoder interface and unused."""
        from ..retrieval.encoder import check_texts

        texts = check_texts(texts)
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        vectors = np.asarray(self.encoder.encode(texts), dtype=np.float32)
        if vectors.shape != (len(texts), self.dimension):
            raise ValueError(f"encoder {self.name!r} returned shape {vectors.shape} for {len(texts)} texts, expected "
                             f"({len(texts)}, {self.dimension})")
        if not np.isfinite(vectors).all():
            raise ValueError(f"encoder {self.name!r} returned non-finite values")
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32)


def as_retrieval_encoder(encoder):
    """`encoder` itself when it already has the retrieval interface (.name, .dimension, .encode: HashingEncoder,
    DenseEncoder, RetrievalEncoder), else RetrievalEncoder(encoder) (a HybridEncoder, named by its weights)."""
    if isinstance(getattr(encoder, "name", None), str) and hasattr(encoder, "dimension") \
            and callable(getattr(encoder, "encode", None)):
        return encoder  # already a retrieval encoder (HashingEncoder, DenseEncoder, RetrievalEncoder)
    return RetrievalEncoder(encoder)


def retrieval_cascade(documents, student_encoder, teacher_encoder=None, *, k=5, mode="dense", measure="margin",
                      threshold=None, index_kind="auto"):
    """A TeacherStudentCascade of two KnowledgeBaseAnswerers over the same documents.

    Args:
        documents: a non-empty list of hybridrag.retrieval.Document, indexed as they are by both knowledge bases
            (chunk them first, once, with hybridrag.retrieval.chunk_documents: chunking by each encoder's own
            tokenizer would give the two sides different passages under the same ids).
        student_encoder: a retrieval encoder (HashingEncoder, DenseEncoder) or an encoder with .dimension and
            .encode (a HybridEncoder, wrapped in RetrievalEncoder).
        teacher_encoder: the same kinds; None = the bundled all-MiniLM-L6-v2 (DenseEncoder()).
        k, mode: of both answerers (see KnowledgeBaseAnswerer). measure, threshold: of the cascade.
    The student and the teacher are at `cascade.student.knowledge_base` and `cascade.teacher.knowledge_base`.
    """
    from ..retrieval.encoder import DenseEncoder
    from ..retrieval.knowledge_base import KnowledgeBase

    if student_encoder is None:
        raise TypeError("student_encoder must be an encoder, got None")
    student_encoder = as_retrieval_encoder(student_encoder)
    teacher_encoder = DenseEncoder() if teacher_encoder is None else as_retrieval_encoder(teacher_encoder)
    student = KnowledgeBaseAnswerer(KnowledgeBase.build(documents, student_encoder, index_kind=index_kind), k=k,
                                    mode=mode)
    teacher = KnowledgeBaseAnswerer(KnowledgeBase.build(documents, teacher_encoder, index_kind=index_kind), k=k,
                                    mode=mode)
    return TeacherStudentCascade(student, teacher, measure, threshold)
