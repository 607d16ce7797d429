"""FeedbackExtractor: the mapping's exact values, the input forms agreeing (from_model against a dense softmax), the
embedding fallback and bad input; WeightUpdater: the three update rules, bounds, re-ranking and state."""
import json

import numpy as np
import pytest
import torch

from hybridrag.retention.feedback import FeedbackExtractor, WeightUpdater


def test_feedback_at_the_threshold_at_zero_and_at_full_attention():
    extractor = FeedbackExtractor()                       # t = 1 / S, p = .5, n = -.5, u = 0
    np.testing.assert_array_equal(extractor.from_scores(np.ones(4)), [0.5] * 4)
    np.testing.assert_array_equal(extractor.from_scores(np.ones(3)), [0.5] * 3)
    np.testing.assert_array_equal(extractor.from_scores(np.array([2.0, 0, 0, 0])), [1.0, -0.5, -0.5, -0.5])
    np.testing.assert_array_equal(extractor.from_scores(np.zeros(3)), [-0.5] * 3)   # no attention to any item
    np.testing.assert_array_equal(extractor.from_scores(np.array([0.3])), [1.0])    # S = 1: t = 1
    np.testing.assert_array_equal(extractor.from_scores(np.array([[1.0, 1.0], [0.0, 5.0]])), [[0.5, 0.5], [-0.5, 1]])


def test_feedback_between_the_anchors():
    extractor = FeedbackExtractor(threshold=0.4, positive=0.2, negative=-1.0, neutral=-0.1)
    shares = np.array([0.4, 0.1, 0.3, 0.2, 0.0])          # sums to 1: the shares are the scores themselves
    expected = [0.2, -1 + 0.9 * 0.25, -1 + 0.9 * 0.75, -1 + 0.9 * 0.5, -1.0]
    np.testing.assert_allclose(extractor.from_scores(shares), expected, rtol=0, atol=1e-12)
    high = extractor.from_scores(np.array([0.7, 0.3]))
    np.testing.assert_allclose(high, [0.2 + 0.8 * 0.3 / 0.6, -1 + 0.9 * 0.75], rtol=0, atol=1e-12)
    rng = np.random.default_rng(0)
    for size in (2, 5, 17):
        scores = np.sort(rng.random(size))
        assert (np.diff(FeedbackExtractor().from_scores(scores)) >= 0).all()    # never decreases with attention


def items_case(seed=0, tq=5, tk=12, num_items=4):
    rng = np.random.default_rng(seed)
    matrix = rng.random((tq, tk))
    matrix /= matrix.sum(axis=1, keepdims=True)
    token_to_item = rng.integers(-1, num_items, tk)
    token_to_item[:num_items] = np.arange(num_items)     # every item has a token
    return matrix, token_to_item


def test_the_three_input_forms_agree():
    extractor = FeedbackExtractor()
    matrix, token_to_item = items_case()
    per_item = np.array([matrix[:, token_to_item == i].sum(axis=1).mean() for i in range(4)])
    from_matrix = extractor.from_attention_matrix(matrix, token_to_item, 4)
    from_tokens = extractor.from_token_attention(torch.tensor(matrix.mean(axis=0)), torch.tensor(token_to_item), 4)
    np.testing.assert_allclose(from_matrix, extractor.from_scores(per_item), rtol=0, atol=1e-12)
    np.testing.assert_allclose(from_tokens, from_matrix, rtol=0, atol=1e-12)
    np.testing.assert_allclose(extractor.extract(attention_matrix=matrix, token_to_item=token_to_item, num_items=4),
                               from_matrix, rtol=0, atol=1e-12)
    assert len(set(np.round(from_matrix, 9))) > 2         # a case with distinct values, not a trivial one


def dense_attention(q, k, window):
    """softmax over the int-window causal pattern, K/V heads repeated: (B, H, Tq, Tk) float64."""
    tq, tk = q.shape[2], k.shape[2]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1).double()
    logits = q.double() @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    position = torch.arange(tq)[:, None] + tk - tq
    key = torch.arange(tk)[None, :]
    visible = (key <= position) & (position - key <= window - 1)
    return torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)


@pytest.mark.parametrize("tq, tk", [(10, 10), (6, 13)])
def test_from_model_matches_the_dense_matrix(tq, tk):
    """attention_mass (blockwise, no Tq x Tk matrix) and a dense softmax matrix give the same feedback."""
    batch, heads, kv_heads, dim, window, num_items = 2, 4, 2, 16, 6, 3
    q, k = torch.randn(batch, heads, tq, dim), torch.randn(batch, kv_heads, tk, dim)
    segments = torch.randint(-1, num_items, (batch, tk))
    segments[:, -num_items:] = torch.arange(num_items)   # every item is visible to the last rows
    answer_mask = torch.zeros(batch, tq, dtype=torch.bool)
    answer_mask[:, -4:] = True
    answer_mask[1, 0] = True
    extractor = FeedbackExtractor()
    feedback = extractor.from_model(q, k, segments, num_items, window, answer_mask=answer_mask)
    assert feedback.shape == (batch, num_items)
    probabilities = dense_attention(q, k, window).mean(dim=1)    # heads averaged, as from_model does
    for b in range(batch):
        dense = extractor.from_attention_matrix(probabilities[b][answer_mask[b]], segments[b], num_items)
        np.testing.assert_allclose(feedback[b], dense, rtol=0, atol=1e-5)
    every_row = extractor.from_model(q, k, segments, num_items, window)
    for b in range(batch):
        dense = extractor.from_attention_matrix(probabilities[b], segments[b], num_items)
        np.testing.assert_allclose(every_row[b], dense, rtol=0, atol=1e-5)


def test_embedding_fallback():
    extractor = FeedbackExtractor()
    items = np.array([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 2.0]])
    answer = np.array([2.0, 0.0, 0.0])
    cosines = np.array([1.0, 0.6, 0.0])
    expected = extractor.from_scores(np.exp(cosines / 0.5))
    np.testing.assert_allclose(extractor.from_embeddings(answer, items, temperature=0.5), expected, atol=1e-12)
    fallback = extractor.extract(answer_embedding=torch.tensor(answer), item_embeddings=torch.tensor(items))
    assert fallback[0] > fallback[1] > fallback[2]
    np.testing.assert_allclose(fallback, extractor.from_embeddings(answer, items), atol=1e-12)
    assert extractor.extract(scores=np.ones(3), answer_embedding=answer, item_embeddings=items).tolist() == [0.5] * 3


EXTRACTOR_CASES = [
    (dict(threshold=0.0), ValueError, r"threshold must be None \(1 / number of items\) or in \(0, 1\), got 0.0"),
    (dict(threshold=1.0), ValueError, r"threshold must be None .* or in \(0, 1\), got 1.0"),
    (dict(threshold="half"), TypeError, r"threshold must be a number, got str"),
    (dict(positive=float("nan")), ValueError, r"positive must be finite, got nan"),
    (dict(positive=1.5), ValueError, r"need -1 <= negative <= neutral <= positive <= 1, got .*positive=1.5"),
    (dict(neutral=0.6), ValueError, r"need -1 <= negative <= neutral <= positive <= 1, got .*neutral=0.6"),
    (dict(negative=0.1), ValueError, r"need -1 <= negative <= neutral .*negative=0.1"),
]


@pytest.mark.parametrize("kwargs, error, match", EXTRACTOR_CASES)
def test_bad_extractor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        FeedbackExtractor(**kwargs)


def bad_inputs():
    matrix, items = items_case()
    tokens = matrix.mean(axis=0)
    nan = tokens.copy()
    nan[3] = np.nan
    negative = tokens.copy()
    negative[2] = -0.1
    return [
        ("from_scores", (np.array([0.5, -0.1]),), ValueError, r"scores must be >= 0 .*got a minimum of -0.1"),
        ("from_scores", (np.array([0.5, np.nan]),), ValueError, r"scores has NaN or inf values"),
        ("from_scores", (np.array([0.5, np.inf]),), ValueError, r"scores has NaN or inf values"),
        ("from_scores", (np.zeros(0),), ValueError, r"scores must be a non-empty array of 1 or 2 dims, got shape"),
        ("from_scores", ([0.5, 0.5],), TypeError, r"scores must be a numpy array or a torch tensor, got list"),
        ("from_scores", (np.array([True, False]),), TypeError, r"scores must hold real numbers, got dtype bool"),
        ("from_token_attention", (nan, items, 4), ValueError, r"attention has NaN or inf values"),
        ("from_token_attention", (negative, items, 4), ValueError, r"attention must be >= 0"),
        ("from_token_attention", (tokens, items[:-1], 4), ValueError,
         r"token_to_item has 11 entries but attention has 12 context tokens"),
        ("from_token_attention", (tokens, items, 3), ValueError,
         r"token_to_item ids must lie in \[-1, 3\) \(num_items = 3\), got -1 \.\. 3"),
        ("from_token_attention", (tokens, np.where(items < 0, -2, items), 4), ValueError,
         r"token_to_item ids must lie in \[-1, 4\) \(num_items = 4\), got -2 \.\. 3"),
        ("from_token_attention", (tokens, items.astype(float), 4), TypeError,
         r"token_to_item must be a 1-D integer array, got dtype float64"),
        ("from_token_attention", (tokens, items, 0), ValueError, r"num_items must be >= 1, got 0"),
        ("from_token_attention", (matrix, items, 4), ValueError, r"attention must be a non-empty array of 1 dims"),
        ("from_attention_matrix", (matrix, items[:-2], 4), ValueError,
         r"token_to_item has 10 entries but attention has 12 context tokens"),
        ("from_attention_matrix", (-matrix, items, 4), ValueError, r"attention must be >= 0"),
        ("from_embeddings", (np.ones(3), np.ones((2, 4))), ValueError,
         r"answer_embedding must be \(d,\) and item_embeddings \(S, d\) .*got shapes \(3,\) and \(2, 4\)"),
        ("from_embeddings", (np.ones(3), np.full((2, 3), np.nan)), ValueError, r"item_embeddings has NaN or inf"),
        ("from_embeddings", (np.zeros(3), np.ones((2, 3))), ValueError, r"must be non-zero vectors"),
    ]


@pytest.mark.parametrize("method, args, error, match", bad_inputs())
def test_bad_attention_inputs(method, args, error, match):
    with pytest.raises(error, match=match):
        getattr(FeedbackExtractor(), method)(*args)


def test_bad_extract_and_from_model_calls():
    extractor = FeedbackExtractor()
    with pytest.raises(ValueError, match="pass one attention form, got scores and token_attention"):
        extractor.extract(scores=np.ones(2), token_attention=np.ones(2))
    with pytest.raises(ValueError, match="token_attention needs token_to_item and num_items"):
        extractor.extract(token_attention=np.ones(2))
    with pytest.raises(ValueError, match="no attention was given, and the embedding fallback needs answer_embedding"):
        extractor.extract(answer_embedding=np.ones(3))
    with pytest.raises(ValueError, match="temperature must be > 0, got 0.0"):
        extractor.from_embeddings(np.ones(3), np.ones((2, 3)), temperature=0.0)
    q, k = torch.randn(2, 2, 4, 16), torch.randn(2, 2, 4, 16)
    segments = torch.zeros(2, 4, dtype=torch.long)
    mask = torch.tensor([[True, False, False, False], [False] * 4])
    with pytest.raises(ValueError, match=r"answer_mask selects no query row in batch rows \[1\]"):
        extractor.from_model(q, k, segments, 1, 4, answer_mask=mask)
    with pytest.raises(ValueError, match="num_segments"):  # attention_mass's own checks come before any work
        extractor.from_model(q, k, segments, 0, 4)


def test_ema_converges_to_the_repeated_feedback():
    updater = WeightUpdater(method="ema", rate=0.1)
    for _ in range(200):
        updater.update(["a", "b", "c"], np.array([0.6, -0.5, 0.0]))
    np.testing.assert_allclose(updater.weight(["a", "b", "c", "new"]), [1.6, 0.5, 1.0, 1.0], rtol=0, atol=1e-8)
    first = WeightUpdater(rate=0.25).update(["a"], np.array([1.0]))
    assert first.tolist() == [0.75 * 1.0 + 0.25 * 2.0]


@pytest.mark.parametrize("method, expected", [("additive", [1.5, 0.5]),
                                              ("multiplicative", [np.exp(0.5), np.exp(-0.5)])])
def test_additive_and_multiplicative_steps(method, expected):
    updater = WeightUpdater(method=method, rate=0.5, bounds=(0.1, 10.0))
    np.testing.assert_allclose(updater.update(np.array([7, 8]), np.array([1.0, -1.0])), expected, rtol=1e-12)
    np.testing.assert_allclose(updater.weight([7, 8]), expected, rtol=1e-12)


@pytest.mark.parametrize("method", ["ema", "additive", "multiplicative"])
def test_bounds_hold(method):
    updater = WeightUpdater(method=method, rate=1.0, bounds=(0.5, 1.5))
    for _ in range(20):
        updater.update(["up", "down"], np.array([1.0, -1.0]))
        assert ((updater.weight(["up", "down"]) >= 0.5) & (updater.weight(["up", "down"]) <= 1.5)).all()
    assert updater.weight(["up", "down"]).tolist() == [1.5, 0.5]


def test_apply_reranks_by_score_plus_log_weight():
    updater = WeightUpdater(method="additive", rate=1.0)
    updater.update(["a", "c"], np.array([1.0, -0.5]))    # weights a 2, b 1 (never updated), c .5
    ids, adjusted = updater.apply(["c", "b", "a"], np.array([-0.1, -0.2, -0.3]))    # negative inner products
    assert ids == ["a", "b", "c"]
    np.testing.assert_allclose(adjusted, [-0.3 + np.log(2), -0.2, -0.1 + np.log(0.5)], rtol=0, atol=1e-12)
    ids, _ = WeightUpdater().apply(["x", "y", "z"], torch.tensor([1.0, 2.0, 1.0]))
    assert ids == ["y", "x", "z"]                         # equal adjusted scores keep the input order


def test_state_dict_round_trip():
    updater = WeightUpdater(method="multiplicative", rate=0.3)
    updater.update(["a", "b"], np.array([0.8, -0.4]))
    state = json.loads(json.dumps(updater.state_dict()))
    twin = WeightUpdater(method="multiplicative", rate=0.3)
    twin.load_state_dict(state)
    assert len(twin) == 2 and twin.weight(["a", "b"]).tolist() == updater.weight(["a", "b"]).tolist()
    with pytest.raises(ValueError, match="state has method='multiplicative' but this updater has method='ema'"):
        WeightUpdater(rate=0.3).load_state_dict(state)
    state["weights"]["a"] = 50.0
    with pytest.raises(ValueError, match=r"state weights must be finite and within bounds \(0.1, 10.0\)"):
        twin.load_state_dict(state)
    with pytest.raises(TypeError, match="state must be a dict from WeightUpdater.state_dict"):
        twin.load_state_dict([1])


UPDATER_CASES = [
    (dict(method="sgd"), ValueError, r"method must be one of \('ema', 'additive', 'multiplicative'\), got 'sgd'"),
    (dict(rate=0.0), ValueError, r"rate must be in \(0, 1\] for method 'ema', got 0.0"),
    (dict(rate=1.5), ValueError, r"rate must be in \(0, 1\] for method 'ema', got 1.5"),
    (dict(method="additive", rate=-1.0), ValueError, r"rate must be > 0 for method 'additive', got -1.0"),
    (dict(bounds=(0.0, 2.0)), ValueError, r"need 0 < low <= initial <= high, got bounds=\(0.0, 2.0\)"),
    (dict(bounds=(2.0, 3.0)), ValueError, r"need 0 < low <= initial <= high, got bounds=\(2.0, 3.0\) and initial"),
    (dict(bounds=1.0), TypeError, r"bounds must be a \(low, high\) pair, got 1.0"),
    (dict(initial=float("inf")), ValueError, r"initial must be finite, got inf"),
]


@pytest.mark.parametrize("kwargs, error, match", UPDATER_CASES)
def test_bad_updater_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        WeightUpdater(**kwargs)


def test_bad_updates_change_nothing():
    updater = WeightUpdater()
    cases = [
        ((["a", "a"], np.array([0.1, 0.2])), ValueError, r"ids must be distinct within one update"),
        ((["a", "b"], np.array([0.1])), ValueError, r"feedback must be a real \(2,\) array .*shape \(1,\)"),
        ((["a"], np.array([1.5])), ValueError, r"feedback must be finite and in \[-1, 1\], got 1.5 \.\. 1.5"),
        ((["a"], np.array([np.nan])), ValueError, r"feedback must be finite and in \[-1, 1\]"),
        ((["a", 2.5], np.array([0.1, 0.1])), TypeError, r"ids\[1\] must be a str or an int, got float"),
        (("ab", np.array([0.1, 0.1])), TypeError, r"ids must be a sequence of item ids, got str"),
    ]
    for args, error, match in cases:
        with pytest.raises(error, match=match):
            updater.update(*args)
    with pytest.raises(ValueError, match=r"scores must be a real \(2,\) array"):
        updater.apply(["a", "b"], np.ones(3))
    with pytest.raises(ValueError, match=r"scores has NaN or inf values"):
        updater.apply(["a"], np.array([np.nan]))
    assert len(updater) == 0
