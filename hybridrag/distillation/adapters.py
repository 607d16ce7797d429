"""Ready-made cascade models (the protocol of hybridrag.distillation.cascade).

- KnowledgeBaseAnswerer(knowledge_base, k=5, mode="dense", by_document=False): retrieval as a model: result = the
  ids of the top k passages (by_document=True: of the documents they were chunked from), scores = their scores. A
  student over a cheap encoder (HashingEncoder, a HybridEncoder, int8) and a teacher over all-MiniLM-L6-v2, both
  hybridrag.retrieval.KnowledgeBase: `retrieval_cascade` builds the pair.
- SystemAnswerer(system, method="hybrid", top_k=None, attention=False): a HybridRAGSystem's answers as a model:
  result = the response text, scores = the retrieved passages' scores, attention_quality with attention=True. A
  student may be base RAG over fewer passages (top_k=1) or an int8 system; the teacher the float system.

Layering: this module imports hybridrag.retrieval (downward): its documents module (no search packages) at
import, the knowledge base and the encoders only when it builds knowledge bases; the system is used
through its methods (duck typing), never imported, so distillation stays below system.
"""
from ..retrieval.documents import source_id
from .cascade import TeacherStudentCascade

__all__ = ["KnowledgeBaseAnswerer", "SystemAnswerer", "retrieval_cascade", "SEARCH_MODES", "SYSTEM_METHODS"]

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
        by_document: False: the hits are the passages as stored. True: passages are folded into the documents they
            were chunked from (metadata "source_id", see chunk_documents), each document at its best passage, so a
            "margin" is top-1 minus top-2 document and not two windows of one document (which made a chunked
            knowledge base's student escalate questions it had right). The best max(k, candidates) passages are
            searched and folded; result = up to k source ids, scores = their best passage's score, hits = those
            passages.
    """

    def __init__(self, knowledge_base, *, k=5, mode="dense", candidates=50, by_document=False):
        if not callable(getattr(knowledge_base, "search", None)):
            raise TypeError(f"knowledge_base must have a search(query, k, mode) method (a KnowledgeBase), got "
                            f"{type(knowledge_base).__name__}")
        if mode not in SEARCH_MODES:
            raise ValueError(f"mode must be one of {SEARCH_MODES}, got {mode!r}")
        self.knowledge_base = knowledge_base
        self.k = _check_count("k", k)
        self.mode = mode
        self.candidates = _check_count("candidates", candidates)
        if not isinstance(by_document, bool):
            raise TypeError(f"by_document must be True or False, got {by_document!r}")
        self.by_document = by_document

    def __repr__(self):
        return (f"KnowledgeBaseAnswerer({self.knowledge_base!r}, k={self.k}, mode={self.mode!r}, "
                f"by_document={self.by_document})")

    def answer(self, query):
        if not self.by_document:
            hits = self.knowledge_base.search(query, self.k, self.mode, candidates=self.candidates)
            return {"result": [hit.document.id for hit in hits], "scores": [hit.score for hit in hits], "hits": hits}
        best = {}
        for hit in self.knowledge_base.search(query, max(self.k, self.candidates), self.mode,
                                              candidates=self.candidates):
            best.setdefault(source_id(hit.document), hit)  # hits come best first
        hits = list(best.values())[:self.k]
        return {"result": [source_id(hit.document) for hit in hits], "scores": [hit.score for hit in hits],
                "hits": hits}

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


def retrieval_cascade(documents, student_encoder, teacher_encoder=None, *, k=5, mode="dense", measure="margin",
                      threshold=None, index_kind="auto", by_document=False):
    """A TeacherStudentCascade of two KnowledgeBaseAnswerers over the same documents.

    Args:
        documents: a non-empty list of hybridrag.retrieval.Document, indexed as they are by both knowledge bases
            (chunk them first, once, with hybridrag.retrieval.chunk_documents: chunking by each encoder's own
            tokenizer would give the two sides different passages under the same ids).
        student_encoder: a retrieval encoder (HashingEncoder, DenseEncoder, HybridTextEncoder) or a HybridEncoder
            (wrapped in a HybridTextEncoder named by its weights: hybridrag.retrieval.encoder.as_retrieval_encoder).
        teacher_encoder: the same kinds; None = the bundled all-MiniLM-L6-v2 (DenseEncoder()).
        k, mode, by_document: of both answerers (see KnowledgeBaseAnswerer; by_document=True when `documents` are
            chunks, so that the margin compares documents). measure, threshold: of the cascade.
    The student and the teacher are at `cascade.student.knowledge_base` and `cascade.teacher.knowledge_base`.
    """
    from ..retrieval.encoder import DenseEncoder, as_retrieval_encoder
    from ..retrieval.knowledge_base import KnowledgeBase

    if student_encoder is None:
        raise TypeError("student_encoder must be an encoder, got None")
    student_encoder = as_retrieval_encoder(student_encoder)
    teacher_encoder = DenseEncoder() if teacher_encoder is None else as_retrieval_encoder(teacher_encoder)
    student = KnowledgeBaseAnswerer(KnowledgeBase.build(documents, student_encoder, index_kind=index_kind), k=k,
                                    mode=mode, by_document=by_document)
    teacher = KnowledgeBaseAnswerer(KnowledgeBase.build(documents, teacher_encoder, index_kind=index_kind), k=k,
                                    mode=mode, by_document=by_document)
    return TeacherStudentCascade(student, teacher, measure, threshold)
