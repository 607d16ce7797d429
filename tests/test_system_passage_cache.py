"""Passage KV caches (hybridrag.system.passage_cache) on a tiny random Llama: re-rotated keys equal a passage run at
its offset, the stitched cache answers like one prompt whose passages do not see each other, the passage pattern
is the hybrid kernels' pattern."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaForCausalLM  # noqa: E402

from hybridrag.integrations.transformers import SETTINGS_ATTR  # noqa: E402
from hybridrag.system.passage_cache import (cache_argument, check_rotary, encode_passage, passage_pattern,  # noqa: E402
                                            shift_keys, stitch)


@pytest.fixture(scope="module")
def model(tiny_llama):
    return tiny_llama


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


def test_a_passage_encoded_after_the_prefix_is_the_tail_of_prefix_and_passage_in_one_run(model):
    """Each passage sees the prefix as if it came right after it (positions P .. P + L - 1, as APE's shared prefix);
    stitched, its keys move to its offset in the prompt."""
    prefix, first, second = _ids(5, 12), _ids(17, 13), _ids(11, 14)
    head = encode_passage(model, prefix)
    parts = [head, encode_passage(model, first, head), encode_passage(model, second, head)]
    assert [p.start for p in parts] == [0, 5, 5] and [p.length for p in parts] == [5, 17, 11]
    together = encode_passage(model, torch.cat([prefix, second], dim=1))
    cache = stitch(parts, check_rotary(model))
    for layer in range(2):
        torch.testing.assert_close(parts[2].keys[layer], together.keys[layer][:, :, 5:], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(parts[2].values[layer], together.values[layer][:, :, 5:], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.layers[layer].keys[:, :, 22:],
                                   shift_keys(parts[2].keys[layer], 17, check_rotary(model)), rtol=0, atol=0)
        torch.testing.assert_close(cache.layers[layer].keys[:, :, :22],
                                   torch.cat([head.keys[layer], parts[1].keys[layer]], dim=2), rtol=0, atol=0)
    with pytest.raises(ValueError, match="prefix must start at position 0"):
        encode_passage(model, second, parts[1])
