"""GrowingCache (hybridrag.system.growing_cache): steps append in place into buffers with room, give the same logits
as transformers' DynamicCache, and stay right when a buffer grows or its views are replaced; stitch writes the
passages' re-rotated keys straight into such buffers."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, MistralConfig  # noqa: E402

from hybridrag.system.generation import stream_generate  # noqa: E402
from hybridrag.system.growing_cache import GrowingCache, GrowingLayer  # noqa: E402
from hybridrag.system.passage_cache import (_rotation, cache_argument, check_rotary, encode_passage,  # noqa: E402
                                            stitch)


def _kv(length, seed, heads=2, dim=16):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(1, heads, length, dim, generator=generator),
            torch.randn(1, heads, length, dim, generator=generator))


def test_updates_append_in_place_until_the_room_runs_out_then_double():
    layer = GrowingLayer(capacity=8)
    steps = [_kv(n, seed) for seed, n in enumerate((3, 1, 4, 2))]
    keys, values = layer.update(*steps[0])
    buffer = layer._key_buffer
    assert buffer.shape[2] == 8 and keys.data_ptr() == buffer.data_ptr()
    layer.update(*steps[1])
    keys, values = layer.update(*steps[2])
    assert layer._key_buffer is buffer, "within the room no new buffer is made"
    keys, values = layer.update(*steps[3])  # 10 rows > 8: grows to max(8, 10, 2 x 8)
    assert layer._key_buffer.shape[2] == 16 and layer.capacity == 16
    assert torch.equal(keys, torch.cat([k for k, _ in steps], dim=2))
    assert torch.equal(values, torch.cat([v for _, v in steps], dim=2))
    assert layer.get_seq_length() == 10


def test_crop_keeps_the_buffer_and_a_replaced_view_is_adopted():
    layer = GrowingLayer(capacity=16)
    first, second, third = _kv(6, 1), _kv(2, 2), _kv(3, 3)
    layer.update(*first)
    layer.crop(-2)
    buffer = layer._key_buffer
    keys, _ = layer.update(*second)
    assert layer._key_buffer is buffer
    assert torch.equal(keys, torch.cat([first[0][:, :, :4], second[0]], dim=2))
    layer.batch_select_indices(torch.tensor([0]))  # replaces keys/values with gathered copies
    keys, values = layer.update(*third)
    assert torch.equal(keys, torch.cat([first[0][:, :, :4], second[0], third[0]], dim=2))
    assert torch.equal(values, torch.cat([first[1][:, :, :4], second[1], third[1]], dim=2))
    layer.reset()
    assert layer.get_seq_length() == 0
    keys, _ = layer.update(*third)
    assert torch.equal(keys, third[0])


def test_generation_with_it_equals_dynamic_cache(tiny_llama):
    ids = torch.randint(0, 97, (1, 19), generator=torch.Generator().manual_seed(4))
    grown = GrowingCache.for_model(tiny_llama.config, 4)  # too small: grows while decoding
    dynamic = DynamicCache(config=tiny_llama.config)
    with torch.no_grad():
        for cache in (grown, dynamic):
            cache.logits = [tiny_llama(input_ids=ids[:, :11], use_cache=True,
                                       **{cache_argument(tiny_llama): cache}).logits]
            for position in range(11, 19):
                cache.logits.append(tiny_llama(input_ids=ids[:, position:position + 1], use_cache=True,
                                               **{cache_argument(tiny_llama): cache}).logits)
    for a, b in zip(grown.logits, dynamic.logits):
        assert torch.equal(a, b)
    tokens = [t.id for t in stream_generate(tiny_llama, ids, max_new_tokens=6, eos_token_ids=())]
    with torch.no_grad():
        reference = tiny_llama.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert tokens == reference[0, 19:].tolist()


def test_for_model_refuses_sliding_window_layers():
    config = MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
    assert GrowingCache.for_model(config, 16) is None


def _rotate(keys, cos, sin):
    """RoPE's rotation as transformers' Llama writes it: keys * cos + rotate_half(keys) * sin."""
    first, second = keys.chunk(2, dim=-1)
    return keys * cos + torch.cat((-second, first), dim=-1) * sin


def test_stitch_writes_the_rotated_keys_with_room(tiny_llama):
    ids = [torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(n)) for n in (5, 9, 7)]
    prefix = encode_passage(tiny_llama, ids[0])
    parts = [prefix] + [encode_passage(tiny_llama, x, prefix) for x in ids[1:]]
    rotary = check_rotary(tiny_llama)
    cache = stitch(parts, rotary, room=12)
    shifts = torch.cat([torch.zeros(5, dtype=torch.long), torch.zeros(9, dtype=torch.long),
                        torch.full((7,), 9, dtype=torch.long)])  # the third part was encoded at 5, sits at 14
    cos, sin = _rotation(rotary, shifts, parts[0].keys[0])
    for index, layer in enumerate(cache.layers):
        expected = _rotate(torch.cat([p.keys[index] for p in parts], dim=2), cos, sin)
        assert torch.equal(layer.keys, expected)
        assert torch.equal(layer.values, torch.cat([p.values[index] for p in parts], dim=2))
        assert layer._key_buffer.shape[2] == 21 + 12
    assert cache.get_seq_length() == 21


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="capacity must be an int >= 0, got -1"):
        GrowingLayer(-1)
    with pytest.raises(ValueError, match="buffers must be two"):
        GrowingLayer.over(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 5, 8), 2)
    with pytest.raises(ValueError, match="length <= capacity"):
        GrowingLayer.over(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8), 5)
    with pytest.raises(TypeError, match="non-empty list of GrowingLayer"):
        GrowingCache([])
