"""Retrieval quality on Python's bundled documentation: BM25, dense (all-MiniLM-L6-v2), hybrid and a trained
NeuralRetriever, scored with recall@k, MRR and nDCG@10 on hand-written questions.

Corpus: the 79 topics of `pydoc_data.topics` (the language reference as `help()` shows it), chunked into 200-token
windows (MiniLM's tokenizer, 40 overlap). Queries: benchmarks/data/pydoc_queries.jsonl, questions written by hand
(not copied from the text; tests/test_pydoc_queries.py checks), each labelled with the topic(s) that answer it and
split into train and test. A ranking of chunks becomes a ranking of topics by each topic's best chunk.

The trained retriever: a NeuralRetriever tower over the MiniLM embeddings (identity-initialised, so it starts as the
dense row), trained with InfoNCE on the train split only (positives: the best-scoring chunk of a relevant topic;
hard negatives: the best chunks of other topics) and evaluated on the test split.

    python -m benchmarks.retrieval_quality            # this suite alone: benchmarks.report --suite retrieval_quality
    python -m benchmarks.retrieval_quality --full     # the recorded run's size (300 training steps instead of 60)
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hybridrag.retrieval import (DenseEncoder, Document, KnowledgeBase, NeuralRetriever, evaluate,
                                 reciprocal_rank_fusion)

from .common import progress

SUITE = "retrieval_quality"
EXPECTED_S = {"quick": 60, "full": 75}  # on the 2-core AMD EPYC of the recorded results (encoding the 821 chunks)
QUERIES = Path(__file__).resolve().parent / "data" / "pydoc_queries.jsonl"
DEPTH = 100  # chunks retrieved per query before they are folded into topics
KS = (1, 5, 10)
CHECK_COLUMNS = [("check", lambda r: r["check"]), ("value", lambda r: r["value"]),
                 ("passed", lambda r: str(r["passed"]))]
BENCH_COLUMNS = [("method", lambda r: r["method"]), ("split", lambda r: r["split"]),
                 ("queries", lambda r: str(r["queries"]))] + [
    (metric, lambda r, metric=metric: f"{r[metric]:.3f}")
    for metric in ("recall@1", "recall@5", "recall@10", "mrr", "ndcg@10")]


def bench_dtype(device):
    """The dense encoder runs in float32; the report measures that matmul ceiling for the record."""
    return torch.float32


def load_queries():
    rows = [json.loads(line) for line in QUERIES.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {split: [r for r in rows if r["split"] == split] for split in ("train", "test")}


def corpus():
    import pydoc_data.topics

    return [Document(key, text, title=key) for key, text in sorted(pydoc_data.topics.topics.items())]


def topics_from_chunks(chunk_ids, knowledge_base):
    """Chunk ranking -> topic ranking (first occurrence of each source)."""
    return list(dict.fromkeys(knowledge_base.get(i).metadata["source_id"] for i in chunk_ids))


def check(device):
    """The inputs the numbers rest on: every label is a topic of this Python, and the splits are disjoint."""
    import pydoc_data.topics

    queries = load_queries()
    labels = {t for split in queries.values() for q in split for t in q["relevant"]}
    unknown = sorted(labels - set(pydoc_data.topics.topics))
    ids = [q["id"] for split in queries.values() for q in split]
    return [{"check": "labels are pydoc topics", "value": f"{len(labels)} topics, unknown {unknown}",
             "passed": not unknown},
            {"check": "query ids unique across splits", "value": f"{len(ids)} queries", "passed":
             len(ids) == len(set(ids))}]


def _score(method, split, queries, rankings):
    run = {q["id"]: ranking for q, ranking in zip(queries, rankings)}
    qrels = {q["id"]: set(q["relevant"]) for q in queries}
    metrics = evaluate(run, qrels, ks=KS)
    return {"method": method, "split": split, "queries": len(queries),
            **{f"recall@{k}": metrics[f"recall@{k}"] for k in KS},
            "mrr": metrics["mrr"], "ndcg@10": metrics["ndcg@10"]}


def _search_topics(knowledge_base, texts, mode):
    results = knowledge_base.search_many(texts, DEPTH, mode, candidates=DEPTH)
    return [topics_from_chunks([r.document.id for r in hits], knowledge_base) for hits in results]


def _hard_examples(knowledge_base, chunk_vectors, chunk_ids, queries, encoder, negatives=8):
    """(query vectors, positive chunk vectors, hard-negative chunk vectors) for the train queries."""
    source = np.array([knowledge_base.get(i).metadata["source_id"] for i in chunk_ids])
    query_vectors = encoder.encode([q["query"] for q in queries])
    scores = query_vectors @ chunk_vectors.T
    positives, hard = [], []
    for row, query in enumerate(queries):
        relevant = np.isin(source, query["relevant"])
        positives.append(np.flatnonzero(relevant)[np.argmax(scores[row, relevant])])
        order = np.argsort(-scores[row])
        hard.append([i for i in order if not relevant[i]][:negatives])
    return (torch.from_numpy(query_vectors), torch.from_numpy(chunk_vectors[positives]),
            torch.from_numpy(chunk_vectors[np.array(hard)]))


def train_retriever(examples, dimension, *, steps=300, batch=16, lr=1e-4, seed=0):
    """InfoNCE on the train queries; one shared tower starting at the identity, a small learning rate (74 train
    queries: separate towers or lr 1e-3 overfit and fall below the untrained dense row on the test split)."""
    torch.manual_seed(seed)
    queries, positives, negatives = examples
    retriever = NeuralRetriever(dimension, temperature=0.05, shared_towers=True)
    optimizer = torch.optim.AdamW(retriever.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    for _ in progress(range(steps), "training the NeuralRetriever", unit="step"):
        rows = torch.randperm(len(queries), generator=generator)[:batch]
        loss = retriever.loss(queries[rows], positives[rows], negatives[rows], hard_negative_ratio=1.0, margin=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return retriever.eval()


def _trained_topics(retriever, knowledge_base, chunk_vectors, chunk_ids, encoder, queries):
    with torch.no_grad():
        documents = retriever.encode_documents(torch.from_numpy(chunk_vectors))
        _, rows = retriever.top_k(torch.from_numpy(encoder.encode([q["query"] for q in queries])), documents,
                                  min(DEPTH, len(chunk_ids)))
    return [topics_from_chunks([chunk_ids[i] for i in row], knowledge_base) for row in rows.tolist()]


def benchmark(device, quick=False, ceilings=None, log=print):
    queries = load_queries()
    encoder = DenseEncoder(device=device, show_progress=sys.stderr.isatty())  # a bar over the chunks it encodes
    started = time.perf_counter()
    log(f"[{SUITE}] knowledge base: chunking the pydoc topics and encoding the chunks with {encoder.name} ...")
    knowledge_base = KnowledgeBase.build(corpus(), encoder, chunk_tokens=200, overlap=40, index_kind="flat")
    encoder.show_progress = False  # no bar for each small batch of questions below
    log(f"[{SUITE}] knowledge base: {len(knowledge_base)} chunks in {time.perf_counter() - started:.1f} s")
    rows, lexical = [], {}
    for split in ("train", "test"):
        texts = [q["query"] for q in queries[split]]
        for mode in ("bm25", "dense", "hybrid"):
            rankings = _search_topics(knowledge_base, texts, mode)
            rows.append(_score(mode, split, queries[split], rankings))
            if mode == "bm25":
                lexical[split] = rankings  # fused with the trained retriever below
    chunk_ids = [d.id for d in knowledge_base.documents]
    chunk_vectors = knowledge_base.embeddings_for(chunk_ids)
    examples = _hard_examples(knowledge_base, chunk_vectors, chunk_ids, queries["train"], encoder)
    steps = 60 if quick else 300
    retriever = train_retriever(examples, encoder.dimension, steps=steps)
    for split in ("train", "test"):
        trained = _trained_topics(retriever, knowledge_base, chunk_vectors, chunk_ids, encoder, queries[split])
        rows.append(_score("trained", split, queries[split], trained))
        fused = [[t for t, _ in reciprocal_rank_fusion([a, b])] for a, b in zip(trained, lexical[split])]
        rows.append(_score("trained+bm25", split, queries[split], fused))
    for row in rows:
        row.update(chunks=len(knowledge_base), encoder=encoder.name, train_steps=steps)
    return rows


def plot(rows, ceilings, env, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    test = [r for r in rows if r["split"] == "test"]
    figure, axis = plt.subplots(figsize=(8.5, 3.6))
    width = 0.2
    for offset, metric in enumerate(("recall@1", "recall@10", "mrr", "ndcg@10")):
        axis.bar(np.arange(len(test)) + offset * width, [r[metric] for r in test], width, label=metric)
    axis.set_xticks(np.arange(len(test)) + 1.5 * width, [r["method"] for r in test])
    axis.set_ylim(0, 1)
    axis.grid(True, axis="y", alpha=0.3)
    axis.set_title(f"pydoc topics, {test[0]['queries']} held-out questions ({env['device']})", fontsize=10)
    axis.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the bars, never over them
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


if __name__ == "__main__":
    from .report import main

    raise SystemExit(main(["--suite", SUITE, *sys.argv[1:]]))
