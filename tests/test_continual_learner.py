"""ContinualLearner: bounded buffer, exact gradient accumulation, atomic checkpoints that resume to the same steps,
learning on buffered data, and bad input."""
import copy
import os

import pytest
import torch

from hybridrag.retention import continual as continual_module
from hybridrag.retention.continual import ContinualLearner
from hybridrag.retrieval.neural import NeuralRetriever


pytestmark = pytest.mark.usefixtures("one_thread")


def rotation_pairs(count, dim=16, seed=0, negatives=0):
    """Queries are a fixed random rotation of their positives plus noise: the untrained retriever is blind to it."""
    g = torch.Generator().manual_seed(seed)
    rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
    docs = torch.randn(count, dim, generator=g)
    queries = docs @ rotation.T + 0.3 * torch.randn(count, dim, generator=g)
    hard = torch.randn(count, negatives, dim, generator=g) if negatives else None
    return queries, docs, hard


def params(module):
    return [p.detach().clone() for p in module.parameters()]


def recall_at_1(retriever, queries, docs):
    _, idx = retriever.top_k(queries, retriever.encode_documents(docs), 1)
    return (idx[:, 0] == torch.arange(len(docs))).float().mean().item()


def test_buffer_keeps_the_newest_and_counts_the_dropped():
    learner = ContinualLearner(NeuralRetriever(4), buffer_size=5, batch_size=2)
    assert learner.observe(torch.arange(12.0).view(3, 4), torch.zeros(3, 4)) == 0
    assert learner.observe(torch.arange(12.0, 28.0).view(4, 4), torch.zeros(4, 4)) == 2
    assert len(learner) == 5 and learner.dropped == 2
    assert [int(q[0]) for q, _, _ in learner.buffer] == [8, 12, 16, 20, 24]
    assert repr(learner) == ("ContinualLearner(buffered=5/5, batch_size=2, accumulation_steps=1, steps=0, dropped=2, "
                             "checkpoint_dir=None)")


def test_source_labels_are_counted_removed_dropped_with_their_examples_and_saved(tmp_path):
    learner = ContinualLearner(NeuralRetriever(4), buffer_size=6, batch_size=2)
    learner.observe(torch.arange(8.0).view(2, 4), torch.zeros(2, 4))
    learner.observe(torch.arange(8.0, 20.0).view(3, 4), torch.zeros(3, 4), source="synthetic")
    learner.observe(torch.arange(20.0, 28.0).view(2, 4), torch.zeros(2, 4), source="feedback")  # drops the oldest
    assert learner.sources() == {None: 1, "synthetic": 3, "feedback": 2} and learner.dropped == 1
    saved = learner.save_checkpoint(tmp_path / "c.pt")
    assert learner.remove("synthetic") == 3 and learner.remove("synthetic") == 0
    assert [int(q[0]) for q, _, _ in learner.buffer] == [4, 20, 24] and learner.dropped == 1
    assert learner.sources() == {None: 1, "feedback": 2}
    learner.step()  # the sampler draws from what is left
    restored = ContinualLearner(NeuralRetriever(4), buffer_size=6, batch_size=2)
    restored.load_checkpoint(saved)
    assert restored.sources() == {None: 1, "synthetic": 3, "feedback": 2} and len(restored) == 6
    with pytest.raises(TypeError, match="source must be None or a str, got int"):
        learner.observe(torch.zeros(1, 4), torch.zeros(1, 4), source=3)
    with pytest.raises(ValueError, match="remove takes the source label"):
        learner.remove(None)
    assert len(learner) == 3  # a refused call buffers nothing


@pytest.mark.parametrize("in_batch", [False, True])
def test_accumulated_steps_match_one_big_batch_or_manual_accumulation(in_batch):
    queries, docs, hard = rotation_pairs(16, negatives=3)
    base = NeuralRetriever(16, temperature=0.1)
    with torch.no_grad():
        base.query_tower.weight.add_(0.2 * torch.randn(16, 16))
    small, big = copy.deepcopy(base), copy.deepcopy(base)
    options = {"in_batch_negatives": in_batch, "seed": 3, "buffer_size": 16}
    accumulate = ContinualLearner(small, optimizer=torch.optim.SGD(small.parameters(), lr=0.5), batch_size=4,
                                  accumulation_steps=2, **options)
    one_batch = ContinualLearner(big, optimizer=torch.optim.SGD(big.parameters(), lr=0.5), batch_size=8, **options)
    for learner in (accumulate, one_batch):
        learner.observe(queries, docs, hard)
        learner.step()
    # the sampler: a permutation from torch.Generator().manual_seed(seed), read batch_size at a time
    order = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    manual = copy.deepcopy(base)
    for half in (order[:4], order[4:8]):
        (manual.loss(queries[half], docs[half], hard[half], in_batch_negatives=in_batch) / 2).backward()
    with torch.no_grad():
        for p in manual.parameters():
            p -= 0.5 * p.grad
    for got, want in zip(params(small), params(manual)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    if not in_batch:  # the loss is then a plain mean of per-query terms: accumulation is exact
        for got, want in zip(params(small), params(big)):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(params(small), params(base)))


def test_resume_from_a_checkpoint_reproduces_the_next_steps(tmp_path):
    queries, docs, hard = rotation_pairs(40, negatives=2)
    first = ContinualLearner(NeuralRetriever(16), lr=0.01, buffer_size=32, batch_size=6, accumulation_steps=2,
                             checkpoint_dir=tmp_path, checkpoint_every=3, seed=7)
    first.observe(queries, docs, hard)
    for _ in range(3):
        first.step()
    checkpoint = tmp_path / "step-00000003.pt"
    assert sorted(os.listdir(tmp_path)) == [checkpoint.name]  # no temporary file left behind
    expected = [first.step()["loss"] for _ in range(2)]

    torch.manual_seed(123)  # a differently initialised retriever and an empty buffer
    second = ContinualLearner(NeuralRetriever(16), lr=0.01, buffer_size=32, batch_size=6, accumulation_steps=2, seed=0)
    second.load_checkpoint(checkpoint)
    assert second.step_count == 3 and second.dropped == 8 and len(second) == 32
    assert [second.step()["loss"] for _ in range(2)] == expected
    for got, want in zip(params(second.retriever), params(first.retriever)):
        assert torch.equal(got, want)
    assert second.step_count == first.step_count == 5


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    learner = ContinualLearner(NeuralRetriever(4), batch_size=2)
    learner.observe(torch.randn(4, 4), torch.randn(4, 4))
    path = learner.save_checkpoint(tmp_path / "ckpt.pt")
    before = path.read_bytes()

    def broken_save(obj, file):
        file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(continual_module.torch, "save", broken_save)
    learner.step()
    with pytest.raises(OSError, match="disk full"):
        learner.save_checkpoint(path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ckpt.pt"]


def test_training_on_the_buffer_raises_its_recall():
    queries, docs, _ = rotation_pairs(96)
    learner = ContinualLearner(NeuralRetriever(16, temperature=0.1), lr=0.02, buffer_size=128, batch_size=16,
                               accumulation_steps=2)
    for chunk in range(0, 96, 32):
        learner.observe(queries[chunk:chunk + 32], docs[chunk:chunk + 32])
    before = recall_at_1(learner.retriever, queries, docs)
    stats = learner.train(epochs=25)
    after = recall_at_1(learner.retriever, queries, docs)
    assert stats["steps"] == 25 * 96 // 32 and len(stats["losses"]) == stats["steps"]
    assert stats["losses"][-1] < stats["losses"][0]
    assert before <= 0.2 and after >= 0.9, f"recall@1 on the 96 buffered pairs {before:.2f} -> {after:.2f}"


def test_token_examples_of_different_lengths_are_padded():
    retriever = NeuralRetriever(vocab_size=30, output_dim=16, padding_idx=0)
    learner = ContinualLearner(retriever, batch_size=4, in_batch_negatives=False, seed=1)
    q1, p1, n1 = torch.randint(1, 30, (2, 3)), torch.randint(1, 30, (2, 5)), torch.randint(1, 30, (2, 2, 4))
    q2, p2, n2 = torch.randint(1, 30, (2, 6)), torch.randint(1, 30, (2, 2)), torch.randint(1, 30, (2, 2, 7))
    learner.observe(q1, p1, n1)
    learner.observe(q2, p2, n2)
    queries, positives, negatives = learner._collate([0, 2])
    assert queries.shape == (2, 6) and positives.shape == (2, 5) and negatives.shape == (2, 2, 7)
    assert queries.tolist() == [q1[0].tolist() + [0, 0, 0], q2[0].tolist()]
    assert negatives[0, 1].tolist() == n1[0, 1].tolist() + [0, 0, 0]
    # one batch of all 4 examples; without in-batch negatives the loss is the mean of per-query terms, padding inert
    expected = (retriever.loss(q1, p1, n1, in_batch_negatives=False)
                + retriever.loss(q2, p2, n2, in_batch_negatives=False)) / 2
    assert learner.step()["loss"] == pytest.approx(expected.item(), rel=1e-5)


def learner_with(**kwargs):
    return ContinualLearner(NeuralRetriever(4), **{"batch_size": 2, **kwargs})


@pytest.mark.parametrize("make, error, match", [
    (lambda: ContinualLearner(torch.nn.Linear(2, 2)), TypeError, r"retriever must be a NeuralRetriever, got Linear"),
    (lambda: learner_with(optimizer="adam"), TypeError, r"optimizer must be a torch.optim.Optimizer or None, got str"),
    (lambda: learner_with(buffer_size=0), ValueError, r"buffer_size must be positive, got 0"),
    (lambda: learner_with(batch_size=8, buffer_size=4), ValueError,
     r"batch_size \(8\) must not exceed buffer_size \(4\)"),
    (lambda: learner_with(accumulation_steps=1.5), TypeError, r"accumulation_steps must be an int, got float"),
    (lambda: learner_with(hard_negative_ratio=2), ValueError, r"hard_negative_ratio must be in \[0.0, 1.0\], got 2"),
    (lambda: learner_with(in_batch_negatives="no"), TypeError, r"in_batch_negatives must be a bool, got str"),
    (lambda: learner_with(checkpoint_every=5), ValueError, r"checkpoint_every=5 needs a checkpoint_dir"),
    (lambda: learner_with(seed=1.0), TypeError, r"seed must be an int, got float"),
])
def test_bad_constructor_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_bad_calls(tmp_path):
    learner = learner_with(buffer_size=8)
    with pytest.raises(ValueError, match=r"the buffer holds 0 examples, fewer than batch_size \(2\); observe more"):
        learner.step()
    with pytest.raises(ValueError, match=r"positives has 3 rows but queries has 2"):
        learner.observe(torch.zeros(2, 4), torch.zeros(3, 4))
    learner.observe(torch.randn(2, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"hard_negatives must match the buffered examples \(none hard negatives "
                                         r"each\), got M=1"):
        learner.observe(torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 1, 4))
    with pytest.raises(ValueError, match=r"save_checkpoint needs a path when the learner has no checkpoint_dir"):
        learner.save_checkpoint()
    with pytest.raises(ValueError, match=r"epochs must be positive, got 0"):
        learner.train(0)
    path = learner.save_checkpoint(tmp_path / "a.pt")
    with pytest.raises(ValueError, match=r"the checkpoint has batch_size=2 but this learner has 4"):
        learner_with(buffer_size=8, batch_size=4).load_checkpoint(path)
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other.pt is not a ContinualLearner checkpoint of format 3"):
        learner.load_checkpoint(tmp_path / "other.pt")
    fixed = ContinualLearner(NeuralRetriever(vocab_size=9, output_dim=16, padding_idx=None), batch_size=2)
    fixed.observe(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"queries has length 4 but the buffered ones have 3; token inputs of "
                                         r"different lengths need a retriever with a padding_idx"):
        fixed.observe(torch.ones(2, 4, dtype=torch.long), torch.ones(2, 3, dtype=torch.long))
