"""pytest-benchmark suite for retrieval speed: VectorIndex.search (flat, IVF, HNSW on the CPU; flat and IVF on the GPU
where FAISS's GPU build sees one) and BM25Index.search_many at the quick sizes, then the quick suite end to end
through benchmarks.report's run_suite with its results file (written to a temporary folder) checked.

    pytest benchmarks/test_bench_retrieval_speed.py --benchmark-only   # the timings only
    pytest benchmarks/test_bench_retrieval_speed.py                    # timings and checks (under a minute on CPU)

Not part of the normal test run (pyproject's testpaths is ["tests"]).
"""
import json

import numpy as np
import pytest

from benchmarks import retrieval_speed as rs
from benchmarks.common import default_device, environment
from hybridrag.retrieval.bm25 import BM25Index
from hybridrag.retrieval.vector_index import VectorIndex, gpu_available

DEVICE = default_device()
SIZES = rs.Sizes(quick=True)
GPU = gpu_available()


@pytest.fixture(scope="module")
def vectors():
    generator = rs.ClusteredVectors(SIZES.dim, SIZES.clusters, SIZES.topics)
    base, queries = generator.sample(SIZES.base[-1], stream=1), generator.sample(SIZES.queries, stream=2)
    return base, queries, rs.exact_top_k(base, queries, rs.K)


@pytest.mark.parametrize("device", ["cpu", "gpu"])
@pytest.mark.parametrize("kind", rs.KINDS)
def test_vector_search(benchmark, vectors, kind, device):
    if device == "gpu" and kind not in rs.GPU_KINDS:
        pytest.skip("FAISS has no GPU HNSW")
    if device == "gpu" and not GPU:
        pytest.skip("faiss has no GPU build here or sees no GPU")
    base, queries, truth = vectors
    index, build = rs.build_index(kind, device, base, queries)
    benchmark.group = f"VectorIndex.search N={len(base)} d={SIZES.dim} Q={len(queries)} k={rs.K}"
    benchmark.extra_info.update(kind=kind, device=device, build_s=build["build_s"])
    _, ids = benchmark.pedantic(index.search, args=(queries, rs.K), rounds=5, warmup_rounds=1, iterations=1)
    recall = rs.recall_at_k(ids, truth)
    benchmark.extra_info["recall_at_10"] = recall
    if benchmark.stats:  # None under --benchmark-disable
        benchmark.extra_info["qps_at_median"] = len(queries) / benchmark.stats.stats.median
    assert build["build_s"] > 0
    if kind == "flat":
        assert recall >= (1.0 if device == "cpu" else 0.99)
    else:
        assert 0.5 < recall <= 1.0


def test_bm25_search(benchmark):
    texts, _ = rs.zipf_corpus(SIZES.bm25_docs, SIZES.bm25_vocabulary)
    queries = rs.sample_queries(texts, SIZES.bm25_queries)
    index = BM25Index()
    index.build(texts, [str(i) for i in range(len(texts))])
    benchmark.group = f"BM25Index.search_many docs={len(texts)} Q={len(queries)} k={rs.K}"
    hits = benchmark.pedantic(index.search_many, args=(queries, rs.K), rounds=5, warmup_rounds=1, iterations=1)
    assert len(hits) == len(queries) and all(hits), "every query is made of words of some document"
    assert all(len(h) <= rs.K and [s for _, s in h] == sorted((s for _, s in h), reverse=True) for h in hits)


# ----------------------------------------------------------------------------------------------------------------
# The quick suite through report.run_suite, and its results file
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    from benchmarks import report
    folder = tmp_path_factory.mktemp("retrieval_speed")
    env = environment(DEVICE)
    result = report.run_suite(rs, DEVICE, env, None, quick=True, out=folder, load_limit=1.0)
    payload = json.loads((folder / f"{rs.SUITE}-quick.json").read_text())
    return payload, result.passed, report.tables(result, env), folder


def _vector(rows, kind, device, n=None):
    return [r for r in rows if r["part"] == "vector" and r["kind"] == kind and r["device"] == device
            and (n is None or r["n"] == n)]


def test_quick_results_file(quick_results):
    payload, passed, tables, folder = quick_results
    assert set(payload) == {"suite", "size", "env", "ceilings", "load_limit", "duration_s", "correctness", "rows"}
    assert payload["suite"] == rs.SUITE and payload["size"] == "quick" and passed
    assert {"device", "git_commit", "date", "torch"} <= set(payload["env"])
    assert all(row["passed"] for row in payload["correctness"]) and len(payload["correctness"]) >= 3
    assert (folder / f"{rs.SUITE}-quick.png").stat().st_size > 0
    assert any(rs.SUITE in table for table in tables)
    for row in payload["rows"]:
        assert {"part", "kind", "device", "n", "label", "status", "build_s", "qps", "latency_ms", "recall_at_10",
                "timing", "other_load", "flagged"} <= set(row), row["label"]
        if row["status"] == "ok":
            assert row["build_s"] > 0 and row["qps"] > 0 and row["latency_ms"] > 0 and row["hardware"], row["label"]


def test_quick_vector_rows(quick_results):
    rows = quick_results[0]["rows"]
    for n in SIZES.base:
        flat = _vector(rows, "flat", "cpu", n)
        assert len(flat) == 1 and flat[0]["recall_at_10"] == 1.0  # exact search against the torch matmul's top-10
        assert flat[0]["saved_bytes"] >= n * SIZES.dim * 4  # save() holds every vector
        ivf = _vector(rows, "ivf", "cpu", n)
        nlist = ivf[0]["params"]["nlist"]
        assert [r["params"]["nprobe"] for r in ivf] == [p for p in rs.NPROBES if p <= nlist]
        recalls = [r["recall_at_10"] for r in ivf]
        assert all(0 < r <= 1 for r in recalls)
        assert recalls == sorted(recalls), "more probed cells search a superset: recall cannot drop"
    hnsw = _vector(rows, "hnsw", "cpu")
    assert {r["n"] for r in hnsw} == {SIZES.hnsw_probe, SIZES.base[-1]}  # the quick probe build is fast
    assert [r["params"]["ef_search"] for r in hnsw if r["n"] == SIZES.base[-1]] == list(rs.EF_SEARCHES)
    assert all(0 < r["recall_at_10"] <= 1 for r in hnsw)
    assert "chosen N" in hnsw[-1]["note"]
    for kind in rs.GPU_KINDS:
        gpu = _vector(rows, kind, "gpu")
        if GPU:
            assert gpu and all(r["status"] == "ok" and r["gpu_copy_s"] > 0 for r in gpu)
        else:
            assert [r["status"] for r in gpu] == ["unavailable"] and "gpu_available" in gpu[0]["reason"]


def test_quick_bm25_rows(quick_results):
    rows = [r for r in quick_results[0]["rows"] if r["part"] == "bm25"]
    assert [r["corpus"] for r in rows] == ["synthetic-zipf", "pydoc"]
    assert rows[0]["n"] == SIZES.bm25_docs and 80 <= rows[0]["mean_words"] <= 120
    assert rows[1]["n"] > 100  # the pydoc topics give a few hundred 200-word chunks
    for row in rows:
        assert row["queries_with_hits"] == row["queries"] == SIZES.bm25_queries


# ----------------------------------------------------------------------------------------------------------------
# The measuring tools can tell right from wrong
# ----------------------------------------------------------------------------------------------------------------

def test_recall_at_k_counts_sets_and_misses():
    truth = np.array([[1, 2, 3], [4, 5, 6]])
    assert rs.recall_at_k(truth[:, ::-1], truth) == 1.0
    assert rs.recall_at_k(np.array([[1, 9, -1], [6, 5, 4]]), truth) == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match=r"same shape, got \(2, 2\) and \(2, 3\)"):
        rs.recall_at_k(truth[:, :2], truth)


def test_search_width_changes_what_ivf_searches(vectors):
    base, queries, truth = vectors
    index = VectorIndex(SIZES.dim, kind="ivf", device="cpu")
    index.add(base, np.arange(len(base)))
    assert rs.set_search_width(index, 10**6) == index.nlist  # capped at nlist
    assert rs.recall_at_k(index.search(queries, rs.K)[1], truth) == 1.0  # every cell: exhaustive
    assert rs.set_search_width(index, 1) == 1
    assert rs.recall_at_k(index.search(queries, rs.K)[1], truth) < 0.95


def test_search_width_rejects_flat_and_bad_values():
    index = VectorIndex(4, kind="flat", device="cpu")
    index.add(np.eye(4, dtype=np.float32), np.arange(4))
    with pytest.raises(ValueError, match="needs an 'ivf' or 'hnsw' index, got kind 'flat'"):
        rs.set_search_width(index, 8)
    with pytest.raises(ValueError, match="value must be an int >= 1, got 0"):
        rs.set_search_width(index, 0)


def test_bm25_reference_check_can_fail():
    texts, _ = rs.zipf_corpus(300, 1_000, seed=2)
    queries = rs.sample_queries(texts, 20, seed=2)
    index = BM25Index()
    index.build(texts, [str(i) for i in range(len(texts))])
    assert rs.bm25_top_scores_error(index, rs.lucene_bm25(texts), queries, rs.K) < 1e-5
    assert rs.bm25_top_scores_error(index, rs.lucene_bm25(texts, k1=1.2), queries, rs.K) > 1e-3


def test_hnsw_size_rule():
    assert rs.hnsw_size(100_000, 40.0, 1_000_000) == 1_000_000    # ~480 s scaled: within 15 minutes
    assert rs.hnsw_size(100_000, 100.0, 1_000_000) == 500_000     # ~1200 s for 1M; ~570 s for 500k
    assert rs.hnsw_size(100_000, 300.0, 1_000_000) is None        # not even 250k fits 10 minutes
    assert rs.hnsw_size(100_000, 1.0, 100_000) is None            # the probe already is the full size


def test_clustered_vectors_are_seeded_unit_rows():
    generator = rs.ClusteredVectors(16, 8, 2, seed=3)
    first, again = generator.sample(1_000, stream=1, chunk=300), generator.sample(1_000, stream=1, chunk=300)
    queries = generator.sample(100, stream=2)
    assert first.dtype == np.float32 and np.array_equal(first, again)
    assert np.allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    assert not (queries[:, None, :] == first[None, :, :]).all(axis=2).any()  # no query is a base vector
