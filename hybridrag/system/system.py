"""`HybridRAGSystem`: answers questions over a knowledge base with a real language model on the kernels.

Three methods, one prompt layout (`PromptParts`: the chat template's opening and instruction, one block per
passage, the question and the assistant's turn), token for token the same in each:
- "hybrid": the prefix is encoded once and each passage's KV cache once, after the prefix, under the passage
  pattern (AttentionConfig: a sliding window, the first tokens as sinks, optional landmarks), kept in the passage
  store (`passage_store`: bounded, MemoryManager eviction, optionally int8, saved with the system), and stitched
  after the prefix with its keys re-rotated to the passage's offset (`passage_cache`); at answer time only the
  question, the answer and the last passage's last recompute_tokens run, attending to every passage. Optional
  second step (drop_unattended): the question's attention picks the passages the answer is generated from. With
  reader_adapter, those question-side rows run with the reader's LoRA adapters on (`reader`: trained to answer
  from stitched caches as base RAG answers from the full prompt); passages are always the base model's.
- "base_rag": the same tokens as one prompt with full causal attention (plain RAG).
- "direct": the question alone.
With attn_implementation="hybridrag" the answer rows' attention mass per passage is recorded on the way
(`capture_attention_mass`: no T x T matrix), and with attention_feedback it moves the WeightUpdater's retrieval
weights (FeedbackExtractor.from_scores).
"""
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..atomic_file import write_atomically
from ..integrations.transformers import capture_attention_mass
from ..retrieval import KnowledgeBase, SearchResult
from ..retrieval.documents import chunk_documents, source_id
from ..retrieval.encoder import make_encoder
from ..retrieval.prompting import escape_boundaries
from ..retention.feedback import FeedbackExtractor, WeightUpdater
from .config import SystemConfig
from .generation import GenerationStats, stream_generate
from .loading import load_documents
from .model import load_language_model
from .passage_cache import cache_argument, check_rotary, stitch
from .passage_store import PassageKVStore, fingerprint
from .reader import attach_reader, load_reader, reading

TASKS = {
    "qa": "Answer the question using the documents. Reply with a short answer only.",
    "generation": "Write a helpful response to the request, using the documents.",
    "classification": "Classify the text using the documents. Reply with one of the labels only.",
}
DIRECT = {
    "qa": "Answer the question. Reply with a short answer only.",
    "generation": "Write a helpful response to the request.",
    "classification": "Classify the text. Reply with one of the labels only.",
}
_MARKER = "\u0000PASSAGES\u0000"
READER_ATTR = "_hybridrag_reader_adapter"  # on a model with a reader attached: the reader file's resolved path
log = logging.getLogger(__name__)


@dataclass
class PromptParts:
    """Token ids (1, n) of a prompt's parts: `prefix` (template opening and instruction), `passages` (one per
    retrieved passage) and `suffix` (the question and the assistant's turn)."""

    prefix: torch.Tensor
    passages: list
    suffix: torch.Tensor

    def full(self):
        return torch.cat([self.prefix, *self.passages, self.suffix], dim=1)

    @property
    def length(self):
        """T, the prompt's tokens."""
        return sum(p.shape[1] for p in (self.prefix, *self.passages, self.suffix))

    def segments(self):
        """(1, T) passage index of each prompt position, -1 outside passages."""
        ids = [torch.full((self.prefix.shape[1],), -1)]
        ids += [torch.full((p.shape[1],), i) for i, p in enumerate(self.passages)]
        ids.append(torch.full((self.suffix.shape[1],), -1))
        return torch.cat(ids)[None]


def _resolved(path):
    return str(Path(path).resolve())


def passage_block(document):
    """The text a passage holds in the prompt: its title line, then its text (no number: the block is the same in
    every prompt, so its KV cache can be reused)."""
    title = f"Document: {escape_boundaries(document.title)}\n" if document.title else "Document:\n"
    return f"{title}{escape_boundaries(document.text)}\n\n"


class HybridRAGSystem:
    """Documents in a KnowledgeBase (MiniLM + FAISS + BM25), answers from the language model (SmolLM2-135M-Instruct
    unless `config.model_path` names another), the three methods of the module docstring.

    Memory: the model, the knowledge base, and the passage store (at most config.passage_cache_size passages and
    passage_cache_bytes bytes; passage_cache gives the bytes a token)."""

    def __init__(self, config=None, *, language_model=None, neural_retriever=None):
        self.config = SystemConfig.from_any(config)
        if language_model is not None and self.config.reader_adapter is not None:
            held = getattr(language_model.model, READER_ATTR, None)
            if held != _resolved(self.config.reader_adapter):
                raise ValueError(f"reader_adapter={self.config.reader_adapter!r} with a given language_model that "
                                 f"holds {'no reader' if held is None else 'the reader ' + repr(held)}: leave out "
                                 "language_model (the system loads a copy of its own and attaches the reader)")
        self._language_model = language_model
        self.knowledge_base = None
        self.neural_retriever = _check_neural_retriever(neural_retriever)
        c = self.config
        self.passages = PassageKVStore(c.passage_cache_size, max_bytes=c.passage_cache_bytes,
                                       storage=c.passage_cache_storage, policy=c.passage_cache_policy)
        self.weights = WeightUpdater() if c.attention_feedback else None

    def __repr__(self):
        kb = "none" if self.knowledge_base is None else f"{len(self.knowledge_base)} documents"
        model = "not loaded" if self._language_model is None else self._language_model.name
        return f"HybridRAGSystem(model={model}, knowledge_base={kb}, passage_cache={self.passages.stats()})"

    # ---------------------------------------------------------------- parts

    @property
    def language_model(self):
        """The LanguageModel, loaded on first use (the conversion of the bundled GGUF is cached on disk)."""
        if self._language_model is None:
            c = self.config
            lm = load_language_model(c.model_path, cache_dir=c.cache_dir, attn_implementation=c.attn_implementation,
                                     int8=c.int8, device=c.device, fresh=c.reader_adapter is not None)
            c.attention.check_against_model(lm.model.config)
            if c.reader_adapter is not None:
                self._attach_reader(lm)
            self._language_model = lm
        return self._language_model

    def _attach_reader(self, lm):
        """Attach config.reader_adapter to lm's own model copy; a reader trained with other settings is used,
        with a warning naming them."""
        reader = load_reader(self.config.reader_adapter)
        attach_reader(lm.model, reader, fingerprint(lm))
        setattr(lm.model, READER_ATTR, _resolved(self.config.reader_adapter))
        here = {"recompute_tokens": self.config.recompute_tokens, "pattern": list(self._pattern)}
        differ = {key: (reader.trained_for[key], value) for key, value in here.items()
                  if key in reader.trained_for and reader.trained_for[key] != value}
        if differ:
            log.warning("reader adapter %s was trained with other settings (trained, now): %s",
                        self.config.reader_adapter, differ)

    def _reading(self, method):
        """The block in which the hybrid method's question-side rows run: the reader adapter on, if any."""
        return reading(self.language_model.model, enabled=method == "hybrid")

    def load_documents(self, paths, **options):
        """Documents from files and folders of .txt, .md and .jsonl (see hybridrag.system.loading)."""
        return load_documents(paths, **options)

    def create_vectorstore(self, documents):
        """Build the knowledge base: documents split into config.attention.segment_length-token passages sharing
        window_overlap tokens, encoded by config.encoder, indexed for dense, BM25 and hybrid search."""
        c = self.config
        encoder = make_encoder(c.encoder)
        c.retriever.check_against_encoder(encoder.dimension)
        self.knowledge_base = KnowledgeBase.build(documents, encoder, chunk_tokens=c.attention.segment_length,
                                                  overlap=c.attention.window_overlap, index_kind=c.index_kind)
        self.passages.clear()
        if self.weights is not None:
            self.weights = WeightUpdater()
        if c.precompute_passages:
            self.precompute_passages()
        return self.knowledge_base

    def add_documents(self, documents):
        """Chunk and index more documents into the knowledge base, as create_vectorstore does (their ids must be
        new sources). Returns the number of passages added; nothing changes when a document is refused."""
        knowledge_base = self._built()
        documents = list(documents)
        present = {source_id(d) for d in knowledge_base.documents}
        clashes = [d.id for d in documents if d.id in present]
        if clashes:
            raise ValueError(f"documents already in the knowledge base: {clashes[:5]}; remove them first")
        c = self.config
        chunks = chunk_documents(documents, c.attention.segment_length, c.attention.window_overlap,
                                 tokenizer=getattr(knowledge_base.encoder, "tokenizer", None))
        empty = sorted({d.id for d in documents} - {chunk.metadata["source_id"] for chunk in chunks})
        if empty:
            raise ValueError(f"documents with no text to index: {empty[:5]}")
        knowledge_base.add(chunks)
        return len(chunks)

    def remove_documents(self, ids):
        """Remove the documents with these source ids (all their passages) -> the number of passages removed
        (0 for unknown ids)."""
        knowledge_base = self._built()
        wanted = set(ids)
        chunks = [d.id for d in knowledge_base.documents if source_id(d) in wanted]
        return knowledge_base.remove(chunks) if chunks else 0

    def _built(self):
        if self.knowledge_base is None:
            raise ValueError("no knowledge base yet: call create_vectorstore(documents) first")
        return self.knowledge_base

    def precompute_passages(self, task_type="qa", progress=True):
        """Encode the knowledge base's passages (in document order) into the passage store for `task_type`'s
        prompt, until the store's passage or byte bound is reached. Returns the number encoded; those left out
        are logged. Time: one passage prefill each (a 200-token passage of SmolLM2-135M: ~0.4 s on 2 CPU cores)."""
        if self.knowledge_base is None:
            raise ValueError("no knowledge base: call create_vectorstore(documents) first")
        if not self.config.passage_cache:
            raise ValueError("passage_cache=False: there is no passage store to fill")
        documents = self.knowledge_base.documents
        prefix = self.prompt_parts("?", [], task_type).prefix
        done = 0
        for document in tqdm(documents, desc="passage KV caches", unit="passage", disable=not progress):
            if not self._fits(self._tokens(passage_block(document))):
                break
            self._cached_parts(prefix, [self._tokens(passage_block(document))])
            done += 1
        if done < len(documents):
            log.warning("precompute_passages: %d of %d passages encoded; the store's bound (passage_cache_size=%d, "
                        "passage_cache_bytes=%s) left out %d, encoded when first retrieved", done, len(documents),
                        self.passages.capacity, self.passages.max_bytes, len(documents) - done)
        return done

    def _fits(self, ids):
        """True when the passage ids (1, L) fits the store without evicting (the bytes a token of those stored)."""
        store = self.passages
        if len(store) >= store.capacity:
            return False
        if store.max_bytes is None or not len(store):
            return True
        return store.nbytes + store.nbytes / store.tokens * ids.shape[1] <= store.max_bytes

    def retrieve(self, question, k=None):
        """The top k (default retriever.top_k, at most attention.max_retrieved_segments) SearchResults.

        With a neural_retriever (a features-mode hybridrag.retrieval.NeuralRetriever over the encoder's vectors,
        e.g. trained end to end), the mode's num_candidates best are re-scored by its towers (cosine / temperature
        of the encoded question and the stored passage vectors); with attention_feedback, they are then re-ranked
        by the WeightUpdater's weights."""
        if self.knowledge_base is None:
            raise ValueError("no knowledge base: call create_vectorstore(documents) (or HybridRAGSystem.load) first")
        r = self.config.retriever
        k = min(k or r.top_k, self.config.attention.max_retrieved_segments)
        rerank = None if self.neural_retriever is None else self._neural_scores
        if self.weights is None or not len(self.weights):
            return self.knowledge_base.search(question, k, r.mode, candidates=r.num_candidates, rerank=rerank)
        hits = self.knowledge_base.search(question, max(k, r.num_candidates), r.mode, candidates=r.num_candidates,
                                          rerank=rerank)
        by_id = {hit.document.id: hit for hit in hits}
        ids, _ = self.weights.apply(list(by_id), torch.tensor([hit.score for hit in by_id.values()],
                                                              dtype=torch.float64))
        return [by_id[key] for key in ids[:k]]

    def _neural_scores(self, question, documents):
        """The neural retriever's scores (n,) of `documents` for `question`, from the stored passage vectors."""
        kb, retriever = self.knowledge_base, self.neural_retriever
        if retriever.input_dim != kb.encoder.dimension:
            raise ValueError(f"the neural retriever takes {retriever.input_dim}-dim features but the encoder gives "
                             f"{kb.encoder.dimension}: train it over this encoder's vectors")
        query = torch.from_numpy(kb.encoder.encode([question]))
        passages = torch.from_numpy(kb.embeddings_for([document.id for document in documents]))
        with torch.no_grad():
            return retriever.similarity(query, passages)[0].double().numpy()

    # ---------------------------------------------------------------- prompts

    def prompt_parts(self, question, documents, task_type="qa"):
        """PromptParts of `question` over `documents` (Document objects, in prompt order)."""
        lm = self.language_model
        text = lm.chat_prompt(TASKS[task_type], f"{_MARKER}Question: {question}" if task_type != "generation"
                              else f"{_MARKER}Request: {question}")
        prefix, suffix = text.split(_MARKER)
        return PromptParts(self._tokens(prefix), [self._tokens(passage_block(d)) for d in documents],
                           self._tokens(suffix))

    def _tokens(self, text):
        ids = self.language_model.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return ids.to(self.config.device)

    # ---------------------------------------------------------------- answers

    def generate_response(self, question, use_hybrid=True, task_type="qa", *, method=None, labels=None,
                          measure_attention=True, on_token=None, retrieved=None):
        """Answer `question` from the knowledge base.

        Args:
            use_hybrid: True = "hybrid" (cached passages stitched), False = "base_rag" (one prompt, full
                attention). method: "hybrid" | "base_rag" | "direct" overrides use_hybrid.
            task_type: "qa" | "generation" | "classification" (with `labels`: the label whose tokens the model
                finds most likely after the prompt).
            measure_attention: record each passage's attention mass from the answer rows (needs
                attn_implementation="hybridrag"; it costs an attention_mass per layer and step).
            on_token: called with each decoded text piece as it comes (streaming).
            retrieved: None (retrieve from the knowledge base) or the passages to answer from, a list of
                SearchResult (e.g. from another retriever; at most attention.max_retrieved_segments), in prompt
                order; retrieval is skipped (timings["retrieve"] is 0). Not with method="direct".

        Returns a dict: response, passages [{id, text, score, attention_mass}], citations (ids of the passages
        that got at least their uniform share 1 / k of the passage mass, most attended first; [] without mass),
        success (a non-empty answer), timings {retrieve, passages, prefill, first_token, decode} in seconds
        (first_token counts from the start of prompt processing: passages + prefill; passages includes the
        drop_unattended step), tokens_per_second, method, prompt_tokens; with drop_unattended, hybrid answers also
        carry dropped [{id, share}] (passages holds the kept ones).
        """
        method = method or ("hybrid" if use_hybrid else "base_rag")
        return self._respond(question, method, task_type, labels, measure_attention, on_token, retrieved)[0]

    def _respond(self, question, method, task_type="qa", labels=None, measure_attention=True, on_token=None,
                 retrieved=None):
        """(generate_response's dict, the AttentionMassRecord of the answer rows or None)."""
        self._check_question(question, method, task_type, labels)
        timings = {"retrieve": 0.0, "passages": 0.0}
        hits = []
        if retrieved is not None:
            hits = self._check_retrieved(retrieved, method)
        elif method != "direct":
            start = time.perf_counter()
            hits = self.retrieve(question)
            timings["retrieve"] = time.perf_counter() - start
        documents = [hit.document for hit in hits]
        if method == "direct":
            parts = PromptParts(self._tokens(self.language_model.chat_prompt(DIRECT[task_type], question)), [],
                                self._tokens(""))
        else:
            parts = self.prompt_parts(question, documents, task_type)
        if task_type == "classification":
            return self._classify(question, parts, hits, labels, method, timings), None
        self._check_budget(parts)  # before any passage is encoded
        start = time.perf_counter()
        dropped = []
        if method == "hybrid" and self.config.drop_unattended is not None and len(hits) > 1:
            hits, dropped = self._drop_unattended(parts, hits)
            parts = self.prompt_parts(question, [hit.document for hit in hits], task_type)
        input_ids, cache = self.prefill_inputs(parts, method)
        timings["passages"] = time.perf_counter() - start
        stats = GenerationStats()
        with self._reading(method):
            text, record = self._generate(parts, input_ids, cache, stats, measure_attention and bool(hits),
                                          on_token)
        timings.update(prefill=timings["passages"] + stats.prefill_s, first_token=timings["passages"]
                       + stats.first_token_s, decode=stats.decode_s)
        masses = _passage_mass(record)
        if masses is not None and len(hits) > 1:
            self._learn_from_attention(parts, hits, masses)
        result = self._result(text, hits, masses, timings, stats, method, parts)
        if method == "hybrid" and self.config.drop_unattended is not None:
            result["dropped"] = dropped
        return result, record

    def _drop_unattended(self, parts, hits):
        """(kept hits, dropped [{id, share}]): the question's last row runs over every stitched passage, and the
        passages whose attention share is below drop_unattended / k are dropped (the most attended always stays)."""
        lm = self.language_model
        if lm.attn_implementation != "hybridrag":
            raise ValueError("drop_unattended needs attn_implementation='hybridrag' (the shares come from the "
                             f"kernels), got {lm.attn_implementation!r}")
        input_ids, cache = self.prefill_inputs(parts, "hybrid")
        rows = torch.zeros(1, parts.length, dtype=torch.bool)
        rows[:, -1] = True
        device = self.config.device
        with torch.no_grad(), capture_attention_mass(lm.model, parts.segments().to(device), rows.to(device),
                                                     num_segments=len(hits)) as record, self._reading("hybrid"):
            lm.model(input_ids=input_ids, use_cache=True, **{cache_argument(lm.model): cache})
        share = _passage_mass(record)
        share = share / share.sum().clamp(min=1e-30)
        limit = self.config.drop_unattended / len(hits)
        keep = [i for i in range(len(hits)) if share[i] >= limit or i == int(share.argmax())]
        dropped = [{"id": hits[i].document.id, "share": float(share[i])} for i in range(len(hits)) if i not in keep]
        return [hits[i] for i in keep], dropped

    def _learn_from_attention(self, parts, hits, masses):
        """Attention feedback: the WeightUpdater (attention_feedback) and the store's importance (policy
        "importance") take each passage's share of the answer's attention."""
        share = (masses / masses.sum().clamp(min=1e-30)).tolist()
        if self.weights is not None:
            feedback = FeedbackExtractor().from_scores(masses.numpy())
            self.weights.update([hit.document.id for hit in hits], feedback)
        if self.config.passage_cache and self.passages.policy == "importance":
            for ids, value in zip(parts.passages, share):
                self.passages.reward(self.passages.key(ids, self._pattern, parts.prefix), value)

    def _check_question(self, question, method, task_type, labels):
        if not isinstance(question, str):
            raise TypeError(f"question must be a str, got {type(question).__name__}")
        if not question.strip():
            raise ValueError("question is empty: ask something")
        if method not in ("hybrid", "base_rag", "direct"):
            raise ValueError(f"method must be 'hybrid', 'base_rag' or 'direct', got {method!r}")
        if task_type not in TASKS:
            raise ValueError(f"task_type must be one of {tuple(TASKS)}, got {task_type!r}")
        if task_type == "classification":
            if not labels or isinstance(labels, str) or not all(isinstance(x, str) and x.strip() for x in labels):
                raise ValueError(f"task_type='classification' needs labels, a list of non-empty strings, got "
                                 f"{labels!r}")
        elif labels is not None:
            raise ValueError(f"labels apply to task_type='classification' only, got task_type={task_type!r}")

    def _check_retrieved(self, retrieved, method):
        """The given passages as a list of SearchResult, or a TypeError/ValueError naming `retrieved`."""
        if method == "direct":
            raise ValueError("retrieved passages were given with method='direct', which answers without passages")
        if isinstance(retrieved, (str, bytes)) or not hasattr(retrieved, "__iter__"):
            raise TypeError(f"retrieved must be None or a list of SearchResult, got {type(retrieved).__name__}")
        hits = list(retrieved)
        for position, hit in enumerate(hits):
            if not isinstance(hit, SearchResult):
                raise TypeError(f"retrieved[{position}] must be a SearchResult, got {type(hit).__name__}")
        limit = self.config.attention.max_retrieved_segments
        if len(hits) > limit:
            raise ValueError(f"retrieved holds {len(hits)} passages, more than attention.max_retrieved_segments="
                             f"{limit}")
        return hits

    def _check_budget(self, parts):
        total = parts.length + self.config.generation.max_new_tokens
        limit = self.language_model.context_length
        if total > limit:
            raise ValueError(f"the prompt ({parts.length} tokens) and max_new_tokens "
                             f"({self.config.generation.max_new_tokens}) need {total} positions, past the model's "
                             f"context of {limit}: retrieve fewer passages (retriever.top_k) or shorter ones "
                             "(attention.segment_length)")

    def prefill_inputs(self, parts, method):
        """(input_ids the model still has to run, the cache before them or None). Hybrid: the stitched cache of
        the prefix and the passages but the last passage's last recompute_tokens, which run with the suffix."""
        if method != "hybrid" or not parts.passages:
            return parts.full(), None
        cached = self._cached_parts(parts.prefix, parts.passages)
        last = parts.passages[-1]
        recompute = min(self.config.recompute_tokens, last.shape[1])
        if recompute:
            kept = last.shape[1] - recompute
            cached[-1:] = [cached[-1].head(kept)] if kept else []
        input_ids = torch.cat([last[:, last.shape[1] - recompute:], parts.suffix], dim=1)
        room = input_ids.shape[1] + self.config.generation.max_new_tokens
        return input_ids, stitch(cached, check_rotary(self.language_model.model), room)

    @property
    def _pattern(self):
        return self.config.attention.pattern

    def _cached_parts(self, prefix, passages):
        """[PassageKV of the prefix, then of each passage encoded after it], from the store (or encoded afresh
        with passage_cache=False)."""
        model, pattern = self.language_model.model, self._pattern
        store = self.passages if self.config.passage_cache else PassageKVStore(len(passages) + 1)
        head = store.get(model, prefix, pattern)
        return [head] + [store.get(model, ids, pattern, head, prefix) for ids in passages]

    def _generate(self, parts, input_ids, cache, stats, measure, on_token):
        """(answer text, the AttentionMassRecord of the answer rows or None)."""
        lm, g = self.language_model, self.config.generation
        prompt_length = parts.length
        context = None
        if measure and lm.attn_implementation == "hybridrag":
            total = prompt_length + g.max_new_tokens
            rows = torch.zeros(1, total, dtype=torch.bool)
            rows[:, prompt_length - 1:] = True  # the rows whose logits give the answer's tokens
            segments = torch.cat([parts.segments(), torch.full((1, g.max_new_tokens), -1)], dim=1)
            context = capture_attention_mass(lm.model, segments.to(self.config.device),
                                             rows.to(self.config.device), num_segments=len(parts.passages))
        pieces = []
        with context if context is not None else contextlib.nullcontext() as record:
            for token in stream_generate(lm.model, input_ids, past_key_values=cache, tokenizer=lm.tokenizer,
                                         max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                                         seed=g.seed, stats=stats):
                pieces.append(token.text)
                if on_token is not None and token.text:
                    on_token(token.text)
        return "".join(pieces).strip(), record

    def _classify(self, question, parts, hits, labels, method, timings):
        lm = self.language_model
        start = time.perf_counter()
        scores = []
        for label in labels:
            label_ids = self._tokens(label)
            input_ids, cache = self.prefill_inputs(parts, method)
            ids = torch.cat([input_ids, label_ids], dim=1)
            with torch.no_grad(), self._reading(method):
                logits = lm.model(input_ids=ids, use_cache=cache is not None,
                                  **({} if cache is None else {cache_argument(lm.model): cache})).logits
            steps = torch.log_softmax(logits[0, -label_ids.shape[1] - 1:-1].float(), dim=-1)
            scores.append(float(steps.gather(1, label_ids[0, :, None]).mean()))
        best = max(range(len(labels)), key=scores.__getitem__)
        timings.update(prefill=time.perf_counter() - start, first_token=time.perf_counter() - start, decode=0.0)
        stats = GenerationStats(prompt_tokens=parts.length)
        result = self._result(labels[best], hits, None, timings, stats, method, parts)
        result["label_scores"] = dict(zip(labels, scores))
        return result

    def _result(self, text, hits, masses, timings, stats, method, parts):
        passages = [{"id": hit.document.id, "text": hit.document.text, "score": hit.score,
                     "attention_mass": None if masses is None else float(masses[i])} for i, hit in enumerate(hits)]
        return {"response": text, "passages": passages, "citations": _citations(passages), "success": bool(text),
                "timings": {name: round(value, 6) for name, value in timings.items()},
                "tokens_per_second": stats.tokens_per_second, "method": method,
                "prompt_tokens": parts.length}

    def compare_methods(self, question, task_type="qa", **options):
        """{"hybrid": r, "base_rag": r, "direct": r}: generate_response with each method on `question`."""
        return {method: self.generate_response(question, task_type=task_type, method=method, **options)
                for method in ("hybrid", "base_rag", "direct")}

    def analyze_attention_patterns(self, question, *, method="hybrid", plot=None, retrieved=None, on_token=None):
        """Where the answer's attention went: passage mass per layer and head, and four summaries.

        Needs attn_implementation="hybridrag". Returns a dict: response, passage_ids, mass (layers x heads x k
        nested lists), per_passage (k,) and per_layer (layers x k) shares (each row sums to 1), and
        - entropy: of per_passage, divided by log k (0 = one passage, 1 = spread evenly);
        - focus: the largest share;
        - coverage: the fraction of passages with at least half the uniform share 1 / k;
        - attention_quality: sum over passages of share x support, support = the fraction of the answer's words
          (normalized, stop words kept) found in that passage: how much of the attention went to the passages the
          answer's words come from (0 when the answer has no word).
        plot: a path: also write a PNG heatmap (layers x passages, mean over heads) there.
        retrieved: None, or the passages to answer from (see generate_response).
        on_token: called with each decoded text piece as it comes (see generate_response).
        """
        if self.language_model.attn_implementation != "hybridrag":
            raise ValueError("analyze_attention_patterns needs attn_implementation='hybridrag' (the mass comes from "
                             f"the kernels), got {self.language_model.attn_implementation!r}")
        if method == "direct":
            raise ValueError("method='direct' retrieves no passage: nothing to analyze")
        result, record = self._respond(question, method, retrieved=retrieved, on_token=on_token)
        masses = mass_by_layer(record)
        if masses is None:
            raise ValueError("no attention mass was recorded (no passage retrieved?)")
        per_layer = masses.mean(1)
        per_layer = per_layer / per_layer.sum(-1, keepdim=True).clamp(min=1e-30)
        share = masses.mean(dim=(0, 1))
        share = share / share.sum().clamp(min=1e-30)
        k = share.numel()
        entropy = float(-(share * share.clamp(min=1e-30).log()).sum() / torch.log(torch.tensor(float(k)))) if k > 1 \
            else 0.0
        support = torch.tensor([_support(result["response"], p["text"]) for p in result["passages"]],
                               dtype=torch.float64)
        analysis = {"response": result["response"], "passage_ids": [p["id"] for p in result["passages"]],
                    "mass": masses.tolist(), "per_passage": share.tolist(), "per_layer": per_layer.tolist(),
                    "entropy": entropy, "focus": float(share.max()),
                    "coverage": float((share >= 0.5 / k).double().mean()),
                    "attention_quality": float((share * support).sum()), "result": result}
        if plot is not None:
            _heatmap(per_layer, analysis["passage_ids"], plot)
        return analysis

    # ---------------------------------------------------------------- persistence

    def save(self, path, *, passages=True):
        """Write config.json, the knowledge base (kb/), the passage store (passages/, when it holds any: the KV
        caches for this model, reloaded by `load` when the model matches; not with passages=False, as while a
        generation may be filling it) and the attention-feedback weights (weights.json) into folder `path`, each
        written atomically."""
        if self.knowledge_base is None:
            raise ValueError("nothing to save: call create_vectorstore(documents) first")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.knowledge_base.save(path / "kb")
        if passages and len(self.passages):
            self.passages.save(path / "passages", fingerprint(self.language_model))
        if self.weights is not None:
            _write_text(path / "weights.json", json.dumps(self.weights.state_dict()))
        _write_text(path / "config.json", json.dumps(self.config.to_dict(), indent=1))

    @classmethod
    def load(cls, path, *, language_model=None, neural_retriever=None):
        """A system written by `save` (FileNotFoundError naming what is missing). A saved passage store is read
        back, which loads the language model: it must be the model the caches were computed with (ValueError
        otherwise)."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no hybridrag system at {path} (missing config.json)")
        system = cls(SystemConfig.from_any(path / "config.json"), language_model=language_model,
                     neural_retriever=neural_retriever)
        system.knowledge_base = KnowledgeBase.load(path / "kb", make_encoder(system.config.encoder))
        if system.weights is not None and (path / "weights.json").is_file():
            system.weights.load_state_dict(json.loads((path / "weights.json").read_text(encoding="utf-8")))
        if system.config.passage_cache and (path / "passages" / "index.json").is_file():
            system.passages.load(path / "passages", fingerprint(system.language_model))
        return system


def load_knowledge_base(path):
    """The knowledge base of the system saved in folder `path` (by HybridRAGSystem.save), with the encoder its
    config names, and without loading the language model. FileNotFoundError naming what is missing."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no hybridrag system at {path} (missing config.json)")
    config = SystemConfig.from_any(path / "config.json")
    return KnowledgeBase.load(path / "kb", make_encoder(config.encoder))


def _write_text(path, text):
    payload = text.encode("utf-8")
    write_atomically(path, lambda out: out.write(payload))


def _support(answer, passage):
    """The fraction of the answer's normalized words that occur in the passage's normalized words."""
    from .evaluation import normalize_answer
    words = normalize_answer(answer).split()
    if not words:
        return 0.0
    vocabulary = set(normalize_answer(passage).split())
    return sum(word in vocabulary for word in words) / len(words)


def _heatmap(per_layer, passage_ids, path):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    figure, axes = plt.subplots(figsize=(1.2 + 0.6 * len(passage_ids), 1.5 + 0.18 * per_layer.shape[0]))
    image = axes.imshow(per_layer.numpy(), aspect="auto", cmap="viridis")
    axes.set_xticks(range(len(passage_ids)), [str(i)[:18] for i in passage_ids], rotation=45, ha="right", fontsize=7)
    axes.set_ylabel("layer")
    axes.set_title("answer's attention mass per passage (share, mean over heads)", fontsize=8)
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def mass_by_layer(record):
    """(layers, H, k) float64: each passage's mass from the answer rows, per layer and head, averaged over the
    calls that had answer rows (the question's last row, then each generated token), or None."""
    if record is None:
        return None
    layers = {}
    for layer, mass in zip(record.layers, record):
        if float(mass.sum()) > 0:
            layers.setdefault(layer, []).append(mass[0].double())
    if not layers:
        return None
    return torch.stack([torch.stack(layers[layer]).mean(0) for layer in sorted(layers)])


def _passage_mass(record):
    """(k,) float64: mass_by_layer averaged over layers and heads, or None."""
    masses = mass_by_layer(record)
    return None if masses is None else masses.mean(dim=(0, 1))


def _citations(passages):
    masses = [p["attention_mass"] for p in passages]
    if not passages or any(m is None for m in masses) or sum(masses) <= 0:
        return []
    share = sum(masses) / len(masses)
    cited = sorted((p for p in passages if p["attention_mass"] >= share), key=lambda p: -p["attention_mass"])
    return [p["id"] for p in cited]


def _check_neural_retriever(retriever):
    from ..retrieval.neural import NeuralRetriever

    if retriever is not None and (not isinstance(retriever, NeuralRetriever) or retriever.mode != "features"):
        raise TypeError(f"neural_retriever must be None or a NeuralRetriever in features mode (input_dim = the "
                        f"encoder's dimension), got {retriever!r}")
    return retriever


def create_hybrid_rag_system(config=None, *, language_model=None, neural_retriever=None):
    """A HybridRAGSystem from config: None (defaults), a dict, a path to JSON/YAML, or a SystemConfig; optionally
    a trained NeuralRetriever (features mode) that re-scores retrieval's candidates."""
    return HybridRAGSystem(config, language_model=language_model, neural_retriever=neural_retriever)
