"""RetrievalAugmentedSegments: what it retrieves, how the passages enter, gradients to the retriever, the callable
knowledge-base forms and bad input."""
import math

import pytest
import torch

from hybridrag.models import Retrieval, RetrievalAugmentedSegments

pytestmark = pytest.mark.usefixtures("one_thread")
HIDDEN, PASSAGE_DIM, N, PLEN = 32, 16, 10, 4


def make(top_k=3, gate=0.5):
    torch.manual_seed(0)
    module = RetrievalAugmentedSegments(HIDDEN, PASSAGE_DIM, num_heads=2, num_queries=2, top_k=top_k,
                                        temperature=0.5)
    with torch.no_grad():
        module.cross_attention.gate.fill_(gate)
    return module


def knowledge(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, PASSAGE_DIM, generator=g), torch.randn(N, PLEN, HIDDEN, generator=g)


def hidden(batch=2, length=7, seed=2):
    return torch.randn(batch, length, HIDDEN, generator=torch.Generator().manual_seed(seed))


def test_retrieval_is_the_top_k_of_the_fused_scores():
    module = make()
    vectors, passages = knowledge()
    h = hidden()
    out, retrieval = module(h, vectors, passages)
    assert isinstance(retrieval, Retrieval) and out.shape == h.shape
    with torch.no_grad():
        queries = module.query_generator(h)
        q = module.retriever.encode_queries(queries.reshape(-1, PASSAGE_DIM)).view(2, 2, -1)
        cos = q @ module.retriever.encode_documents(vectors).T / module.retriever.temperature
        fused = torch.logsumexp(cos, dim=1) - math.log(2)
    top = torch.topk(fused, 3, dim=1)
    assert torch.equal(retrieval.indices, top.indices)
    torch.testing.assert_close(retrieval.scores, top.values)
    torch.testing.assert_close(retrieval.probs.sum(dim=1), torch.ones(2))
    torch.testing.assert_close(retrieval.log_probs.exp(), retrieval.probs)


def test_output_is_the_probability_weighted_cross_attention():
    module = make()
    vectors, passages = knowledge()
    h = hidden()
    mask = torch.ones(N, PLEN, dtype=torch.bool)
    mask[:, -1] = False
    out, retrieval = module(h, vectors, passages, mask)
    expected = h.clone()
    for z in range(3):
        chosen = retrieval.indices[:, z]
        attended = module.cross_attention(h, passages[chosen][:, None], mask[chosen][:, None])
        expected = expected + retrieval.probs[:, z, None, None] * (attended - h)
    torch.testing.assert_close(out, expected)
    # a closed gate leaves the hidden states exactly as they were
    closed = make(gate=0.0)
    assert torch.equal(closed(h, vectors, passages, return_retrieval=False), h)


def test_gradients_reach_the_retriever_towers_through_the_scores():
    module = make()
    vectors, passages = knowledge()
    out, retrieval = module(hidden(), vectors, passages)
    (out ** 2).sum().backward()
    for name in ("retriever.query_tower.weight", "retriever.document_tower.weight", "retriever.log_temperature",
                 "query_generator.slots", "query_generator.out_proj.weight", "cross_attention.gate",
                 "cross_attention.v_proj.weight"):
        grad = module.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    # the marginal-likelihood route: log p(z | x) alone reaches the towers, even with the gate closed
    closed = make(gate=0.0)
    _, retrieval = closed(hidden(), vectors, passages)
    per_passage_loglik = torch.tensor([[-1.0, -2.0, -3.0]]).expand(2, -1)
    (-torch.logsumexp(retrieval.log_probs + per_passage_loglik, dim=1).mean()).backward()
    assert closed.retriever.query_tower.weight.grad.abs().sum() > 0
    assert closed.retriever.document_tower.weight.grad.abs().sum() > 0


def test_callable_knowledge_base_equals_the_tensors():
    module = make()
    vectors, passages = knowledge()
    mask = torch.rand(N, PLEN, generator=torch.Generator().manual_seed(3)) > 0.3
    mask[:, 0] = True
    h = hidden()
    out, retrieval = module(h, vectors, passages, mask)

    def search(query_vectors):  # an "index" returning every passage, in reverse order
        assert not query_vectors.requires_grad
        order = torch.arange(N - 1, -1, -1)
        return order.expand(2, -1).clone(), vectors[order].expand(2, -1, -1)

    def fetch(indices):
        return passages[indices], mask[indices]

    out2, retrieval2 = module(h, search, fetch)
    assert torch.equal(retrieval2.indices, retrieval.indices)
    torch.testing.assert_close(out2, out)


@pytest.mark.parametrize("args, error, match", [
    (lambda v, p: (hidden()[0], v, p), ValueError, r"hidden_states must be \(B, T, 32\)"),
    (lambda v, p: (hidden(), v[:, :8], p), ValueError, r"passage_vectors must be \(N, 16\)"),
    (lambda v, p: (hidden(), v[:2], p[:2]), ValueError, "fewer than top_k=3"),
    (lambda v, p: (hidden(), v.long(), p), TypeError, "passage_vectors must be floating point"),
    (lambda v, p: (hidden(), v, p[:5]), ValueError, "passages has 5 passages but passage_vectors has 10"),
    (lambda v, p: (hidden(), v, p[..., :8]), ValueError, r"passages must be \(N, Lp, 32\)"),
    (lambda v, p: (hidden(), v, p.double()), TypeError, "dtype torch.float64"),
    (lambda v, p: (hidden(), v, p, torch.ones(N, PLEN)), TypeError, "passage_mask must be a bool"),
    (lambda v, p: (hidden(), v, p, torch.ones(N, 3, dtype=torch.bool)), ValueError, "passage_mask must have shape"),
    (lambda v, p: (hidden(), v.numpy(), p), TypeError, "passage_vectors must be a torch.Tensor or a callable"),
    (lambda v, p: (hidden(), lambda q: (torch.zeros(2, 2, dtype=torch.long), v[:2].expand(2, -1, -1)), p),
     ValueError, "C >= top_k=3"),
    (lambda v, p: (hidden(), lambda q: (torch.arange(4).expand(2, -1), v[:3].expand(2, -1, -1)), p),
     ValueError, "must be"),
    (lambda v, p: (hidden(), lambda q: (torch.tensor([[0, 1, 99]] * 2), v[:3].expand(2, -1, -1)), p),
     ValueError, r"retrieved passage ids must lie in \[0, 10\)"),
    (lambda v, p: (hidden(), v, lambda i: (p[i][..., :8], None)), ValueError, "fetch callable's states"),
])
def test_bad_inputs(args, error, match):
    module = make()
    vectors, passages = knowledge()
    with pytest.raises(error, match=match):
        module(*args(vectors, passages))


def test_bad_construction():
    with pytest.raises(ValueError, match="top_k must be positive"):
        RetrievalAugmentedSegments(HIDDEN, PASSAGE_DIM, num_heads=2, top_k=0)
    with pytest.raises(TypeError, match="passage_dim must be an int"):
        RetrievalAugmentedSegments(HIDDEN, 16.0, num_heads=2)
