"""hybridrag.train.marginal: the RAG-sequence / REALM marginal likelihood against a hand computation, its gradient
reaching both retriever towers through p(passage | query), the passage index refresh, exploration candidates, the
contrastive term, and bad inputs."""
import math

import pytest
import torch

from hybridrag.retrieval import NeuralRetriever
from hybridrag.train import (MarginalRAG, PassageIndex, TinyCausalLM, answer_log_likelihood, marginal_nll,
                             retrieval_posterior)

VOCAB = 24
PASSAGES = [[3, 4, 5], [6, 7], [8, 9, 10, 11], [12, 13], [14, 15, 16]]


def rag(k=3, **kwargs):
    torch.manual_seed(0)
    retriever = NeuralRetriever(vocab_size=VOCAB, embedding_dim=16, padding_idx=0)
    generator = TinyCausalLM(VOCAB, dim=32, layers=1, heads=2, max_len=16)
    return MarginalRAG(retriever, generator, PASSAGES, k=k, **kwargs)


def batch():
    return {"query_ids": torch.tensor([[17, 18], [19, 0]]), "query_mask": torch.tensor([[1, 1], [1, 0]]),
            "answer_ids": torch.tensor([[20, 21], [22, 0]]), "answer_mask": torch.tensor([[1, 1], [1, 0]])}


def test_marginal_nll_matches_a_hand_computation_and_is_stable():
    scores = torch.tensor([[2.0, 0.0, -1.0]], dtype=torch.float64)
    ll = torch.tensor([[-1.0, -3.0, -0.5]], dtype=torch.float64)
    prior = [math.exp(s) / sum(math.exp(t) for t in (2.0, 0.0, -1.0)) for s in (2.0, 0.0, -1.0)]
    expected = -math.log(sum(p * math.exp(l) for p, l in zip(prior, (-1.0, -3.0, -0.5))))
    assert marginal_nll(scores, ll).item() == pytest.approx(expected, rel=1e-12)
    huge = marginal_nll(torch.tensor([[1000.0, -1000.0]]), torch.tensor([[-2000.0, -5000.0]]))
    assert huge.item() == pytest.approx(2000.0)  # no overflow or underflow
    posterior = retrieval_posterior(scores, ll)
    assert posterior.sum().item() == pytest.approx(1.0) and posterior.argmax().item() == 0
    masked = marginal_nll(torch.tensor([[0.0, float("-inf")]]), torch.tensor([[-1.0, -0.1]]))
    assert masked.item() == pytest.approx(1.0)  # a -inf score leaves that passage out


def test_the_score_gradient_is_prior_minus_posterior():
    scores = torch.tensor([[0.3, -0.2, 1.0]], requires_grad=True)
    ll = torch.tensor([[-0.5, -4.0, -2.0]])
    marginal_nll(scores, ll).backward()
    expected = torch.softmax(scores.detach(), -1) - retrieval_posterior(scores.detach(), ll)
    torch.testing.assert_close(scores.grad, expected)


def test_answer_log_likelihood_packs_passage_query_answer_without_inner_padding():
    model = rag()
    b = batch()
    rows = torch.tensor([[0, 1], [2, 3]])
    ll = answer_log_likelihood(model.generator, model.index.passages[rows], model.index.mask[rows], **b)
    ids = torch.tensor([[6, 7, 17, 18, 20, 21]])  # query 0 with passage 1
    log_probs = torch.log_softmax(model.generator(input_ids=ids)["logits"], -1)[0]
    expected = log_probs[3, 20] + log_probs[4, 21]
    torch.testing.assert_close(ll[0, 1], expected, rtol=1e-5, atol=1e-5)
    ids = torch.tensor([[12, 13, 19, 22]])  # query 1 (one real token) with passage 3
    expected = torch.log_softmax(model.generator(input_ids=ids)["logits"], -1)[0, 2, 22]
    torch.testing.assert_close(ll[1, 1], expected, rtol=1e-5, atol=1e-5)


def test_gradients_reach_both_retriever_towers_and_the_generator():
    model = rag()
    out = model(**batch())
    assert out["retrieval_logits"].shape == out["answer_log_likelihood"].shape == out["top_indices"].shape == (2, 3)
    out["loss"].backward()
    query_tower, document_tower = model.retriever.query_tower, model.retriever.document_tower
    assert query_tower[0].weight.grad[17].abs().sum() > 0  # the query's tokens
    rows = model.index.passages[out["top_indices"].flatten()].unique()
    assert document_tower[0].weight.grad[rows[rows > 0]].abs().sum() > 0  # the retrieved passages' tokens
    assert model.retriever.log_temperature.grad is not None
    assert model.generator.head.weight.grad.abs().sum() > 0


def test_refresh_re_encodes_the_index_and_exploration_draws_outside_the_top():
    model = rag(k=4, random_candidates=2)
    stale = model.index.embeddings.clone()
    with torch.no_grad():
        model.retriever.document_tower[0].weight.mul_(2.0).add_(1.0)
    assert torch.equal(model.index.embeddings, stale)
    model.refresh_passages()
    fresh = model.retriever.encode_documents(model.index.passages)
    torch.testing.assert_close(model.index.embeddings, fresh)
    top2 = model.retriever.top_k(batch()["query_ids"], model.index.embeddings, 2)[1]
    candidates = model.candidates(batch()["query_ids"])
    assert torch.equal(candidates[:, :2], top2) and all(len(set(row.tolist())) == 4 for row in candidates)
    model.eval()
    assert torch.equal(model.candidates(batch()["query_ids"]),
                       model.retriever.top_k(batch()["query_ids"], model.index.embeddings, 4)[1])
    assert {"index.passages", "index.mask", "index.embeddings"} <= set(model.state_dict())


def test_the_contrastive_term_adds_to_the_marginal_likelihood():
    model = rag(contrastive_weight=0.5)
    out = model(**batch(), positive_index=torch.tensor([0, 2]))
    assert out["loss"].item() == pytest.approx(out["marginal_nll"].item() + 0.5 * out["contrastive_loss"].item())
    with pytest.raises(ValueError, match="contrastive_weight=0.5 needs positive_index"):
        model(**batch())
    with pytest.raises(ValueError, match="positive_index was given but contrastive_weight is 0"):
        rag()(**batch(), positive_index=torch.tensor([0, 2]))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match=r"answer_log_likelihood has shape \(1, 2\) but retrieval_logits has"):
        marginal_nll(torch.zeros(1, 3), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="retrieval_logits holds NaN or \\+inf"):
        marginal_nll(torch.tensor([[float("nan"), 0.0]]), torch.zeros(1, 2))
    with pytest.raises(TypeError, match="retrieval_logits must be a floating-point tensor"):
        marginal_nll(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="reduction must be 'mean', 'sum' or 'none'"):
        marginal_nll(torch.zeros(1, 2), torch.zeros(1, 2), reduction="avg")
    with pytest.raises(ValueError, match=r"k must be <= the number of passages \(5\), got 6"):
        rag(k=6)
    with pytest.raises(ValueError, match=r"random_candidates must be an int in \[0, k=3\), got 3"):
        rag(random_candidates=3)
    retriever = NeuralRetriever(vocab_size=VOCAB, embedding_dim=8, padding_idx=0)
    with pytest.raises(ValueError, match=r"passages\[1\] must be a non-empty list of token ids"):
        PassageIndex([[1, 2], []], retriever)
    with pytest.raises(ValueError, match=r"the retriever's padding_idx \(0\) must equal pad_id \(1\)"):
        PassageIndex([[2, 3]], retriever, pad_id=1)
    with pytest.raises(TypeError, match="retriever must be a NeuralRetriever in tokens mode"):
        PassageIndex([[2, 3]], NeuralRetriever(input_dim=4))
