"""DynamicQueryGenerator: the kernel attention against a dense softmax (values and gradients), exact padding, task
conditioning, fusion of hand-made rankings, retrieval through a VectorIndex, and bad input."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hybridrag.retrieval import query_generator as qg_module
from hybridrag.retrieval.query_generator import DynamicQueryGenerator, fuse_rankings
from hybridrag.retrieval.vector_index import VectorIndex

HIDDEN, HEADS = 64, 4  # head_dim 16, the smallest the kernels take


pytestmark = pytest.mark.usefixtures("one_thread")


def dense_reference(gen, hidden, task_ids=None, mask=None):
    """The documented forward written out with a dense masked softmax."""
    batch, length, _ = hidden.shape
    task_ids = torch.zeros(batch, dtype=torch.long) if task_ids is None else task_ids
    seed = gen.slots[None] + gen.task_embedding(task_ids)[:, None]
    split = lambda x: x.view(batch, -1, HEADS, gen.head_dim).transpose(1, 2)  # noqa: E731
    q, k, v = split(gen.q_proj(seed)), split(gen.k_proj(hidden)), split(gen.v_proj(hidden))
    scores = q @ k.transpose(-1, -2) * gen.head_dim ** -0.5  # (B, H, S, T)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    o = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(batch, -1, HEADS * gen.head_dim)
    return F.normalize(gen.out_proj(gen.norm(seed + gen.o_proj(o))), dim=-1)


def grads(module, hidden, out):
    weights = torch.randn_like(out)
    names = ("slots", "task_embedding.weight", "q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")
    params = dict(module.named_parameters())
    return torch.autograd.grad((out * weights).sum(), [params[n] for n in names] + [hidden])


@pytest.mark.parametrize("length", [3, 9, 40])  # fewer, about as many and more keys than the 4 query slots
@pytest.mark.parametrize("masked", [False, True])
def test_attention_matches_a_dense_softmax_with_gradients(length, masked):
    gen = DynamicQueryGenerator(HIDDEN, 24, num_queries=4, num_heads=HEADS, num_tasks=2)
    hidden = torch.randn(3, length, HIDDEN, requires_grad=True)
    task_ids = torch.tensor([0, 1, 1])
    mask = torch.rand(3, length) < 0.6 if masked else None
    if masked:
        mask[:, 0] = True
    out = gen(hidden, task_ids, mask)
    expected = dense_reference(gen, hidden, task_ids, mask)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.manual_seed(1)
    got = grads(gen, hidden, out)
    torch.manual_seed(1)
    for g, e in zip(got, grads(gen, hidden, expected)):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)
    assert got[0].abs().sum() > 0


def test_the_attention_is_the_project_kernel(monkeypatch):
    calls = []
    kernel = qg_module.hybrid_attention

    def spy(q, k, v, window, **kwargs):
        calls.append((tuple(q.shape), tuple(k.shape), window, kwargs))
        return kernel(q, k, v, window, **kwargs)

    monkeypatch.setattr(qg_module, "hybrid_attention", spy)
    gen = DynamicQueryGenerator(HIDDEN, 8, num_queries=3, num_heads=HEADS, backend="cpu")
    mask = torch.tensor([[True] * 5 + [False] * 2, [True] * 7])
    gen(torch.randn(2, 7, HIDDEN), attention_mask=mask)
    assert len(calls) == 1
    q_shape, k_shape, window, kwargs = calls[0]
    assert q_shape == (2, HEADS, 3, 16) and k_shape == (2, HEADS, 7, 16) and window == (-1, -1)
    assert kwargs["causal"] is False and kwargs["backend"] == "cpu" and kwargs["kv_start"].tolist() == [2, 0]


def test_padding_does_not_change_the_real_tokens_outputs():
    gen = DynamicQueryGenerator(HIDDEN, 16, num_queries=4, num_heads=HEADS, num_tasks=3)
    lengths, total = [5, 9, 6, 3], 9
    rows = [torch.randn(n, HIDDEN) for n in lengths]
    masks = [torch.arange(total) < 5,  # right padding
             torch.ones(total, dtype=torch.bool),  # none
             torch.arange(total) >= 3,  # left padding
             torch.tensor([False, True, False, False, True, False, True, False, False])]  # scattered
    hidden = torch.full((4, total, HIDDEN), float("nan"))  # NaN padding must not leak
    for b, (row, mask) in enumerate(zip(rows, masks)):
        hidden[b, mask] = row
    hidden.requires_grad_(True)
    task_ids = torch.tensor([2, 0, 1, 2])
    out = gen(hidden, task_ids, torch.stack(masks))
    for b, row in enumerate(rows):
        alone = gen(row[None], task_ids[b:b + 1])
        torch.testing.assert_close(out[b], alone[0], atol=1e-5, rtol=1e-5)
    out.sum().backward()
    padding = ~torch.stack(masks)
    assert torch.isfinite(hidden.grad).all() and hidden.grad[padding].abs().max() == 0


def test_task_conditioning_changes_the_queries():
    gen = DynamicQueryGenerator(HIDDEN, 16, num_queries=4, num_heads=HEADS, num_tasks=3)
    hidden = torch.randn(1, 6, HIDDEN).expand(3, -1, -1)
    out = gen(hidden, torch.tensor([0, 1, 1]))
    assert out.shape == (3, 4, 16)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3, 4))
    torch.testing.assert_close(out[1], out[2])
    assert (out[0] - out[1]).abs().max() > 1e-2
    out.sum().backward()
    used = gen.task_embedding.weight.grad.abs().sum(dim=1)
    assert used[0] > 0 and used[1] > 0 and used[2] == 0


def test_fusion_of_hand_made_rankings():
    ids = np.array([[[7, 3, 5], [3, 9, -1], [3, 3, 7]]])  # one batch row, S = 3 rankings; a repeat and an empty slot
    scores = np.array([[[0.9, 0.8, 0.1], [0.95, 0.2, -np.inf], [0.5, 0.5, 0.4]]])
    s, i = fuse_rankings(scores, ids, 5, "rrf", rrf_k=1)
    # 3: 1/3 + 1/2 + 1/2; 7: 1/2 + 1/3 (its repeat in the third ranking dropped: 7 is rank 2 there); 9: 1/3; 5: 1/4
    assert i.tolist() == [[3, 7, 9, 5, -1]]
    np.testing.assert_allclose(s[0, :4], [4 / 3, 5 / 6, 1 / 3, 1 / 4], rtol=1e-6)
    assert s[0, 4] == -np.inf and s.dtype == np.float32 and i.dtype == np.int64
    s, i = fuse_rankings(scores, ids, 3, "max")
    assert i.tolist() == [[3, 7, 9]] and np.allclose(s, [[0.95, 0.9, 0.2]])
    s, i = fuse_rankings(scores, ids, 4, "mean")
    assert i.tolist() == [[3, 7, 9, 5]]
    np.testing.assert_allclose(s, [[(0.8 + 0.95 + 0.5) / 3, (0.9 + 0.4) / 3, 0.2 / 3, 0.1 / 3]], rtol=1e-6)
    s, i = DynamicQueryGenerator.fuse(np.zeros((2, 1, 2)), np.array([[[4, 2]], [[1, 8]]]), 2, "max")
    assert i.tolist() == [[4, 2], [1, 8]]  # ties: the better rank first


def test_retrieve_through_a_vector_index():
    corpus = F.normalize(torch.randn(50, 16), dim=-1).numpy()
    index = VectorIndex(16, kind="flat")
    index.add(corpus, np.arange(100, 150, dtype=np.int64))
    # batch row 0: its queries are documents 100 and 101 exactly (twice); row 1: documents 140..143
    vectors = torch.from_numpy(corpus[[0, 1, 0, 1, 40, 41, 42, 43]]).view(2, 4, 16)
    scores, ids = DynamicQueryGenerator.retrieve(vectors, index.search, 3, fusion="max")
    assert set(ids[0, :2].tolist()) == {100, 101} and set(ids[1, :3].tolist()) <= {140, 141, 142, 143}
    np.testing.assert_allclose(scores[:, :2], 1.0, rtol=1e-5)
    _, rrf_ids = DynamicQueryGenerator.retrieve(vectors, index.search, 2, depth=1)
    assert set(rrf_ids[0].tolist()) == {100, 101}  # (deeper, an id that every ranking holds lower down can win RRF)
    deep_scores, deep_ids = index.search(vectors.reshape(8, 16).numpy(), 10)
    expected = fuse_rankings(deep_scores.reshape(2, 4, 10), deep_ids.reshape(2, 4, 10), 5)
    for got, want in zip(DynamicQueryGenerator.retrieve(vectors, index.search, 5, depth=10), expected):
        np.testing.assert_array_equal(got, want)
    gen = DynamicQueryGenerator(HIDDEN, 16, num_heads=HEADS)
    _, ids = gen.retrieve(gen(torch.randn(2, 5, HIDDEN)), index.search, 4, fusion="mean")
    assert ids.shape == (2, 4) and (ids >= 100).all()


@pytest.mark.parametrize("kwargs, error, match", [
    ({"hidden_size": 64, "query_dim": 0}, ValueError, r"query_dim must be positive, got 0"),
    ({"hidden_size": 64, "query_dim": 8, "num_queries": 2.0}, TypeError, r"num_queries must be an int, got float"),
    ({"hidden_size": 64, "query_dim": 8, "num_tasks": 0}, ValueError, r"num_tasks must be positive, got 0"),
    ({"hidden_size": 64, "query_dim": 8, "num_heads": 8}, ValueError,
     r"head_dim must be in \[16, 256\] for the attention kernels, got 8 \(hidden_size 64 // num_heads 8\)"),
    ({"hidden_size": 64, "query_dim": 8, "backend": "gpu"}, ValueError, r"backend must be one of .*, got 'gpu'"),
])
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        DynamicQueryGenerator(**kwargs)


FORWARD_CASES = [
    ({"hidden_states": torch.zeros(2, 5, 32)}, ValueError,
     r"hidden_states must be \(B, T, 64\), got shape \(2, 5, 32\)"),
    ({"hidden_states": torch.zeros(2, 0, 64)}, ValueError, r"hidden_states needs B, T >= 1, got shape \(2, 0, 64\)"),
    ({"hidden_states": torch.zeros(2, 5, 64, dtype=torch.float64)}, TypeError,
     r"hidden_states has dtype torch.float64 but the parameters have torch.float32; pass one dtype"),
    ({"task_ids": None}, ValueError, r"task_ids is required when num_tasks > 1 \(num_tasks=3\)"),
    ({"task_ids": torch.tensor([0.0, 1.0])}, TypeError, r"task_ids must be an integer tensor or None, got dtype "
                                                        r"torch.float32"),
    ({"task_ids": [0, 1]}, TypeError, r"task_ids must be an integer tensor or None, got list"),
    ({"task_ids": torch.tensor([0, 1, 2])}, ValueError, r"task_ids must have shape \(2,\) on cpu, got \(3,\) on cpu"),
    ({"task_ids": torch.tensor([0, 3])}, ValueError, r"task_ids must lie in \[0, 3\), got 0 \.\. 3"),
    ({"attention_mask": torch.ones(2, 5)}, TypeError, r"attention_mask must be a bool tensor \(True = real token\) or "
                                                      r"None, got dtype torch.float32"),
    ({"attention_mask": torch.ones(2, 4, dtype=torch.bool)}, ValueError,
     r"attention_mask must have shape \(2, 5\) on cpu, got \(2, 4\) on cpu"),
    ({"attention_mask": torch.tensor([[True] * 5, [False] * 5])}, ValueError,
     r"attention_mask row 1 has no real token; every row needs at least one"),
]


@pytest.mark.parametrize("kwargs, error, match", FORWARD_CASES)
def test_bad_forward_inputs(kwargs, error, match):
    gen = DynamicQueryGenerator(HIDDEN, 8, num_heads=HEADS, num_tasks=3)
    args = {"hidden_states": torch.zeros(2, 5, HIDDEN), "task_ids": torch.tensor([0, 1]), **kwargs}
    with pytest.raises(error, match=match):
        gen(**args)


def fake_search(vectors, k):
    return np.zeros((len(vectors), k), np.float32), np.zeros((len(vectors), k), np.int64)


@pytest.mark.parametrize("call, error, match", [
    (lambda: fuse_rankings(np.zeros((1, 2, 3)), np.zeros((1, 2, 3), np.int64), 2, "sum"), ValueError,
     r"fusion must be one of \('rrf', 'max', 'mean'\), got 'sum'"),
    (lambda: fuse_rankings(np.zeros((1, 2, 3)), np.zeros((1, 2, 3), np.int64), 0), ValueError,
     r"k must be positive, got 0"),
    (lambda: fuse_rankings(np.zeros((1, 2, 3)), np.zeros((1, 2, 3), np.int64), 2, rrf_k=0), ValueError,
     r"rrf_k must be a finite number > 0, got 0"),
    (lambda: fuse_rankings(np.zeros((1, 2, 3)), np.zeros((2, 3), np.int64), 2), ValueError,
     r"scores and ids must be \(B, S, n\) arrays of one shape, ids integer; got scores \(1, 2, 3\) and ids \(2, 3\)"),
    (lambda: fuse_rankings(np.zeros((1, 2, 3)), np.zeros((1, 2, 3)), 2), ValueError,
     r"ids integer; got scores \(1, 2, 3\) and ids \(1, 2, 3\) dtype float64"),
    (lambda: DynamicQueryGenerator.retrieve(np.zeros((2, 8), np.float32), fake_search, 2), ValueError,
     r"query_vectors must be a float \(B, S, d\) array or tensor with no empty dim, got shape \(2, 8\)"),
    (lambda: DynamicQueryGenerator.retrieve(np.zeros((1, 2, 8), np.float32), "index", 2), TypeError,
     r"search_fn must be callable, got str"),
    (lambda: DynamicQueryGenerator.retrieve(np.zeros((1, 2, 8), np.float32), fake_search, 2, depth=0), ValueError,
     r"depth must be positive, got 0"),
    (lambda: DynamicQueryGenerator.retrieve(np.zeros((1, 2, 8), np.float32), lambda v, k: fake_search(v, k + 1), 2),
     ValueError, r"search_fn must return scores and ids of one shape \(2, w\) with 1 <= w <= 2, got \(2, 3\) and "
         r"\(2, 3\)"),
])
def test_bad_fusion_and_retrieval_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_retrieve_takes_a_search_that_returns_fewer_columns_than_asked():
    """VectorIndex.search returns min(depth, index size) columns: a small index must not break retrieve."""
    index = VectorIndex(8, kind="flat")
    vectors = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index.add(vectors, np.arange(5))
    scores, ids = DynamicQueryGenerator.retrieve(vectors[None, :2], index.search, 3, depth=10)
    assert ids.shape == (1, 3) and set(ids[0].tolist()) <= set(range(5)) and np.isfinite(scores).all()
