"""Answer accuracy of the whole system on Python's bundled documentation: hybrid, base RAG and direct answers of
SmolLM2-135M-Instruct to the 200 questions of benchmarks/data/pydoc_qa.jsonl, scored against their golds.

Corpus: every topic of `pydoc_data.topics` (one Document per topic), split and indexed by the system itself
(attention.segment_length-token passages, the chosen encoder). The experiment is
hybridrag.system.experiments.run_research_experiment: its module docstring defines the metrics (context quality is
the retrieval hit rate: a retrieved passage holds a gold answer).

    python -m benchmarks.system_accuracy --questions 5          # a few questions, files in benchmarks/runs/
    python -m benchmarks.system_accuracy --record               # all 200 (~2 h on 2 cores): benchmarks/results/<device>/system_accuracy.*
    python -m benchmarks.system_accuracy --train-reader         # also a reader adapter, and hybrid answers with it

The reader adapter (hybridrag.system.reader; --train-reader trains one, --reader-adapter takes a file) is distilled
from base RAG's answers to the 184 retrieval queries of benchmarks/data/pydoc_queries.jsonl (written for the
retrieval benchmark, kept apart from the answer questions), over the same knowledge base; the hybrid method then
answers the 200 questions once more with it (the configuration "reader_adapter=..."; base RAG and direct do not
read it and do not run again).

Accuracy does not depend on the machine's speed (greedy decoding), so a busy machine does not spoil the figures;
its load is recorded all the same (other processes' CPU share, benchmarks.common.LoadMeter), since the time columns
do depend on it.
"""
import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from hybridrag.retrieval import Document
from hybridrag.system import create_hybrid_rag_system
from hybridrag.system.experiments import load_questions, run_research_experiment
from hybridrag.system.model import load_language_model
from hybridrag.system.reader import load_reader
from hybridrag.train.reader_finetune import ReaderConfig, read_questions, reader_finetune

from .common import (RESULTS_ROOT, RUNS_ROOT, check_output_options, device_slug, environment, fmt_number,
                     format_seconds, format_table, LoadMeter, log, long_step, results_dir, write_json)

SUITE = "system_accuracy"
QUESTIONS = Path(__file__).resolve().parent / "data" / "pydoc_qa.jsonl"
READER_QUESTIONS = Path(__file__).resolve().parent / "data" / "pydoc_queries.jsonl"
METHODS = ("hybrid", "base_rag", "direct")
SMALL_SWEEP = {"retriever.top_k": [2, 8], "attention.window_size": [64]}
COLUMNS = [
    ("config", lambda r: r["config"]),
    ("method", lambda r: r["method"]),
    ("EM", lambda r: f"{r['exact_match']:.3f}"),
    ("contains", lambda r: f"{r['contains_gold']:.3f}"),
    ("F1", lambda r: f"{r['token_f1']:.3f}"),
    ("success", lambda r: f"{r['success_rate']:.3f}"),
    ("context quality", lambda r: fmt_number(r["context_quality"], ".3f")),
    ("attention quality", lambda r: fmt_number(r["attention_quality"], ".3f")),
    ("first token s", lambda r: f"{r['first_token_s']:.2f}"),
]


def corpus():
    import pydoc_data.topics

    return [Document(topic, text, topic) for topic, text in sorted(pydoc_data.topics.topics.items())]


def experiment_config(args):
    return {"encoder": args.encoder, "generation": {"max_new_tokens": args.max_new_tokens}}


def parse_args(argv):
    slug = device_slug(torch.device("cpu"))
    parser = argparse.ArgumentParser(prog="python -m benchmarks.system_accuracy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=None, metavar="N", help="the first N questions (default all)")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="answer length cap (default %(default)s)")
    parser.add_argument("--encoder", default="minilm", help="'minilm' or 'hashing-<dim>' (default %(default)s)")
    parser.add_argument("--sweeps", action="store_true", help=f"also run the small sweep {SMALL_SWEEP}")
    reader = parser.add_mutually_exclusive_group()
    reader.add_argument("--train-reader", action="store_true",
                        help="distil a reader adapter from base RAG's answers to the retrieval queries (~35 min on "
                             "2 cores), written to --out, then answer with the hybrid method and it too")
    reader.add_argument("--reader-adapter", type=Path, default=None, metavar="FILE",
                        help="answer with the hybrid method and this reader adapter too")
    parser.add_argument("--reader-epochs", type=int, default=2, help="--train-reader's epochs (default %(default)s)")
    parser.add_argument("--reader-questions", type=int, default=None, metavar="N",
                        help="--train-reader on the first N retrieval queries (default all)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated methods of the base configuration (default %(default)s); a run with "
                             "fewer records as system_accuracy_reader (it needs a reader)")
    parser.add_argument("--out", type=Path, default=RUNS_ROOT / slug / SUITE,
                        help="folder for results.json and the plots (default %(default)s)")
    parser.add_argument("--record", action="store_true",
                        help=f"also write {RESULTS_ROOT.name}/<device>/{SUITE}.json and .png (all questions only)")
    args = parser.parse_args(argv)
    total = len(load_questions(QUESTIONS))
    if args.questions is not None and not 1 <= args.questions <= total:
        parser.error(f"--questions must be in 1..{total}, got {args.questions}")
    if args.record and args.questions not in (None, total):
        parser.error(f"--record records the whole question set: drop --questions (or use {total})")
    args.methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if not args.methods or not set(args.methods) <= set(METHODS) or len(set(args.methods)) < len(args.methods):
        parser.error(f"--methods must be distinct names out of {', '.join(METHODS)}, got {args.methods}")
    reader = args.train_reader or args.reader_adapter is not None
    if args.record and args.reader_questions is not None:
        parser.error("--record trains the reader on every retrieval query: drop --reader-questions")
    if args.record and set(args.methods) != set(METHODS) and not reader:
        parser.error("--record with fewer --methods records the reader's run: add --train-reader or --reader-adapter")
    if args.reader_adapter is not None and not args.reader_adapter.is_file():
        parser.error(f"--reader-adapter {args.reader_adapter}: no such file")
    check_output_options(parser, args.out)
    return args


def run(args, env):
    """(summary, results.json payload, other processes' CPU share during the run)."""
    questions = load_questions(QUESTIONS)[:args.questions]
    config = experiment_config(args)
    meter = LoadMeter().start()
    system = create_hybrid_rag_system(config)
    documents = corpus()
    with long_step(f"knowledge base over {len(documents)} pydoc topics ({args.encoder})"):
        system.create_vectorstore(documents)
    log(f"{len(system.knowledge_base)} passages; {len(questions)} questions x {', '.join(args.methods)}")
    sweeps, reader = dict(SMALL_SWEEP) if args.sweeps else {}, None
    if args.train_reader:
        reader = train_reader(system, args, env)
    if args.train_reader or args.reader_adapter is not None:
        sweeps["reader_adapter"] = [str(args.out / "reader.pt" if args.train_reader else args.reader_adapter)]
    summary = run_research_experiment(None, questions, out_dir=args.out, methods=args.methods, documents=documents,
                                      system=system, sweeps=sweeps or None,
                                      sweep_methods=("hybrid",) if list(sweeps) == ["reader_adapter"] else None)
    other_load = meter.stop()
    payload = json.loads((args.out / "results.json").read_text(encoding="utf-8"))
    if reader is not None or args.reader_adapter is not None:
        trained = load_reader(sweeps["reader_adapter"][0])
        payload["reader"] = {"file": sweeps["reader_adapter"][0], "trained_for": trained.trained_for,
                             "summary": {k: v for k, v in trained.summary.items() if k != "losses"},
                             "losses": trained.summary.get("losses", [])}
    return summary, payload, other_load


def train_reader(system, args, env):
    """Distil the reader adapter for `system`'s settings into args.out / reader.pt (module docstring); a system of
    its own with a model copy of its own, so the shared model stays as it is (its training store holds the ~450
    passages the queries retrieve, 4.5 GB in float32). Returns the training summary."""
    c = system.config
    lm = load_language_model(c.model_path, cache_dir=c.cache_dir, attn_implementation=c.attn_implementation,
                             int8=c.int8, device=c.device, fresh=True)
    trainer = create_hybrid_rag_system(c, language_model=lm)
    trainer.knowledge_base = system.knowledge_base
    questions = read_questions(READER_QUESTIONS)[:args.reader_questions]
    log(f"reader adapter: base RAG answers {len(questions)} retrieval queries, then {args.reader_epochs} epochs")
    summary = reader_finetune(trainer, questions, args.out / "reader.pt", ReaderConfig(epochs=args.reader_epochs),
                              notes={"env": env})
    log(f"reader adapter: loss {summary['loss_before']:.3f} -> {summary['loss_after']:.3f} in "
        f"{format_seconds(summary['seconds'])} (+ {format_seconds(summary['teacher_seconds'])} of base RAG answers)")
    return summary


def record(summary, payload, other_load, env, wall_s, name=SUITE):
    """benchmarks/results/<device>/<name>.json (rows, answers, environment, load, the reader) and .png."""
    folder = results_dir(env["slug"])
    answers = [{key: r[key] for key in ("config", "method", "question_id", "response", "scores", "success",
                                        "context_hit", "topic_hit")} |
                {"attention_quality": None if r["analysis"] is None else r["analysis"]["attention_quality"],
                 "first_token_s": r["timings"]["first_token"]} for r in payload["records"]]
    recorded = {"suite": name, "size": "full", "env": env, "experiment_env": payload["environment"],
                "other_load": other_load, "duration_s": wall_s, "questions": summary["questions"],
                "config": payload["configs"]["base"], "sweeps": summary["sweeps"], "rows": summary["rows"],
                "answers": answers}
    if "reader" in payload:
        recorded["reader"] = payload["reader"]
    json_path = write_json(folder / f"{name}.json", recorded)
    png_path = folder / f"{name}.png"
    shutil.copyfile(Path(summary["out_dir"]) / "method_comparison.png", png_path)
    return [json_path, png_path]


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cpu")
    env = {**environment(device), "slug": device_slug(device)}
    log(f"device: {env['device']}, torch {env['torch']}, commit {env['git_commit']}, "
        f"load {env['load_avg_1m']:.1f} (1-minute average)")
    start = time.perf_counter()
    summary, payload, other_load = run(args, env)
    wall_s = time.perf_counter() - start
    title = (f"{SUITE}: {summary['questions']} questions, SmolLM2-135M-Instruct, {args.encoder}, "
             f"max_new_tokens {args.max_new_tokens}, {format_seconds(wall_s)}, other load {other_load:.0%}, "
             f"commit {env['git_commit']}")
    print(format_table(title, summary["rows"], COLUMNS))
    files = summary["files"]
    if args.record:
        name = SUITE if set(args.methods) == set(METHODS) else f"{SUITE}_reader"
        files += [str(path) for path in record(summary, payload, other_load, env, wall_s, name)]
    print("\n".join(f"wrote {path}" for path in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
