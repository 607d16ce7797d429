"""VectorIndex: exact results for flat, high recall for IVF/HNSW, add/remove by id, persistence, errors."""
import time
import tracemalloc

import numpy as np
import pytest

from hybridrag.retrieval import vector_index
from hybridrag.retrieval.vector_index import VectorIndex, gpu_available

KINDS = ("flat", "ivf", "hnsw")


def clustered(count, dimension=32, centres=20, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centres, dimension))
    points = means[rng.integers(centres, size=count)] + 0.3 * rng.standard_normal((count, dimension))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    vectors = clustered(3000)
    ids = np.arange(len(vectors), dtype=np.int64) * 7 + 3  # ids unrelated to positions
    queries = clustered(50, seed=1)
    return vectors, ids, queries


def exact(vectors, ids, queries, k):
    scores = queries @ vectors.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), ids[order]


def recall(found, truth):
    return np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found.tolist(), truth.tolist())])


@pytest.mark.parametrize("kind", KINDS)
def test_search_against_brute_force(data, kind):
    vectors, ids, queries = data
    index = VectorIndex(32, kind=kind, device="cpu", ef_search=128)
    index.add(vectors, ids)
    scores, found = index.search(queries, 10)
    true_scores, true_ids = exact(vectors, ids, queries, 10)
    assert scores.dtype == np.float32 and found.dtype == np.int64 and found.shape == (50, 10)
    assert np.all(np.diff(scores, axis=1) <= 1e-6), "results must be best first"
    if kind == "flat":
        np.testing.assert_allclose(scores, true_scores, rtol=1e-5, atol=1e-5)
        assert recall(found, true_ids) == 1.0
    else:
        assert recall(found, true_ids) >= 0.9, f"{kind} recall@10 {recall(found, true_ids):.3f}"
    np.testing.assert_allclose(index.reconstruct(ids[[5, 0, 77]]), vectors[[5, 0, 77]], atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_removed_ids_never_come_back(data, kind):
    vectors, ids, queries = data
    index = VectorIndex(32, kind=kind, device="cpu")
    index.add(vectors, ids)
    gone = ids[:500]
    assert index.remove(np.concatenate([gone, gone[:3], [10**9]])) == 500  # repeats and unknown ids not counted
    assert len(index) == 2500 and gone[0] not in index and ids[600] in index
    _, found = index.search(np.concatenate([queries, vectors[:20]]), 20)
    assert not set(found.ravel().tolist()) & set(gone.tolist())
    assert index.remove(gone) == 0
    with pytest.raises(KeyError, match="ids not in the index"):
        index.reconstruct(gone[:1])
    # a removed id may be added again with a new vector
    index.add(vectors[:1] * -1, gone[:1])
    assert index.search(-vectors[:1], 1)[1][0, 0] == gone[0]


def test_hnsw_compacts_its_tombstones(data):
    vectors, ids, _ = data
    index = VectorIndex(32, kind="hnsw")
    index.add(vectors, ids)
    index.remove(ids[:500])
    assert len(index._tombstones) == 500  # below a quarter: kept as tombstones, filtered at search
    index.remove(ids[500:1000])
    assert not index._tombstones and index._index.ntotal == 2000  # past a quarter: graph rebuilt from live vectors
    _, found = index.search(vectors[1000:1010], 1)
    assert found[:, 0].tolist() == ids[1000:1010].tolist()


@pytest.mark.parametrize("kind", KINDS)
def test_k_beyond_the_index_is_clamped_to_its_size(kind):
    vectors = clustered(60, dimension=8)
    index = VectorIndex(8, kind=kind, nlist=1 if kind == "ivf" else None)
    index.add(vectors, np.arange(60))
    scores, found = index.search(vectors[:2], 75)
    assert found.shape == scores.shape == (2, 60) and found.dtype == np.int64 and scores.dtype == np.float32
    assert np.isfinite(scores).all() and sorted(found[0].tolist()) == list(range(60))
    index.remove(np.arange(10))
    assert index.search(vectors[:2], 75)[1].shape == (2, 50)  # live vectors, not HNSW's tombstoned nodes


@pytest.mark.parametrize("kind", KINDS)
def test_a_huge_k_costs_what_the_index_size_does(kind):
    vectors = clustered(50, dimension=8)
    index = VectorIndex(8, kind=kind, nlist=1 if kind == "ivf" else None)
    index.add(vectors, np.arange(50))
    for k in (2**31, 10**8):
        started = time.perf_counter()
        tracemalloc.start()
        scores, found = index.search(vectors[:3], k)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert found.shape == (3, 50) and time.perf_counter() - started < 1.0 and peak < 1 << 20, (k, peak)


def test_ivf_slots_its_probed_cells_do_not_fill_are_minus_one():
    vectors = clustered(400, dimension=8, centres=8)
    index = VectorIndex(8, kind="ivf", nlist=8, nprobe=1)
    index.add(vectors, np.arange(400))
    scores, found = index.search(vectors[:4], 400)
    assert found.shape == (4, 400) and (found == -1).any()
    assert (np.isneginf(scores) == (found == -1)).all()


def test_empty_index_returns_no_columns():
    scores, found = VectorIndex(4).search(np.ones((2, 4)), 3)
    assert scores.shape == found.shape == (2, 0) and found.dtype == np.int64 and scores.dtype == np.float32


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(tmp_path, data, kind):
    vectors, ids, queries = data
    index = VectorIndex(32, kind=kind)
    index.add(vectors, ids)
    index.remove(ids[:100])
    path = tmp_path / "vectors.npz"
    index.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["vectors.npz"]
    loaded = VectorIndex.load(path)
    assert loaded.kind == kind and len(loaded) == len(index)
    for a, b in zip(index.search(queries, 10), loaded.search(queries, 10)):
        np.testing.assert_array_equal(a, b)
    loaded.add(vectors[:1], [10**6])
    assert loaded.search(vectors[:1], 1)[1][0, 0] in (10**6, ids[0] if ids[0] in loaded else 10**6)


def test_load_refuses_damaged_files(tmp_path):
    path = tmp_path / "vectors.npz"
    with pytest.raises(FileNotFoundError, match="no vector index file"):
        VectorIndex.load(path)
    path.write_bytes(b"not an npz archive")
    with pytest.raises(ValueError, match="corrupted or not an index"):
        VectorIndex.load(path)


def test_auto_picks_flat_then_ivf_by_size(monkeypatch):
    small = VectorIndex(8)
    small.add(clustered(100, dimension=8), np.arange(100))
    assert small.kind == "flat"
    monkeypatch.setattr(vector_index, "AUTO_FLAT_LIMIT", 500)
    large = VectorIndex(8)
    large.add(clustered(1000, dimension=8), np.arange(1000))
    assert large.kind == "ivf" and large.nlist == min(round(1000 ** 0.5), 1000 // 39)  # 39 points a cell for k-means


def test_gpu_is_feature_detected():
    if gpu_available():
        pytest.skip("this machine has faiss's GPU build and a GPU")
    assert not VectorIndex(8).on_gpu
    with pytest.raises(ValueError, match="device='gpu' needs faiss's GPU build"):
        VectorIndex(8, device="gpu")


@pytest.mark.parametrize("kwargs, error, message", [
    ({"dimension": 0}, ValueError, "dimension must be >= 1, got 0"),
    ({"dimension": 8, "kind": "lsh"}, ValueError, r"kind must be one of \('auto', 'flat', 'ivf', 'hnsw'\), got 'lsh'"),
    ({"dimension": 8, "device": "tpu"}, ValueError, "device must be one of"),
    ({"dimension": 8, "nprobe": 0}, ValueError, "nprobe must be >= 1, got 0"),
    ({"dimension": 8.0}, TypeError, "dimension must be an int, got float"),
])
def test_constructor_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        VectorIndex(**kwargs)


def test_add_and_search_errors():
    index = VectorIndex(4)
    index.add(np.eye(4, dtype=np.float32), [0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"vectors must have shape \(N, 4\), got \(2, 3\)"):
        index.add(np.zeros((2, 3)), [5, 6])
    with pytest.raises(ValueError, match=r"ids must have shape \(2,\), got \(3,\)"):
        index.add(np.zeros((2, 4)), [5, 6, 7])
    with pytest.raises(ValueError, match=r"ids already in the index: \[1\]"):
        index.add(np.zeros((1, 4)), [1])
    with pytest.raises(ValueError, match="ids must be unique within one add"):
        index.add(np.zeros((2, 4)), [9, 9])
    with pytest.raises(ValueError, match="ids must be >= 0"):
        index.add(np.zeros((1, 4)), [-1])
    with pytest.raises(ValueError, match="vectors holds NaN or inf"):
        index.add(np.full((1, 4), np.nan), [8])
    with pytest.raises(TypeError, match="vectors must be floating point"):
        index.add(np.zeros((1, 4), dtype=np.int32), [8])
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        index.search(np.zeros((1, 4)), 0)
    with pytest.raises(ValueError, match="an IVF index with nlist=50 needs at least 50 vectors"):
        VectorIndex(4, kind="ivf", nlist=50).add(np.eye(4, dtype=np.float32), [0, 1, 2, 3])
