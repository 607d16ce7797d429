"""NeuralRetriever: identity start, masked token pooling, the InfoNCE formula, learning where the base encoder is weak,
and bad input."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hybridrag.retrieval.neural import NeuralRetriever


pytestmark = pytest.mark.usefixtures("one_thread")


def alias_task(seed, topics=40, aliases=2, docs=100, train_docs=50):
    """Documents are pairs of topic tokens; a query names its document's two topics through alias tokens, which map to
    topics by a fixed hidden mapping. Query and document vocabularies are disjoint (token overlap is zero). Training
    queries (every alias combination of each training document) cover every alias: the first `topics` documents chain
    all topics. Held-out queries ask for the other documents, whose queries training never saw (same mapping).

    Returns documents (docs, 2), (train queries (n, 2), their document ids), (held-out ones), vocab_size."""
    g = torch.Generator().manual_seed(seed)
    alias_of = (1 + topics + torch.randperm(topics * aliases, generator=g)).view(topics, aliases)  # 0 = padding
    chain = torch.randperm(topics, generator=g)
    doc_topics = torch.cat([torch.stack([chain, chain.roll(1)], dim=1),
                            torch.stack([torch.randperm(topics, generator=g)[:2] for _ in range(docs - topics)])])
    combos = torch.cartesian_prod(torch.arange(aliases), torch.arange(aliases))  # (aliases ** 2, 2)
    train_ids = torch.arange(train_docs).repeat_interleave(len(combos))
    train_pick = combos.repeat(train_docs, 1)
    test_ids = torch.arange(train_docs, docs).repeat_interleave(2)
    test_pick = torch.randint(aliases, (len(test_ids), 2), generator=g)
    return doc_topics + 1, (alias_of[doc_topics[train_ids], train_pick], train_ids), \
        (alias_of[doc_topics[test_ids], test_pick], test_ids), 1 + topics * (1 + aliases)


def rotation_task(seed, dim=32, pairs=500, noise=0.5):
    """Query features are a fixed random rotation of their document's features plus noise: the base cosine is blind."""
    g = torch.Generator().manual_seed(seed)
    rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
    docs = torch.randn(pairs, dim, generator=g)
    return docs, docs @ rotation.T + noise * torch.randn(pairs, dim, generator=g)


def recall_at_k(retriever, queries, targets, documents, k=5):
    _, idx = retriever.top_k(queries, retriever.encode_documents(documents), k)
    return (idx == targets[:, None]).any(dim=1).float().mean().item()


def train(retriever, queries, positives, *, epochs, batch, lr, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(retriever.parameters(), lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(queries), generator=g)
        for start in range(0, len(queries), batch):
            b = order[start:start + batch]
            loss = retriever.loss(queries[b], positives[b])
            opt.zero_grad()
            loss.backward()
            opt.step()


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_training_raises_held_out_recall_where_tokens_do_not_overlap(seed, shared):
    documents, (train_q, train_t), (test_q, test_t), vocab = alias_task(seed)
    assert not set(train_q.flatten().tolist() + test_q.flatten().tolist()) & set(documents.flatten().tolist())
    retriever = NeuralRetriever(vocab_size=vocab, output_dim=32, temperature=0.1, shared_towers=shared)
    before = recall_at_k(retriever, test_q, test_t, documents)
    train(retriever, train_q, documents[train_t], epochs=10, batch=32, lr=0.05, seed=seed)
    after = recall_at_k(retriever, test_q, test_t, documents)
    assert before <= 0.15 and after >= 0.9, \
        f"held-out recall@5 {before:.2f} -> {after:.2f} (chance 0.05); expected <= 0.15 -> >= 0.9"


def test_training_recovers_a_rotation_of_base_features_on_held_out_pairs():
    docs, queries = rotation_task(0)
    retriever = NeuralRetriever(32, temperature=0.1)
    held_out = torch.arange(300, 500) - 300
    before = recall_at_k(retriever, queries[300:], held_out, docs[300:])
    train(retriever, queries[:300], docs[:300], epochs=20, batch=50, lr=0.02)
    after = recall_at_k(retriever, queries[300:], held_out, docs[300:])
    assert before <= 0.1 and after >= 0.95, \
        f"held-out recall@5 over 200 documents {before:.3f} -> {after:.3f} (chance 0.025); expected <= 0.1 -> >= 0.95"


@pytest.mark.parametrize("output_dim", [24, 40])
def test_untrained_feature_retriever_ranks_like_the_base_encoder(output_dim):
    base_docs = F.normalize(torch.randn(60, 24), dim=-1)
    base_queries = torch.randn(7, 24) * 3  # unnormalised features are fine: the towers normalise
    retriever = NeuralRetriever(24, output_dim)
    scores, idx = retriever.top_k(base_queries, retriever.encode_documents(base_docs), 10)
    expected_scores, expected_idx = torch.topk(F.normalize(base_queries, dim=-1) @ base_docs.T, 10)
    assert torch.equal(idx, expected_idx)
    torch.testing.assert_close(scores, expected_scores)
    assert retriever.encode_queries(base_queries).shape == (7, output_dim)


def test_smaller_output_dim_starts_as_one_projection_for_both_towers():
    retriever = NeuralRetriever(24, 8)
    x = torch.randn(5, 24)
    torch.testing.assert_close(retriever.encode_queries(x), retriever.encode_documents(x))
    torch.testing.assert_close(retriever.encode_queries(x).norm(dim=-1), torch.ones(5))


def test_token_towers_pool_only_real_tokens():
    retriever = NeuralRetriever(vocab_size=20, output_dim=16, padding_idx=0)
    short = torch.tensor([[3, 5], [7, 7]])
    padded = torch.tensor([[3, 0, 5, 0, 0], [0, 7, 0, 7, 0]])
    torch.testing.assert_close(retriever.encode_queries(padded), retriever.encode_queries(short))
    torch.testing.assert_close(retriever.encode_documents(padded.int()), retriever.encode_documents(short))
    emb = retriever.query_tower[0].weight
    expected = F.normalize(retriever.query_tower[1]((emb[3] + emb[5]) / 2), dim=-1)
    torch.testing.assert_close(retriever.encode_queries(short)[0], expected)


def test_shared_and_separate_towers():
    shared = NeuralRetriever(vocab_size=20, output_dim=16, shared_towers=True)
    separate = NeuralRetriever(vocab_size=20, output_dim=16)
    assert shared.query_tower is shared.document_tower
    assert separate.query_tower is not separate.document_tower
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(separate) - 1 == 2 * (count(shared) - 1)  # the log-temperature is shared by both


@torch.no_grad()
def manual_loss(retriever, q_in, p_in, n_in, margin, in_batch):
    q, p = retriever.encode_queries(q_in), retriever.encode_documents(p_in)
    tau = retriever.temperature.item()
    losses = []
    for i in range(len(q)):
        pos = math.exp((float(q[i] @ p[i]) - margin) / tau)
        others = [math.exp(float(q[i] @ p[j]) / tau) for j in range(len(q)) if in_batch and j != i]
        if n_in is not None:
            n = retriever.encode_documents(n_in[i])
            others += [math.exp(float(q[i] @ n[m]) / tau) for m in range(len(n))]
        losses.append(-math.log(pos / (pos + sum(others))))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("margin", [0.0, 0.2])
@pytest.mark.parametrize("in_batch, ratio, used", [(True, 1.0, 4), (True, 0.5, 2), (True, 0.3, 1), (True, 0.0, 0),
                                                   (False, 1.0, 4), (False, 0.6, 2), (False, 0.3, 1)])
def test_loss_matches_the_documented_formula(margin, in_batch, ratio, used):
    retriever = NeuralRetriever(12, temperature=0.2)
    with torch.no_grad():
        retriever.query_tower.weight.add_(0.3 * torch.randn(12, 12))
    q, p, n = torch.randn(5, 12), torch.randn(5, 12), torch.randn(5, 4, 12)
    loss = retriever.loss(q, p, n, hard_negative_ratio=ratio, margin=margin, in_batch_negatives=in_batch)
    expected = manual_loss(retriever, q, p, n[:, :used] if used else None, margin, in_batch)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_loss_trains_every_learned_parameter_and_a_fixed_temperature_stays():
    learned = NeuralRetriever(vocab_size=30, output_dim=16, temperature=0.1)
    learned.loss(torch.randint(1, 30, (4, 3)), torch.randint(1, 30, (4, 5)), torch.randint(1, 30, (4, 2, 5))).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learned.parameters())
    fixed = NeuralRetriever(8, temperature=0.1, learn_temperature=False)
    assert "log_temperature" not in dict(fixed.named_parameters())
    assert fixed.temperature.item() == pytest.approx(0.1)
    sim = fixed.similarity(torch.randn(3, 8), torch.randn(4, 8))
    assert sim.shape == (3, 4) and sim.abs().max() <= 10 + 1e-4


FEATURE_CASES = [
    (lambda r: r.encode_queries(np.zeros((2, 8), np.float32)), TypeError,
     r"queries must be a torch.Tensor, got ndarray \(wrap numpy arrays with torch.from_numpy\)"),
    (lambda r: r.encode_queries(torch.zeros(2, 9)), ValueError,
     r"queries must have shape \(N, 8\) features with no empty dim, got \(2, 9\)"),
    (lambda r: r.encode_documents(torch.zeros(0, 8)), ValueError, r"documents must have shape \(N, 8\) features"),
    (lambda r: r.encode_queries(torch.zeros(2, 8, dtype=torch.long)), TypeError,
     r"queries must be a floating-point tensor of features, got dtype torch.int64"),
    (lambda r: r.loss(torch.zeros(3, 8), torch.zeros(2, 8)), ValueError,
     r"positives has 2 rows but queries has 3; pass one row per query"),
    (lambda r: r.loss(torch.zeros(3, 8), torch.zeros(3, 8), torch.zeros(3, 8)), ValueError,
     r"hard_negatives must have shape \(N, M, 8\) features with no empty dim, got \(3, 8\)"),
    (lambda r: r.loss(torch.zeros(3, 8), torch.zeros(3, 8), torch.zeros(2, 1, 8)), ValueError,
     r"hard_negatives has 2 rows but queries has 3"),
    (lambda r: r.loss(torch.zeros(3, 8), torch.zeros(3, 8), hard_negative_ratio=1.5), ValueError,
     r"hard_negative_ratio must be in \[0.0, 1.0\], got 1.5"),
    (lambda r: r.loss(torch.zeros(3, 8), torch.zeros(3, 8), hard_negative_ratio="all"), TypeError,
     r"hard_negative_ratio must be a float, got str"),
    (lambda r: r.loss(torch.zeros(3, 8), torch.zeros(3, 8), margin=-0.1), ValueError,
     r"margin must be in \[0.0, inf\], got -0.1"),
    (lambda r: r.loss(torch.zeros(3, 8), torch.zeros(3, 8), in_batch_negatives=0), TypeError,
     r"in_batch_negatives must be a bool, got int"),
    (lambda r: r.loss(torch.zeros(3, 8), torch.zeros(3, 8), in_batch_negatives=False), ValueError,
     r"the loss has no negative: .* \(got 3 queries, in_batch_negatives=False, 0 hard negatives used\)"),
    (lambda r: r.loss(torch.zeros(1, 8), torch.zeros(1, 8), torch.zeros(1, 3, 8), hard_negative_ratio=0.1),
     ValueError, r"the loss has no negative: .*got 1 queries, in_batch_negatives=True, 0 hard negatives used"),
    (lambda r: r.top_k(torch.zeros(2, 8), torch.zeros(5, 8), 6), ValueError,
     r"k must be in \[1, 5\] \(the number of documents\), got 6"),
    (lambda r: r.top_k(torch.zeros(2, 8), torch.zeros(5, 8), 2.0), TypeError, r"k must be an int, got float"),
    (lambda r: r.top_k(torch.zeros(2, 8), torch.zeros(5, 7), 2), ValueError,
     r"document_embeddings must have shape \(Nd >= 1, 8\), got \(5, 7\)"),
    (lambda r: r.top_k(torch.zeros(2, 8), torch.zeros(5, 8, dtype=torch.long), 2), TypeError,
     r"document_embeddings must be floating point, got dtype torch.int64"),
    (lambda r: r.top_k(torch.zeros(2, 8), [[0.0] * 8], 1), TypeError,
     r"document_embeddings must be a torch.Tensor, got list"),
]


@pytest.mark.parametrize("call, error, match", FEATURE_CASES)
def test_bad_feature_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call(NeuralRetriever(8))


TOKEN_CASES = [
    (lambda r: r.encode_queries(torch.zeros(2, 3)), TypeError,
     r"queries must be an integer tensor of token ids, got dtype torch.float32"),
    (lambda r: r.encode_queries(torch.tensor([[1, 2], [3, 10]])), ValueError,
     r"queries token ids must lie in \[0, 10\), got 1 \.\. 10"),
    (lambda r: r.encode_documents(torch.tensor([[1, 2], [0, 0]])), ValueError,
     r"documents row \(1,\) holds only padding \(padding_idx=0\); every row needs at least one real token"),
    (lambda r: r.loss(torch.tensor([[1], [2]]), torch.tensor([[1], [2]]), torch.tensor([[[1], [2]], [[3], [0]]])),
     ValueError, r"hard_negatives row \(1, 1\) holds only padding"),
    (lambda r: r.encode_queries(torch.tensor([1, 2])), ValueError,
     r"queries must have shape \(N, L\) token ids with no empty dim, got \(2,\)"),
]


@pytest.mark.parametrize("call, error, match", TOKEN_CASES)
def test_bad_token_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call(NeuralRetriever(vocab_size=10, output_dim=16))


@pytest.mark.parametrize("kwargs, error, match", [
    ({}, ValueError, r"pass exactly one of input_dim \(features mode\) and vocab_size \(tokens mode\), got "
                     r"input_dim=None and vocab_size=None"),
    ({"input_dim": 8, "vocab_size": 10}, ValueError, r"pass exactly one of input_dim"),
    ({"input_dim": 0}, ValueError, r"input_dim must be positive, got 0"),
    ({"input_dim": 8, "output_dim": 2.5}, TypeError, r"output_dim must be an int, got float"),
    ({"vocab_size": 10, "padding_idx": 10}, ValueError, r"padding_idx must be None or an int in \[0, 10\), got 10"),
    ({"vocab_size": 10, "embedding_dim": -1}, ValueError, r"embedding_dim must be positive, got -1"),
    ({"input_dim": 8, "temperature": 0.0}, ValueError, r"temperature must be in \[0.001, inf\], got 0.0"),
    ({"input_dim": 8, "shared_towers": 1}, TypeError, r"shared_towers must be a bool, got int"),
    ({"input_dim": 8, "learn_temperature": None}, TypeError, r"learn_temperature must be a bool, got NoneType"),
])
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        NeuralRetriever(**kwargs)
