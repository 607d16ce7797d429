"""NaN and inf under the attention patterns, every backend and the reference: a non-finite query, key or value
reaches exactly the rows that see it (kernels/nonfinite.py). Rows that do not see it equal a run without it bit for
bit, rows that do see it are non-finite; with a zero upstream gradient on those rows every gradient equals the clean
run's too."""
import pytest
import torch
from conftest import DEVICE

import hybridrag as hr
from hybridrag.kernels.patterns import hybrid_mask, resolve_landmarks, resolve_window

BACKENDS = ["triton", "reference"] + (["cpu"] if DEVICE == "cpu" else [])
NAN, INF = float("nan"), float("inf")

# (name, T, D, window, hybrid keyword arguments): the sliding window alone, landmarks with and without global rows,
# memory tokens, a key padding mask and left padding.
PATTERNS = [
    ("window", 113, 64, 8, {}),
    ("landmarks", 113, 40, 16, {"landmarks": (3, 50, 100)}),
    ("global-rows", 63, 64, 8, {"landmarks": (0, 40), "global_queries": True}),
    ("bidirectional", 113, 40, (5, 9), {"causal": False, "landmarks": (17,)}),
    ("memory", 63, 40, 8, {"memory": 3}),
]


def _inputs(t, dim, heads=4, kv_heads=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, t, dim, generator=generator).to(DEVICE)
    k, v = (torch.randn(1, kv_heads, t, dim, generator=generator).to(DEVICE) for _ in range(2))
    return q, k, v


def _call(backend, q, k, v, window, kwargs, *, kv_start=None, key_mask=None):
    kwargs = dict(kwargs)
    memory = kwargs.pop("memory", 0)
    if "landmarks" in kwargs:
        kwargs["landmarks"] = torch.tensor(kwargs["landmarks"], device=DEVICE)
    if memory:
        generator = torch.Generator().manual_seed(1)
        kwargs["memory_k"], kwargs["memory_v"] = (
            torch.randn(1, k.shape[1], memory, k.shape[3], generator=generator).to(DEVICE) for _ in range(2))
    return hr.hybrid_attention(q, k, v, window, kv_start=kv_start, key_mask=key_mask, backend=backend,
                               return_lse=True, **kwargs)


def _seen_by(t, window, kwargs):
    """(T, T) bool: row i sees key j (the pattern's one definition)."""
    causal = kwargs.get("causal", True)
    left, right = resolve_window(window, causal)
    landmarks = resolve_landmarks(torch.tensor(kwargs.get("landmarks", ()), dtype=torch.long), t)
    return hybrid_mask(t, t, left, right, causal, landmarks, kwargs.get("global_queries", True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, t, dim, window, kwargs", PATTERNS, ids=[p[0] for p in PATTERNS])
@pytest.mark.parametrize("which, value", [("k", NAN), ("v", NAN), ("v", INF), ("q", NAN)])
def test_a_non_finite_entry_reaches_only_the_rows_that_see_it(backend, name, t, dim, window, kwargs, which, value):
    q, k, v = _inputs(t, dim)
    clean_out, clean_lse = _call(backend, q, k, v, window, kwargs)
    seen = _seen_by(t, window, kwargs).to(DEVICE)
    for position in sorted({0, t // 2, t - 1}):
        dirty = {"q": q, "k": k, "v": v}
        dirty[which] = dirty[which].clone()
        dirty[which][0, 0, position, 1] = value  # kv head 0 serves query heads 0 and 1
        out, lse = _call(backend, dirty["q"], dirty["k"], dirty["v"], window, kwargs)
        reached = torch.zeros(4, t, dtype=torch.bool, device=DEVICE)  # (heads, rows)
        if which == "q":
            reached[0, position] = True
        else:
            reached[:2] = seen[:, position]
        assert torch.equal(out[0][~reached], clean_out[0][~reached]), f"{which}[{position}] leaked into a row"
        assert torch.equal(lse[0][~reached], clean_lse[0][~reached])
        if which == "v":  # at least the value's column in every row that sees it; the scores are untouched
            assert not torch.isfinite(out[0, :, :, 1][reached]).any()
            assert torch.equal(lse[0][reached], clean_lse[0][reached])
        else:  # a non-finite score: the whole row, and its lse
            assert not torch.isfinite(out[0][reached]).any() and torch.isnan(lse[0][reached]).all()


def _gradients(backend, q, k, v, window, kwargs, grad_out, **masks):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out, _ = _call(backend, q, k, v, window, kwargs, **masks)
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, t, dim, window, kwargs", PATTERNS[:3], ids=[p[0] for p in PATTERNS[:3]])
def test_gradients_ignore_a_value_the_rows_with_gradient_do_not_see(backend, name, t, dim, window, kwargs):
    q, k, v = _inputs(t, dim)
    position = t // 2
    seen = _seen_by(t, window, kwargs).to(DEVICE)[:, position]
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    grad_out[:, :2, seen] = 0.0  # the rows whose output the NaN makes NaN take no gradient
    dirty_v = v.clone()
    dirty_v[0, 0, position, 1] = NAN
    clean = _gradients(backend, q, k, v, window, kwargs, grad_out)
    dirty = _gradients(backend, q, k, dirty_v, window, kwargs, grad_out)
    for label, a, b in zip(("dq", "dk", "dv"), clean[1:], dirty[1:]):
        assert torch.isfinite(b).all(), f"{label} has non-finite entries"
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=lambda m: f"{label}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hiding", ["kv_start", "key_mask"])
def test_padding_holding_nan_changes_nothing(backend, hiding):
    """Padding slots are often uninitialised memory: NaN and inf there must not touch any real row or gradient."""
    q, k, v = _inputs(113, 40, heads=2, kv_heads=1)
    q, k, v = (torch.cat([t, t.flip(2)]) for t in (q, k, v))  # batch 2: row 1 padded, row 0 not
    masks = {"kv_start": torch.tensor([0, 37], device=DEVICE)} if hiding == "kv_start" else {}
    if hiding == "key_mask":
        key_mask = torch.ones(2, 113, dtype=torch.bool, device=DEVICE)
        key_mask[1, 20:57] = False
        masks["key_mask"] = key_mask
    hidden = slice(0, 37) if hiding == "kv_start" else slice(20, 57)
    dirty_k, dirty_v = k.clone(), v.clone()
    dirty_k[1, :, hidden] = NAN
    dirty_v[1, :, hidden] = INF
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    kwargs = {"landmarks": (10, 40, 80)}
    clean = _gradients(backend, q, k, v, 16, kwargs, grad_out, **masks)
    dirty = _gradients(backend, q, dirty_k, dirty_v, 16, kwargs, grad_out, **masks)
    for label, a, b in zip(("o", "dq", "dk", "dv"), clean, dirty):
        assert torch.isfinite(b).all(), f"{label} has non-finite entries"
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=lambda m: f"{label}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sliding_window_issue_case(backend):
    """The reported case: k or v at position 299 of T = 300, window 8: only row 299 sees it."""
    q, k, v = _inputs(300, 64, heads=1, kv_heads=1)
    for which in ("k", "v"):
        dirty = {"k": k.clone(), "v": v.clone()}
        dirty[which][0, 0, 299, 0] = NAN
        out = hr.sliding_window_attention(q, dirty["k"], dirty["v"], 8, backend=backend)
        rows = (~torch.isfinite(out[0, 0])).any(-1).nonzero().flatten().tolist()
        assert rows == [299], f"NaN in {which}[299] reached rows {rows}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_streaming_ring_slot_no_query_sees(backend):
    """A NaN key/value stays in the ring after the window has moved past it: later chunks must not see it."""
    for which in ("k", "v"):
        cache = hr.StreamingKVCache(1, 1, 64, 8, sinks=4, device=DEVICE)
        q, k, v = _inputs(32, 64, heads=2, kv_heads=1)
        dirty = {"k": k.clone(), "v": v.clone()}
        dirty[which][0, 0, 24, 3] = NAN  # stays in ring slot (24 - 4) % 8, hidden from every query >= 32
        with torch.no_grad():
            first = hr.ops.streaming_attention(q, dirty["k"], dirty["v"], cache, backend=backend)
            nan_rows = (~torch.isfinite(first[0])).any(-1).any(0).nonzero().flatten().tolist()
            assert nan_rows == list(range(24, 32)), f"{which}: rows {nan_rows}"
            q2, k2, v2 = _inputs(16, 64, heads=2, kv_heads=1, seed=5)
            assert torch.isfinite(hr.ops.streaming_attention(q2, k2, v2, cache, backend=backend)).all()
