"""HybridRAGPipeline: a HybridRAGSystem (the base RAG pipeline) with an optional hybrid encoder for retrieval, one
`query` call returning the answer and its sources, and real-time queries through the StreamProcessor.

    pipeline = HybridRAGPipeline(system, hybrid_encoder=encoder, use_hybrid=True)
    out = pipeline.query("What does the nonlocal statement do?", top_k=3)
    out["answer"], out["sources"]          # sources: [{id, text, score, attention_mass}]
    for stream_id, index, out in pipeline.stream_queries(["q1", ("user-7", "q2")]): ...

use_hybrid (per pipeline, or per call):
- True: the passages come from the hybrid encoder's index (HybridVectorStoreAdapter over the system's knowledge base)
  when a hybrid encoder was given, else from the system's own retrieval; the answer from the system's "hybrid"
  method (cached passage KV stitched under the passage pattern).
- False: the base pipeline as it is: the system's own retrieval (its encoder, attention-feedback weights, neural
  re-scoring) and its "base_rag" method (one prompt, full attention).
The hybrid-encoder side searches the hybrid index with the system's retriever.mode and num_candidates; the system's
attention-feedback weights and neural retriever belong to the original encoder's side (a system with a
neural_retriever is refused with a hybrid encoder: its towers read the original encoder's vectors).
"""
import asyncio
import time

from ..streaming.config import StreamingConfig
from ..system.system import HybridRAGSystem
from .vector_store import HybridVectorStoreAdapter

__all__ = ["HybridRAGPipeline"]


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


class HybridRAGPipeline:
    """The base RAG system with hybrid-encoder retrieval (module docstring).

    Args:
        base_rag_pipeline: a HybridRAGSystem. With a hybrid encoder, it must hold its knowledge base already
            (create_vectorstore or HybridRAGSystem.load), which the adapter indexes once with the hybrid encoder.
        hybrid_encoder: None (the system's own encoder), a HybridEncoder or any retrieval encoder, or a
            HybridVectorStoreAdapter built over the system's knowledge base. Its dimension must match the system's
            retriever.query_embed_dim / doc_embed_dim where those are set (a ValueError names them).
        use_hybrid: the default of query's use_hybrid.

    Attributes: system, vector_store (the HybridVectorStoreAdapter, None without a hybrid encoder), use_hybrid.
    """

    def __init__(self, base_rag_pipeline, hybrid_encoder=None, use_hybrid=True):
        if not isinstance(base_rag_pipeline, HybridRAGSystem):
            raise TypeError(f"base_rag_pipeline must be a HybridRAGSystem, got {type(base_rag_pipeline).__name__}")
        self.system = base_rag_pipeline
        self.use_hybrid = _check_bool("use_hybrid", use_hybrid)
        self.vector_store = None
        if hybrid_encoder is not None:
            if self.system.knowledge_base is None:
                raise ValueError("the system has no knowledge base to index with the hybrid encoder: call "
                                 "system.create_vectorstore(documents) (or HybridRAGSystem.load) first")
            if self.system.neural_retriever is not None:
                raise ValueError("the system has a neural_retriever, which re-scores with the original encoder's "
                                 "vectors; the hybrid encoder's side cannot apply it: leave out hybrid_encoder or the "
                                 "neural_retriever")
            if isinstance(hybrid_encoder, HybridVectorStoreAdapter):
                if hybrid_encoder.original is not self.system.knowledge_base:
                    raise ValueError("the HybridVectorStoreAdapter was built over another knowledge base than the "
                                     "system's: build it over system.knowledge_base")
                store = hybrid_encoder
            else:
                dimension = getattr(hybrid_encoder, "dimension", None)
                if dimension is not None:
                    self.system.config.retriever.check_against_encoder(dimension)
                store = HybridVectorStoreAdapter(self.system.knowledge_base, hybrid_encoder)
            if store.using_fallback:
                raise ValueError("the HybridVectorStoreAdapter has no hybrid encoder (it works on the fallback); "
                                 "give the pipeline hybrid_encoder=None for the system's own encoder")
            self.system.config.retriever.check_against_encoder(store.encoder.dimension)
            self.vector_store = store

    def __repr__(self):
        encoder = "the system's" if self.vector_store is None else repr(self.vector_store.encoder.name)
        return f"HybridRAGPipeline(use_hybrid={self.use_hybrid}, encoder={encoder}, system={self.system!r})"

    # ---------------------------------------------------------------- one query

    def _top_k(self, top_k):
        limit = self.system.config.attention.max_retrieved_segments
        if top_k is None:
            return min(self.system.config.retriever.top_k, limit)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be None (the system's retriever.top_k) or an int >= 1, got {top_k!r}")
        if top_k > limit:
            raise ValueError(f"top_k={top_k} is more than attention.max_retrieved_segments={limit}, the most passages "
                             "a prompt takes")
        return top_k

    def query(self, query, top_k=None, *, use_hybrid=None):
        """Answer `query` (a non-empty str) from the top_k passages (None: the system's retriever.top_k).

        Returns {"answer": str, "sources": [{id, text, score, attention_mass}] (the passages the answer read, in
        prompt order), "method": "hybrid" | "base_rag", "encoder": the name of the encoder that retrieved them,
        "citations", "success", "tokens_per_second", "timings": {retrieve, passages, prefill, first_token, decode,
        total} in seconds}.
        """
        if not isinstance(query, str):
            raise TypeError(f"query must be a str, got {type(query).__name__}")
        if not query.strip():
            raise ValueError("query is empty: ask something")
        use_hybrid = self.use_hybrid if use_hybrid is None else _check_bool("use_hybrid", use_hybrid)
        k = self._top_k(top_k)
        system = self.system
        if system.knowledge_base is None:
            raise ValueError("the system has no knowledge base: call system.create_vectorstore(documents) first")
        store = self.vector_store
        if store is not None and store.original is not system.knowledge_base:
            raise ValueError("the system's knowledge base was replaced after the pipeline indexed it: build a new "
                             "HybridRAGPipeline over the system")
        start = time.perf_counter()
        if use_hybrid and store is not None:
            r = system.config.retriever
            hits = store.search(query, k, r.mode, candidates=r.num_candidates)
            encoder = store.encoder.name
        else:
            hits = system.retrieve(query, k)
            encoder = system.knowledge_base.encoder.name
        retrieve = time.perf_counter() - start
        method = "hybrid" if use_hybrid else "base_rag"
        result = system.generate_response(query, method=method, retrieved=hits)
        timings = {**result["timings"], "retrieve": round(retrieve, 6)}
        timings["total"] = round(time.perf_counter() - start, 6)
        return {"answer": result["response"], "sources": result["passages"], "method": method, "encoder": encoder,
                "citations": result["citations"], "success": result["success"],
                "tokens_per_second": result["tokens_per_second"], "timings": timings}

    __call__ = query

    # ---------------------------------------------------------------- real-time queries

    async def astream_queries(self, queries, top_k=None, *, use_hybrid=None, streaming=None):
        """Answer queries as they arrive, through hybridrag.streaming.StreamProcessor: yields (stream_id, index,
        output) as each answer is ready, in order within each stream.

        queries: an iterable or async iterable of queries, each a str (stream 0) or a (stream_id, str) pair (any
            hashable stream_id: a user, a connection). index counts each stream's queries from 0.
        output: query()'s dict, or a hybridrag.streaming.StreamError when that query failed (a bad query, say);
            the processor then refuses that stream's later queries (StreamError too) and other streams go on.
        streaming: a StreamingConfig (or dict / JSON / YAML path; None = defaults): back-pressure (max_pending),
            batching (batch_size, timeout), max_results.
        The model answers one query at a time (the system is not built for concurrent answers), in a worker
        thread, so the event loop keeps accepting queries meanwhile.
        """
        config = StreamingConfig.from_any(streaming)
        lock, stop = asyncio.Lock(), asyncio.Event()

        async def answer(stream_id, query):
            if stop.is_set():
                raise _Skipped("the reader stopped reading before this query was answered")
            async with lock:
                return await asyncio.to_thread(self.query, query, top_k, use_hybrid=use_hybrid)

        processor = config.processor(answer)

        async def produce():
            try:
                async for stream_id, query in _pairs(queries):
                    await processor.submit(stream_id, query)
            finally:  # also after a bad item, so that results() ends; an early stop closes it below instead
                if not stop.is_set():
                    await processor.close()

        producer = asyncio.ensure_future(produce())
        exhausted = False
        try:
            async for item in processor.results():
                yield item
            exhausted = True
        finally:
            if not exhausted:  # the reader stopped early: accept nothing more, skip what was accepted, end cleanly
                stop.set()
                producer.cancel()
                await asyncio.wait([producer])
                closing = asyncio.ensure_future(processor.close())
                async for _ in processor.results():
                    pass
                await closing
        await asyncio.wait([producer])
        if producer.exception() is not None:
            raise producer.exception()

    def stream_queries(self, queries, top_k=None, *, use_hybrid=None, streaming=None):
        """astream_queries run to the end in a new event loop (asyncio.run; not from inside a running loop, where
        astream_queries is the call): the list of (stream_id, index, output), in the order they were answered."""
        async def collect():
            return [item async for item in self.astream_queries(queries, top_k, use_hybrid=use_hybrid,
                                                                streaming=streaming)]
        return asyncio.run(collect())


class _Skipped(Exception):
    """The result of a query accepted before the reader of astream_queries stopped: it was not answered."""


async def _pairs(queries):
    """(stream_id, query) for each item of an iterable or async iterable: a str is stream 0's."""
    if isinstance(queries, (str, bytes)):
        raise TypeError("queries must be an iterable of queries (str or (stream_id, str) pairs), got a single str: "
                        "wrap it in a list")
    if hasattr(queries, "__aiter__"):
        async for item in queries:
            yield _pair(item)
    elif hasattr(queries, "__iter__"):
        for item in queries:
            yield _pair(item)
    else:
        raise TypeError(f"queries must be an iterable or async iterable, got {type(queries).__name__}")


def _pair(item):
    if isinstance(item, str):
        return 0, item
    if isinstance(item, tuple) and len(item) == 2:
        return item
    raise TypeError(f"each query must be a str or a (stream_id, str) pair, got {item!r}")
