"""The HTTP API's request and response bodies (pydantic): what a client sends and gets back, as the OpenAPI schema
shows them. Unknown fields are refused (422 naming them), so a misspelt option never goes silently unused."""
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_QUESTION_CHARS = 4000
MAX_DOCUMENT_CHARS = 1_000_000
MAX_BATCH = 1000

Method = Literal["hybrid", "base_rag", "direct"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
                                  description="one value per passage in [-1, 1]: how much it helped (negative: it misled)")


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


class Stats(BaseModel):
    documents: int
    passages: int
    queue: QueueStats
    passage_store: dict
    uptime_s: float
