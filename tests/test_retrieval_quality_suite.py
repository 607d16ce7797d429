"""The retrieval quality suite's pieces (benchmarks/retrieval_quality.py) at a tiny size, with the hashing encoder:
the recorded run itself encodes 821 chunks with MiniLM and belongs to `python -m benchmarks.report`."""
import numpy as np
import torch

from benchmarks import retrieval_quality as quality
from benchmarks.common import format_table
from hybridrag.retrieval import Document, HashingEncoder, KnowledgeBase


def test_check_passes_on_the_shipped_query_set():
    checks = quality.check("cpu")
    assert all(row["passed"] for row in checks), checks
    assert "check" in format_table("checks", checks, quality.CHECK_COLUMNS)


def test_chunk_rankings_fold_into_topic_rankings_and_score():
    documents = [Document("alpha", "one two three four five six"), Document("beta", "seven eight nine ten")]
    kb = KnowledgeBase.build(documents, HashingEncoder(64), chunk_tokens=3, overlap=1)
    chunk_ids = [d.id for d in kb.documents]
    assert quality.topics_from_chunks(["alpha#1", "beta#0", "alpha#0"], kb) == ["alpha", "beta"]
    queries = [{"id": "q1", "query": "nine ten", "relevant": ["beta"]},
               {"id": "q2", "query": "two three", "relevant": ["alpha"]}]
    rankings = quality._search_topics(kb, [q["query"] for q in queries], "bm25")
    row = quality._score("bm25", "test", queries, rankings)
    assert row["recall@1"] == 1.0 and row["mrr"] == 1.0 and row["queries"] == 2
    assert "bm25" in format_table("rows", [row], quality.BENCH_COLUMNS)
    assert len(chunk_ids) == len(kb)


def test_training_moves_queries_to_their_positives(one_thread):
    rng = np.random.default_rng(0)
    documents = rng.standard_normal((64, 16)).astype(np.float32)
    documents /= np.linalg.norm(documents, axis=1, keepdims=True)
    queries = documents.copy()
    queries[:, :8] = 0.5 * rng.standard_normal((64, 8))  # half the dims are noise: the base cosine is weak
    negatives = np.stack([documents[np.roll(np.arange(64), s)] for s in range(1, 5)], axis=1)
    examples = tuple(torch.from_numpy(a) for a in (queries, documents, negatives))
    retriever = quality.train_retriever(examples, 16, steps=150, lr=1e-2)
    with torch.no_grad():
        _, top = retriever.top_k(examples[0], retriever.encode_documents(examples[1]), 1)
    base = (torch.from_numpy(queries @ documents.T).argmax(dim=1) == torch.arange(64)).float().mean()
    trained = (top[:, 0] == torch.arange(64)).float().mean()
    assert base < 0.25 and trained > 0.9, (base, trained)
