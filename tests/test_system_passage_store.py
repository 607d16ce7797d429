"""The passage store (hybridrag.system.passage_store) on a tiny random Llama: bounded in passages and bytes, evicting
in the MemoryManager's order, int8 and float16 storage within their error, keys that tell patterns and prefixes
apart, and a save/load round trip that refuses another model's caches."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from hybridrag.system.passage_cache import encode_passage  # noqa: E402
from hybridrag.system.passage_store import PassageKVStore, quantize_rows  # noqa: E402

PATTERN = (-1, 0, None)


@pytest.fixture(scope="module")
def model(tiny_llama):
    return tiny_llama


def _ids(length, seed):
    return torch.randint(0, 97, (1, length), generator=torch.Generator().manual_seed(seed))


def _same(a, b, atol=0.0):
    assert a.start == b.start and a.length == b.length
    for x, y in zip(a.keys + a.values, b.keys + b.values):
        torch.testing.assert_close(x, y, rtol=0, atol=atol)


def test_the_store_reuses_and_evicts_least_recently_used(model):
    store = PassageKVStore(2)
    a, b, c = _ids(7, 7), _ids(8, 8), _ids(9, 9)
    first = store.get(model, a, PATTERN)
    _same(store.get(model, a, PATTERN), first)
    assert store.hits == 1
    store.get(model, b, PATTERN)
    store.get(model, a, PATTERN)  # a is now the most recent
    store.get(model, c, PATTERN)  # evicts b
    assert len(store) == 2 and store.evictions == 1
    assert store.key(b, PATTERN) not in store and store.key(a, PATTERN) in store
    store.get(model, b, PATTERN)
    assert store.misses == 4 and store.stats()["bytes"] == store.nbytes > 0


def test_the_byte_bound_evicts_and_refuses_a_passage_larger_than_it(model):
    one = encode_passage(model, _ids(10, 1)).nbytes  # 2 layers x (k, v) x 2 heads x 10 x 16 x 4 bytes
    store = PassageKVStore(100, max_bytes=2 * one)
    for seed in range(3):
        store.get(model, _ids(10, seed), PATTERN)
    assert len(store) == 2 and store.nbytes == 2 * one and store.evictions == 1
    with pytest.raises(ValueError, match="more than the store's max_bytes"):
        store.get(model, _ids(30, 5), PATTERN)
    assert len(store) == 2 and store.nbytes == 2 * one  # nothing half-written


def test_importance_keeps_the_passages_answers_attend_to(model):
    store = PassageKVStore(2, policy="importance")
    a, b, c = _ids(6, 1), _ids(6, 2), _ids(6, 3)
    store.get(model, a, PATTERN)
    store.get(model, b, PATTERN)
    store.reward(store.key(a, PATTERN), 0.8)
    store.get(model, c, PATTERN)  # a is the oldest but the most important: b goes
    assert store.key(a, PATTERN) in store and store.key(b, PATTERN) not in store
    store.reward("not stored", 1.0)  # a no-op


def test_keys_tell_patterns_and_prefixes_apart(model):
    ids, prefix = _ids(9, 1), _ids(4, 2)
    keys = {PassageKVStore.key(ids), PassageKVStore.key(ids, PATTERN), PassageKVStore.key(ids, (8, 2, None)),
            PassageKVStore.key(ids, PATTERN, prefix), PassageKVStore.key(ids, PATTERN, _ids(4, 3))}
    assert len(keys) == 5
    assert PassageKVStore.key(ids, PATTERN, prefix) == PassageKVStore.key(ids.clone(), PATTERN, prefix.clone())


def test_int8_rows_are_within_half_a_scale_step():
    x = torch.randn(1, 3, 17, 40) * torch.logspace(-3, 3, 17)[None, None, :, None]
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8 and scale.shape == (1, 3, 17, 1)
    assert ((q.float() * scale - x).abs() <= scale / 2 * (1 + 1e-6)).all()
    zero, _ = quantize_rows(torch.zeros(1, 1, 2, 8))
    assert (zero == 0).all()


@pytest.mark.parametrize("storage,ratio,atol", [("int8", 0.32, None), ("float16", 0.5, 1e-2), ("bfloat16", 0.5, 6e-2)])
def test_compressed_storage_comes_back_in_the_model_dtype_within_its_error(model, storage, ratio, atol):
    ids = _ids(12, 4)
    exact = encode_passage(model, ids)
    store = PassageKVStore(4, storage=storage)
    first = store.get(model, ids, PATTERN)
    back = store.get(model, ids, PATTERN)
    _same(first, back)  # a miss gives what the hits give
    assert back.keys[0].dtype == torch.float32 and store.nbytes <= ratio * exact.nbytes
    for x, y in zip(exact.keys + exact.values, back.keys + back.values):
        limit = x.abs().amax(-1, keepdim=True) / 254 * 1.001 if atol is None else atol
        assert ((x - y).abs() <= limit).all()


def test_save_and_load_round_trip_and_refuse_another_model(model, tmp_path):
    store = PassageKVStore(3, storage="int8")
    prefix = _ids(4, 9)
    head = store.get(model, prefix, PATTERN)
    parts = [store.get(model, _ids(8, seed), PATTERN, head, prefix) for seed in (1, 2)]
    store.get(model, prefix, PATTERN)  # the prefix is now the most recent
    store.save(tmp_path / "kv", "model-a")
    order = store._memory.eviction_order()

    again = PassageKVStore(3, storage="int8").load(tmp_path / "kv", "model-a")
    assert again._memory.eviction_order() == order and again.nbytes == store.nbytes
    _same(again.get(model, _ids(8, 1), PATTERN, head, prefix), store.get(model, _ids(8, 1), PATTERN, head, prefix))
    assert again.misses == 0 and parts[0].start == 4

    smaller = PassageKVStore(2, storage="int8").load(tmp_path / "kv", "model-a")
    assert len(smaller) == 2 and order[0] not in smaller  # the least valuable stays out
    with pytest.raises(ValueError, match="computed for model-a, not for model-b"):
        PassageKVStore(3, storage="int8").load(tmp_path / "kv", "model-b")
    with pytest.raises(ValueError, match="holds storage='int8'"):
        PassageKVStore(3).load(tmp_path / "kv", "model-a")
    with pytest.raises(FileNotFoundError, match="missing index.json"):
        PassageKVStore(3).load(tmp_path / "nothing", "model-a")

    store.get(model, _ids(8, 3), PATTERN, head, prefix)  # evicts one passage: its file goes at the next save
    store.save(tmp_path / "kv", "model-a")
    assert len(list((tmp_path / "kv").glob("*.safetensors"))) == 3


@pytest.mark.parametrize("kwargs,match", [
    ({"capacity": 0}, "capacity must be an int >= 1"),
    ({"max_bytes": 0}, "max_bytes must be None or an int >= 1"),
    ({"storage": "fp8"}, "storage must be one of"),
    ({"policy": "random"}, "policy must be one of"),
])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PassageKVStore(**{"capacity": 2, **kwargs})


def test_saving_another_storage_over_a_folder_rewrites_its_files(model, tmp_path):
    ids = _ids(8, 1)
    first = PassageKVStore(2, storage="int8")
    first.get(model, ids, PATTERN)
    first.save(tmp_path / "kv", "model-a")
    second = PassageKVStore(2, storage="float16")
    second.get(model, ids, PATTERN)
    second.save(tmp_path / "kv", "model-a")
    loaded = PassageKVStore(2, storage="float16").load(tmp_path / "kv", "model-a")
    _same(loaded.get(model, ids, PATTERN), second.get(model, ids, PATTERN))
