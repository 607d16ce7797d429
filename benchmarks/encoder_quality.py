"""Encoder quality: a HybridEncoder distilled from the bundled all-MiniLM-L6-v2 on passages of Python's documentation,
side by side with MiniLM on the pydoc retrieval questions: recall@1/5/10, MRR and nDCG@10, encode throughput on this
CPU, parameters and size in float and int8 (and the int8 encoder's quality).

Training (hybridrag.encoders.train): the student hybridrag.encoders.train.STUDENT_CONFIG (hidden 384, convolutions
3/5, two hybrid-attention blocks, window 32, 384-dim mean-pooled output; its token embeddings start from MiniLM's),
loss "distill" (1 - cosine to MiniLM's embedding of the same passage), AdamW 5e-4, warmup 100 then cosine, batches of
32 passages. The passages: windows of 32, 96 and 200 MiniLM tokens over the topics of `pydoc_data.topics` (4953
passages; --quick trains on 1500 of them). The questions (benchmarks/data/pydoc_queries.jsonl) are never trained
on: every one of the 184 is held out ("all"; "test" is retrieval_quality's test split, for comparison with it).

Evaluation: retrieval_quality's corpus (the 79 topics), its chunking (200-token windows, 40 overlap, MiniLM's
tokenizer: the same 821 chunks for every encoder), its dense search and topic folding (_search_topics) and its
scoring (_score, hybridrag.retrieval.metrics). int8: the trained encoder quantized W8A16 per channel
(HybridEncoder.quantize: the transformer blocks' linear layers; embeddings, convolutions and the output projection
stay float), scored the same way.

Throughput: encode(texts) of 64 chunks (~200 tokens) and of the 184 questions, batches of 32, texts/s from the median
of a few timed calls after one warm-up call, the other processes' share of the CPU over those calls (LoadMeter); a
row timed under more than 15% other load is flagged (hatched in the figure) and --record refuses to record the run.

    python -m benchmarks.encoder_quality [--quick] [--checkpoint PATH] [--threads N] [--out DIR] [--record]

Run time on the 2-core AMD EPYC, 2 threads: the full run 13 min on the idle machine (at 004c4ff: 9.6 min of training
at 1.22 steps/s, 1.7 min of MiniLM's embeddings of the passages, cached in runs/ for the next run, then the
encoding and timing); --quick 9 min with other processes taking ~50% of the CPU.
"""
import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hybridrag.encoders import HybridEncoder
from hybridrag.encoders.retrieval import HybridTextEncoder
from hybridrag.encoders.train import (PASSAGE_TOKENS, STUDENT_CONFIG, EncoderTrainingConfig, pydoc_passages,
                                      summary_path, train_encoder)
from hybridrag.retrieval import KnowledgeBase
from hybridrag.retrieval.encoder import DenseEncoder

from .common import (RUNS_ROOT, add_output_options, check_output_options, device_slug, environment, figure_legend,
                     flag_under_load, format_table, load_column, LoadMeter, log, plot_bars, record_run, write_json)
from .retrieval_quality import _score, _search_topics, corpus, load_queries

SUITE = "encoder_quality"
LOAD_LIMIT = 0.15
SIZES = {"quick": {"steps": 80, "passages": 1500, "eval_every": 40, "warmup": 20, "repeats": 3},
         "full": {"steps": 700, "passages": None, "eval_every": 100, "warmup": 100, "repeats": 5}}
THROUGHPUT_CHUNKS = 64
BATCH = 32
METRICS = ("recall@1", "recall@5", "recall@10", "ndcg@10")
QUALITY_COLUMNS = [("method", lambda r: r["method"]), ("split", lambda r: r["split"]),
                   ("queries", lambda r: str(r["queries"]))] + [
    (metric, lambda r, metric=metric: f"{r[metric]:.3f}") for metric in ("recall@1", "recall@5", "recall@10", "mrr",
                                                                          "ndcg@10")]
SPEED_COLUMNS = [("model", lambda r: r["model"]), ("workload", lambda r: r["workload"]),
                 ("texts", lambda r: str(r["texts"])), ("texts/s", lambda r: f"{r['texts_per_second']:.1f}"),
                 ("x minilm", lambda r: f"{r['vs_minilm']:.2f}x"), ("load", load_column)]
SIZE_COLUMNS = [("model", lambda r: r["model"]), ("parameters", lambda r: f"{r['parameters'] / 1e6:.2f} M"),
                ("size", lambda r: f"{r['size_bytes'] / 2**20:.1f} MiB"), ("weights", lambda r: r["weights"])]


def _minilm_size(encoder):
    """Parameters and bytes (parameters and buffers, each tensor once) of the sentence-transformers model."""
    module = encoder.model
    tensors = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return sum(p.numel() for p in module.parameters()), sum(t.numel() * t.element_size() for t in tensors.values())


def train_student(minilm, spec, out, name, suite=SUITE, log=log):
    """The HybridEncoder student (STUDENT_CONFIG, seed 0) distilled from `minilm` at `spec`'s size: its "steps",
    "warmup", "eval_every", "passages" (a seeded sample of that many pydoc passages, None = all) and, optional,
    "lengths" (pydoc_passages' window lengths) and "batch_size". Writes out/<name>.pt and the teacher's embedding
    cache beside it. Returns (checkpoint path, training summary)."""
    torch.manual_seed(0)
    student = HybridEncoder(STUDENT_CONFIG)
    passages = pydoc_passages(student.tokenizer, spec.get("lengths", PASSAGE_TOKENS))
    if spec["passages"] is not None:
        passages = random.Random(0).sample(passages, spec["passages"])
    batch_size = spec.get("batch_size", EncoderTrainingConfig.batch_size)
    config = EncoderTrainingConfig(steps=spec["steps"], batch_size=batch_size, warmup=spec["warmup"],
                                   eval_every=spec["eval_every"],
                                   teacher_cache=str(out / f"{name}-teacher.npz"), output=str(out / f"{name}.pt"))
    log(f"[{suite}] training the HybridEncoder ({student.num_parameters() / 1e6:.1f} M parameters): {config.steps} "
        f"steps of {config.batch_size} on {len(passages)} pydoc passages (MiniLM's embeddings of them first, cached "
        f"in {config.teacher_cache}) ...")
    summary = train_encoder(student, passages, config, teacher=minilm, progress=sys.stderr.isatty())
    log(f"[{suite}] trained in {summary['train_seconds']:.0f} s ({summary['seconds']:.0f} s with the teacher's "
        f"embeddings); held-out teacher cosine {summary['evals'][0]['teacher_cosine']:.3f} -> "
        f"{summary['evals'][-1]['teacher_cosine']:.3f}")
    return Path(summary["checkpoint"]), summary


def _quality(encoders, queries, log=log):
    """retrieval_quality's chunking, dense search and scoring for each encoder; the knowledge bases are returned for
    the throughput texts."""
    rows, bases = [], {}
    splits = {"all": queries["train"] + queries["test"], "test": queries["test"]}
    for method, encoder in encoders.items():
        started = time.perf_counter()
        bases[method] = KnowledgeBase.build(corpus(), encoder, chunk_tokens=200, overlap=40, index_kind="flat")
        for split, chosen in splits.items():
            rankings = _search_topics(bases[method], [q["query"] for q in chosen], "dense")
            rows.append({**_score(method, split, chosen, rankings), "chunks": len(bases[method])})
        log(f"[{SUITE}] {method}: {len(bases[method])} chunks encoded and searched in "
            f"{time.perf_counter() - started:.0f} s")
    chunk_ids = {method: [d.id for d in base.documents] for method, base in bases.items()}
    first = next(iter(chunk_ids.values()))
    if any(ids != first for ids in chunk_ids.values()):
        raise RuntimeError("the encoders' knowledge bases hold different chunks; the comparison would not be fair")
    return rows, bases


def _throughput(encoders, workloads, repeats):
    """Median texts/s of encode(texts) per encoder and workload, after one warm-up call; the load over the timed
    calls."""
    rows = []
    for workload, texts in workloads.items():
        for model, encoder in encoders.items():
            encoder.encode(texts, batch_size=BATCH)
            seconds, meter = [], LoadMeter().start()
            for _ in range(repeats):
                started = time.perf_counter()
                encoder.encode(texts, batch_size=BATCH)
                seconds.append(time.perf_counter() - started)
            rows.append({"model": model, "workload": workload, "texts": len(texts), "repeats": repeats,
                         "median_s": statistics.median(seconds), "seconds": seconds,
                         "texts_per_second": len(texts) / statistics.median(seconds), "other_load": meter.stop()})
    for row in rows:
        base = next(r for r in rows if r["workload"] == row["workload"] and r["model"] == "minilm")
        row["vs_minilm"] = row["texts_per_second"] / base["texts_per_second"]
        row["ratio_other_load"] = base["other_load"]
    return rows


def run(size, out, checkpoint=None, log=log):
    spec = SIZES[size]
    env = environment(torch.device("cpu"))
    name = SUITE + ("-quick" if size == "quick" else "")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    minilm = DenseEncoder(device="cpu", show_progress=False)
    if checkpoint is None:
        checkpoint, summary = train_student(minilm, SIZES[size], out, name, log=log)
    else:
        checkpoint = Path(checkpoint)
        beside = summary_path(checkpoint)
        summary = json.loads(beside.read_text()) if beside.is_file() else None
    student = HybridTextEncoder(checkpoint, name="hybrid-encoder")
    quantized = HybridEncoder.load(checkpoint)
    queries = load_queries()
    calibration = [d.text[:600] for d in corpus()][:32]
    agreement = quantized.quantize({"mode": "w8a16"}, calibration_texts=calibration)["agreement"]
    int8 = HybridTextEncoder(quantized, name="hybrid-encoder-int8")
    encoders = {"minilm": minilm, "hybrid-encoder": student, "hybrid-encoder int8": int8}
    quality, bases = _quality(encoders, queries, log)
    log(f"[{SUITE}] timing encode ({spec['repeats']} calls per row) ...")
    workloads = {"chunks": [d.text for d in bases["minilm"].documents[:THROUGHPUT_CHUNKS]],
                 "queries": [q["query"] for q in queries["train"] + queries["test"]]}
    speed = _throughput(encoders, workloads, spec["repeats"])
    flagged = flag_under_load(speed, LOAD_LIMIT)
    parameters, size_bytes = _minilm_size(minilm)
    sizes = [{"model": "minilm", "parameters": parameters, "size_bytes": size_bytes, "weights": "float32"},
             {"model": "hybrid-encoder", "parameters": student.encoder.num_parameters(),
              "size_bytes": student.encoder.size_bytes(), "weights": "float32"},
             {"model": "hybrid-encoder int8", "parameters": quantized.num_parameters(),
              "size_bytes": quantized.size_bytes(),
              "weights": "int8 W8A16 blocks (per-channel scales), float32 rest"}]
    result = {
        "suite": SUITE, "size": size, "checkpoint": str(checkpoint), "student_config": student.encoder.config.to_dict(),
        "training": None if summary is None else {key: summary[key] for key in summary if key != "history"},
        "training_losses": None if summary is None else [[h["step"], h["loss"]] for h in summary["history"]],
        "quality": quality, "throughput": speed, "sizes": sizes, "int8_agreement": agreement,
        "load_limit": LOAD_LIMIT, "flagged": [f"{r['model']} {r['workload']}: {r['flagged']}" for r in flagged],
        "seconds": time.perf_counter() - started, "environment": env,
    }
    write_json(out / f"{name}.json", result)
    plot(result, out / f"{name}.png")
    return result, out / f"{name}.png"


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = result["throughput"]
    models = list(dict.fromkeys(r["model"] for r in speed))
    workloads = list(dict.fromkeys(r["workload"] for r in speed))
    figure, axes = plt.subplots(1, 1 + len(workloads), figsize=(12, 4),
                                gridspec_kw={"width_ratios": [3] + [1.2] * len(workloads)})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    rows = [r for r in result["quality"] if r["split"] == "all"]
    width = 0.8 / len(rows)
    for offset, row in enumerate(rows):
        axes[0].bar(np.arange(len(METRICS)) + offset * width, [row[m] for m in METRICS], width,
                    color=colors[models.index(row["method"]) if row["method"] in models else offset],
                    label=row["method"])
    axes[0].set_xticks(np.arange(len(METRICS)) + width * (len(rows) - 1) / 2, METRICS)
    axes[0].set_ylim(0, 1)
    axes[0].grid(True, axis="y", alpha=0.3)
    axes[0].set_title(f"retrieval: pydoc topics, {rows[0]['queries']} questions (none trained on)", fontsize=10)
    threads = result["environment"]["cpu_threads"]
    for axis, workload in zip(axes[1:], workloads):
        chosen = [next(r for r in speed if r["model"] == m and r["workload"] == workload) for m in models]
        plot_bars(axis, np.arange(len(models)), [r["texts_per_second"] for r in chosen],
                  [bool(r["flagged"]) for r in chosen], color=colors[:len(models)], width=0.7)
        axis.set_xticks(np.arange(len(models)), [m.replace("hybrid-encoder", "hybrid") for m in models],
                        fontsize=8)
        axis.grid(True, axis="y", alpha=0.3)
        axis.set_title(f"encode {chosen[0]['texts']} {workload}, texts/s", fontsize=10)
    axes[1].set_ylabel(f"texts / s (batches of {BATCH}, {threads} thread{'s' if threads > 1 else ''})")
    figure.suptitle(result["environment"]["device"], fontsize=9)
    figure_legend(figure, axes[:1], ncol=3)
    if result["flagged"]:
        figure.text(0.99, 0.005, f"hatched: timed under other load above {result['load_limit']:.0%} (flagged)",
                    ha="right", va="bottom", fontsize=8, color="firebrick")
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def tables(result):
    return "\n\n".join([
        format_table(f"Retrieval quality (dense search over the {result['quality'][0]['chunks']} pydoc chunks, "
                     f"folded to topics)", result["quality"], QUALITY_COLUMNS),
        format_table(f"Encode throughput (load: other processes' share of the CPU; * = above "
                     f"{result['load_limit']:.0%}, flagged)", result["throughput"], SPEED_COLUMNS),
        format_table("Size", result["sizes"], SIZE_COLUMNS)])


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.encoder_quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="80 training steps on 1500 passages, 3 timed calls "
                                                             "(full: 700 steps on every passage, 5 calls)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="evaluate this HybridEncoder checkpoint instead of training one")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's choice)")
    add_output_options(parser, SUITE, files='the JSON, PNG and checkpoint', default_text='benchmarks/runs/<device>/', record_needs='full size, trained in the run, a clean checkout, no row flagged')
    args = parser.parse_args(argv)
    out = args.out or RUNS_ROOT / device_slug(torch.device("cpu"))
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.checkpoint is not None and not args.checkpoint.is_file():
        parser.error(f"--checkpoint {args.checkpoint}: no such file")
    if args.record and args.checkpoint is not None:
        parser.error("--record records an encoder trained in the run: drop --checkpoint")
    check_output_options(parser, out, record=args.record, quick=args.quick)
    if args.threads:
        torch.set_num_threads(args.threads)
    result, png = run("quick" if args.quick else "full", out, args.checkpoint)
    print(tables(result))
    print(f"wrote {out}")
    if args.record:
        if result["flagged"]:
            print(f"not recorded: {len(result['flagged'])} throughput rows were timed under other load above "
                  f"{LOAD_LIMIT:.0%} ({'; '.join(result['flagged'])}); run again on a quiet machine", file=sys.stderr)
            return 1
        for path in record_run(SUITE, result, png):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
