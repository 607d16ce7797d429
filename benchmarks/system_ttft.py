"""Time to first token of the hybrid RAG system: cached passages stitched in front of the question ("hybrid",
passage store warm) against plain RAG over the same tokens ("base_rag", the whole prompt prefilled), with 4, 16 and
64 retrieved passages, on the real SmolLM2-135M-Instruct.

Corpus: Python's bundled docs (`pydoc_data.topics`) cut into 100-token passages (so 64 fit SmolLM2's 8,192
positions), hashing encoder (retrieval quality does not matter here). Each case: one warm-up answer (it fills the
passage store), then `--repeats` answers of one token per method in turn, medians reported. Also recorded: the
first, uncached hybrid answer (it encodes every passage), the passage store's bytes per passage and the prompt's KV
bytes (what base RAG holds for the same tokens).

    python -m benchmarks.system_ttft                  # prints the table
    python -m benchmarks.system_ttft --record         # and writes benchmarks/results/<device>/system_ttft.json
"""
import argparse
import statistics
import sys
import time

import torch

from hybridrag.retrieval import Document
from hybridrag.system import create_hybrid_rag_system

from .common import LoadMeter, device_slug, environment, results_dir, write_json

QUESTION = "How does a for statement run its loop body over the items of a sequence?"
PASSAGES = (4, 16, 64)


def build(passages, attn_implementation):
    config = {"encoder": "hashing-384", "attn_implementation": attn_implementation, "passage_cache_size": 80,
              "retriever": {"top_k": passages, "mode": "dense"}, "generation": {"max_new_tokens": 1},
              "attention": {"segment_length": 100, "window_overlap": 0, "max_retrieved_segments": passages}}
    system = create_hybrid_rag_system(config)
    from pydoc_data.topics import topics
    system.create_vectorstore([Document(name, text, name) for name, text in sorted(topics.items())])
    return system


def first_token(system, method):
    result = system.generate_response(QUESTION, method=method, measure_attention=False)
    return result["timings"]["first_token"], result["prompt_tokens"]


def run_case(passages, repeats, attn_implementation):
    system = build(passages, attn_implementation)
    meter = LoadMeter().start()
    uncached, prompt_tokens = first_token(system, "hybrid")  # encodes the prefix and every passage
    first_token(system, "base_rag")  # warm-up
    times = {"hybrid": [], "base_rag": []}
    for _ in range(repeats):
        for method in times:
            times[method].append(first_token(system, method)[0])
    load = meter.stop()
    store = system.passages.stats()
    per_token = store["bytes"] / max(sum(p.length for p in system.passages._table.values()), 1)
    hybrid, base = statistics.median(times["hybrid"]), statistics.median(times["base_rag"])
    return {"passages": passages, "prompt_tokens": prompt_tokens, "attn_implementation": attn_implementation,
            "hybrid_first_token_s": hybrid, "base_rag_first_token_s": base, "speedup": base / hybrid,
            "hybrid_uncached_first_token_s": uncached, "hybrid_s": times["hybrid"], "base_rag_s": times["base_rag"],
            "store_bytes_per_passage": store["bytes"] / max(store["passages"], 1),
            "prompt_kv_bytes": int(per_token * prompt_tokens), "store": store, "other_load": load}


def table(rows):
    lines = ["| passages | prompt tokens | base RAG first token s | hybrid (cached) s | speedup | hybrid uncached s "
             "| passage KV MiB | prompt KV MiB | other load |", "|" + " --- |" * 9]
    for r in rows:
        lines.append(f"| {r['passages']} | {r['prompt_tokens']:,} | {r['base_rag_first_token_s']:.2f} | "
                     f"{r['hybrid_first_token_s']:.3f} | {r['speedup']:.1f}x | {r['hybrid_uncached_first_token_s']:.2f}"
                     f" | {r['store_bytes_per_passage'] / 2**20:.1f} | {r['prompt_kv_bytes'] / 2**20:.0f} | "
                     f"{r['other_load']:.0%} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.system_ttft", description=__doc__.split("\n")[0])
    parser.add_argument("--passages", type=int, nargs="+", default=list(PASSAGES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--attn", default="hybridrag", choices=("hybridrag", "sdpa", "eager"))
    parser.add_argument("--record", action="store_true", help="write benchmarks/results/<device>/system_ttft.json")
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    rows = []
    for passages in args.passages:
        start = time.perf_counter()
        rows.append(run_case(passages, args.repeats, args.attn))
        print(f"{passages} passages: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    print(table(rows))
    if args.record:
        path = results_dir(device_slug(device)) / "system_ttft.json"
        write_json(path, {"suite": "system_ttft", "environment": environment(device), "question": QUESTION,
                          "rows": rows})
        print(f"recorded {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
