"""The CPU backend's plain causal fast path (kernels/hybrid/plain_causal.py, torch's sdpa) against the tiled path it
stands in for (hybridrag.ops.hybrid.PLAIN_CAUSAL_FAST_PATH = False): the same outputs on odd shapes, grouped-query
heads, caches (Tq < Tk) and windows; the same NaN/inf semantics (kernels/nonfinite.py), a non-finite entry where
no row sees it included; the calls it must leave to the tiled path; and the transformers integration on top."""
import pytest
import torch

import hybridrag as hr
import hybridrag.ops.hybrid as hybrid_ops

NAN, INF = float("nan"), float("inf")

# (B, H, Hkv, Tq, Tk, D): decode steps (Tq = 1), prefill (Tq = Tk) and prefill after a cache (1 < Tq < Tk)
SHAPES = [(1, 9, 3, 1, 1, 64), (2, 9, 3, 1, 15, 64), (1, 4, 2, 1, 63, 40), (2, 4, 4, 1, 63, 64),
          (1, 9, 3, 15, 15, 64), (2, 4, 2, 63, 63, 40), (1, 4, 1, 15, 63, 64), (2, 9, 3, 15, 63, 40),
          (1, 4, 2, 63, 64, 64)]
WINDOWS = [-1, 1, 5, 16]


def _inputs(batch, heads, kv_heads, tq, tk, dim, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, tq, dim, generator=generator)
    k, v = (torch.randn(batch, kv_heads, tk, dim, generator=generator) for _ in range(2))
    return q, k, v


def _tiled(*args, **kwargs):
    saved, hybrid_ops.PLAIN_CAUSAL_FAST_PATH = hybrid_ops.PLAIN_CAUSAL_FAST_PATH, False
    try:
        return hr.hybrid_attention(*args, **kwargs)
    finally:
        hybrid_ops.PLAIN_CAUSAL_FAST_PATH = saved


@pytest.fixture
def no_tiled_path(monkeypatch):
    """Fail any call that reaches the tiled path."""
    def refuse(*args, **kwargs):
        raise AssertionError("the call took the tiled path")
    monkeypatch.setattr(hybrid_ops, "_attention", refuse)


@pytest.fixture
def count_tiled(monkeypatch):
    calls = []
    real = hybrid_ops._attention

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(hybrid_ops, "_attention", counted)
    return calls


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-H{}-Hkv{}-Tq{}-Tk{}-D{}".format(*s))
def test_equals_the_tiled_path(shape, window):
    q, k, v = _inputs(*shape)
    expected = _tiled(q, k, v, window)
    actual = hr.hybrid_attention(q, k, v, window)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, atol=5e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[5], SHAPES[7]], ids=["decode", "prefill", "after-cache"])
def test_runs_sdpa_and_not_the_tiled_path(shape, no_tiled_path):
    q, k, v = _inputs(*shape)
    hr.hybrid_attention(q, k, v, -1)
    hr.hybrid_attention(q, k, v, 5, scale=0.3)


def test_non_contiguous_inputs_and_a_scale():
    """transformers' layout: (B, T, H, D) projections transposed to (B, H, T, D)."""
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(2, 15, 9, 64, generator=generator).transpose(1, 2)
    k, v = (torch.randn(2, 63, 3, 64, generator=generator).transpose(1, 2) for _ in range(2))
    for tq in (1, 15):
        rows = q[:, :, -tq:]
        torch.testing.assert_close(hr.hybrid_attention(rows, k, v, -1, scale=0.2),
                                   _tiled(rows, k, v, -1, scale=0.2), atol=5e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# NaN and inf: the tiled path's semantics, whether the entry is seen or hidden


def _poison(q, k, v, which, index, value):
    """A copy of the inputs with tensor `which`'s entry at `index` set to `value`."""
    q, k, v = q.clone(), k.clone(), v.clone()
    {"q": q, "k": k, "v": v}[which][index] = value
    return q, k, v


# (shape, window, tensor, index, value): keys/values the rows see, keys/values only some rows see (causal), and
# ones that no row sees (before a decode step's window)
NON_FINITE = [
    (SHAPES[1], -1, "k", (0, 1, 4, 7), NAN),
    (SHAPES[1], -1, "k", (1, 2, 0, 0), INF),
    (SHAPES[1], -1, "v", (0, 0, 9, 3), INF),
    (SHAPES[1], -1, "v", (1, 1, 2, 5), -INF),
    (SHAPES[1], -1, "q", (0, 4, 0, 1), NAN),
    (SHAPES[1], 5, "k", (0, 1, 3, 2), NAN),       # key 3 is outside the last 5 of 15: no row sees it
    (SHAPES[1], 5, "v", (1, 0, 0, 2), INF),       # value 0: likewise
    (SHAPES[1], 5, "k", (0, 1, 12, 2), NAN),      # inside the window
    (SHAPES[0], -1, "k", (0, 1, 0, 7), NAN),      # a decode step over a single key (sdpa ignores its score)
    (SHAPES[0], -1, "k", (0, 2, 0, 0), -INF),
    (SHAPES[0], -1, "v", (0, 0, 0, 3), INF),
    (SHAPES[2], -1, "k", (0, 1, 62, 39), INF),    # decode steps: the newest key, the oldest, a value in a window
    (SHAPES[3], -1, "k", (1, 3, 0, 0), -INF),
    (SHAPES[3], 16, "v", (0, 2, 50, 5), NAN),
    (SHAPES[1], 1, "k", (1, 0, 14, 3), NAN),      # a window of one key: a single key again
    (SHAPES[5], -1, "k", (0, 1, 40, 0), NAN),     # only rows 40.. see key 40
    (SHAPES[5], -1, "v", (1, 0, 50, 7), INF),
    (SHAPES[5], -1, "q", (1, 3, 20, 9), INF),
    (SHAPES[5], 16, "k", (0, 0, 10, 5), -INF),    # rows 10..25 see key 10
    (SHAPES[7], -1, "k", (0, 2, 60, 1), NAN),     # seen only by the last rows of the 15
    (SHAPES[7], -1, "v", (1, 1, 5, 5), NAN),      # seen by every row
    (SHAPES[7], 5, "k", (1, 0, 30, 3), INF),      # before every row's window
    (SHAPES[7], 5, "v", (0, 2, 62, 3), -INF),
]


@pytest.mark.parametrize("shape, window, which, index, value", NON_FINITE)
def test_a_non_finite_entry_gives_what_the_tiled_path_gives(shape, window, which, index, value):
    q, k, v = _poison(*_inputs(*shape), which, index, value)
    expected = _tiled(q, k, v, window)
    actual = hr.hybrid_attention(q, k, v, window)
    torch.testing.assert_close(actual, expected, atol=5e-6, rtol=1e-5, equal_nan=True)
    assert torch.equal(actual.isnan(), expected.isnan()) and torch.equal(actual.isinf(), expected.isinf())


def test_a_key_hidden_by_the_window_stays_out_of_a_decode_step_and_keeps_the_fast_path(no_tiled_path):
    q, k, v = _inputs(*SHAPES[1])
    clean = hr.hybrid_attention(q, k, v, 5)
    q2, k2, v2 = _poison(q, k, v, "k", (0, 1, 3, 2), NAN)
    q2, k2, v2 = _poison(q2, k2, v2, "v", (1, 0, 0, 2), INF)
    assert torch.equal(hr.hybrid_attention(q2, k2, v2, 5), clean)


def test_a_key_of_minus_inf_scores_makes_its_rows_nan_as_the_tiled_path_does():
    """A key whose scores are -inf would get weight 0 from a softmax and vanish; the semantics make the rows that
    see it NaN."""
    q, k, v = _inputs(*SHAPES[1])
    q = q.abs() + 0.1
    k[0, :, 7] = -INF
    expected, actual = _tiled(q, k, v, -1), hr.hybrid_attention(q, k, v, -1)
    assert expected[0].isnan().all() and not expected[1].isnan().any()
    torch.testing.assert_close(actual, expected, equal_nan=True)


def test_a_non_finite_value_with_zero_weight_still_gives_nan_columns():
    """A decode step's value whose key the softmax weights exactly 0 (exp underflow): the tiled path puts NaN in its
    column all the same, and so does the fast path (its check does not rest on the weights)."""
    q = torch.zeros(1, 4, 1, 64)
    q[..., 0] = 30.0
    k = torch.zeros(1, 2, 20, 64)
    k[:, :, 0, 0] = -40.0  # score -150 * 0.125 = -150 below the others: weight exp(-150) = 0 in float32
    v = torch.randn(1, 2, 20, 64)
    v[0, 1, 0, 9] = INF
    expected, actual = _tiled(q, k, v, -1), hr.hybrid_attention(q, k, v, -1)
    assert expected[0, 2:, 0, 9].isnan().all()
    torch.testing.assert_close(actual, expected, equal_nan=True)


def test_a_finite_sum_that_overflows_falls_back_to_the_tiled_path(count_tiled):
    q, k, v = _inputs(*SHAPES[1])
    v[0, 0, :, 0] = 3e38  # finite entries whose sum is inf
    torch.testing.assert_close(hr.hybrid_attention(q, k, v, -1), _tiled(q, k, v, -1), equal_nan=True)
    assert count_tiled  # the fast path gave up, so the tiled path ran (and its result was returned)


# ----------------------------------------------------------------------------------------------------------------
# Calls the fast path leaves alone


@pytest.mark.parametrize("case", ["landmarks", "memory", "key_mask", "kv_start", "lse", "bfloat16", "grad",
                                  "not-causal", "reference"])
def test_other_calls_take_the_tiled_path(case, count_tiled):
    q, k, v = _inputs(*SHAPES[7])
    kwargs, window = {}, 5
    if case == "landmarks":
        kwargs["landmarks"] = 8
    elif case == "memory":
        kwargs["memory_k"], kwargs["memory_v"] = torch.randn(1, 3, 2, 40), torch.randn(1, 3, 2, 40)
    elif case == "key_mask":
        kwargs["key_mask"] = torch.ones(2, 63, dtype=torch.bool)
    elif case == "kv_start":
        kwargs["kv_start"] = torch.zeros(2, dtype=torch.long)
    elif case == "lse":
        kwargs["return_lse"] = True
    elif case == "bfloat16":
        q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    elif case == "grad":
        q.requires_grad_(True)
    elif case == "not-causal":
        kwargs["causal"], window = False, (4, 4)
    elif case == "reference":
        kwargs["backend"] = "reference"
    out = hr.hybrid_attention(q, k, v, window, **kwargs)
    assert len(count_tiled) == 1  # the fast path returns without the tiled path
    if case == "grad":
        out.sum().backward()
        assert q.grad is not None and torch.isfinite(q.grad).all()


def test_gradients_equal_the_tiled_path_under_no_grad_and_with_grad():
    q, k, v = _inputs(*SHAPES[5])
    with torch.no_grad():
        fast = hr.hybrid_attention(q, k, v, 16)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = hr.hybrid_attention(*leaves, 16)
    torch.testing.assert_close(out.detach(), fast, atol=5e-6, rtol=1e-5)


def test_validation_still_runs_on_the_fast_path():
    q, k, v = _inputs(*SHAPES[1])
    with pytest.raises(TypeError, match="global_queries"):
        hr.hybrid_attention(q, k, v, -1, global_queries=1)
    with pytest.raises(ValueError, match="scale"):
        hr.hybrid_attention(q, k, v, -1, scale=-1.0)
    with pytest.raises(ValueError, match="window"):
        hr.hybrid_attention(q, k, v, 0)
    with pytest.raises(ValueError, match="heads"):
        hr.hybrid_attention(q[:, :8], k, v, -1)
    with pytest.raises(ValueError, match="head_dim"):
        hr.hybrid_attention(q[..., :8], k[..., :8], v[..., :8], -1)


# ----------------------------------------------------------------------------------------------------------------
# The transformers integration on top


transformers = pytest.importorskip("transformers", minversion="5.4")


def _tiny_llama(attn_implementation):
    from transformers import LlamaConfig, LlamaForCausalLM

    from hybridrag.integrations.transformers import register
    register()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=97, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval().to(torch.float32).requires_grad_(False), config


def test_model_logits_and_cached_decoding_equal_the_tiled_path():
    from transformers import DynamicCache

    model, _ = _tiny_llama("hybridrag")
    model.set_attn_implementation("hybridrag")
    ids = torch.randint(3, 97, (1, 23), generator=torch.Generator().manual_seed(1))

    def run():
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            logits = [model(ids[:, :15], cache=cache, use_cache=True).logits]
            logits.append(model(ids[:, 15:20], cache=cache, use_cache=True).logits)  # Tq = 5 after 15 cached
            for position in range(20, 23):
                logits.append(model(ids[:, position:position + 1], cache=cache, use_cache=True).logits)
        return logits

    fast = run()
    saved, hybrid_ops.PLAIN_CAUSAL_FAST_PATH = hybrid_ops.PLAIN_CAUSAL_FAST_PATH, False
    try:
        tiled = run()
    finally:
        hybrid_ops.PLAIN_CAUSAL_FAST_PATH = saved
    for a, b in zip(fast, tiled):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_output_attentions_and_capture_still_work_on_the_fast_path_model():
    from hybridrag.integrations.transformers import capture_attention_mass

    model, _ = _tiny_llama("hybridrag")
    model.set_attn_implementation("hybridrag")
    ids = torch.randint(3, 97, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(ids, output_attentions=True)
        plain = model(ids).logits
        segments = (torch.arange(12) // 4)[None]
        with capture_attention_mass(model, segments) as record:
            captured = model(ids).logits
    assert len(out.attentions) == 2 and out.attentions[0].shape == (1, 4, 12, 12)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(1, 4, 12), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits, plain, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(captured, plain)
    assert len(record) == 2 and record[0].shape == (1, 4, 3)
    torch.testing.assert_close(record[0].sum(-1), torch.ones(1, 4), atol=1e-5, rtol=0)


@pytest.mark.parametrize("tq, tk, window", [(300, 300, 16), (200, 300, -1)])
def test_many_rows_that_would_need_a_mask_take_the_tiled_path(tq, tk, window, count_tiled):
    """Past MASKED_ROWS query rows a windowed or cached prefill would need a (Tq, Tk) mask: the tiled path runs."""
    from hybridrag.kernels.hybrid.plain_causal import MASKED_ROWS

    assert tq > MASKED_ROWS
    q, k, v = _inputs(1, 4, 2, tq, tk, 40)
    expected = _tiled(q, k, v, window)
    count_tiled.clear()
    torch.testing.assert_close(hr.hybrid_attention(q, k, v, window), expected, rtol=1e-5, atol=1e-5)
    assert count_tiled == [1]
