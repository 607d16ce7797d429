"""Cascade quality: hybridrag.distillation.TeacherStudentCascade on the pydoc retrieval questions. A cheap student
answers first and escalates to the teacher (the bundled all-MiniLM-L6-v2) when its confidence is below a threshold
chosen on validation questions: the share of questions the student keeps, the cascade's quality against the teacher
alone and the student alone, and the time it saves.

Corpus: retrieval_quality's (the 79 topics of `pydoc_data.topics`, 200-token windows with 40 overlap by MiniLM's
tokenizer: 821 chunks), chunked once and indexed as they are by every knowledge base (flat index, the 100 best
chunks of a search). A model's answer is the topic ranking those chunks fold into (KnowledgeBaseAnswerer with
by_document=True: each topic at its best chunk, as retrieval_quality scores it) and its scores are the topics' best
chunk scores, so the "margin" is top-1 minus top-2 topic and the "entropy" is over the topics (a chunk-level margin
would often compare two windows of one topic).
Questions: benchmarks/data/pydoc_queries.jsonl (184, none trained on), split seeded into a validation and a test
half (the file's train/test labels are not used: nothing is trained on questions here). --quick keeps the first 3
chunks of each topic (179 chunks) and a seeded 100 of the questions.

Students:
  hybrid-encoder       a HybridEncoder distilled from MiniLM as benchmarks/encoder_quality.py trains it
                       (hybridrag.encoders.train: STUDENT_CONFIG, loss "distill", AdamW 5e-4, warmup then cosine;
                       full: encoder_quality's 700 steps of 32 on all 4953 pydoc passages; --quick: 20 steps of 16
                       on 512 passages of 32 tokens, a barely trained student), or --checkpoint's;
  hybrid-encoder int8  the same weights quantized W8A16 per channel (HybridEncoder.quantize), full size only;
  bm25                 BM25 over the same chunks (the teacher's knowledge base searched with mode "bm25").
The first dense pair comes from hybridrag.distillation.retrieval_cascade (the teacher's knowledge base is built once).

Each student with each measure ("margin"; "entropy" with score temperature 0.05 for cosine scores, 1.0 for BM25's):
calibrate(validation, target_agreement=0.9) against the teacher's answers (an answer agrees when its top-1 topic is
the teacher's; threshold "inf": no threshold reached the target, every question escalates), then on the test half:
the share the student keeps, the cascade's agreement with the teacher, recall@1/5/10, MRR and nDCG@10 of the
cascade's rankings, of the student alone and of the teacher alone, and the time. Calibrate and evaluate see each
model's answer to a question once (Recorded: its measured seconds ride along). Attention quality, the cascade's
third kind of measure, needs a generating system (SystemAnswerer) and is not measured here.

Time: wall time (perf_counter) of whole passes over the test questions, one query at a time (query encoding and
search), of the teacher alone, each student alone and each cascade (run(): the student, then the teacher on the
escalated ones), the models in turn, rotated, after a warm-up on 5 questions; the median pass per query; time saved
= 1 - cascade / teacher alone. The other processes' share of the CPU over the passes (LoadMeter): rows timed above
15% are flagged (hatched in the figure) and --record refuses to record the run; the 1-minute load average is in the
environment. evaluate()'s own estimate (per-call timings of both models) is in the JSON as time_saved_evaluate.

Output: a table on stdout, cascade_quality.json and .png (-quick.*: kept share vs recall@1 on the test half at every
threshold, the calibrated points marked, and the time per query) under --out (default
benchmarks/runs/<device>/cascade_quality, ignored by git); --record copies a full run to
benchmarks/results/<device>/cascade_quality.json and .png (a clean checkout, trained in the run, no row flagged).

    python -m benchmarks.cascade_quality [--quick] [--checkpoint PATH] [--target T] [--seed N] [--threads N]
                                         [--out DIR] [--record]

Run time: --quick --threads 1 took 2.0 min wall on a 2-core Intel Xeon with other processes taking about half its
CPU (load average 4.5; training 36 s with the teacher's embeddings, the two knowledge bases 32 s). The full size was
not timed (its training alone took encoder_quality 9.6 min at 2 threads on an idle 2-core AMD EPYC).
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

from hybridrag.distillation import KnowledgeBaseAnswerer, TeacherStudentCascade, confidence, retrieval_cascade
from hybridrag.encoders import HybridEncoder
from hybridrag.encoders.retrieval import HybridTextEncoder
from hybridrag.encoders.train import PASSAGE_TOKENS, summary_path
from hybridrag.retrieval import KnowledgeBase
from hybridrag.retrieval.documents import chunk_documents
from hybridrag.retrieval.encoder import DenseEncoder, as_retrieval_encoder

from .common import (RUNS_ROOT, add_output_options, check_output_options, device_slug, environment, figure_legend,
                     flag_under_load, format_table, load_column, LoadMeter, log, plot_bars, record_run, write_json)
from .encoder_quality import SIZES as ENCODER_SIZES, train_student
from .retrieval_quality import DEPTH, _score, corpus, load_queries

SUITE = "cascade_quality"
LOAD_LIMIT = 0.15
MEASURES = ("margin", "entropy")
TEMPERATURE = {"dense": 0.05, "bm25": 1.0}
TARGET = 0.9
METRICS = ("recall@1", "recall@5", "recall@10", "mrr", "ndcg@10")
_FULL = ENCODER_SIZES["full"]
SIZES = {"quick": {"chunks_per_topic": 3, "questions": 100, "steps": 20, "batch_size": 16, "passages": 512,
                   "lengths": (32,), "warmup": 5, "eval_every": 10, "repeats": 2,
                   "students": ("hybrid-encoder", "bm25")},
         "full": {"chunks_per_topic": None, "questions": None, "steps": _FULL["steps"], "batch_size": 32,
                  "passages": _FULL["passages"], "lengths": PASSAGE_TOKENS, "warmup": _FULL["warmup"],
                  "eval_every": _FULL["eval_every"], "repeats": 5,
                  "students": ("hybrid-encoder", "hybrid-encoder int8", "bm25")}}
QUALITY_COLUMNS = [("method", lambda r: r["method"]), ("kept", lambda r: _share(r["kept_share"])),
                   ("agree", lambda r: _share(r["agreement_with_teacher"])),
                   ("threshold", lambda r: "-" if r["measure"] is None else "inf" if r["threshold"] is None
                    else f"{r['threshold']:.4f}")] + [
    (metric, lambda r, metric=metric: f"{r[metric]:.3f}") for metric in METRICS]
TIME_COLUMNS = [("method", lambda r: r["method"]), ("ms/query", lambda r: f"{r['ms_per_query']:.2f}"),
                ("x teacher", lambda r: f"{r['vs_teacher']:.2f}x"),
                ("saved", lambda r: "-" if r["time_saved"] is None else f"{r['time_saved']:+.0%}"),
                ("load", load_column)]


def _finite(threshold):
    """A threshold for the JSON: None for inf (calibrate reached no target: every query escalates)."""
    return None if threshold == float("inf") else threshold


def _share(value):
    return "-" if value is None else f"{value:.0%}"


class Recorded:
    """A model that answers each query once: the answer is kept with the seconds that call took (the cascade
    protocol's "seconds") and given again, so calibrate and evaluate under every measure see one measured call of
    each model per query."""

    def __init__(self, model):
        self.model, self.answers = model, {}

    def answer(self, query):
        if query not in self.answers:
            started = time.perf_counter()
            answer = self.model(query)
            self.answers[query] = {**answer, "seconds": time.perf_counter() - started}
        return self.answers[query]

    __call__ = answer


def select(chunks, queries, per_topic, count, seed):
    """(chunks, queries): each topic's first `per_topic` chunks and a seeded sample of `count` questions (None:
    all of them)."""
    if per_topic is not None:
        chunks = [c for c in chunks if c.metadata["chunk"] < per_topic]
    if count is not None:
        queries = random.Random(seed).sample(list(queries), count)
    return chunks, queries


def split(queries, seed):
    """(validation, test): a seeded half each (validation gets the odd one)."""
    order = list(queries)
    random.Random(seed).shuffle(order)
    half = (len(order) + 1) // 2
    return order[:half], order[half:]


def _passes(models, queries, repeats, warmup=5):
    """Per model: the answers of the last pass and the median seconds per query over `repeats` timed passes over
    `queries`, the models taken in turn (rotated) after a warm-up on the first `warmup` queries; the other processes'
    load over the timed passes."""
    for model in models.values():
        for query in queries[:warmup]:
            model(query)
    names, seconds, answers = list(models), {name: [] for name in models}, {}
    meter = LoadMeter().start()
    for repeat in range(repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            started = time.perf_counter()
            answers[name] = [models[name](query) for query in queries]
            seconds[name].append(time.perf_counter() - started)
    load = meter.stop()
    return answers, {name: statistics.median(s) / len(queries) for name, s in seconds.items()}, seconds, load


def _sweep(student, teacher, confidences, queries):
    """[(kept share, recall@1, ndcg@10)] of the cascade on `queries` at every threshold (each distinct confidence,
    plus inf: everything escalated)."""
    points = []
    for threshold in sorted(set(confidences) | {float("inf")}):
        kept = [c >= threshold and threshold != float("inf") for c in confidences]
        rankings = [s if k else t for s, t, k in zip(student, teacher, kept)]
        row = _score("sweep", "test", queries, rankings)
        points.append((float(np.mean(kept)), row["recall@1"], row["ndcg@10"]))
    return points


def _students(names, checkpoint, chunks):
    """The dense students: {name: encoder}, and the int8 encoder's agreement with the float one (None without)."""
    encoders = {}
    if "hybrid-encoder" in names:
        encoders["hybrid-encoder"] = HybridTextEncoder(checkpoint, name="hybrid-encoder")
    agreement = None
    if "hybrid-encoder int8" in names:
        quantized = HybridEncoder.load(checkpoint)
        agreement = quantized.quantize({"mode": "w8a16"}, calibration_texts=[c.text[:600] for c in chunks][:32])
        agreement = agreement["agreement"]
        encoders["hybrid-encoder int8"] = HybridTextEncoder(quantized, name="hybrid-encoder-int8")
    return encoders, agreement


def _cascades(name, student, teacher, mode, validation, test, target, log=log):
    """{measure: (cascade, its evaluate() on `test`)} for one student: calibrated on `validation` over Recorded
    models (student and teacher: Recorded), the cascade returned over the models themselves, for timing."""
    out = {}
    for measure in MEASURES:
        recorded = TeacherStudentCascade(student, teacher, measure, score_temperature=TEMPERATURE[mode])
        calibration = recorded.calibrate([q["query"] for q in validation], target_agreement=target)
        evaluation = recorded.evaluate([q["query"] for q in test])
        cascade = TeacherStudentCascade(student.model, teacher.model, measure, recorded.threshold,
                                        score_temperature=TEMPERATURE[mode])
        cascade.calibration = calibration
        out[measure] = (cascade, evaluation)
        log(f"[{SUITE}] {name}, {measure}: threshold {cascade.threshold:.4f} keeps {calibration['kept_share']:.0%} "
            f"of the validation questions (the student alone agrees with the teacher on "
            f"{calibration['student_agreement']:.0%})")
    return out


def _rows(students, cascades, test, answers, per_query, seconds, load):
    """The quality rows, the timing rows and the kept share vs quality curves of every student and cascade."""
    teacher = [a["result"] for a in answers["teacher"]]
    teacher_s = per_query["teacher"]

    def timing_row(method, key, student=None, measure=None, **extra):
        return {"method": method, "student": student, "measure": measure, "ms_per_query": per_query[key] * 1e3,
                "pass_seconds": seconds[key], "vs_teacher": per_query[key] / teacher_s,
                "time_saved": None if key == "teacher" else 1 - per_query[key] / teacher_s, "other_load": load,
                **extra}

    def agreement(rankings):
        return float(np.mean([bool(r) and r[0] == t[0] for r, t in zip(rankings, teacher)]))

    quality = [{**_score("minilm (teacher) alone", "test", test, teacher), "student": None, "measure": None,
                "kept_share": None, "agreement_with_teacher": 1.0, "threshold": None}]
    timing = [timing_row("minilm (teacher) alone", "teacher")]
    curves = {}
    for name, mode in students.items():
        alone = [a["result"] for a in answers[name]]
        quality.append({**_score(f"{name} alone", "test", test, alone), "student": name, "measure": None,
                        "kept_share": 1.0, "agreement_with_teacher": agreement(alone), "threshold": None})
        timing.append(timing_row(f"{name} alone", name, name))
        curves[name] = {}
        for measure, (cascade, evaluation) in cascades[name].items():
            key, label = (name, measure), f"{name} -> minilm, {measure}"
            outs = answers[key]
            rankings = [o["result"] for o in outs]
            quality.append({**_score(label, "test", test, rankings), "student": name, "measure": measure,
                            "score_temperature": cascade.score_temperature, "threshold": _finite(cascade.threshold),
                            "kept_share": float(np.mean([o["answered_by"] == "student" for o in outs])),
                            "agreement_with_teacher": agreement(rankings),
                            "evaluate": {**evaluation, "threshold": _finite(evaluation["threshold"])},
                            "calibration": {**{k: v for k, v in cascade.calibration.items()
                                               if k not in ("confidences", "agreements", "candidates")},
                                            "threshold": _finite(cascade.threshold)},
                            "recall@1_bounds": _bounds(test, alone, teacher)})
            timing.append(timing_row(label, key, name, measure, time_saved_evaluate=evaluation["time_saved_share"]))
            values = [confidence(a, measure, score_temperature=cascade.score_temperature) for a in answers[name]]
            curves[name][measure] = {"points": _sweep(alone, teacher, values, test),
                                     "chosen": [quality[-1]["kept_share"], quality[-1]["recall@1"],
                                                quality[-1]["ndcg@10"]]}
    return quality, timing, curves


def _bounds(queries, student, teacher):
    """The recall@1 a cascade of these two lies between: always picking the worse ranking, always the better one."""
    rows = [(_score("", "", [q], [s])["recall@1"], _score("", "", [q], [t])["recall@1"])
            for q, s, t in zip(queries, student, teacher)]
    return [float(np.mean([min(r) for r in rows])), float(np.mean([max(r) for r in rows]))]


def run(size, out, checkpoint=None, *, target=TARGET, seed=0, spec=None, log=log):
    spec = SIZES[size] if spec is None else spec
    name = SUITE + ("-quick" if size == "quick" else "")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    env = environment(torch.device("cpu"))
    minilm = DenseEncoder(device="cpu", show_progress=False)
    summary = None
    dense = [s for s in spec["students"] if s != "bm25"]
    if dense and checkpoint is None:
        checkpoint, summary = train_student(minilm, spec, out, name, SUITE, log)
    elif dense:
        checkpoint = Path(checkpoint)
        beside = summary_path(checkpoint)
        summary = json.loads(beside.read_text()) if beside.is_file() else None
    chunks = chunk_documents(corpus(), chunk_tokens=200, overlap=40, tokenizer=minilm.tokenizer)
    queries = load_queries()
    chunks, questions = select(chunks, queries["train"] + queries["test"], spec["chunks_per_topic"],
                                spec["questions"], seed)
    validation, test = split(questions, seed)
    log(f"[{SUITE}] {len(chunks)} chunks of {len({c.metadata['source_id'] for c in chunks})} topics; "
        f"{len(validation)} validation and {len(test)} test questions")
    encoders, int8_agreement = _students(dense, checkpoint, chunks)
    pairs, teacher_base = {}, None
    for student_name, encoder in encoders.items():
        built = time.perf_counter()
        if teacher_base is None:
            cascade = retrieval_cascade(chunks, encoder, minilm, k=DEPTH, index_kind="flat")
            student_base, teacher_base = cascade.student.knowledge_base, cascade.teacher.knowledge_base
        else:
            student_base = KnowledgeBase.build(chunks, as_retrieval_encoder(encoder), index_kind="flat")
        pairs[student_name] = (KnowledgeBaseAnswerer(student_base, k=DEPTH, by_document=True), "dense")
        log(f"[{SUITE}] {student_name}: knowledge base{'s' if len(pairs) == 1 else ''} built in "
            f"{time.perf_counter() - built:.0f} s")
    if teacher_base is None:
        teacher_base = KnowledgeBase.build(chunks, minilm, index_kind="flat")
    teacher = KnowledgeBaseAnswerer(teacher_base, k=DEPTH, by_document=True)
    if "bm25" in spec["students"]:
        pairs["bm25"] = (KnowledgeBaseAnswerer(teacher_base, k=DEPTH, mode="bm25", by_document=True), "bm25")
    students = {student: mode for student, (_, mode) in pairs.items()}
    models, cascades, recorded = {"teacher": teacher}, {}, Recorded(teacher)
    for student_name, (answerer, mode) in pairs.items():
        models[student_name] = answerer
        cascades[student_name] = _cascades(student_name, Recorded(models[student_name]), recorded, mode, validation,
                                           test, target, log)
        models.update({(student_name, m): c.run for m, (c, _) in cascades[student_name].items()})
    log(f"[{SUITE}] timing {len(models)} models over the {len(test)} test questions ({spec['repeats']} passes "
        f"each) ...")
    answers, per_query, seconds, load = _passes(models, [q["query"] for q in test], spec["repeats"])
    quality, timing, curves = _rows(students, cascades, test, answers, per_query, seconds, load)
    for row, times in zip(quality, timing):
        if row["measure"] is not None:
            log(f"[{SUITE}] {row['method']}: keeps {row['kept_share']:.0%} of the test questions, recall@1 "
                f"{row['recall@1']:.3f}, saves {times['time_saved']:+.0%}")
    flagged = flag_under_load(timing, LOAD_LIMIT)
    result = {
        "suite": SUITE, "size": size, "seed": seed, "target_agreement": target, "measures": list(MEASURES),
        "score_temperature": TEMPERATURE,
        "data": {"corpus": "pydoc_data.topics", "chunks": len(chunks),
                 "topics": len({c.metadata["source_id"] for c in chunks}), "validation": len(validation),
                 "test": len(test), "test_ids": [q["id"] for q in test], "depth": DEPTH},
        "teacher": minilm.name, "students": list(pairs), "checkpoint": None if checkpoint is None else str(checkpoint),
        "training": None if summary is None else {key: summary[key] for key in summary if key != "history"},
        "int8_agreement": int8_agreement, "quality": quality, "timing": timing, "curves": curves,
        "load_limit": LOAD_LIMIT, "flagged": [f"{r['method']}: {r['flagged']}" for r in flagged],
        "seconds": time.perf_counter() - started, "environment": env,
    }
    write_json(out / f"{name}.json", result)
    plot(result, out / f"{name}.png")
    return result, out / f"{name}.png"


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    students = result["students"]
    figure, axes = plt.subplots(1, len(students) + 1, figsize=(4 * len(students) + 5, 4),
                                gridspec_kw={"width_ratios": [1] * len(students) + [1.4]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    teacher = next(r for r in result["quality"] if r["student"] is None)
    values = [r["recall@1"] for r in result["quality"]] + [
        point[1] for curves in result["curves"].values() for curve in curves.values() for point in curve["points"]]
    for axis, student in zip(axes, students):
        alone = next(r for r in result["quality"] if r["student"] == student and r["measure"] is None)
        for color, (measure, curve) in zip(colors, result["curves"][student].items()):
            kept, recall, _ = zip(*sorted(curve["points"]))
            axis.plot(kept, recall, color=color, linewidth=1.2, label=f"cascade, {measure} (every threshold)")
            axis.plot(*curve["chosen"][:2], marker="o", color=color, linestyle="none")
        axis.set_ylim(min(values) - 0.03, max(values) + 0.03)
        axis.axhline(teacher["recall@1"], color="black", linestyle="--", linewidth=1, label="teacher (MiniLM) alone")
        axis.axhline(alone["recall@1"], color="gray", linestyle=":", linewidth=1, label="student alone")
        axis.set_xlim(-0.02, 1.02)
        axis.set_xlabel("share of test questions the student keeps")
        axis.grid(True, alpha=0.3)
        axis.set_title(f"student {student}", fontsize=10)
    axes[0].set_ylabel(f"recall@1 ({result['data']['test']} test questions)")
    timing = result["timing"]
    positions = np.arange(len(timing))
    plot_bars(axes[-1], positions, [r["ms_per_query"] for r in timing], [bool(r["flagged"]) for r in timing],
              color=[colors[MEASURES.index(r["measure"])] if r["measure"] else "gray" for r in timing])
    axes[-1].set_xticks(positions, [r["method"].replace(" -> minilm, ", "\n") for r in timing], rotation=60,
                        ha="right", fontsize=7)
    axes[-1].set_ylabel("ms per query (median pass)")
    axes[-1].grid(True, axis="y", alpha=0.3)
    threads = result["environment"]["cpu_threads"]
    axes[-1].set_title(f"time, {threads} thread{'s' if threads > 1 else ''}, load avg "
                       f"{result['environment']['load_avg_1m']:.1f}", fontsize=10)
    figure.suptitle(f"TeacherStudentCascade on pydoc questions ({result['size']}, target agreement "
                    f"{result['target_agreement']:g}; dots: the threshold calibrated on validation); "
                    f"{result['environment']['device']}", fontsize=9)
    figure_legend(figure, axes[:-1], ncol=4)
    if result["flagged"]:
        figure.text(0.99, 0.005, f"hatched: timed under other load above {result['load_limit']:.0%} (flagged)",
                    ha="right", va="bottom", fontsize=8, color="firebrick")
    figure.tight_layout(rect=(0, 0.08, 1, 0.95))
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def tables(result):
    data = result["data"]
    return "\n\n".join([
        format_table(f"Quality on the test half ({data['test']} questions; {data['chunks']} chunks of {data['topics']} "
                     f"topics; threshold calibrated on {data['validation']} validation questions for agreement >= "
                     f"{result['target_agreement']:g} with the teacher; kept = answered by the student; agree = top-1 "
                     f"topic is the teacher's)", result["quality"], QUALITY_COLUMNS),
        format_table(f"Time per query (median of whole passes over the test half; load: other processes' share of "
                     f"the CPU; * = above {result['load_limit']:.0%}, flagged)", result["timing"], TIME_COLUMNS)])


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cascade_quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="each topic's first 3 chunks, 100 questions, a student trained 20 steps on short "
                             "passages, no int8 student, 2 timed passes (full: 821 chunks, 184 questions, "
                             "encoder_quality's 700 steps, int8 too, 5 passes)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="use this HybridEncoder checkpoint as the student instead of training one (e.g. the "
                             "encoder_quality.pt benchmarks.encoder_quality wrote)")
    parser.add_argument("--target", type=float, default=TARGET,
                        help=f"target agreement with the teacher of the kept answers, in (0, 1] (default {TARGET})")
    parser.add_argument("--seed", type=int, default=0,
                        help="validation/test split and --quick's sample of questions (default 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's choice)")
    add_output_options(parser, SUITE, files='the JSON, PNG and checkpoint', record_needs='full size, trained in the run, a clean checkout, no row flagged')
    args = parser.parse_args(argv)
    out = args.out or RUNS_ROOT / device_slug(torch.device("cpu")) / SUITE
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if not 0 < args.target <= 1:
        parser.error(f"--target must be in (0, 1], got {args.target}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if args.checkpoint is not None and not args.checkpoint.is_file():
        parser.error(f"--checkpoint {args.checkpoint}: no such file")
    if args.record and args.checkpoint is not None:
        parser.error("--record records a student trained in the run: drop --checkpoint")
    check_output_options(parser, out, record=args.record, quick=args.quick)
    if args.threads:
        torch.set_num_threads(args.threads)
    result, png = run("quick" if args.quick else "full", out, args.checkpoint, target=args.target, seed=args.seed)
    print(tables(result))
    print(f"{result['seconds']:.0f} s ({result['environment']['cpu_threads']} thread(s), load average "
          f"{result['environment']['load_avg_1m']:.1f} at the start); wrote {out}")
    if args.record:
        if result["flagged"]:
            print(f"not recorded: {len(result['flagged'])} timing rows were timed under other load above "
                  f"{LOAD_LIMIT:.0%} ({'; '.join(result['flagged'])}); run again on a quiet machine", file=sys.stderr)
            return 1
        for path in record_run(SUITE, result, png):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
