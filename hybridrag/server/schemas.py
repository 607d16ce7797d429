"""The HTTP API's request and response bodies (pydantic): what a client sends and gets back, as the OpenAPI schema
shows them. Unknown fields are refused (422 naming them), so a misspelt option never goes silently unused."""
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_QUESTION_CHARS = 4000
MAX_DOCUMENT_CHARS = 1_000_000
MAX_BATCH = 1000
MAX_SAMPLES = 32

Method = Literal["hybrid", "base_rag", "direct"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(BaseModel):
    detail: str = Field(description="what went wrong and what to do")


class QueryRequest(_Strict):
    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS, pattern=r"\S",
                          description="the question, answered from the knowledge base")
    method: Method = Field("base_rag", description="hybrid: cached passages stitched (the hybrid method); base_rag: "
                                                   "one prompt with full attention; direct: no retrieval")
    measure_attention: bool = Field(True, description="measure the attention mass the answer gives each passage")
    timeout_s: float | None = Field(None, gt=0, le=3600, description="this request's time limit in seconds (at "
                                                                     "most the server's --timeout)")


class HybridQueryRequest(_Strict):
    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS, pattern=r"\S")
    measure_attention: bool = True
    timeout_s: float | None = Field(None, gt=0, le=3600)


class Passage(BaseModel):
    id: str
    text: str
    score: float
    attention_mass: float | None = Field(None, description="share of the answer's attention this passage got")


class QueryResponse(BaseModel):
    request_id: str
    response: str
    method: Method
    success: bool
    passages: list[Passage]
    citations: list[str] = Field(description="ids of the passages that got at least their uniform share of the "
                                             "answer's attention, most attended first")
    timings: dict[str, float]
    tokens_per_second: float | None = None
    prompt_tokens: int
    encoder: str | None = Field(None, description="the encoder whose index the passages came from (null: direct)")


class CascadeRequest(_Strict):
    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS, pattern=r"\S")
    threshold: float | None = Field(None, ge=0, allow_inf_nan=False,
                                    description="keep the student's answer when its confidence is at least this "
                                                "(default: the server's --cascade-threshold)")
    timeout_s: float | None = Field(None, gt=0, le=3600)


class CascadeResponse(BaseModel):
    answer: QueryResponse = Field(description="the answer given: the student's when kept, else the teacher's")
    answered_by: Literal["student", "teacher"]
    escalated: bool
    confidence: float | None = Field(description="the student's confidence (the server's --cascade-measure); null "
                                                 "when infinite (a margin over a single passage)")
    threshold: float | None = Field(description="null when infinite (every answer escalates)")
    student_response: str = Field(description="the student's answer text (also when the teacher answered)")
    seconds: dict[str, float] = Field(description="student, teacher (0 when kept) and total")


class GenerateRequest(_Strict):
    condition: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS, pattern=r"\S",
                           description="what the synthetic passages should be about (a question or a topic)")
    num_samples: int = Field(4, ge=1, le=MAX_SAMPLES)
    num_steps: int | None = Field(None, ge=1, le=256, description="unmasking steps (default: the model's own)")
    temperature: float = Field(1.0, ge=0, le=10, allow_inf_nan=False,
                               description="> 0 samples each word; 0: the most likely word at each position")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    min_similarity: float | None = Field(None, ge=-1, le=1, allow_inf_nan=False,
                                         description="accept a passage only when its embedding's cosine with the "
                                                     "condition's is at least this (null: not checked)")
    max_corpus_similarity: float | None = Field(None, ge=-1, le=1, allow_inf_nan=False,
                                                description="accept a passage only when its nearest passage in the "
                                                            "knowledge base is at most this similar (novelty; "
                                                            "null: not checked)")
    authentic: bool = Field(False, description="the copy test: refuse a passage more similar to its nearest "
                                               "knowledge-base passage than that passage is to its own nearest "
                                               "other one (needs 2 passages or more)")
    add: bool = Field(False, description="add the accepted passages to the knowledge base as documents flagged "
                                         "synthetic (needs the API key when the server has one)")
    timeout_s: float | None = Field(None, gt=0, le=3600)


class GeneratedPassage(BaseModel):
    text: str
    similarity: float = Field(description="cosine of its embedding with the condition's")
    corpus_similarity: float | None = Field(description="cosine with its nearest passage in the knowledge base "
                                                        "(null when it is empty)")
    score: float = Field(description="similarity x (1 - max(corpus_similarity, 0))")
    copy_bound: float | None = Field(None, description="with authentic: its nearest passage's cosine with that "
                                                       "passage's own nearest other passage")
    accepted: bool
    id: str | None = Field(None, description="the document id it was added under (add=true, accepted)")


class GenerateResponse(BaseModel):
    request_id: str
    samples: list[GeneratedPassage] = Field(description="one per generated passage (one whose every word was out "
                                                        "of the generator's vocabulary is left out)")
    added: list[str] = Field(description="ids of the synthetic documents added")
    total_passages: int


class DocumentIn(_Strict):
    id: str = Field(min_length=1, max_length=200, pattern=r"^[^#\s][^#]*$",
                    description="the document's id ('#' is reserved for its passages' ids)")
    text: str = Field(min_length=1, max_length=MAX_DOCUMENT_CHARS, pattern=r"\S")
    title: str = Field("", max_length=1000)
    metadata: dict[str, str | int | float | bool | None] = Field(default_factory=dict)


class AddDocumentsRequest(_Strict):
    documents: list[DocumentIn] = Field(min_length=1, max_length=MAX_BATCH)


class RemoveDocumentsRequest(_Strict):
    ids: list[str] = Field(min_length=1, max_length=MAX_BATCH)


class DocumentsChanged(BaseModel):
    documents: int = Field(description="documents the request added or removed")
    passages: int = Field(description="passages (chunks) added or removed")
    total_passages: int


class RetentionUpdateRequest(_Strict):
    passage_ids: list[str] = Field(min_length=1, max_length=MAX_BATCH)
    feedback: list[float] = Field(min_length=1, max_length=MAX_BATCH,
                                  description="one value per passage in [-1, 1]: how much it helped (negative: it "
                                              "misled)")


class RetentionUpdateResponse(BaseModel):
    weights: dict[str, float]


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    passages: int


class QueueStats(BaseModel):
    pending: int
    running: int
    capacity: int
    accepted: int
    completed: int
    failed: int
    cancelled: int
    timed_out: int
    rejected: int


class CascadeStats(BaseModel):
    queries: int
    kept: int
    escalated: int
    kept_share: float | None
    student_seconds: float
    teacher_seconds: float


class Stats(BaseModel):
    documents: int
    passages: int
    queue: QueueStats
    passage_store: dict
    cascade: CascadeStats
    uptime_s: float
