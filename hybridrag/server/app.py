"""`create_app`: the FastAPI application over a HybridRAGSystem.

    POST /query             answer a question (base RAG by default; "method" picks hybrid, base_rag or direct)
    POST /query/hybrid      the hybrid method; its passages come from the hybrid encoder's index when the server has one
                            (`hybrid_encoder`: the knowledge base indexed once more with it, kept in step)
    POST /stream/query      the answer as server-sent events: "token" events {"i", "text"}, then one "done" event
                            with the whole answer (the /query body), or an "error" event {"status", "detail"}
    POST /documents         add documents (chunked and indexed as the system builds its knowledge base)   [key]
    POST /documents/remove  remove documents by id                                                         [key]
    GET  /documents         the documents' ids, titles and passage counts
    POST /retention/update  move the attention-feedback weights of passages                                [key]
    POST /diffusion/generate  synthetic passages from the document generator (--generator), scored for relevance
                            and novelty; with "add": the accepted ones become documents flagged synthetic    [key]
    POST /distillation/cascade  the student (base RAG over the top passage) answers; the teacher (the hybrid
                            method over top_k passages) only when the student's confidence is under the threshold
    GET  /hybrid/stats      knowledge base, queue, passage-store and cascade counts
    GET  /health            liveness
    GET  /                  the web page (static/index.html): ask, answers streaming in per method side by side,
                            each passage's attention mass as a bar
    GET  /openapi.json, /docs  the schema and its page

Generation runs through a bounded GenerationQueue: a request that finds it full gets 429 with Retry-After and is
not queued; an accepted one is answered exactly once, gets 504 past `timeout_s` (or the request's own smaller
"timeout_s"; its generation stops), and stops
generating when its client disconnects. [key]: with `api_key` set, these need the header X-API-Key (401 without).
Bodies over `max_body_bytes` get 413; a field that fails validation gets 422 naming it ({"detail": [{"loc",
"msg", "type"}]}, FastAPI's form, also for the checks the system makes). With `state_dir`, every change to the
knowledge base or the weights is saved there (each written atomically) before the reply, and the whole system
(HybridRAGSystem.save, with the passage store) at shutdown.
"""
import asyncio
import collections
import hmac
import json
import math
import re
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import torch
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from ..diffusion import filter_samples
from ..diffusion.quality import SYNTHETIC
from ..distillation import SystemAnswerer, TeacherStudentCascade
from ..distillation.config import check_threshold
from ..pipeline.vector_store import HybridVectorStoreAdapter
from ..retrieval.documents import Document, source_id
from .generation_queue import GenerationCancelled, GenerationQueue, Job
from .limits import BodySizeLimit
from .schemas import (AddDocumentsRequest, CascadeRequest, CascadeResponse, DocumentsChanged, ErrorBody,
                      GeneratedPassage, GenerateRequest, GenerateResponse, Health, HybridQueryRequest, QueryRequest,
                      QueryResponse, RemoveDocumentsRequest, RetentionUpdateRequest, RetentionUpdateResponse, Stats)

POLL_S = 0.1  # how often a waiting request looks for its client's disconnect
PAGE = Path(__file__).parent / "static" / "index.html"
CASCADE_MEASURES = ("margin", "entropy", "attention")  # what a SystemAnswerer's answer carries
SYNTHETIC_ID = re.compile(r"synthetic-(\d+)")

def _errors(*codes):
    """The OpenAPI entries of the error statuses a route can answer besides 200 and 422 (bodies {"detail": str})."""
    meaning = {401: "the X-API-Key header is missing or wrong", 409: "the server is not set up for this",
               413: "the body is over the size limit", 429: "the generation queue is full: retry after Retry-After s",
               504: "no answer within the time limit; the generation was stopped"}
    return {code: {"model": ErrorBody, "description": meaning[code]} for code in (*codes, 413)}


GENERATES = _errors(429, 504)


def _invalid(field, message):
    """A 422 in FastAPI's validation form, for a check the system makes."""
    return HTTPException(422, detail=[{"loc": ["body", field], "msg": message, "type": "value_error"}])


def _answer_body(job, result, encoder=None):
    passages = [{"id": p["id"], "text": p["text"], "score": float(p["score"]),
                 "attention_mass": None if p.get("attention_mass") is None else float(p["attention_mass"])}
                for p in result["passages"]]
    return QueryResponse(request_id=job.id, response=result["response"], method=result["method"],
                         success=bool(result["success"]), passages=passages, citations=list(result["citations"]),
                         timings={k: float(v) for k, v in result["timings"].items()},
                         tokens_per_second=result.get("tokens_per_second"),
                         prompt_tokens=int(result["prompt_tokens"]),
                         encoder=None if result["method"] == "direct" else encoder).model_dump()


def create_app(system, *, state_dir=None, api_key=None, capacity=16, batch_size=4, timeout_s=120.0,
               max_body_bytes=2_000_000, cascade_measure="margin", cascade_threshold=None, generator=None,
               hybrid_encoder=None):
    """The app serving `system` (a HybridRAGSystem with a knowledge base). See the module docstring.

    cascade_measure: the student's confidence in /distillation/cascade: "margin" (top-1 minus top-2 retrieval
    score), "entropy" (1 - the normalised entropy of the scores' softmax) or "attention" (the answer's attention
    quality; needs attn_implementation="hybridrag"). cascade_threshold: the default threshold (None: each request
    must give one); choose it on validation questions with TeacherStudentCascade.calibrate.
    generator: None or the DocumentGenerator (hybridrag.diffusion) of /diffusion/generate, trained with this
    knowledge base's encoder. hybrid_encoder: None or the encoder (a HybridEncoder) whose index /query/hybrid
    retrieves from: every passage is encoded with it here, once (the index is rebuilt at each start, not saved).
    """
    if system.knowledge_base is None:
        raise ValueError("system has no knowledge base: call create_vectorstore(documents) before serving it")
    if api_key is not None and (not isinstance(api_key, str) or len(api_key) < 8):
        raise ValueError("api_key must be None or a str of at least 8 characters")
    if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if cascade_measure not in CASCADE_MEASURES:
        raise ValueError(f"cascade_measure must be one of {CASCADE_MEASURES}, got {cascade_measure!r}")
    cascade_threshold = check_threshold(cascade_threshold, cascade_measure, "cascade_threshold")
    if generator is not None and generator.encoder.name != system.knowledge_base.encoder.name:
        raise ValueError(f"generator is conditioned on encoder {generator.encoder.name!r} but the knowledge base "
                         f"uses {system.knowledge_base.encoder.name!r}")
    store = None if hybrid_encoder is None else HybridVectorStoreAdapter(system.knowledge_base, hybrid_encoder)
    if store is not None:
        store.refresh()  # the hybrid index of every passage
    own_encoder = system.knowledge_base.encoder.name
    hybrid_name = own_encoder if store is None else store.encoder.name
    started = time.monotonic()
    write_lock = threading.Lock()  # one knowledge-base or weights change (and its save) at a time
    cascade_counts = {"queries": 0, "kept": 0, "escalated": 0, "student_seconds": 0.0, "teacher_seconds": 0.0}

    def answer(job):
        """Worker thread: the job's payload is a function of its on_token callback."""
        return job.payload(job.on_token)

    queue = GenerationQueue(answer, capacity=capacity, batch_size=batch_size)

    @asynccontextmanager
    async def lifespan(app):
        queue.start()
        yield
        await queue.close()  # the accepted requests are answered first
        if state_dir is not None:
            await asyncio.to_thread(system.save, state_dir)  # now with the passage store

    app = FastAPI(title="hybridrag", version="0.1.0", lifespan=lifespan,
                  description="Hybrid RAG over your documents with an offline LLM on hybridrag's kernels.")
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)

    @app.exception_handler(Exception)
    async def internal_error(request, error):  # still JSON, and says what broke (the server log has the trace)
        return JSONResponse({"detail": f"internal error: {type(error).__name__}: {error}"}, status_code=500)

    app.state.queue, app.state.system = queue, system

    def require_key(x_api_key: str | None = Header(None, description="needed when the server has an API key")):
        if api_key is not None and not hmac.compare_digest((x_api_key or "").encode(), api_key.encode()):
            raise HTTPException(401, detail="a valid X-API-Key header is needed for this endpoint",
                                headers={"WWW-Authenticate": "X-API-Key"})

    async def admit(payload, stream=False):
        job = Job(payload, asyncio.get_running_loop(), stream=stream)
        if not await queue.submit(job):
            seconds = queue.retry_after()
            raise HTTPException(429, detail=f"the generation queue is full ({queue.capacity} waiting); retry after "
                                            f"{seconds} s", headers={"Retry-After": str(seconds)})
        return job

    def limit(body):
        return min(timeout_s, body.timeout_s) if body.timeout_s is not None else timeout_s

    async def settle(request, job, seconds, field="question"):
        """The job's answer; 504 past `seconds`, 422 naming `field` for an input the system refuses."""
        deadline = time.monotonic() + seconds
        while not job.future.done():
            if await request.is_disconnected():
                job.cancel()
                raise HTTPException(499, detail="the client disconnected")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                job.cancel()
                queue.count_timeout()
                raise HTTPException(504, detail=f"no answer within {seconds} s; the generation was stopped")
            await asyncio.wait({job.future}, timeout=min(POLL_S, remaining))
        try:
            return job.future.result()
        except ValueError as refused:
            raise _invalid(field, str(refused)) from None
        except GenerationCancelled as cancelled:
            raise HTTPException(499, detail=str(cancelled)) from None

    def generation(body, method, hybrid_index=False):
        def run(on_token):
            hits = None
            if hybrid_index and store is not None:
                r = system.config.retriever
                hits = store.search(body.question, r.top_k, r.mode, candidates=r.num_candidates)
            return system.generate_response(body.question, method=method, measure_attention=body.measure_attention,
                                            on_token=on_token, retrieved=hits)
        return run

    async def query(request, body, method, hybrid_index=False):
        job = await admit(generation(body, method, hybrid_index))
        return _answer_body(job, await settle(request, job, limit(body)), hybrid_name if hybrid_index else own_encoder)

    @app.post("/query", response_model=QueryResponse, responses=GENERATES,
              summary="Answer a question (base RAG unless method says)")
    async def query_endpoint(request: Request, body: QueryRequest):
        return await query(request, body, body.method)

    @app.post("/query/hybrid", response_model=QueryResponse, responses=GENERATES,
              summary="Answer a question with the hybrid method")
    async def query_hybrid(request: Request, body: HybridQueryRequest):
        return await query(request, body, "hybrid", hybrid_index=True)

    @app.post("/stream/query", summary="Answer a question as server-sent events",
              response_class=StreamingResponse, responses={200: {"content": {"text/event-stream": {}}}, **_errors(429)})
    async def stream_query(request: Request, body: QueryRequest):
        job = await admit(generation(body, body.method), stream=True)

        async def events():
            seconds = limit(body)
            try:
                index, deadline = 0, time.monotonic() + seconds
                while True:
                    try:
                        piece = await asyncio.wait_for(job.pieces.get(), max(0.0, deadline - time.monotonic()))
                    except TimeoutError:
                        job.cancel()
                        queue.count_timeout()
                        yield _event("error", {"status": 504, "detail": f"no answer within {seconds} s"})
                        return
                    if piece is None:
                        break
                    yield _event("token", {"i": index, "text": piece})
                    index += 1
                try:
                    yield _event("done", _answer_body(job, job.future.result(), own_encoder))
                except ValueError as refused:
                    yield _event("error", {"status": 422, "detail": str(refused)})
                except GenerationCancelled as cancelled:
                    yield _event("error", {"status": 499, "detail": str(cancelled)})
            finally:  # the client went away (the stream is cancelled), or it ended
                if not job.future.done():
                    job.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Request-Id": job.id})

    def save():
        """After a change: the hybrid encoder's index brought in step with the knowledge base, and everything saved
        but the passage store, a cache the generation thread may be filling right now; that is saved at shutdown,
        when no generation runs."""
        if store is not None:
            store.refresh()
        if state_dir is not None:
            system.save(state_dir, passages=False)

    def change_documents(add=None, remove=None):
        with write_lock:
            if add is not None:
                documents = [Document(d.id, d.text, d.title, dict(d.metadata)) for d in add]
                try:
                    changed = system.add_documents(documents)
                except ValueError as refused:
                    raise _invalid("documents", str(refused)) from None
                count = len(documents)
            else:
                present = {source_id(d) for d in system.knowledge_base.documents}
                count = len(set(remove) & present)
                changed = system.remove_documents(remove)
            save()
            return DocumentsChanged(documents=count, passages=changed, total_passages=len(system.knowledge_base))

    @app.post("/documents", response_model=DocumentsChanged, dependencies=[Depends(require_key)],
              responses=_errors(401),
              summary="Add documents to the knowledge base")
    async def add_documents(body: AddDocumentsRequest):
        return await asyncio.to_thread(change_documents, add=body.documents)

    @app.post("/documents/remove", response_model=DocumentsChanged, dependencies=[Depends(require_key)],
              responses=_errors(401),
              summary="Remove documents (and all their passages) by id")
    async def remove_documents(body: RemoveDocumentsRequest):
        return await asyncio.to_thread(change_documents, remove=body.ids)

    @app.get("/documents", summary="The documents: id, title, passage count and whether it is synthetic")
    async def list_documents():
        counts, firsts = collections.Counter(), {}
        for passage in system.knowledge_base.documents:
            counts[source_id(passage)] += 1
            firsts.setdefault(source_id(passage), passage)
        return {"documents": [{"id": i, "title": firsts[i].title, "passages": n,
                               "synthetic": firsts[i].metadata.get(SYNTHETIC) is True} for i, n in counts.items()]}

    def update_weights(body):
        if system.weights is None:
            raise HTTPException(409, detail="this system keeps no retention weights (attention_feedback is off in "
                                            "its config)")
        if len(body.feedback) != len(body.passage_ids):
            raise _invalid("feedback", f"needs one value per passage id: {len(body.passage_ids)} ids, "
                                       f"{len(body.feedback)} values")
        if not all(-1.0 <= value <= 1.0 for value in body.feedback):
            raise _invalid("feedback", "every value must be in [-1, 1]")
        unknown = [i for i in body.passage_ids if i not in system.knowledge_base]
        if unknown:
            raise _invalid("passage_ids", f"no such passages: {unknown[:5]}")
        with write_lock:
            system.weights.update(list(body.passage_ids), np.asarray(body.feedback, dtype=np.float64))
            save()
            weights = system.weights.weight(list(body.passage_ids))
        return RetentionUpdateResponse(weights=dict(zip(body.passage_ids, map(float, weights))))

    @app.post("/retention/update", response_model=RetentionUpdateResponse, dependencies=[Depends(require_key)],
              responses=_errors(401, 409),
              summary="Feedback on passages: moves their retrieval weights")
    async def retention_update(body: RetentionUpdateRequest):
        return await asyncio.to_thread(update_weights, body)

    def generate_passages(body):
        """Worker thread: the generator's passages, their embeddings' similarity to the condition and to their
        nearest knowledge-base passage (found by the index, so no N x corpus matrix), and the filter's verdict."""
        texts = generator.generate(body.condition, body.num_samples, body.num_steps, temperature=body.temperature,
                                   seed=body.seed)
        knowledge_base = system.knowledge_base
        encoder = knowledge_base.encoder
        texts = [text for text in texts if text.strip()]  # every word [UNK]: nothing to score or index
        if not texts:
            return []
        vectors = np.asarray(encoder.encode(texts), dtype=np.float32)
        condition = np.asarray(encoder.encode([body.condition]), dtype=np.float32)[0]
        neighbours = [hits[0].document.id for hits in knowledge_base.search_vectors(vectors, k=1) if hits]
        corpus = knowledge_base.embeddings_for(neighbours) if neighbours else None
        bounds = None
        if body.authentic and neighbours:
            # each neighbour's nearest other passage in the whole knowledge base, not only among the neighbours
            bounds = torch.tensor([next((h.score for h in hits if h.document.id != own), -1.0) for own, hits
                                   in zip(neighbours, knowledge_base.search_vectors(corpus, k=2))]).clamp(-1, 1)
        result = filter_samples(torch.from_numpy(vectors), torch.from_numpy(condition),
                                None if corpus is None else torch.from_numpy(corpus),
                                min_similarity=body.min_similarity, max_corpus_similarity=body.max_corpus_similarity,
                                authentic=body.authentic, corpus_neighbour_similarity=bounds)
        accepted = set(result.accepted.tolist())
        return [{"text": text, "similarity": float(result.similarity[i]),
                 "corpus_similarity": _finite(result.corpus_similarity[i]), "score": float(result.score[i]),
                 "copy_bound": float(result.copy_bound[i]) if body.authentic else None,
                 "accepted": i in accepted} for i, text in enumerate(texts)]

    def add_synthetic(body, samples):
        """Add the accepted samples as documents synthetic-<n> (n counting on from the largest there)."""
        with write_lock:
            numbers = [int(m.group(1)) for d in system.knowledge_base.documents
                       if (m := SYNTHETIC_ID.fullmatch(source_id(d)))]
            start = max(numbers, default=-1) + 1
            documents = []
            for sample in (s for s in samples if s["accepted"]):
                sample["id"] = f"synthetic-{start + len(documents)}"
                documents.append(Document(sample["id"], sample["text"], metadata={
                    SYNTHETIC: True, "condition": body.condition, "similarity": sample["similarity"],
                    "corpus_similarity": sample["corpus_similarity"], "score": sample["score"]}))
            if documents:
                try:
                    system.add_documents(documents)
                except ValueError as refused:  # nothing was added
                    raise _invalid("add", str(refused)) from None
                save()
            return [d.id for d in documents]

    @app.post("/diffusion/generate", response_model=GenerateResponse, responses=_errors(401, 409, 429, 504),
              summary="Synthetic passages about a condition, filtered for relevance and novelty; optionally added")
    async def diffusion_generate(request: Request, body: GenerateRequest,
                                 x_api_key: str | None = Header(None, description="needed with add=true when the "
                                                                                   "server has an API key")):
        if body.add:
            require_key(x_api_key)
        if generator is None:
            raise HTTPException(409, detail="this server has no document generator: train one with `hybridrag "
                                            "train-generator --kb DIR --out FILE` and start the server with "
                                            "--generator FILE")
        if body.authentic and len(system.knowledge_base) < 2:
            raise _invalid("authentic", f"the copy test needs 2 passages or more; the knowledge base holds "
                                        f"{len(system.knowledge_base)}")
        job = await admit(lambda on_token: generate_passages(body))
        samples = await settle(request, job, limit(body), "condition")
        added = await asyncio.to_thread(add_synthetic, body, samples) if body.add else []
        return GenerateResponse(request_id=job.id, samples=[GeneratedPassage(**s) for s in samples], added=added,
                                total_passages=len(system.knowledge_base))

    def run_cascade(question, threshold, on_token):
        """Worker thread: one cascade answer; the counts are only touched here, on the one worker."""
        attention = cascade_measure == "attention"
        student = SystemAnswerer(system, method="base_rag", top_k=1, attention=attention, on_token=on_token)
        teacher = SystemAnswerer(system, method="hybrid", attention=attention, on_token=on_token)
        outcome = TeacherStudentCascade(student, teacher, cascade_measure, threshold).run(question)
        cascade_counts["queries"] += 1
        cascade_counts["escalated" if outcome["escalated"] else "kept"] += 1
        cascade_counts["student_seconds"] += outcome["seconds"]["student"]
        cascade_counts["teacher_seconds"] += outcome["seconds"]["teacher"]
        return outcome

    @app.post("/distillation/cascade", response_model=CascadeResponse, responses=GENERATES,
              summary="Answer with the cheap student; escalate to the teacher when it is not confident enough")
    async def distillation_cascade(request: Request, body: CascadeRequest):
        threshold = cascade_threshold if body.threshold is None else body.threshold
        if threshold is None:
            raise _invalid("threshold", "this server has no default cascade threshold (start it with "
                                        "--cascade-threshold): give one in the request")
        try:
            threshold = check_threshold(threshold, cascade_measure)
        except ValueError as refused:
            raise _invalid("threshold", str(refused)) from None
        job = await admit(lambda on_token: run_cascade(body.question, threshold, on_token))
        outcome = await settle(request, job, limit(body))
        chosen = outcome["teacher"] if outcome["escalated"] else outcome["student"]
        return CascadeResponse(answer=_answer_body(job, chosen["response"], own_encoder),
                               answered_by=outcome["answered_by"], escalated=outcome["escalated"],
                               confidence=_finite(outcome["confidence"]), threshold=_finite(threshold),
                               student_response=outcome["student"]["result"],
                               seconds={k: float(v) for k, v in outcome["seconds"].items()})

    @app.get("/hybrid/stats", response_model=Stats, summary="Knowledge base, queue and passage-store counts")
    async def stats():
        counts = system.knowledge_base.stats()  # "sources": the documents the passages were chunked from
        return Stats(documents=counts["sources"], passages=counts["documents"], queue=queue.stats(),
                     passage_store=_plain(system.passages.stats()), cascade=cascade_stats(),
                     uptime_s=time.monotonic() - started)

    def cascade_stats():
        counts = dict(cascade_counts)
        counts["kept_share"] = counts["kept"] / counts["queries"] if counts["queries"] else None
        return counts

    @app.get("/", include_in_schema=False)
    async def page():
        """The web page: ask, watch the answers stream in, the attention each passage got, methods side by side."""
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/health", response_model=Health, summary="Liveness")
    async def health():
        return Health(status="ok", model=str(system.config.model_path or "SmolLM2-135M-Instruct"),
                      passages=len(system.knowledge_base))

    return app


def _event(name, data):
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def _finite(value):
    """A float for JSON: None for +-inf (JSON has no infinity)."""
    value = float(value)
    return value if math.isfinite(value) else None


def _plain(value):
    """JSON-able copy of a stats dict (numpy numbers to Python ones)."""
    return json.loads(json.dumps(value, default=float))
