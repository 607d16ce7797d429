"""Key padding anywhere (`key_mask`) and packed sequences (`cu_seqlens_q/k`, flash-attn's varlen layout) for
hybrid_attention and sliding_window_attention: every backend against the float64 reference for outputs, lse and
every gradient under the tolerance rule; packed batches against their sequences run one by one."""
import pytest
import torch
from conftest import DEVICE
from test_hybrid_kernel import BACKEND_DTYPE_IDS, BACKEND_DTYPES, BACKENDS, Case, compare

import hybridrag as hr

# Random masks (holes anywhere, landmarks among the hidden keys), combined with every other part of the pattern.
KEY_MASK_CASES = [
    Case(1, 1, 64, 1, hidden="batch0", memory=2),  # the only key hidden: the row sees the memory tokens alone
    Case(15, 15, 128, 4, batch=2, heads=4, kv_heads=2, landmarks=5, hidden=0.4),
    Case(63, 63, 64, 16, batch=2, landmarks=8, hidden=0.3),
    Case(113, 113, 40, (5, 9), causal=False, heads=4, kv_heads=1, landmarks=(0, 17, 62), memory=3, hidden=0.5),
    Case(1, 300, 100, 64, kv_heads=1, landmarks=(0, 299), hidden=0.2),  # decode: one row, a global one
    Case(300, 300, 64, 64, landmarks=100, memory=8, kv_start=(37,), hidden=0.1),
    Case(63, 63, 40, -1, batch=2, kv_heads=1, landmarks=16, hidden="batch0"),  # batch row 0 sees nothing at all
    Case(63, 113, 64, (7, 3), causal=False, batch=2, landmarks=20, global_queries=False, hidden=0.6),
]


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES, ids=BACKEND_DTYPE_IDS, indirect=["backend"])
@pytest.mark.parametrize("case", KEY_MASK_CASES, ids=Case.id)
def test_key_mask_matches_reference(case, backend, dtype):
    failures = compare(backend, case, dtype)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_rows_whose_keys_are_all_hidden_give_zeros_and_minus_inf(backend):
    q, k, v = torch.randn(2, 2, 20, 64, device=DEVICE), torch.randn(2, 1, 20, 64, device=DEVICE), \
        torch.randn(2, 1, 20, 64, device=DEVICE)
    key_mask = torch.ones(2, 20, dtype=torch.bool, device=DEVICE)
    key_mask[1, :12] = False  # batch row 1: rows 0..11 see no key (causal), the rest see keys 12..
    out, lse = hr.hybrid_attention(q, k, v, 8, landmarks=4, key_mask=key_mask, return_lse=True, backend=backend)
    assert torch.equal(out[1, :, :12], torch.zeros_like(out[1, :, :12]))
    assert torch.isneginf(lse[1, :, :12]).all() and torch.isfinite(lse[1, :, 12:]).all()
    assert torch.isfinite(lse[0]).all()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_key_mask_equal_to_kv_start_gives_the_same_answer(backend):
    q, k, v = torch.randn(2, 4, 50, 64, device=DEVICE), torch.randn(2, 2, 50, 64, device=DEVICE), \
        torch.randn(2, 2, 50, 64, device=DEVICE)
    kv_start = torch.tensor([0, 17], device=DEVICE)
    key_mask = torch.arange(50, device=DEVICE)[None, :] >= kv_start[:, None]
    by_start = hr.hybrid_attention(q, k, v, 10, landmarks=7, kv_start=kv_start, backend=backend)
    by_mask = hr.hybrid_attention(q, k, v, 10, landmarks=7, key_mask=key_mask, backend=backend)
    torch.testing.assert_close(by_mask, by_start, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"], indirect=True)
def test_sliding_window_attention_takes_a_key_mask(backend):
    q, k, v = torch.randn(1, 2, 40, 64, device=DEVICE), torch.randn(1, 2, 40, 64, device=DEVICE), \
        torch.randn(1, 2, 40, 64, device=DEVICE)
    key_mask = torch.rand(1, 40, device=DEVICE) > 0.5
    got = hr.sliding_window_attention(q, k, v, (6, 6), causal=False, key_mask=key_mask, backend=backend)
    want = hr.hybrid_attention(q.double(), k.double(), v.double(), (6, 6), causal=False, key_mask=key_mask,
                               backend="reference")
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# packed sequences


def _pack(lengths_q, lengths_k, heads=4, kv_heads=2, dim=64, dtype=torch.float32):
    """Packed q (1, H, total_q, D), k, v (1, Hkv, total_k, D) and int32 offsets."""
    q = torch.randn(1, heads, sum(lengths_q), dim, device=DEVICE, dtype=dtype)
    k = torch.randn(1, kv_heads, sum(lengths_k), dim, device=DEVICE, dtype=dtype)
    v = torch.randn_like(k)

    def offsets(lengths):
        return torch.tensor([0] + lengths, device=DEVICE).cumsum(0).to(torch.int32)
    return q, k, v, offsets(lengths_q), offsets(lengths_k)


def _grads(fn, tensors, grad_out):
    leaves = [t.detach().requires_grad_(True) for t in tensors]
    out, lse = fn(*leaves)
    finite = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    loss = (out.float() * grad_out.float()).sum() + finite.sum()
    return [out, lse, *torch.autograd.grad(loss, leaves)]


PACKED = [
    # self-attention packing (DataCollatorWithFlattening): equal query and key lengths, one sequence of length 1
    dict(lengths_q=[17, 1, 40, 9], lengths_k=[17, 1, 40, 9], window=8, landmarks=5, memory=0),
    # queries the last of their keys (cached decode of several streams), one sequence without queries
    dict(lengths_q=[3, 0, 1, 5], lengths_k=[30, 7, 12, 5], window=-1, landmarks=4, memory=2),
    # bidirectional band and tensor landmarks (positions within each sequence; those past its end are dropped)
    dict(lengths_q=[20, 33], lengths_k=[20, 33], window=(4, 4), causal=False, landmarks=(0, 10, 25), memory=0),
]


@pytest.mark.parametrize("backend", BACKENDS + ["reference"], indirect=True)
@pytest.mark.parametrize("spec", PACKED, ids=lambda spec: f"q{spec['lengths_q']}k{spec['lengths_k']}")
def test_packed_batch_equals_its_sequences_one_by_one(spec, backend):
    q, k, v, cu_q, cu_k = _pack(spec["lengths_q"], spec["lengths_k"])
    landmarks = spec["landmarks"]
    if isinstance(landmarks, tuple):
        landmarks = torch.tensor(landmarks, device=DEVICE)
    memory = [torch.randn(1, 2, spec["memory"], 64, device=DEVICE) for _ in range(2)] if spec["memory"] else []
    causal = spec.get("causal", True)
    options = dict(landmarks=landmarks, causal=causal, return_lse=True, backend=backend)
    grad_out = torch.randn_like(q)

    def packed(q, k, v, *memory):
        memory_kw = dict(memory_k=memory[0], memory_v=memory[1]) if memory else {}
        return hr.hybrid_attention(q, k, v, spec["window"], cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                   max_seqlen_q=max(spec["lengths_q"]), **memory_kw, **options)

    got = _grads(packed, [q, k, v, *memory], grad_out)
    parts = {name: [] for name in ("o", "lse", "dq")}
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    dmemory = [torch.zeros_like(m) for m in memory]
    for (q_lo, q_hi), (k_lo, k_hi) in zip(zip(cu_q.tolist(), cu_q.tolist()[1:]), zip(cu_k.tolist(), cu_k.tolist()[1:])):
        if q_hi == q_lo:
            continue
        seq_landmarks = landmarks[landmarks < k_hi - k_lo] if isinstance(landmarks, torch.Tensor) else landmarks

        def single(q, k, v, *memory):
            memory_kw = dict(memory_k=memory[0], memory_v=memory[1]) if memory else {}
            return hr.hybrid_attention(q, k, v, spec["window"], **memory_kw, **{**options,
                                                                               "landmarks": seq_landmarks})
        out, lse, dq_s, dk_s, dv_s, *dmem_s = _grads(
            single, [q[:, :, q_lo:q_hi], k[:, :, k_lo:k_hi], v[:, :, k_lo:k_hi], *memory],
            grad_out[:, :, q_lo:q_hi])
        parts["o"].append(out)
        parts["lse"].append(lse)
        parts["dq"].append(dq_s)
        dk[:, :, k_lo:k_hi], dv[:, :, k_lo:k_hi] = dk_s, dv_s
        for total, part in zip(dmemory, dmem_s):
            total += part
    want = [torch.cat(parts["o"], 2), torch.cat(parts["lse"], 2), torch.cat(parts["dq"], 2), dk, dv, *dmemory]
    for name, a, b in zip(["o", "lse", "dq", "dk", "dv", "dmemory_k", "dmemory_v"], got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_packed_sequences_match_the_reference_with_a_key_mask(backend):
    q, k, v, cu_q, cu_k = _pack([25, 38], [25, 38])
    key_mask = torch.rand(1, 63, device=DEVICE) > 0.3
    key_mask[0, 25] = True
    got = hr.sliding_window_attention(q, k, v, 9, key_mask=key_mask, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                      backend=backend)
    want = hr.sliding_window_attention(q.double(), k.double(), v.double(), 9, key_mask=key_mask, cu_seqlens_q=cu_q,
                                       cu_seqlens_k=cu_k, backend="reference")
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    # the sequences really are apart: the second one's first row sees only its own key
    torch.testing.assert_close(got[:, :, 25], v[:, :, 25].repeat_interleave(2, dim=1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_attention_mass_takes_a_key_mask(backend):
    q, k = torch.randn(2, 4, 40, 64, device=DEVICE), torch.randn(2, 2, 40, 64, device=DEVICE)
    segments = torch.randint(-1, 3, (2, 40), device=DEVICE)
    key_mask = torch.rand(2, 40, device=DEVICE) > 0.4
    memory_k = torch.randn(1, 2, 3, 64, device=DEVICE)
    options = dict(landmarks=6, memory_k=memory_k, key_mask=key_mask)
    got = hr.attention_mass(q, k, segments, 3, 8, backend=backend, **options)
    want = hr.attention_mass(q.double(), k.double(), segments, 3, 8, backend="reference",
                             **{**options, "memory_k": memory_k.double()})
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    unmasked = hr.attention_mass(q, k, segments, 3, 8, backend=backend, landmarks=6, memory_k=memory_k)
    assert (got - unmasked).abs().max() > 1e-3  # the mask changes the answer


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(cu_seqlens_q=torch.tensor([0, 5, 10], dtype=torch.int32)), ValueError, "together"),
    (dict(cu_seqlens_q=torch.tensor([0, 5, 9], dtype=torch.int32),
          cu_seqlens_k=torch.tensor([0, 5, 10], dtype=torch.int32)), ValueError, "end at the packed length 10"),
    (dict(cu_seqlens_q=torch.tensor([0, 6, 5, 10], dtype=torch.int32),
          cu_seqlens_k=torch.tensor([0, 5, 5, 10], dtype=torch.int32)), ValueError, "non-decreasing"),
    (dict(cu_seqlens_q=torch.tensor([0.0, 10.0]), cu_seqlens_k=torch.tensor([0, 10], dtype=torch.int32)),
     TypeError, "cu_seqlens_q must be a 1-D int32"),
    (dict(cu_seqlens_q=torch.tensor([0, 10], dtype=torch.int32), cu_seqlens_k=torch.tensor([0, 10], dtype=torch.int32),
          max_seqlen_q=4), ValueError, "max_seqlen_q is 4"),
    (dict(cu_seqlens_q=torch.tensor([0, 10], dtype=torch.int32), cu_seqlens_k=torch.tensor([0, 10], dtype=torch.int32),
          kv_start=torch.tensor([1])), ValueError, "kv_start does not apply"),
    (dict(cu_seqlens_q=torch.tensor([0, 3, 10], dtype=torch.int32),
          cu_seqlens_k=torch.tensor([0, 0, 10], dtype=torch.int32)), ValueError, "no keys"),
    (dict(key_mask=torch.ones(1, 10)), TypeError, "key_mask must be a bool"),
    (dict(key_mask=torch.ones(2, 10, dtype=torch.bool)), ValueError, r"key_mask must have shape \(1, 10\)"),
])
def test_bad_key_mask_and_packing_arguments_are_refused(kwargs, error, match):
    q, k = torch.randn(1, 2, 10, 64), torch.randn(1, 2, 10, 64)
    with pytest.raises(error, match=match):
        hr.hybrid_attention(q, k, k, 4, backend="cpu", **kwargs)
