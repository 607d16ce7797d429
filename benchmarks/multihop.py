"""Multi-hop retrieval on a two-hop question set over Python's bundled docs: one hop against two (MultiHopRAGTask).

Corpus: every topic of `pydoc_data.topics`, chunked into 100-word passages (20 overlapping), in a KnowledgeBase
(the bundled MiniLM encoder by default, hybrid search). Questions: benchmarks/data/two_hop_qa.jsonl. Each question describes
a thing by what hop 1's passage says of it without naming it ("the method that the with statement calls after its
suite"); hop 1's passage names it ("__exit__()") and the answer lies in another passage (hop 2's gold: any passage
holding the `hop2` snippet, whitespace-normalised).

Measured per question: whether the hop-2 gold is retrieved by one hop of k passages, by one hop of 2k passages (the
same passage budget as two hops), and by MultiHopRAGTask with max_hops=2 and k passages a hop; likewise for the
hop-1 passage. No language model runs.

    python -m benchmarks.multihop                      # JSON and PNG in benchmarks/runs/<device>/multihop/
    python -m benchmarks.multihop --record             # also benchmarks/results/<device>/multihop.json/.png
    python -m benchmarks.multihop --encoder hashing-512 --k 2
"""
import argparse
import json
import time
from pathlib import Path

import torch

from hybridrag.retrieval import Document, KnowledgeBase
from hybridrag.retrieval.encoder import make_encoder
from hybridrag.train.tasks import MultiHopRAGTask

from .common import RESULTS_ROOT, RUNS_ROOT, check_output_options, device_slug, environment, log, record_run, write_json

SUITE = "multihop"
QUESTIONS = Path(__file__).resolve().parent / "data" / "two_hop_qa.jsonl"


def _norm(text):
    return " ".join(text.split())


def corpus():
    import pydoc_data.topics

    return [Document(topic, text, topic) for topic, text in sorted(pydoc_data.topics.topics.items())]


def load_questions(path=QUESTIONS):
    """The question dicts {"id", "question", "answers", "bridge", "hop1", "hop2"}; ValueError naming a bad line."""
    questions = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        missing = {"id", "question", "answers", "bridge", "hop1", "hop2"} - set(record)
        if missing:
            raise ValueError(f"{path}:{number}: missing fields {sorted(missing)}")
        questions.append(record)
    return questions


def _hits(passages, snippet):
    snippet = _norm(snippet)
    return any(snippet in _norm(p["text"]) for p in passages)


def evaluate(knowledge_base, questions, *, k, mode):
    """Per-question rows and the rates (see the module docstring)."""
    single = MultiHopRAGTask([], knowledge_base, max_hops=1, top_k=2 * k, mode=mode)
    multi = MultiHopRAGTask([], knowledge_base, max_hops=2, top_k=k, mode=mode)
    rows = []
    for q in questions:
        wide = single.search(q["question"], k=2 * k)
        hops, stopped = multi.retrieve_hops(q["question"])
        two = [p for hop in hops for p in hop["documents"]]
        for snippet in (q["hop1"], q["hop2"]):
            if not any(_norm(snippet) in _norm(d.text) for d in knowledge_base.documents):
                raise ValueError(f"{q['id']}: no passage holds the snippet {snippet!r}: fix the question set")
        rows.append({"id": q["id"], "one_hop_k": _hits(wide[:k], q["hop2"]), "one_hop_2k": _hits(wide, q["hop2"]),
                     "two_hops": _hits(two, q["hop2"]), "hop1_found": _hits(hops[0]["documents"], q["hop1"]),
                     "hop2_query": hops[1]["query"] if len(hops) > 1 else None, "stopped": stopped,
                     "passages_two_hops": len(two), "two_hop_ids": [p["id"] for p in two]})
    count = len(rows)
    rates = {name: sum(r[name] for r in rows) / count
             for name in ("one_hop_k", "one_hop_2k", "two_hops", "hop1_found")}
    rates["two_hops_where_one_hop_2k_fails"] = sum(r["two_hops"] and not r["one_hop_2k"] for r in rows)
    rates["one_hop_2k_where_two_hops_fail"] = sum(r["one_hop_2k"] and not r["two_hops"] for r in rows)
    return rows, rates


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.multihop", description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", default="minilm", help="'hashing-<dim>' or 'minilm' (default %(default)s)")
    parser.add_argument("--mode", default="hybrid", choices=("dense", "bm25", "hybrid"))
    parser.add_argument("--k", type=int, default=3, help="passages a hop (default %(default)s)")
    parser.add_argument("--chunk-words", type=int, default=100, help="passage length in words (default %(default)s)")
    parser.add_argument("--out", type=Path, default=RUNS_ROOT / device_slug(torch.device("cpu")) / SUITE,
                        help="folder for results.json (default %(default)s)")
    parser.add_argument("--record", action="store_true",
                        help=f"also write {RESULTS_ROOT.name}/<device>/{SUITE}.json and .png (a clean checkout)")
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error(f"--k must be >= 1, got {args.k}")
    check_output_options(parser, args.out, record=args.record)
    return args


def plot(path, payload):
    """Bars: the share of questions whose hop-2 passage (and hop 1's) each retrieval finds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates, k = payload["rates"], payload["k"]
    labels = [f"one hop, {k} passages", f"one hop, {2 * k} passages", f"two hops, {k} + {k} passages",
              f"hop 1's passage, {k} passages"]
    values = [rates["one_hop_k"], rates["one_hop_2k"], rates["two_hops"], rates["hop1_found"]]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    bars = ax.barh(labels[::-1], values[::-1], color=["#999999", "#4c72b0", "#55a868", "#bbbbbb"][::-1])
    for bar, value in zip(bars, values[::-1]):
        ax.text(value + 0.01, bar.get_y() + bar.get_height() / 2, f"{value:.0%}", va="center", fontsize=8)
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("share of questions")
    ax.set_title(f"Two-hop questions ({payload['questions']}): hop-2 passage retrieved "
                 f"({payload['encoder']}, {payload['mode']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)  # light: the machine may be busy with other benchmarks
    start = time.perf_counter()
    questions = load_questions()
    knowledge_base = KnowledgeBase.build(corpus(), make_encoder(args.encoder), chunk_tokens=args.chunk_words,
                                         overlap=20)
    log(f"{len(knowledge_base)} passages, {len(questions)} questions, k={args.k}, {args.encoder} {args.mode}")
    rows, rates = evaluate(knowledge_base, questions, k=args.k, mode=args.mode)
    payload = {"suite": SUITE, "env": environment(torch.device("cpu")), "encoder": args.encoder, "mode": args.mode,
               "k": args.k, "chunk_words": args.chunk_words, "passages": len(knowledge_base),
               "questions": len(questions), "rates": rates, "rows": rows,
               "duration_s": time.perf_counter() - start}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    paths = [write_json(Path(args.out) / "results.json", payload), Path(args.out) / f"{SUITE}.png"]
    plot(paths[1], payload)
    for name, value in rates.items():
        log(f"{name}: {value:.3f}" if isinstance(value, float) else f"{name}: {value}")
    if args.record:
        paths += record_run(SUITE, payload, paths[1])
    for path in paths:
        log(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
