"""Retrieval speed suite: hybridrag's `VectorIndex` (exact flat, IVF, HNSW over FAISS; FAISS GPU where present) and
`BM25Index`, in two parts.

    python -m benchmarks.retrieval_speed            # this suite alone, quick (seconds): benchmarks.report --suite
    python -m benchmarks.retrieval_speed --full     # the recorded sizes (about 9 minutes on 2 idle CPU cores)

vector  Base sets of the first N vectors of one seeded set (N = 100,000 and 1,000,000, d = 384; quick: 5,000 and
        20,000, d = 64) from `ClusteredVectors` (below), 1,000 queries (quick: 200) from the same distribution on a
        separate random stream (so none is in the base set), k = 10. Per index: build seconds (`VectorIndex.add` of all
        N at once: IVF's k-means training and VectorIndex's id bookkeeping included), the bytes `VectorIndex.save`
        writes and the growth of resident memory over the build (both measured), queries/s of the whole batch in one
        `search` call (median of up to 5 calls within 5 s, after a 10-query warm-up), the median single-query
        `search` latency over the first 100 queries (stopped after 10 s if at least 10 ran), and recall@10 against the
        exact top-10 of a float32 torch matmul over the base (the flat index is held against it too). IVF sweeps
        nprobe and HNSW ef_search on one build each. FAISS runs on the CPU with its OpenMP threads (`faiss_threads`
        in each row); a single query runs on one thread (FAISS parallelises over queries).
        HNSW is built at 100,000 first; the full N is built when that build, scaled by N log N, fits in 15 minutes,
        else the largest of N/2, N/4 that fits in 10 minutes (each row states its own N; nothing is extrapolated
        into the results).
        GPU (only when `hybridrag.retrieval.vector_index.gpu_available()`, i.e. faiss's GPU build sees a GPU): flat
        and IVF with device="gpu". Their build is the CPU `add` (the CPU index stays authoritative), and `gpu_copy_s`
        the first search, which copies the index to the GPU. Each nprobe of the sweep re-copies the IVF index (marked
        stale, the way VectorIndex does after any change) in the untimed warm-up. FAISS has no GPU HNSW. Without a
        GPU build the GPU rows are recorded as unavailable with the reason.
bm25    `BM25Index.build` seconds, queries/s of `search_many` over a batch and single-query `search` latency, on
        (a) a seeded synthetic corpus: 100,000 documents (quick: 2,000) of 80 to 120 words drawn from a Zipf
        vocabulary (word of rank r has probability proportional to 1 / r, 50,000 words "w0".."w49999"), 1,000 queries
        of 3 to 6 distinct words drawn from one random document each; (b) Python's bundled docs
        (pydoc_data.topics) chunked by `chunk_documents` into 200-word pieces (40 overlap), queries made the same way
        from the chunks' indexable words. bm25s retrieves on one thread (BM25Index does not pass n_threads).
"""
import contextlib
import gc
import math
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hybridrag.retrieval.bm25 import BM25Index
from hybridrag.retrieval.documents import Document, chunk_documents
from hybridrag.retrieval.vector_index import VectorIndex, gpu_available

from .common import (LoadMeter, cpu_count, cpu_model, fmt_number, long_step, note_flagged, place_labels, plot_bars,
                     plot_line, progress)

SUITE = "retrieval_speed"
EXPECTED_S = {"quick": 10, "full": 540}  # on the 2-core AMD EPYC of the recorded results (HNSW at 1M: ~225 s)
LONG_BUILD_N = 100_000                      # builds of this many vectors or more get a progress bar
K = 10
KINDS = ("flat", "ivf", "hnsw")
GPU_KINDS = ("flat", "ivf")                 # FAISS has no GPU HNSW
NPROBES = (4, 8, 16, 32, 64, 128)           # IVF sweep (values above nlist are dropped)
EF_SEARCHES = (16, 32, 64, 128, 256)        # HNSW sweep
HNSW_FULL_LIMIT_S = 900                     # build HNSW at the full N when the probe's N log N scaling fits this
HNSW_FALLBACK_LIMIT_S = 600                 # else the largest of N/2, N/4 that fits this


class Sizes:
    """Every size the suite uses, full or quick."""

    def __init__(self, quick):
        self.quick = quick
        self.dim = 64 if quick else 384
        self.base = (5_000, 20_000) if quick else (100_000, 1_000_000)
        self.clusters, self.topics = (128, 8) if quick else (4096, 64)
        self.queries = 200 if quick else 1_000
        self.latency_queries, self.latency_budget_s = (30, 0.3) if quick else (100, 10.0)
        self.batch_reps, self.batch_budget_s = (3, 0.3) if quick else (5, 5.0)
        self.hnsw_probe = self.base[0]
        self.bm25_docs = 2_000 if quick else 100_000
        self.bm25_queries = 200 if quick else 1_000
        self.bm25_vocabulary = 50_000


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------

def _unit_rows(x):
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


class ClusteredVectors:
    """Seeded synthetic embeddings: a two-level Gaussian mixture on the unit sphere with a decaying noise spectrum.

    topics (64) are random unit vectors; each cluster centre (4096) is unit(topic + N(0, I/d)) for a random topic;
    cluster weights are proportional to rank^-0.5 (shuffled), so clusters range from ~0.8% of the set down to ~0.01%.
    A vector is unit(centre + s_c * g * lam): g ~ N(0, I), lam_i proportional to (i + 1)^-0.75 scaled to unit norm,
    s_c ~ U(0.8, 1.4) per cluster. Uniform random vectors are the worst case for IVF and HNSW and unlike real
    embeddings; this set has clusters and a low effective dimension instead. The spectrum was set so that the share of
    variance in the top 10/50/100 principal components (0.42/0.71/0.85 on 436 vectors) is near that of
    all-MiniLM-L6-v2 embeddings of the 436 pydoc chunks this suite indexes (0.41/0.77/0.91), measured once when the
    suite was written. It stays a proxy: tune on real embeddings where they exist.

    Base vectors and queries come from separate random streams, in chunks (memory: the output plus one chunk).
    """

    def __init__(self, dim, clusters, topics, seed=0):
        self.dim, self.clusters, self.topics, self.seed = dim, clusters, topics, seed
        rng = np.random.default_rng([seed, 0])
        topic_vectors = _unit_rows(rng.standard_normal((topics, dim), dtype=np.float32))
        noise = rng.standard_normal((clusters, dim), dtype=np.float32) / np.float32(math.sqrt(dim))
        self.centres = _unit_rows(topic_vectors[rng.integers(0, topics, clusters)] + noise)
        weights = (1.0 + np.arange(clusters)) ** -0.5
        self.weights = rng.permutation(weights / weights.sum())
        self.spread = rng.uniform(0.8, 1.4, clusters).astype(np.float32)
        spectrum = (1.0 + np.arange(dim)) ** -0.75
        self.spectrum = (spectrum / np.linalg.norm(spectrum)).astype(np.float32)

    def sample(self, n, stream, chunk=100_000):
        """float32 (n, dim) unit rows; stream 1 is the base set, 2 the queries (any int: its own sequence)."""
        rng = np.random.default_rng([self.seed, stream])
        out = np.empty((n, self.dim), dtype=np.float32)
        for start in range(0, n, chunk):
            rows = min(chunk, n - start)
            which = rng.choice(self.clusters, size=rows, p=self.weights)
            block = rng.standard_normal((rows, self.dim), dtype=np.float32)
            block *= self.spectrum
            block *= self.spread[which, None]
            block += self.centres[which]
            out[start:start + rows] = _unit_rows(block)
        return out

    def describe(self):
        return {"generator": "benchmarks.retrieval_speed.ClusteredVectors", "seed": self.seed, "dim": self.dim,
                "topics": self.topics, "clusters": self.clusters,
                "centre": "unit(random unit topic + N(0, I/d))", "cluster_weights": "rank^-0.5, shuffled",
                "vector": "unit(centre + s_c * g * lam), g ~ N(0, I), lam_i ~ (i+1)^-0.75 (unit norm), "
                          "s_c ~ U(0.8, 1.4) per cluster",
                "base": "stream 1, the first N rows", "queries": "stream 2"}


def zipf_corpus(docs, vocabulary, seed=0, exponent=1.0, words=(80, 120)):
    """`docs` texts of words[0]..words[1] words ("w0".."w{vocabulary-1}", rank r drawn with probability proportional
    to 1 / (r + 1)^exponent). Returns (texts, number of distinct words used)."""
    rng = np.random.default_rng([seed, 3])
    probabilities = (1.0 + np.arange(vocabulary)) ** -exponent
    lengths = rng.integers(words[0], words[1] + 1, docs)
    draws = rng.choice(vocabulary, size=int(lengths.sum()), p=probabilities / probabilities.sum())
    names = np.array([f"w{i}" for i in range(vocabulary)])
    ends = np.cumsum(lengths)
    tokens = names[draws].tolist()
    texts = [" ".join(tokens[end - length:end]) for end, length in zip(ends.tolist(), lengths.tolist())]
    return texts, int(len(np.unique(draws)))


_TOKEN = re.compile(r"(?u)\b\w\w+\b")  # bm25s's default token pattern


def indexable_words(text):
    """The words BM25Index indexes in `text`: bm25s's lowercase tokens minus its English stopwords, in order."""
    from bm25s.stopwords import STOPWORDS_EN
    stop = set(STOPWORDS_EN)
    return [t for t in _TOKEN.findall(text.lower()) if t not in stop]


def sample_queries(texts, count, seed=0, words=(3, 6)):
    """`count` queries of words[0]..words[1] distinct indexable words of one random text each (texts with too few
    are redrawn)."""
    rng = np.random.default_rng([seed, 4])
    queries = []
    while len(queries) < count:
        vocabulary = sorted(set(indexable_words(texts[int(rng.integers(len(texts)))])))
        size = int(rng.integers(words[0], words[1] + 1))
        if len(vocabulary) >= size:
            queries.append(" ".join(vocabulary[i] for i in rng.choice(len(vocabulary), size, replace=False)))
    return queries


def pydoc_chunks():
    """Python's bundled docs (pydoc_data.topics), one Document a topic, chunked into 200-word pieces."""
    from pydoc_data.topics import topics
    return chunk_documents([Document(name, text) for name, text in sorted(topics.items())], chunk_tokens=200,
                           overlap=40)


# ----------------------------------------------------------------------------------------------------------------
# Exact answers and recall
# ----------------------------------------------------------------------------------------------------------------

def exact_top_k(base, queries, k, chunk=200_000):
    """Ids int64 (Q, k) of the k largest inner products, float32 torch matmul on the CPU over chunks of the base
    (independent of FAISS). Memory: Q x chunk x 4 bytes of scores."""
    q = torch.from_numpy(queries)
    best_scores = torch.full((len(queries), 0), -math.inf)
    best_ids = torch.zeros((len(queries), 0), dtype=torch.int64)
    for start in range(0, len(base), chunk):
        scores = q @ torch.from_numpy(base[start:start + chunk]).T
        top = scores.topk(min(k, scores.shape[1]), dim=1)
        merged_scores = torch.cat([best_scores, top.values], dim=1)
        merged_ids = torch.cat([best_ids, top.indices + start], dim=1)
        keep = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1).indices
        best_scores, best_ids = merged_scores.gather(1, keep), merged_ids.gather(1, keep)
    return best_ids.numpy()


def recall_at_k(found, truth):
    """Mean over queries of |found row ∩ truth row| / k; found's -1 slots count as misses. Both int (Q, k)."""
    found, truth = np.asarray(found), np.asarray(truth)
    if found.shape != truth.shape:
        raise ValueError(f"found and truth must have the same shape, got {found.shape} and {truth.shape}")
    hits = (found[:, :, None] == truth[:, None, :]).any(axis=2) & (found >= 0)
    return float(hits.sum(axis=1).mean() / truth.shape[1])


# ----------------------------------------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------------------------------------

def resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def time_batch(run, batch, warmup, max_reps, budget_s):
    """Median seconds of run(batch): warm-up run(warmup), then up to max_reps calls, stopping once budget_s is spent
    (at least one call). Returns (seconds, calls)."""
    run(warmup)
    times, start = [], time.perf_counter()
    while len(times) < max_reps and (not times or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        run(batch)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), len(times)


def time_single(run, items, count, budget_s, min_count=10):
    """Median and 90th percentile milliseconds of run(item) over the first `count` items, stopping after budget_s
    once min_count ran. Returns (median ms, p90 ms, calls)."""
    times, start = [], time.perf_counter()
    for item in items[:count]:
        if len(times) >= min_count and time.perf_counter() - start > budget_s:
            break
        t0 = time.perf_counter()
        run(item)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), float(np.percentile(times, 90)), len(times)


# ----------------------------------------------------------------------------------------------------------------
# Vector indexes
# ----------------------------------------------------------------------------------------------------------------

def set_search_width(index, value):
    """Set a built index's nprobe (IVF) or ef_search (HNSW) in place; returns the value in effect (nprobe is capped at
    nlist). VectorIndex reads ef_search at every search, but copies nprobe into FAISS when it creates the index, so
    IVF's is set on the FAISS index too and a GPU copy is marked stale (re-copied, with the new nprobe, by the next
    search). The assert turns a change in VectorIndex's internals into a failure here instead of timing the wrong
    nprobe."""
    import faiss
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"value must be an int >= 1, got {value!r}")
    if index.kind == "hnsw":
        index.ef_search = value
        return value
    if index.kind != "ivf":
        raise ValueError(f"set_search_width needs an 'ivf' or 'hnsw' index, got kind {index.kind!r}")
    ivf = faiss.extract_index_ivf(index._index)
    index.nprobe = min(value, ivf.nlist)
    ivf.nprobe = index.nprobe
    index._gpu_stale = True
    assert faiss.extract_index_ivf(index._index).nprobe == index.nprobe
    return index.nprobe


def _hardware(device):
    if device == "cpu":
        return f"{cpu_model()} ({cpu_count()} cores)"
    return f"{torch.cuda.get_device_name(0)} (FAISS GPU 0)" if torch.cuda.is_available() else "FAISS GPU 0"


def _gpu_free_bytes():
    return torch.cuda.mem_get_info(0)[0] if torch.cuda.is_available() else None


def build_index(kind, device, base, queries, expected_s=None):
    """Build a VectorIndex over `base` (ids 0..N-1) with the default parameters. Returns (index, build record); the
    record's build_other_load is the load other processes put on the CPU during the build. Builds of LONG_BUILD_N
    vectors or more run under a progress bar (elapsed against `expected_s` when given)."""
    gc.collect()
    resident = resident_bytes()
    index = VectorIndex(base.shape[1], kind=kind, device=device)
    step = long_step(f"{SUITE} {kind} {device} build N={len(base):,}", expected_s) if len(base) >= LONG_BUILD_N \
        else contextlib.nullcontext()
    with step:
        meter, start = LoadMeter().start(), time.perf_counter()
        index.add(base, np.arange(len(base), dtype=np.int64))
        record = {"build_s": time.perf_counter() - start, "build_other_load": meter.stop(), "gpu_copy_s": None,
                  "gpu_memory_bytes": None, "saved_bytes": None}
    gc.collect()
    record["rss_growth_bytes"] = resident_bytes() - resident
    if device == "gpu":
        free = _gpu_free_bytes()
        start = time.perf_counter()
        index.search(queries[:1], K)  # copies the index to the GPU
        record["gpu_copy_s"] = time.perf_counter() - start
        if free is not None:
            record["gpu_memory_bytes"] = free - _gpu_free_bytes()
        if not index.on_gpu:
            raise RuntimeError(f"VectorIndex(kind={kind!r}, device='gpu') did not search on the GPU")
    else:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "index.npz"
            index.save(path)
            record["saved_bytes"] = path.stat().st_size
    return index, record


def _params(index):
    if index.kind == "ivf":
        return {"nlist": index.nlist, "nprobe": index.nprobe}
    if index.kind == "hnsw":
        return {"hnsw_m": index.hnsw_m, "ef_construction": index.ef_construction, "ef_search": index.ef_search}
    return {}


def _vector_row(kind, device, n, sizes, data, **values):
    row = {"part": "vector", "kind": kind, "device": device, "hardware": None, "n": n, "dim": sizes.dim,
           "queries": sizes.queries, "k": K, "params": {}, "label": f"{kind} N={n}", "status": "ok", "reason": None,
           "build_s": None, "gpu_copy_s": None, "saved_bytes": None, "rss_growth_bytes": None,
           "gpu_memory_bytes": None, "batch_s": None, "batch_calls": None, "qps": None, "latency_ms": None,
           "latency_p90_ms": None, "latency_calls": None, "recall_at_10": None, "faiss_threads": None,
           "timing": None, "other_load": None, "data": data, "note": None}
    row.update(values)
    return row


def measure_index(kind, device, base, queries, truth, sizes, data, log, note=None, expected_s=None):
    """Build one index and time it at every width of its sweep: one row a width (flat: one row). A row's other_load
    is the larger of the build's and its own search timing's."""
    import faiss
    index, build = build_index(kind, device, base, queries, expected_s)
    if kind == "ivf":
        widths = [p for p in NPROBES if p <= index.nlist]
    else:
        widths = EF_SEARCHES if kind == "hnsw" else [None]
    rows = []
    for width in progress(widths, f"{SUITE} {kind} {device} N={len(base):,}", unit="width"):
        if width is not None:
            set_search_width(index, width)
        meter = LoadMeter().start()
        batch_s, calls = time_batch(lambda q: index.search(q, K), queries, queries[:10], sizes.batch_reps,
                                    sizes.batch_budget_s)
        latency, p90, single_calls = time_single(lambda q: index.search(q[None], K), queries,
                                                 sizes.latency_queries, sizes.latency_budget_s)
        other_load = meter.stop()
        _, found = index.search(queries, K)
        params = _params(index)
        label = f"{kind} N={len(base)}" + "".join(f" {key}={value}" for key, value in params.items())
        row = _vector_row(kind, device, len(base), sizes, data, hardware=_hardware(device), params=params,
                          label=label, **build, batch_s=batch_s, batch_calls=calls, qps=len(queries) / batch_s,
                          latency_ms=latency, latency_p90_ms=p90, latency_calls=single_calls,
                          recall_at_10=recall_at_k(found, truth), faiss_threads=faiss.omp_get_max_threads(),
                          timing=f"batch: perf_counter median of {calls} search calls of {len(queries)} queries "
                                 f"after a 10-query warm-up; latency: median of {single_calls} one-query calls",
                          other_load=max(other_load, build["build_other_load"]), note=note)
        log(f"  {SUITE} {device} {label}: build {row['build_s']:.1f} s, {row['qps']:.0f} q/s, "
            f"{latency:.3f} ms, recall@10 {row['recall_at_10']:.4f}")
        rows.append(row)
    return rows  # the index is freed here: the next build_index collects before it measures memory


def hnsw_seconds(probe_n, probe_s, n):
    """A build of probe_n vectors in probe_s seconds, scaled by N log N to n vectors."""
    return probe_s * n / probe_n * math.log(n) / math.log(probe_n)


def hnsw_size(probe_n, probe_s, full_n):
    """The N to build HNSW at after a build of probe_n vectors took probe_s seconds: full_n when probe_s scaled by
    N log N fits HNSW_FULL_LIMIT_S, else the largest of full_n / 2, full_n / 4 (above probe_n) that fits
    HNSW_FALLBACK_LIMIT_S, else None."""
    def scaled(n):
        return hnsw_seconds(probe_n, probe_s, n)
    if full_n <= probe_n:
        return None
    if scaled(full_n) <= HNSW_FULL_LIMIT_S:
        return full_n
    for n in (full_n // 2, full_n // 4):
        if n > probe_n and scaled(n) <= HNSW_FALLBACK_LIMIT_S:
            return n
    return None


def vector_rows(sizes, log):
    generator = ClusteredVectors(sizes.dim, sizes.clusters, sizes.topics)
    data = generator.describe()
    start = time.perf_counter()
    base_all = generator.sample(sizes.base[-1], stream=1)
    queries = generator.sample(sizes.queries, stream=2)
    log(f"  {SUITE} generated {len(base_all)} x {sizes.dim} + {len(queries)} queries in "
        f"{time.perf_counter() - start:.1f} s")
    truths, rows = {}, []

    def truth(n):
        if n not in truths:
            truths[n] = exact_top_k(base_all[:n], queries, K)
        return truths[n]

    gpu = gpu_available()
    hnsw_probe = None
    for n in progress(sizes.base, f"{SUITE} vector sizes", unit="size"):
        base = base_all[:n]
        for kind in KINDS:
            if kind == "hnsw" and n != sizes.hnsw_probe:
                continue
            rows += measure_index(kind, "cpu", base, queries, truth(n), sizes, data, log)
            if kind == "hnsw":
                hnsw_probe = rows[-1]["build_s"]
            if kind in GPU_KINDS and gpu:
                rows += measure_index(kind, "gpu", base, queries, truth(n), sizes, data, log)
    full_n = sizes.base[-1]
    chosen = hnsw_size(sizes.hnsw_probe, hnsw_probe, full_n)
    rule = (f"HNSW built at N={sizes.hnsw_probe} in {hnsw_probe:.1f} s (measured); the full N={full_n} is built when "
            f"that time scaled by N log N fits {HNSW_FULL_LIMIT_S} s, else the largest of N/2, N/4 fitting "
            f"{HNSW_FALLBACK_LIMIT_S} s")
    log(f"  {SUITE} {rule}: chosen N={chosen}")
    if chosen is not None:
        rows += measure_index("hnsw", "cpu", base_all[:chosen], queries, truth(chosen), sizes, data, log,
                              note=rule + f": chosen N={chosen}",
                              expected_s=hnsw_seconds(sizes.hnsw_probe, hnsw_probe, chosen))
    else:
        rows.append(_vector_row("hnsw", "cpu", full_n, sizes, data, hardware=_hardware("cpu"), status="skipped",
                                reason=rule + ": none fits"))
    if not gpu:
        reason = "faiss here has no GPU build or sees no GPU (gpu_available() is False)"
        rows += [_vector_row(kind, "gpu", full_n, sizes, data, status="unavailable", reason=reason)
                 for kind in GPU_KINDS]
    return rows


# ----------------------------------------------------------------------------------------------------------------
# BM25
# ----------------------------------------------------------------------------------------------------------------

def _bm25_row(corpus, texts, vocabulary, queries, sizes, log, note):
    gc.collect()
    resident = resident_bytes()
    index = BM25Index()
    meter, start = LoadMeter().start(), time.perf_counter()  # other_load: over the build and the timed searches
    index.build(texts, [str(i) for i in range(len(texts))])
    build_s = time.perf_counter() - start
    gc.collect()
    rss_growth = resident_bytes() - resident
    batch_s, calls = time_batch(lambda q: index.search_many(q, K), queries, queries[:10], sizes.batch_reps,
                                sizes.batch_budget_s)
    latency, p90, single_calls = time_single(lambda q: index.search(q, K), queries, sizes.latency_queries,
                                             sizes.latency_budget_s)
    other_load = meter.stop()
    answered = sum(1 for hits in index.search_many(queries, K) if hits)
    words = sum(len(t.split()) for t in texts)
    row = {"part": "bm25", "kind": "bm25", "device": "cpu", "hardware": _hardware("cpu"), "n": len(texts),
           "corpus": corpus, "mean_words": words / len(texts), "vocabulary": vocabulary, "queries": len(queries),
           "k": K, "params": {"k1": index.k1, "b": index.b, "method": index.method, "stopwords": index.stopwords},
           "label": f"bm25 {corpus} docs={len(texts)}", "status": "ok", "reason": None, "build_s": build_s,
           "rss_growth_bytes": rss_growth, "batch_s": batch_s, "batch_calls": calls, "qps": len(queries) / batch_s,
           "latency_ms": latency, "latency_p90_ms": p90, "latency_calls": single_calls,
           "queries_with_hits": answered, "recall_at_10": None,
           "timing": f"build: one call; batch: perf_counter median of {calls} search_many calls of {len(queries)} "
                     f"queries after a 10-query warm-up; latency: median of {single_calls} search calls",
           "other_load": other_load, "note": note}
    log(f"  {SUITE} {row['label']}: build {build_s:.1f} s, {row['qps']:.0f} q/s, {latency:.3f} ms")
    return row


def bm25_rows(sizes, log):
    texts, vocabulary = zipf_corpus(sizes.bm25_docs, sizes.bm25_vocabulary)
    synthetic = _bm25_row("synthetic-zipf", texts, vocabulary, sample_queries(texts, sizes.bm25_queries), sizes,
                          log, f"{sizes.bm25_vocabulary}-word Zipf(1.0) vocabulary, 80-120 words a document, seed 0; "
                               "queries: 3-6 distinct words of one random document")
    del texts
    chunks = [c.text for c in pydoc_chunks()]
    vocabulary = len({w for text in chunks for w in indexable_words(text)})
    pydoc = _bm25_row("pydoc", chunks, vocabulary, sample_queries(chunks, sizes.bm25_queries), sizes, log,
                      "pydoc_data.topics, chunk_documents(chunk_tokens=200, overlap=40); queries: 3-6 distinct "
                      "indexable words of one random chunk; vocabulary counts indexable words")
    return [synthetic, pydoc]


# ----------------------------------------------------------------------------------------------------------------
# Suite entry points (used by benchmarks.report)
# ----------------------------------------------------------------------------------------------------------------

def bench_dtype(device):
    return torch.float32


def benchmark(device, quick=False, ceilings=None, log=print):
    """Vector rows (flat, IVF nprobe sweep, HNSW ef_search sweep; GPU rows where FAISS has a GPU), then BM25 rows."""
    sizes = Sizes(quick)
    return vector_rows(sizes, log) + bm25_rows(sizes, log)


def _mib(value):
    return fmt_number(None if value is None else value / 2**20, ".0f")


BENCH_COLUMNS = [
    ("case", lambda r: r["label"]),
    ("device", lambda r: r["device"]),
    ("build s", lambda r: fmt_number(r["build_s"], ".2f")),
    ("saved MiB", lambda r: _mib(r.get("saved_bytes"))),
    ("RSS +MiB", lambda r: _mib(r.get("rss_growth_bytes"))),
    ("QPS batch", lambda r: fmt_number(r["qps"], ".0f")),
    ("latency ms", lambda r: fmt_number(r["latency_ms"], ".3f")),
    ("p90 ms", lambda r: fmt_number(r["latency_p90_ms"], ".3f")),
    ("recall@10", lambda r: fmt_number(r["recall_at_10"], ".4f")),
    ("status", lambda r: r["status"] if r["reason"] is None else f"{r['status']}: {r['reason'][:60]}"),
]


# ----------------------------------------------------------------------------------------------------------------
# Correctness: the measured objects answer what they should
# ----------------------------------------------------------------------------------------------------------------

def lucene_bm25(texts, k1=1.5, b=0.75):
    """Reference Lucene BM25 in numpy for texts that are plain space-separated indexable words: score(q, d) =
    sum over distinct query words t of log(1 + (N - df + 0.5) / (df + 0.5)) * tf / (tf + k1 (1 - b + b |d| / avg|d|)).
    Returns score(query) -> float64 (N,)."""
    docs = [text.split() for text in texts]
    lengths = np.array([len(d) for d in docs], dtype=np.float64)
    norm = k1 * (1 - b + b * lengths / lengths.mean())
    postings = {}
    for row, words in enumerate(docs):
        for word in words:
            postings.setdefault(word, {}).setdefault(row, 0)
            postings[word][row] += 1

    def score(query):
        total = np.zeros(len(docs))
        for word in set(query.split()):
            rows = postings.get(word, {})
            if rows:
                idf = math.log(1 + (len(docs) - len(rows) + 0.5) / (len(rows) + 0.5))
                where, tf = np.array(list(rows)), np.array(list(rows.values()), dtype=np.float64)
                total[where] += idf * tf / (tf + norm[where])
        return total
    return score


def bm25_top_scores_error(index, reference, queries, k):
    """Largest |index's top-k scores - the reference's top-k positive scores| over the queries, relative to the top
    score (ids are not compared: BM25 ties are common)."""
    worst = 0.0
    for query, hits in zip(queries, index.search_many(queries, k)):
        expected = np.sort(reference(query))[::-1][:k]
        expected = expected[expected > 0]
        got = np.array([score for _, score in hits])
        if len(got) != len(expected):
            return math.inf
        if len(got):
            worst = max(worst, float(np.abs(got - expected).max() / expected[0]))
    return worst


def _check_row(case, measure, value, limit, passed):
    return {"case": case, "measure": measure, "value": value, "limit": limit, "passed": bool(passed)}


def check(device):
    """Flat top-10 = exact top-10; IVF with nprobe = nlist = exact; on a GPU the same on the GPU copies; BM25 top-10
    scores = a numpy Lucene BM25. Small seeded inputs (seconds)."""
    generator = ClusteredVectors(32, 64, 4, seed=1)
    base, queries = generator.sample(4_000, stream=1), generator.sample(50, stream=2)
    truth = exact_top_k(base, queries, K)
    rows = []
    devices = ("cpu", "gpu") if gpu_available() else ("cpu",)
    for where in devices:
        limit = 1.0 if where == "cpu" else 0.99  # a GPU's float32 sums may swap near-ties at rank 10
        flat = VectorIndex(32, kind="flat", device=where)
        flat.add(base, np.arange(len(base)))
        recall = recall_at_k(flat.search(queries, K)[1], truth)
        rows.append(_check_row(f"{where} flat N=4000 d=32, 50 queries: top-10 vs exact (torch float32)",
                               "recall@10", recall, limit, recall >= limit))
        ivf = VectorIndex(32, kind="ivf", device=where)
        ivf.add(base, np.arange(len(base)))
        set_search_width(ivf, ivf.nlist)
        recall = recall_at_k(ivf.search(queries, K)[1], truth)
        rows.append(_check_row(f"{where} ivf N=4000 d=32 nprobe=nlist={ivf.nlist}: top-10 vs exact", "recall@10",
                               recall, limit, recall >= limit))
    texts, _ = zipf_corpus(500, 2_000, seed=1)
    queries = sample_queries(texts, 30, seed=1)
    index = BM25Index()
    index.build(texts, [str(i) for i in range(len(texts))])
    error = bm25_top_scores_error(index, lucene_bm25(texts), queries, K)
    rows.append(_check_row("BM25Index 500 Zipf docs, 30 queries: top-10 scores vs numpy Lucene BM25",
                           "max rel err", error, 1e-4, error <= 1e-4))
    return rows


CHECK_COLUMNS = [
    ("case", lambda r: r["case"]),
    ("measure", lambda r: r["measure"]),
    ("value", lambda r: f"{r['value']:.3g}"),
    ("limit", lambda r: f"{r['limit']:.3g}"),
    ("result", lambda r: "pass" if r["passed"] else "FAIL"),
]


# ----------------------------------------------------------------------------------------------------------------
# Plot
# ----------------------------------------------------------------------------------------------------------------

def plot(rows, ceilings, env, path):
    """Recall@10 against batch queries/s (one line per index: the IVF nprobe and HNSW ef_search sweeps, flat a
    point; labels placed clear of each other); build seconds per index; BM25 queries/s (batch and one at a time).
    Measured points only; rows flagged under load hollow or hatched."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(18, 5.5))
    vector = [r for r in rows if r["part"] == "vector" and r["status"] == "ok"]
    groups = sorted({(r["kind"], r["device"], r["n"]) for r in vector}, key=lambda g: (g[2], g[0], g[1]))
    markers = {"flat": "s", "ivf": "o", "hnsw": "^"}
    builds, labels, markers_at = [], [], []
    for i, (kind, device, n) in enumerate(groups):
        points = [r for r in vector if (r["kind"], r["device"], r["n"]) == (kind, device, n)]
        plot_line(left, [(r["qps"], r["recall_at_10"], r.get("flagged")) for r in points], marker=markers[kind],
                  linestyle="-" if device == "cpu" else "--", color=f"C{i}", label=f"{kind} {device} N={n:,}")
        for r in points:
            markers_at.append((r["qps"], r["recall_at_10"]))
            width = r["params"].get("nprobe", r["params"].get("ef_search"))
            if width is not None:
                labels.append((r["qps"], r["recall_at_10"], str(width)))
        builds.append((f"{kind} {device}\nN={n:,}", points[0]["build_s"], points[0].get("flagged"), f"C{i}"))
    left.set_xscale("log")
    left.set(xlabel="queries/s (batch of queries, one search call)", ylabel="recall@10 vs exact",
             title="vector search: recall against throughput\n(labels: nprobe for IVF, ef_search for HNSW)")
    left.grid(True, alpha=0.3)
    left.legend(fontsize=7, loc="lower left")
    left.margins(x=0.08, y=0.08)  # room for the labels of the outermost points
    plot_bars(middle, range(len(builds)), [b[1] for b in builds], [b[2] for b in builds],
              color=[b[3] for b in builds])
    middle.set_xticks(range(len(builds)), [b[0] for b in builds], fontsize=6, rotation=45, ha="right")
    middle.set_yscale("log")
    middle.set(ylabel="seconds", title="build (VectorIndex.add; IVF training included)")
    middle.grid(True, axis="y", alpha=0.3)
    bm25 = [r for r in rows if r["part"] == "bm25" and r["status"] == "ok"]
    x = np.arange(len(bm25))
    flags = [r.get("flagged") for r in bm25]
    plot_bars(right, x - 0.2, [r["qps"] for r in bm25], flags, width=0.4, label="batch (search_many)", color="C0")
    plot_bars(right, x + 0.2, [1e3 / r["latency_ms"] for r in bm25], flags, width=0.4,
              label="one at a time (1 / median latency)", color="C1")
    right.set_xticks(x, [f"{r['corpus']}\n{r['n']:,} docs" for r in bm25], fontsize=8)
    right.set_yscale("log")
    right.set(ylabel="queries/s", title="BM25Index")
    right.legend(fontsize=7, loc="upper left")
    right.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"retrieval speed, k={K}\n{env['device']}, torch {env['torch']}, commit {env['git_commit'][:12]}, "
                 f"{env['date'][:10]}", fontsize=9)
    note_flagged(fig, rows)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    left_out = place_labels(left, labels, obstacles=markers_at)  # after the layout: measured on the final axes
    if left_out:
        left.text(0.99, 0.01, f"{left_out} labels left out where points crowd", transform=left.transAxes,
                  ha="right", va="bottom", fontsize=6, color="dimgray")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    from .report import main

    raise SystemExit(main(["--suite", SUITE, *sys.argv[1:]]))
