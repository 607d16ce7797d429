"""capture_attention_mass: the attention mass each segment receives inside a real transformers model, recorded per
attention call with hybridrag.attention_mass (no T x T matrix), against the dense weights of eager attention."""
import pytest
import torch

pytest.importorskip("transformers", minversion="5.4")

from test_transformers_integration import assert_close, build_pair, make_batch  # noqa: E402

from hybridrag.integrations.transformers import apply_hybrid_attention, capture_attention_mass  # noqa: E402


def dense_mass(weights, segments, rows, num_segments):
    """(B, H, S) from dense weights (B, H, Tq, Tk): the mass each segment gets, averaged over the selected rows."""
    one_hot = torch.nn.functional.one_hot(segments.clamp(min=0), num_segments).float() * (segments >= 0)[..., None]
    per_row = torch.einsum("bhqk,bks->bhqs", weights.float(), one_hot)
    rows = rows.float()
    return torch.einsum("bhqs,bq->bhs", per_row, rows) / rows.sum(1).clamp(min=1)[:, None, None]


def _segments(batch, length, num_segments=3):
    segments = torch.arange(length).repeat(batch, 1) * num_segments // length  # three contiguous passages
    segments[:, -2:] = -1  # the last tokens belong to no passage (the question)
    return segments


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_capture_matches_the_dense_weights_of_eager_attention(name):
    eager, hybrid = build_pair(name)
    ids, mask = make_batch("left", length=12)
    segments = _segments(3, 12)
    rows = torch.zeros(3, 12, dtype=torch.bool)
    rows[:, -3:] = True  # the "answer" rows
    with torch.no_grad():
        weights = eager(ids, attention_mask=mask, output_attentions=True).attentions
        with capture_attention_mass(hybrid, segments, rows=rows) as mass:
            hybrid(ids, attention_mask=mask)
    assert len(mass) == len(weights) == 2 and mass.layers == [0, 1]
    assert mass.query_positions == [(0, 12), (0, 12)]
    for layer, dense in enumerate(weights):
        assert mass[layer].shape == (3, 4, 3) and mass[layer].dtype == torch.float32
        assert_close(mass[layer], dense_mass(dense, segments, rows, 3), atol=1e-5, what=f"layer {layer} mass")


def test_capture_under_generate_records_every_call_and_follows_the_landmark_pattern():
    _, model = build_pair("llama")
    apply_hybrid_attention(model, landmark_stride=4, num_memory_tokens=2, window=3)
    ids = make_batch("none", length=10, batch=2)[0]
    segments = _segments(2, 10)
    with torch.no_grad(), capture_attention_mass(model, segments) as mass:
        out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 13)
    assert mass.layers == [0, 1] * 3  # the prompt, then one call per layer for each new token but the last
    assert mass.query_positions[::2] == [(0, 10), (10, 11), (11, 12)]
    # the prompt's calls against the dense weights of the same pattern (memory tokens take part in the softmax)
    with torch.no_grad():
        weights = model(ids, output_attentions=True).attentions
    for layer in (0, 1):
        expected = dense_mass(weights[layer], segments, torch.ones(2, 10, dtype=torch.bool), 3)
        assert_close(mass.by_layer()[layer][0], expected, atol=1e-5, what=f"layer {layer}")
    assert (mass.by_layer()[0][0].sum(-1) < 1).all()  # the memory tokens and the question hold the rest


def test_capture_refuses_a_model_not_on_hybridrag_and_bad_segments():
    eager, hybrid = build_pair("llama")
    with pytest.raises(ValueError, match="attn_implementation='hybridrag'"):
        with capture_attention_mass(eager, _segments(1, 5)):
            pass
    with pytest.raises(TypeError, match="segments must be a 2-D integer tensor"):
        with capture_attention_mass(hybrid, torch.zeros(5)):
            pass
    with pytest.raises(ValueError, match="rows must be a bool tensor"):
        with capture_attention_mass(hybrid, _segments(1, 5), rows=torch.ones(1, 4, dtype=torch.bool)):
            pass


def test_capture_refuses_packed_inputs():
    _, model = build_pair("llama")
    ids = torch.randint(3, 100, (1, 8))
    with pytest.raises(ValueError, match="capture_attention_mass with packed sequences"):
        with torch.no_grad(), capture_attention_mass(model, _segments(1, 8)):
            model(ids, position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]]), use_cache=False)
