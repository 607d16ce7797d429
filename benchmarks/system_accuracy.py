"""Answer accuracy of the whole system on Python's bundled documentation: hybrid, base RAG and direct answers of
SmolLM2-135M-Instruct to the 200 questions of benchmarks/data/pydoc_qa.jsonl, scored against their golds.

Corpus: every topic of `pydoc_data.topics` (one Document per topic), split and indexed by the system itself
(attention.segment_length-token passages, the chosen encoder). The experiment is
hybridrag.system.experiments.run_research_experiment: its module docstring defines the metrics (context quality is
the retrieval hit rate: a retrieved passage holds a gold answer).

    python -m benchmarks.system_accuracy --questions 5          # a few questions, files in benchmarks/runs/
    python -m benchmarks.system_accuracy --record               # all 200 (~2 h on 2 cores): benchmarks/results/<device>/system_accuracy.*

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

from .common import (RESULTS_ROOT, RUNS_ROOT, LoadMeter, device_slug, environment, fmt_number, format_seconds,
                     format_table, is_inside, log, long_step, results_dir, write_json)

SUITE = "system_accuracy"
QUESTIONS = Path(__file__).resolve().parent / "data" / "pydoc_qa.jsonl"
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
    if is_inside(args.out, RESULTS_ROOT):
        parser.error(f"--out {args.out} lies inside {RESULTS_ROOT}: pick another folder (--record writes there)")
    return args


def run(args):
    """(summary, results.json payload, other processes' CPU share during the run)."""
    questions = load_questions(QUESTIONS)[:args.questions]
    config = experiment_config(args)
    meter = LoadMeter().start()
    system = create_hybrid_rag_system(config)
    documents = corpus()
    with long_step(f"knowledge base over {len(documents)} pydoc topics ({args.encoder})"):
        system.create_vectorstore(documents)
    log(f"{len(system.knowledge_base)} passages; {len(questions)} questions x {len(METHODS)} methods")
    summary = run_research_experiment(None, questions, out_dir=args.out, methods=METHODS, documents=documents,
                                      system=system, sweeps=SMALL_SWEEP if args.sweeps else None)
    other_load = meter.stop()
    payload = json.loads((args.out / "results.json").read_text(encoding="utf-8"))
    return summary, payload, other_load


def record(summary, payload, other_load, env, wall_s):
    """benchmarks/results/<device>/system_accuracy.json (rows, answers, environment, load) and .png."""
    folder = results_dir(env["slug"])
    answers = [{key: r[key] for key in ("config", "method", "question_id", "response", "scores", "success",
                                        "context_hit", "topic_hit")} |
                {"attention_quality": None if r["analysis"] is None else r["analysis"]["attention_quality"],
                 "first_token_s": r["timings"]["first_token"]} for r in payload["records"]]
    recorded = {"suite": SUITE, "size": "full", "env": env, "experiment_env": payload["environment"],
                "other_load": other_load, "duration_s": wall_s, "questions": summary["questions"],
                "config": payload["configs"]["base"], "sweeps": summary["sweeps"], "rows": summary["rows"],
                "answers": answers}
    json_path = write_json(folder / f"{SUITE}.json", recorded)
    png_path = folder / f"{SUITE}.png"
    shutil.copyfile(Path(summary["out_dir"]) / "method_comparison.png", png_path)
    return [json_path, png_path]


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cpu")
    env = {**environment(device), "slug": device_slug(device)}
    log(f"device: {env['device']}, torch {env['torch']}, commit {env['git_commit']}, "
        f"load {env['load_avg_1m']:.1f} (1-minute average)")
    start = time.perf_counter()
    summary, payload, other_load = run(args)
    wall_s = time.perf_counter() - start
    title = (f"{SUITE}: {summary['questions']} questions, SmolLM2-135M-Instruct, {args.encoder}, "
             f"max_new_tokens {args.max_new_tokens}, {format_seconds(wall_s)}, other load {other_load:.0%}, "
             f"commit {env['git_commit']}")
    print(format_table(title, summary["rows"], COLUMNS))
    files = summary["files"]
    if args.record:
        files += [str(path) for path in record(summary, payload, other_load, env, wall_s)]
    print("\n".join(f"wrote {path}" for path in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
