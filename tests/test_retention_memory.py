"""MemoryManager: each policy evicts exactly the scripted key, search and its touches, capacity edge cases, save/load
restoring the eviction order, and bad input."""
import json
import os

import numpy as np
import pytest
import torch

from hybridrag.retention.memory import MemoryHit, MemoryItem, MemoryManager

DIM = 4


def vec(i, dim=DIM):
    """A distinct unit-ish vector per i."""
    return np.random.default_rng(i).standard_normal(dim).astype(np.float32)


def filled(policy, keys="abc", capacity=3, **kwargs):
    memory = MemoryManager(capacity, DIM, policy=policy, **kwargs)
    for i, key in enumerate(keys):
        assert memory.add(key, vec(i), {"n": i}) == []
    return memory


def test_lru_evicts_the_least_recently_touched():
    memory = filled("lru")                                # a, b, c at ticks 1, 2, 3
    memory.get("a")                                       # a at 4
    assert memory.eviction_order() == ["b", "c", "a"]
    assert memory.add("d", vec(3)) == ["b"]
    memory.get("c")                                       # d at 5, c at 6: a is now the oldest
    assert memory.add("e", vec(4)) == ["a"]
    assert memory.keys() == ["c", "d", "e"]
    assert memory.add("c", vec(5)) == []                  # re-adding a stored key evicts nothing and touches it
    assert memory.add("f", vec(6)) == ["d"]


def test_lfu_evicts_the_fewest_touches_then_the_least_recent():
    memory = filled("lfu")
    for key in ("a", "a", "b"):
        memory.get(key)                                   # counts a 3, b 2, c 1
    assert memory.add("d", vec(3)) == ["c"]
    memory.get("d")                                       # b 2 (last at tick 6) and d 2 (last at tick 8) tie
    assert memory.eviction_order() == ["b", "d", "a"]
    assert memory.add("e", vec(4)) == ["b"]
    assert memory.add("f", vec(5)) == ["e"]               # a fresh key has one touch: the next to go
    assert memory.keys() == ["a", "d", "f"]


def test_importance_evicts_the_lowest_decayed_importance():
    memory = MemoryManager(3, DIM, policy="importance", decay=0.5, boost=1.0)
    memory.add("a", vec(0), importance=4.0)               # ticks 1, 2, 3
    memory.add("b", vec(1), importance=1.0)
    memory.add("c", vec(2), importance=2.0)
    assert [memory.importance(key) for key in "abc"] == [1.0, 0.5, 2.0]      # 4 * .5**2, 1 * .5, 2
    assert memory.eviction_order() == ["b", "a", "c"]
    assert memory.add("d", vec(3), importance=1.0) == ["b"]
    memory.get("a")                                       # tick 5: a = 4 * .5**4 + 1 = 1.25; c = .5, d = .5
    assert [memory.importance(key) for key in "acd"] == [1.25, 0.5, 0.5]
    assert memory.add("e", vec(4), importance=1.0) == ["c"]   # c and d tie: c was touched earlier


def test_importance_without_boost_ignores_touches():
    memory = MemoryManager(2, DIM, policy="importance", decay=1.0, boost=0.0)
    memory.add("low", vec(0), importance=0.0)
    memory.add("high", vec(1), importance=3.0)
    for _ in range(5):
        memory.get("low")
    assert memory.importance("low") == 0.0
    assert memory.add("new", vec(2)) == ["low"]
    assert memory.add("newer", vec(3)) == ["new"]         # importance 1 < 3


def test_importance_order_survives_underflow():
    """decay ** age underflows to 0 for both keys, but the log-space comparison still orders them."""
    memory = MemoryManager(2, DIM, policy="importance", decay=0.01, boost=0.0)
    memory.add("old", vec(0), importance=1e10)
    memory.add("young", vec(1), importance=1.0)
    for _ in range(400):
        memory.get("young")
    assert memory.importance("old") == 0.0 and memory.importance("young") == 0.0
    assert memory.eviction_order() == ["young", "old"]    # 1e10 * .01**401 > 1 * .01**400


def test_search_scores_order_and_touches():
    memory = MemoryManager(8, DIM, policy="lru")
    vectors = np.eye(DIM, dtype=np.float32)
    for i in range(DIM):
        memory.add(f"k{i}", vectors[i] * (i + 1), [i])    # normalize=True stores unit vectors
    query = np.array([0.1, 0.0, 0.5, 0.9], dtype=np.float32)
    hits = memory.search(query, 2)
    unit = query / np.linalg.norm(query)
    assert [hit.key for hit in hits] == ["k3", "k2"]
    assert hits[0] == MemoryHit("k3", pytest.approx(float(unit[3])), [3])
    assert memory.eviction_order() == ["k0", "k1", "k2", "k3"]    # the best hit is the most recent touch
    batch = memory.search(torch.tensor(np.stack([vectors[0], vectors[1]])), 10)
    assert [[hit.key for hit in hits][:1] for hits in batch] == [["k0"], ["k1"]]
    assert all(len(hits) == 4 for hits in batch)          # k > len returns every stored key
    assert memory.eviction_order()[-2:] == ["k1", "k0"]   # equal best scores (1.0): the earlier result is touched last


def test_search_ties_and_raw_inner_product():
    memory = MemoryManager(4, 2, normalize=False)
    memory.add("x", np.array([2.0, 0.0]))
    memory.add("y", np.array([1.0, 1.0]))
    memory.add("z", np.array([2.0, 0.0]))
    hits = memory.search(np.array([1.0, 0.0]), 3)
    assert [(hit.key, hit.score) for hit in hits] == [("x", 2.0), ("z", 2.0), ("y", 1.0)]   # tie: lower slot first


def test_get_returns_a_copy_and_the_json_payload():
    memory = MemoryManager(2, DIM, normalize=False)
    payload = {"ids": (1, 2), "text": "t"}
    memory.add("a", vec(0), payload)
    payload["text"] = "changed"
    item = memory.get("a")
    assert item == MemoryItem("a", item.embedding, {"ids": [1, 2], "text": "t"})
    np.testing.assert_array_equal(item.embedding, vec(0))
    item.embedding[:] = 0
    assert np.abs(memory.get("a").embedding).sum() > 0


def test_capacity_edge_cases():
    memory = MemoryManager(1, DIM)
    assert memory.search(vec(0), 3) == []
    assert memory.add("a", vec(0)) == []
    assert memory.add("b", vec(1)) == ["a"]
    assert memory.add("b", vec(2)) == []
    assert len(memory) == 1 and "b" in memory and "a" not in memory
    memory.remove("b")
    assert len(memory) == 0 and memory.eviction_order() == []
    assert memory.add("c", vec(3)) == []                  # the freed slot is reused, nothing evicted
    full = filled("lru", keys="abcdef", capacity=6)
    full.remove("c")
    assert full.add("g", vec(7)) == [] and len(full) == 6
    assert full.add("h", vec(8)) == ["a"]


def random_session(memory, rng, steps=60, keys=12):
    """Adds, gets, searches and removes in a random but seeded order."""
    for _ in range(steps):
        key, action = f"k{rng.integers(keys)}", rng.integers(4)
        if action == 0 or key not in memory:
            memory.add(key, rng.standard_normal(DIM), {"key": key, "v": [float(rng.random())]},
                       importance=float(rng.integers(1, 5)))
        elif action == 1:
            memory.get(key)
        elif action == 2:
            memory.search(rng.standard_normal((2, DIM)), 2)
        else:
            memory.remove(key)


@pytest.mark.parametrize("policy", ["lru", "lfu", "importance"])
def test_save_load_restores_the_eviction_order(policy, tmp_path):
    memory = MemoryManager(6, DIM, policy=policy, decay=0.9, boost=0.5)
    random_session(memory, np.random.default_rng(1))
    path = tmp_path / "memory.npz"
    memory.save(path)
    memory.save(path)                                     # overwriting works and leaves no temporary file
    assert os.listdir(tmp_path) == ["memory.npz"]
    loaded = MemoryManager.load(path)
    assert repr(loaded) == repr(memory) and loaded.tick == memory.tick
    assert loaded.keys() == memory.keys()
    assert loaded.eviction_order() == memory.eviction_order()
    for key in memory.keys():
        assert loaded.importance(key) == memory.importance(key)
    query = np.random.default_rng(2).standard_normal(DIM)
    assert loaded.search(query, 3) == memory.search(query, 3)
    for key in memory.keys():
        before, after = memory.get(key), loaded.get(key)
        assert after.payload == before.payload
        np.testing.assert_array_equal(after.embedding, before.embedding)
    evicted = [[], []]
    for twin, log in zip((memory, loaded), evicted):
        for i in range(8):
            log.extend(twin.add(f"new{i}", vec(i), importance=0.5 + i % 3))
    assert evicted[0] == evicted[1] and len(evicted[0]) == 8


def test_load_refuses_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no MemoryManager file at .*absent.npz"):
        MemoryManager.load(tmp_path / "absent.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a numpy file at all")
    with pytest.raises(ValueError, match="garbage.npz' is not a readable hybridrag.MemoryManager file"):
        MemoryManager.load(garbage)
    other = tmp_path / "other.npz"
    np.savez(other, embeddings=np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="is not a readable .*state is not a file in the archive"):
        MemoryManager.load(other)
    memory = filled("lru")
    good = tmp_path / "good.npz"
    memory.save(good)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="is not a readable"):
        MemoryManager.load(truncated)
    with np.load(good) as data:
        arrays = dict(data)
    state = json.loads(arrays["state"].tobytes())
    state["free"] = [0]                                   # slot 0 both stored and free
    arrays["state"] = np.frombuffer(json.dumps(state).encode(), np.uint8)
    np.savez(tmp_path / "bad_slots.npz", **arrays)
    with pytest.raises(ValueError, match="do not partition the capacity"):
        MemoryManager.load(tmp_path / "bad_slots.npz")


CONSTRUCTOR_CASES = [
    (dict(capacity=0), ValueError, r"capacity must be >= 1, got 0"),
    (dict(capacity=-2), ValueError, r"capacity must be >= 1, got -2"),
    (dict(capacity=2.0), TypeError, r"capacity must be an int, got float"),
    (dict(capacity=True), TypeError, r"capacity must be an int, got bool"),
    (dict(dimension=0), ValueError, r"dimension must be >= 1, got 0"),
    (dict(policy="fifo"), ValueError, r"policy must be one of \('lru', 'lfu', 'importance'\), got 'fifo'"),
    (dict(decay=0.0), ValueError, r"decay must be in \(0, 1\], got 0.0"),
    (dict(decay=1.5), ValueError, r"decay must be in \(0, 1\], got 1.5"),
    (dict(decay=float("nan")), ValueError, r"decay must be in \(0, 1\], got nan"),
    (dict(decay="0.9"), TypeError, r"decay must be a number, got str"),
    (dict(boost=-1.0), ValueError, r"boost must be finite and >= 0, got -1.0"),
    (dict(normalize=1), TypeError, r"normalize must be True or False, got 1"),
]


@pytest.mark.parametrize("kwargs, error, match", CONSTRUCTOR_CASES)
def test_bad_constructor_arguments(kwargs, error, match):
    arguments = dict(capacity=4, dimension=DIM) | kwargs
    with pytest.raises(error, match=match):
        MemoryManager(arguments.pop("capacity"), arguments.pop("dimension"), **arguments)


ADD_CASES = [
    (dict(key=3), TypeError, r"key must be a str, got int"),
    (dict(embedding=np.ones(DIM + 1)), ValueError, r"embedding must have shape \(4,\) or \(n, 4\), got \(5,\)"),
    (dict(embedding=np.ones((2, DIM))), ValueError, r"embedding must have shape \(4,\), got \(2, 4\)"),
    (dict(embedding=np.array([1.0, np.nan, 0, 0])), ValueError, r"embedding has NaN or inf values"),
    (dict(embedding=np.array([1.0, np.inf, 0, 0])), ValueError, r"embedding has NaN or inf values"),
    (dict(embedding=np.zeros(DIM)), ValueError, r"embedding has a zero vector, which cannot be normalised"),
    (dict(embedding=np.array(["a"] * DIM)), TypeError, r"embedding must hold real numbers, got dtype <U1"),
    (dict(embedding=torch.ones(DIM, dtype=torch.bool)), TypeError, r"embedding must hold real numbers, got dtype "
                                                                   r"torch.bool"),
    (dict(payload={"f": object()}), TypeError, r"payload must be JSON-serialisable: Object of type object"),
    (dict(importance=-1.0), ValueError, r"importance must be finite and >= 0, got -1.0"),
    (dict(importance=float("inf")), ValueError, r"importance must be finite and >= 0, got inf"),
]


@pytest.mark.parametrize("kwargs, error, match", ADD_CASES)
def test_bad_add_leaves_the_store_unchanged(kwargs, error, match):
    memory = filled("lru")
    arguments = dict(key="new", embedding=vec(9), payload=None) | kwargs
    with pytest.raises(error, match=match):
        memory.add(**arguments)
    assert memory.keys() == ["a", "b", "c"] and memory.tick == 3


def test_bad_lookups_and_queries():
    memory = filled("lru")
    with pytest.raises(KeyError, match="key 'zz' is not in the memory"):
        memory.get("zz")
    with pytest.raises(KeyError, match="key 'zz' is not in the memory"):
        memory.remove("zz")
    with pytest.raises(ValueError, match=r"query must have shape \(4,\) or \(n, 4\), got \(2, 3\)"):
        memory.search(np.ones((2, 3)), 1)
    with pytest.raises(ValueError, match="query has NaN or inf values"):
        memory.search(np.full(DIM, np.nan), 1)
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        memory.search(vec(0), 0)
    assert memory.tick == 3
