"""Passage KV caches (hybridrag.system.passage_cache) on a tiny random Llama: re-rotated keys equal a passage run at
its offset, the stitched cache answers like one prompt whose passages do not see each other, the passage pattern
is the hybrid kernels' pattern, and the store is bounded."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from hybridrag.integrations.transformers import SETTINGS_ATTR, register  # noqa: E402
from hybridrag.system.passage_cache import (PassageKVStore, cache_argument, check_rotary, encode_passage,  # noqa: E402
                                            passage_pattern, shift_keys, stitch)


@pytest.fixture(scope="module")
def model():
    register()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         attn_implementation="hybridrag")
    return LlamaForCausalLM(config).eval()


def _ids(length, seed):
    return torch.randint(0, 97, (1, length), generator=torch.Generator().manual_seed(seed))


def test_shifted_keys_equal_the_passage_run_at_its_offset(model):
    ids = _ids(23, 1)
    alone = encode_passage(model, ids)
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, position_ids=torch.arange(40, 63)[None], use_cache=True, **{cache_argument(model): cache})
    rotary = check_rotary(model)
    for layer in range(2):
        torch.testing.assert_close(shift_keys(alone.keys[layer], 40, rotary), cache.layers[layer].keys,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(alone.values[layer], cache.layers[layer].values, rtol=1e-5, atol=1e-5)


def test_a_question_over_stitched_passages_equals_one_block_diagonal_prompt(model):
    """Reference: the prompt run in one call with eager attention and a mask where each passage sees only itself
    and the question sees everything."""
    prefix, first, second, question = _ids(5, 2), _ids(17, 3), _ids(11, 4), _ids(6, 5)
    parts = [encode_passage(model, ids) for ids in (prefix, first, second)]
    cache = stitch(parts, check_rotary(model))
    with torch.no_grad():
        logits = model(input_ids=question, use_cache=True, **{cache_argument(model): cache}).logits
    full = torch.cat([prefix, first, second, question], dim=1)
    total = full.shape[1]
    block = torch.full((total,), -1)
    block[:5], block[5:22], block[22:33] = 0, 1, 2
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    same = (block[:, None] == block[None, :]) & (block[:, None] >= 0)
    allowed = causal & (same | (block[:, None] < 0))
    mask = torch.zeros(1, 1, total, total).masked_fill(~allowed, float("-inf"))
    eager = LlamaForCausalLM(copy.deepcopy(model.config)).eval()
    eager.load_state_dict(model.state_dict())
    eager.set_attn_implementation("eager")
    # Positions restart in each part (each is run alone at 0 .. L - 1) and RoPE only sees relative positions
    # inside a part, so with shifted positions per part the one-call run must give the same question logits.
    positions = torch.cat([torch.arange(0, 5), torch.arange(5, 22), torch.arange(22, 33), torch.arange(33, 39)])
    with torch.no_grad():
        reference = eager(input_ids=full, attention_mask=mask, position_ids=positions[None]).logits[:, -6:]
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)


def test_the_passage_pattern_needs_the_hybridrag_attention(model):
    other = LlamaForCausalLM(copy.deepcopy(model.config)).eval()
    other.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="runs on attn_implementation='hybridrag'"):
        with passage_pattern(other, 8, 2, None):
            pass
    with passage_pattern(other, -1, 0, None):  # full attention: nothing to apply, any implementation
        pass


def test_the_passage_pattern_is_set_inside_the_block_only(model):
    modules = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "head_dim")]
    with passage_pattern(model, 8, 2, None):
        settings = getattr(modules[0], SETTINGS_ATTR)
        assert (settings.window, settings.sinks, settings.landmark_stride) == (8, 2, None)
    assert all(getattr(m, SETTINGS_ATTR, None) is None for m in modules)


def test_a_windowed_passage_with_sinks_matches_the_hybrid_op_pattern(model):
    """window 4 with 2 sinks inside the passage: the last row's output changes when a key outside both changes,
    only if the key is a sink (the pattern is applied, not ignored)."""
    ids = _ids(20, 6)
    with passage_pattern(model, 4, 2, None):
        base = encode_passage(model, ids)
        changed = ids.clone()
        changed[0, 8] = (changed[0, 8] + 1) % 97  # outside the last rows' window, not a sink
        other = encode_passage(model, changed)
        sink_changed = ids.clone()
        sink_changed[0, 1] = (sink_changed[0, 1] + 1) % 97  # a sink
        sink = encode_passage(model, sink_changed)
    last = slice(16, 20)  # layer 0 at rows 16..19 sees keys 13..19 and the sinks 0, 1: layer 1's values there
    torch.testing.assert_close(base.values[1][:, :, last], other.values[1][:, :, last], rtol=0, atol=1e-6)
    assert not torch.allclose(base.values[1][:, :, last], sink.values[1][:, :, last], atol=1e-4)
    assert not torch.allclose(base.values[1][:, :, 8:12], other.values[1][:, :, 8:12], atol=1e-4)  # they see 8


def test_the_store_reuses_and_evicts_least_recently_used(model):
    store = PassageKVStore(2)
    a, b, c = _ids(7, 7), _ids(8, 8), _ids(9, 9)
    pattern = (-1, 0, None)
    first = store.get(model, a, pattern)
    assert store.get(model, a, pattern) is first and store.hits == 1
    store.get(model, b, pattern)
    store.get(model, a, pattern)  # a is now the most recent
    store.get(model, c, pattern)  # evicts b
    assert len(store) == 2 and store.evictions == 1
    store.get(model, b, pattern)
    assert store.misses == 4 and store.stats()["bytes"] > 0
    with pytest.raises(ValueError, match="capacity must be an int >= 1"):
        PassageKVStore(0)
