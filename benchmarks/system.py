"""End to end: the hybrid RAG system on the real SmolLM2-135M-Instruct. Time to first token of "hybrid" (cached
passages stitched in front of the question, passage store warm) against "base_rag" (the same tokens prefilled as
one prompt), with 4 and 16 retrieved passages (full run: 4, 16, 64); target: hybrid at most 1/10 of base RAG's
time at 16 passages.

Corpus: Python's bundled docs (`pydoc_data.topics`) cut into 60-word passages (about 110 model tokens, so 64 fit
SmolLM2's 8,192 positions), hashing encoder (retrieval quality does not matter here; it counts words). Each case:
one hybrid answer that fills the passage store (recorded as "uncached"), one base-RAG warm-up, then answers of one
token per method in turn, medians reported. More cases at 16 passages: the store in int8, and (full only) the hybrid
method with a reader adapter (hybridrag.system.reader; rank 8 on every linear, freshly initialised: what it costs
does not depend on its training). Also recorded: the store's bytes per passage and per token, and the prompt's KV
bytes (what base RAG holds at answer time).

    python -m benchmarks.system            # this suite alone: benchmarks.report --suite system
    python -m benchmarks.system --full
"""
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from hybridrag.nn.lora import apply_lora
from hybridrag.retrieval import Document
from hybridrag.system import create_hybrid_rag_system, load_language_model
from hybridrag.system.passage_store import fingerprint
from hybridrag.system.reader import ReaderAdapter, save_reader
from hybridrag.train.reader_finetune import ReaderConfig

from .common import CHECK_COLUMNS, LoadMeter, target_text  # noqa: F401 (CHECK_COLUMNS: report reads it)

SUITE = "system"
EXPECTED_S = {"quick": 80, "full": 300}  # on the 2-core AMD EPYC (the 64-passage prompt's prefill dominates)
TARGET_PASSAGES, TARGET_RATIO = 16, 0.1  # hybrid first token <= 1/10 of base RAG's at 16 passages

QUESTION = "How does a for statement run its loop body over the items of a sequence?"
PASSAGES = {"quick": (4, 16), "full": (4, 16, 64)}
REPEATS = {"quick": 2, "full": 3}


def timing_reader(folder):
    """A reader adapter file for SmolLM2-135M in `folder`: the default rank and targets, as initialised."""
    lm = load_language_model(fresh=True)
    config = ReaderConfig()
    apply_lora(lm.model, rank=config.rank, alpha=config.alpha, targets=config.targets)
    spec = ReaderAdapter(fingerprint(lm), config.rank, config.alpha, config.targets, {}, {"untrained": True})
    return save_reader(Path(folder) / "timing_reader.pt", lm.model, spec)


def build(passages, attn_implementation, storage="model", reader=None):
    config = {"encoder": "hashing-384", "attn_implementation": attn_implementation, "passage_cache_size": 80,
              "passage_cache_storage": storage, "reader_adapter": None if reader is None else str(reader),
              "retriever": {"top_k": passages, "mode": "dense"}, "generation": {"max_new_tokens": 1},
              "attention": {"segment_length": 60, "window_overlap": 0, "max_retrieved_segments": passages}}
    system = create_hybrid_rag_system(config)
    from pydoc_data.topics import topics
    system.create_vectorstore([Document(name, text, name) for name, text in sorted(topics.items())])
    return system


def first_token(system, method):
    result = system.generate_response(QUESTION, method=method, measure_attention=False)
    return result["timings"]["first_token"], result["prompt_tokens"]


def run_case(passages, repeats, attn_implementation, storage="model", reader=None):
    system = build(passages, attn_implementation, storage, reader)
    meter = LoadMeter().start()
    uncached, prompt_tokens = first_token(system, "hybrid")  # encodes the prefix and every passage
    first_token(system, "base_rag")  # warm-up
    times = {"hybrid": [], "base_rag": []}
    for _ in range(repeats):
        for method in times:
            times[method].append(first_token(system, method)[0])
    load = meter.stop()
    store = system.passages.stats()
    hybrid, base = statistics.median(times["hybrid"]), statistics.median(times["base_rag"])
    element = torch.finfo(system.language_model.dtype).bits // 8
    config = system.language_model.model.config
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * element
    return {"passages": passages, "storage": storage, "reader": reader is not None, "prompt_tokens": prompt_tokens,
            "attn_implementation": attn_implementation,
            "hybrid_first_token_s": hybrid, "base_rag_first_token_s": base, "speedup": base / hybrid,
            "hybrid_uncached_first_token_s": uncached, "hybrid_s": times["hybrid"], "base_rag_s": times["base_rag"],
            "store_bytes_per_passage": store["bytes"] / max(store["passages"], 1),
            "store_bytes_per_token": store["bytes"] / max(system.passages.tokens, 1),
            "prompt_kv_bytes": kv_per_token * prompt_tokens, "store": store, "other_load": load}


def _target(row):
    if row["passages"] != TARGET_PASSAGES or row["storage"] != "model":
        return None
    ratio = row["hybrid_first_token_s"] / row["base_rag_first_token_s"]
    return {"ratio": "hybrid / base RAG first token", "value": ratio, "limit": TARGET_RATIO,
            "met": bool(ratio <= TARGET_RATIO)}


def bench_dtype(device):
    return torch.float32


def check(device):
    """The answer the timings rest on: hybrid and base RAG see the same passages and prompt tokens and answer."""
    system = build(4, "hybridrag")
    hybrid = system.generate_response(QUESTION, method="hybrid", measure_attention=False)
    base = system.generate_response(QUESTION, method="base_rag", measure_attention=False)
    same = [p["id"] for p in hybrid["passages"]] == [p["id"] for p in base["passages"]]
    return [{"check": "same passages and prompt tokens", "value": f"{hybrid['prompt_tokens']} tokens",
             "passed": same and hybrid["prompt_tokens"] == base["prompt_tokens"]},
            {"check": "both answer", "value": f"{hybrid['response']!r} / {base['response']!r}",
             "passed": hybrid["success"] and base["success"]}]


def benchmark(device, quick=False, ceilings=None, log=print):
    mode = "quick" if quick else "full"
    rows = []
    for passages in PASSAGES[mode]:
        log(f"[{SUITE}] {passages} passages ...")
        row = run_case(passages, REPEATS[mode], "hybridrag")
        row["target"] = _target(row)
        rows.append(row)
    log(f"[{SUITE}] {TARGET_PASSAGES} passages, int8 passage store ...")
    rows.append({**run_case(TARGET_PASSAGES, REPEATS[mode], "hybridrag", "int8"), "target": None})
    if not quick:  # loading a second model copy for the adapter would take quick past its few minutes
        log(f"[{SUITE}] {TARGET_PASSAGES} passages, reader adapter ...")
        with tempfile.TemporaryDirectory() as folder:
            row = run_case(TARGET_PASSAGES, REPEATS[mode], "hybridrag", reader=timing_reader(folder))
        row["target"] = _target(row)
        rows.append(row)
    return rows


def plot(rows, ceilings, env, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 3.4))
    rows_model = [r for r in rows if r.get("storage", "model") == "model" and not r.get("reader")]
    passages = [r["passages"] for r in rows_model]
    for key, label in (("base_rag_first_token_s", "base RAG"), ("hybrid_uncached_first_token_s",
                                                                 "hybrid, passages not cached"),
                       ("hybrid_first_token_s", "hybrid, passages cached")):
        axis.plot(passages, [r[key] for r in rows_model], marker="o", label=label)
    for row in rows:
        if row.get("storage", "model") != "model":
            axis.plot([row["passages"]], [row["hybrid_first_token_s"]], marker="x", linestyle="none",
                      label=f"hybrid, {row['storage']} passage store")
        elif row.get("reader"):
            axis.plot([row["passages"]], [row["hybrid_first_token_s"]], marker="+", markersize=10,
                      linestyle="none", label="hybrid, reader adapter")
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xticks(passages, [str(p) for p in passages])
    axis.set_xlabel("retrieved passages (60 words each)")
    axis.set_ylabel("time to first token, s")
    axis.grid(True, alpha=0.3)
    axis.set_title(f"SmolLM2-135M time to first token ({env['device']})", fontsize=10)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


BENCH_COLUMNS = [("passages", lambda r: str(r["passages"])), ("store", lambda r: r.get("storage", "model")),
                 ("reader", lambda r: "yes" if r.get("reader") else "-"),
                 ("prompt tokens", lambda r: f"{r['prompt_tokens']:,}"),
                 ("base RAG s", lambda r: f"{r['base_rag_first_token_s']:.3f}"),
                 ("hybrid cached s", lambda r: f"{r['hybrid_first_token_s']:.3f}"),
                 ("hybrid uncached s", lambda r: f"{r['hybrid_uncached_first_token_s']:.2f}"),
                 ("speedup", lambda r: f"{r['speedup']:.1f}x"),
                 ("passage KV MiB", lambda r: f"{r['store_bytes_per_passage'] / 2**20:.1f}"),
                 ("prompt KV MiB", lambda r: f"{r['prompt_kv_bytes'] / 2**20:.0f}"),
                 ("target", lambda r: target_text(r["target"], "<="))]


if __name__ == "__main__":
    from .report import main

    raise SystemExit(main(["--suite", SUITE, *sys.argv[1:]]))
