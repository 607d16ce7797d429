"""Research experiments: every method on every question, for a base configuration and one-field sweeps around it.

    from hybridrag.system.experiments import run_research_experiment
    summary = run_research_experiment({"encoder": "hashing-256"}, "questions.jsonl", out_dir="runs/exp",
                                      documents=docs, sweeps={"retriever.top_k": [2, 8]})

Each configuration is the base one, or the base with one field changed (a dotted key into SystemConfig.to_dict()).
The language model is loaded once per model setting (model_path, cache_dir, attn_implementation, int8, device) and
the knowledge base built once per retrieval setting (encoder, index_kind, attention.segment_length,
attention.window_overlap), so a sweep of window_size or top_k costs answers only.

Per (configuration, method) the summary gives:
- accuracy: means of evaluation.score_answer's exact_match, contains_gold and token_f1 against the golds;
- success_rate: the share of non-empty answers;
- context_quality: the retrieval hit rate, the share of questions whose gold answer (any of them, normalized, as
  whole words, as contains_gold) occurs in at least one retrieved passage (None for "direct", which retrieves
  nothing); topic_hit_rate likewise, for questions with a "topic": a retrieved passage comes from that document;
- attention_quality, entropy, focus, coverage: means over the answers whose attention mass was measured
  (attn_implementation="hybridrag", methods hybrid and base_rag), defined as in
  HybridRAGSystem.analyze_attention_patterns and computed from the same answer (no second generation);
- first_token_s, total_s (wall time of generate_response, retrieval included), tokens_per_second: means. The
  attention mass is measured in every hybrid and base_rag answer, so both pay its cost alike.
"""
import json
import math
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from tqdm import tqdm

from .config import SystemConfig
from .evaluation import contains_gold, score_answer
from .system import _support, create_hybrid_rag_system

METHODS = ("hybrid", "base_rag", "direct")
# fields the knowledge base is built from, and fields the language model is loaded from
KB_FIELDS = ("encoder", "index_kind", "attention.segment_length", "attention.window_overlap")
MODEL_FIELDS = ("model_path", "cache_dir", "attn_implementation", "int8", "device", "reader_adapter")
BASE = "base"
ACCURACY = ("exact_match", "contains_gold", "token_f1")
ANALYSIS = ("attention_quality", "entropy", "focus", "coverage")
TIMES = ("first_token_s", "total_s", "tokens_per_second")


def run_research_experiment(config, questions, *, out_dir, methods=METHODS, sweeps=None, documents=None,
                            system=None, progress=None, sweep_methods=None):
    """Run every method on every question for each configuration; write results.json and four PNGs to out_dir.

    Args:
        config: anything SystemConfig.from_any takes, the base configuration (None with `system`: its config).
        questions: a list of {"id", "question", "answers": [gold, ...]} dicts (other keys kept, "topic" used), or
            the path of a JSONL file of them.
        methods: a non-empty subset of ("hybrid", "base_rag", "direct").
        sweeps: {dotted field: [values]}, e.g. {"retriever.top_k": [2, 8], "passage_cache": [True, False]}: each
            value is one configuration, the base with only that field changed (a value equal to the base's is the
            base configuration, not run twice).
        sweep_methods: the methods the sweep configurations run (default: `methods`), e.g. ("hybrid",) for a
            field only the hybrid method reads (reader_adapter).
        documents: a list of Document to build the knowledge base from. Needed unless `system` has a knowledge
            base and no sweep changes a field it is built from (KB_FIELDS).
        system: a HybridRAGSystem whose language model (and knowledge base, for configurations with its
            retrieval settings) is reused.
        progress: None (a tqdm bar on stderr when it is a terminal), True (always) or False (never).

    Returns the summary: {"methods", "configs" (labels in run order), "sweeps" ({field: [{"value", "config"}]}),
    "questions" (count), "rows" (one per configuration and method, the metrics of the module docstring),
    "out_dir", "files"}. results.json holds it with "records" (one per answer), "configs" (label: to_dict()),
    "environment" and "duration_s".
    """
    started = time.perf_counter()
    questions = load_questions(questions)
    methods = _check_methods(methods)
    sweep_methods = methods if sweep_methods is None else _check_methods(sweep_methods, "sweep_methods")
    base = SystemConfig.from_any(system.config if config is None and system is not None else config)
    configs, sweep_points = expand_sweeps(base, sweeps)
    models, knowledge_bases = _reusable_parts(system)
    _check_documents(documents, configs, knowledge_bases)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    environment = _environment_start(base)
    records = []
    plan = {label: methods if label == BASE else sweep_methods for label in configs}
    bar = tqdm(total=sum(map(len, plan.values())) * len(questions), unit="answer", file=sys.stderr,
               disable=None if progress is None else not progress, dynamic_ncols=True, mininterval=0.5)
    with bar:
        for label, cfg in configs.items():
            bar.set_description(label)
            rag = _system_for(cfg, models, knowledge_bases, documents)
            for question in questions:
                for method in plan[label]:
                    records.append(answer_record(rag, label, method, question))
                    bar.update()
    every = [m for m in METHODS if m in methods or (len(configs) > 1 and m in sweep_methods)]
    summary = {"methods": every, "sweep_methods": list(sweep_methods), "configs": list(configs),
               "sweeps": sweep_points,
               "questions": len(questions), "rows": summarize_records(records, plan),
               "out_dir": str(out_dir), "files": []}
    summary["files"] = [str(path) for path in write_plots(summary, records, out_dir)]
    payload = {"summary": summary, "configs": {label: cfg.to_dict() for label, cfg in configs.items()},
               "environment": _environment_end(environment), "duration_s": time.perf_counter() - started,
               "records": records}
    results = out_dir / "results.json"
    results.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    summary["files"].insert(0, str(results))
    return summary


# ---------------------------------------------------------------------------------------------------- inputs

def load_questions(questions):
    """The checked list of question dicts (from a list, or a JSONL path); ValueError naming the bad one."""
    if isinstance(questions, (str, Path)):
        path = Path(questions)
        if not path.is_file():
            raise FileNotFoundError(f"no such questions file: {path}")
        lines = path.read_text(encoding="utf-8").splitlines()
        questions = [json.loads(line) for line in lines if line.strip()]
    if not isinstance(questions, (list, tuple)) or not questions:
        raise ValueError(f"questions must be a non-empty list of {{'id', 'question', 'answers'}} dicts or a JSONL "
                         f"path, got {questions!r}")
    seen = set()
    for position, q in enumerate(questions):
        where = f"questions[{position}]"
        if not isinstance(q, dict) or not {"id", "question", "answers"} <= set(q):
            raise ValueError(f"{where} must be a dict with 'id', 'question' and 'answers', got {q!r}")
        if q["id"] in seen:
            raise ValueError(f"{where}: duplicate id {q['id']!r}")
        seen.add(q["id"])
        if not isinstance(q["question"], str) or not q["question"].strip():
            raise ValueError(f"{where} ({q['id']}): question must be a non-empty str, got {q['question']!r}")
        if not isinstance(q["answers"], list):
            raise ValueError(f"{where} ({q['id']}): answers must be a list of gold strings, got {q['answers']!r}")
        score_answer("", q["answers"])  # refuses golds that are not strings or normalize to nothing
    return list(questions)


def _check_methods(methods, name="methods"):
    methods = (methods,) if isinstance(methods, str) else tuple(methods)
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown or len(set(methods)) != len(methods):
        raise ValueError(f"{name} must be distinct names out of {METHODS}, got {list(methods)}")
    return methods


def dotted_fields(config):
    """{"attention.window_size": value, ...}: every leaf of config.to_dict()."""
    fields = {}
    for key, value in config.to_dict().items():
        if isinstance(value, dict):
            fields.update({f"{key}.{inner}": v for inner, v in value.items()})
        else:
            fields[key] = value
    return fields


def with_field(config, key, value):
    """A new SystemConfig: `config` with the dotted field `key` set to `value` (checked by SystemConfig)."""
    values = config.to_dict()
    section, _, name = key.rpartition(".")
    (values[section] if section else values)[name] = value
    return SystemConfig.from_any(values)


def expand_sweeps(base, sweeps):
    """({label: SystemConfig} with "base" first, {field: [{"value", "config": label}]})."""
    configs, points = {BASE: base}, {}
    if sweeps is None:
        return configs, points
    if not isinstance(sweeps, dict):
        raise ValueError(f"sweeps must be a dict {{dotted field: [values]}}, got {sweeps!r}")
    known = dotted_fields(base)
    for key, values in sweeps.items():
        if key not in known:
            raise ValueError(f"sweeps: unknown field {key!r}; known fields: {sorted(known)}")
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"sweeps[{key!r}] must be a non-empty list of values, got {values!r}")
        points[key] = []
        for value in values:
            label = BASE if value == known[key] and type(value) is type(known[key]) else f"{key}={value}"
            configs.setdefault(label, with_field(base, key, value))
            points[key].append({"value": value, "config": label})
    return configs, points


def _key(config, names):
    fields = dotted_fields(config)
    return tuple(fields[name] for name in names)


def _reusable_parts(system):
    """({model key: LanguageModel}, {knowledge base key: KnowledgeBase}) from `system` (empty without)."""
    if system is None:
        return {}, {}
    models = {_key(system.config, MODEL_FIELDS): system.language_model}
    kbs = {} if system.knowledge_base is None else {_key(system.config, KB_FIELDS): system.knowledge_base}
    return models, kbs


def _check_documents(documents, configs, knowledge_bases):
    if documents is not None and (not isinstance(documents, (list, tuple)) or not documents):
        raise ValueError(f"documents must be None or a non-empty list of Document, got {documents!r}")
    missing = [label for label, cfg in configs.items() if _key(cfg, KB_FIELDS) not in knowledge_bases]
    if missing and documents is None:
        raise ValueError(f"configurations {missing} need a knowledge base built with their settings "
                         f"({', '.join(KB_FIELDS)}): pass documents= (or a system= built with those settings)")


def _system_for(config, models, knowledge_bases, documents):
    """A HybridRAGSystem for `config`, with the loaded model and the built knowledge base reused when they fit."""
    model_key, kb_key = _key(config, MODEL_FIELDS), _key(config, KB_FIELDS)
    rag = create_hybrid_rag_system(config, language_model=models.get(model_key))
    if model_key in models:
        config.attention.check_against_model(models[model_key].model.config)
    else:
        models[model_key] = rag.language_model
    if kb_key in knowledge_bases:
        config.retriever.check_against_encoder(knowledge_bases[kb_key].encoder.dimension)
        rag.knowledge_base = knowledge_bases[kb_key]
    else:
        knowledge_bases[kb_key] = rag.create_vectorstore(list(documents))
    return rag


# ---------------------------------------------------------------------------------------------------- answers

def answer_record(rag, label, method, question):
    """One answer of `rag` to `question` by `method`, scored: a JSON-ready dict."""
    start = time.perf_counter()
    result = rag.generate_response(question["question"], method=method, measure_attention=method != "direct")
    total = time.perf_counter() - start
    passages = result["passages"]
    record = {"config": label, "method": method, "question_id": question["id"], "question": question["question"],
              "answers": question["answers"], "response": result["response"],
              "scores": score_answer(result["response"], question["answers"]), "success": result["success"],
              "timings": {**result["timings"], "total": round(total, 6)},
              "tokens_per_second": result["tokens_per_second"], "prompt_tokens": result["prompt_tokens"],
              "passages": _passage_rows(passages), "citations": result["citations"],
              "context_hit": None, "topic_hit": None, "analysis": None}
    if method != "direct":
        record["context_hit"] = any(contains_gold(p["text"], question["answers"]) == 1.0 for p in passages)
        if "topic" in question:
            sources = [rag.knowledge_base.get(p["id"]).metadata.get("source_id") for p in passages]
            record["topic_hit"] = question["topic"] in sources
        record["analysis"] = attention_analysis(result["response"], passages)
    return record


def _passage_rows(passages):
    total = sum(p["attention_mass"] or 0.0 for p in passages)
    return [{"id": p["id"], "score": p["score"], "attention_mass": p["attention_mass"],
             "share": p["attention_mass"] / total if p["attention_mass"] is not None and total > 0 else None}
            for p in passages]


def attention_analysis(response, passages):
    """{"per_passage", "entropy", "focus", "coverage", "attention_quality"} from the passages' attention masses
    (the answer rows' mass averaged over layers and heads, as analyze_attention_patterns), or None unmeasured."""
    masses = [p["attention_mass"] for p in passages]
    if not masses or any(m is None for m in masses) or sum(masses) <= 0:
        return None
    total = sum(masses)
    share = [m / total for m in masses]
    k = len(share)
    entropy = -sum(s * math.log(max(s, 1e-30)) for s in share) / math.log(k) if k > 1 else 0.0
    support = [_support(response, p["text"]) for p in passages]
    return {"per_passage": share, "entropy": entropy, "focus": max(share),
            "coverage": sum(s >= 0.5 / k for s in share) / k,
            "attention_quality": sum(s * u for s, u in zip(share, support))}


# ---------------------------------------------------------------------------------------------------- summary

def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize_records(records, plan):
    """One row of metrics (module docstring) per configuration and method, in run order; plan: {configuration
    label: the methods it ran}."""
    rows = []
    for label, methods in plan.items():
        for method in methods:
            mine = [r for r in records if r["config"] == label and r["method"] == method]
            rows.append(_row(label, method, mine))
    return rows


def _row(label, method, records):
    analyses = [r["analysis"] for r in records if r["analysis"] is not None]
    row = {"config": label, "method": method, "answers": len(records)}
    row.update({name: _mean([r["scores"][name] for r in records]) for name in ACCURACY})
    row["success_rate"] = _mean([float(r["success"]) for r in records])
    row["context_quality"] = _mean([None if r["context_hit"] is None else float(r["context_hit"]) for r in records])
    row["topic_hit_rate"] = _mean([None if r["topic_hit"] is None else float(r["topic_hit"]) for r in records])
    row.update({name: _mean([a[name] for a in analyses]) for name in ANALYSIS})
    row["attention_measured"] = len(analyses)
    row["first_token_s"] = _mean([r["timings"]["first_token"] for r in records])
    row["total_s"] = _mean([r["timings"]["total"] for r in records])
    row["tokens_per_second"] = _mean([r["tokens_per_second"] for r in records])
    return row


# ---------------------------------------------------------------------------------------------------- environment

def _version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git_commit():
    """HEAD of the checkout this package runs from, "-dirty" when files differ; None outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True)
    except FileNotFoundError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def _environment_start(config):
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": _version("transformers"),
            "hybridrag": _version("hybridrag"), "platform": platform.platform(), "processor": _cpu_model(),
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": config.device,
            "cuda_device": torch.cuda.get_device_name(config.device) if config.device.startswith("cuda") else None,
            "git_commit": _git_commit(), "load_avg_before": list(os.getloadavg()),
            "_wall": time.perf_counter(), "_cpu": time.process_time()}


def _environment_end(environment):
    """The environment with load_avg_after and own_cpu_share (this process's CPU seconds over wall seconds)."""
    environment = dict(environment)
    wall, cpu = time.perf_counter() - environment.pop("_wall"), time.process_time() - environment.pop("_cpu")
    environment.update(load_avg_after=list(os.getloadavg()), own_cpu_share=cpu / max(wall, 1e-9))
    return environment


def _cpu_model():
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------------- plots

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def write_plots(summary, records, out_dir):
    """The four PNGs of the experiment in out_dir; returns their paths."""
    plt = _pyplot()
    paths = [plot_methods(plt, summary, out_dir / "method_comparison.png"),
             plot_configurations(plt, summary, out_dir / "configuration_comparison.png"),
             plot_attention_quality(plt, records, out_dir / "attention_quality.png"),
             plot_attention_patterns(plt, records, out_dir / "attention_patterns.png")]
    return paths


def _save(plt, figure, path):
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_methods(plt, summary, path):
    """Accuracy, success and context quality per method, base configuration; when the sweeps ran only some of the
    methods (sweep_methods), their rows too, labelled with the swept value."""
    rows = [(r["method"], r) for r in summary["rows"] if r["config"] == BASE]
    if any(r["config"] == BASE and r["method"] not in summary["sweep_methods"] for r in summary["rows"]):
        rows += [(f"{r['method']}, {_tick(r['config'].partition('=')[2])}", r) for r in summary["rows"]
                 if r["config"] != BASE]
    metrics = (*ACCURACY, "success_rate", "context_quality", "attention_quality")
    figure, axes = plt.subplots(figsize=(8.5, 3.6))
    width = 0.8 / len(rows)
    for i, (label, row) in enumerate(rows):
        axes.bar([m + i * width for m in range(len(metrics))], [row[m] or 0.0 for m in metrics], width,
                 label=label)
    axes.set_xticks([m + 0.4 - width / 2 for m in range(len(metrics))], metrics, fontsize=8)
    axes.set_ylim(0, 1)
    axes.grid(True, axis="y", alpha=0.3)
    axes.set_title(f"methods on {summary['questions']} questions (base configuration; missing = 0)", fontsize=9)
    axes.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(plt, figure, path)


def plot_configurations(plt, summary, path):
    """contains_gold and first-token time per sweep value, a line per method; the base alone without sweeps."""
    sweeps = summary["sweeps"] or {"(no sweep)": [{"value": BASE, "config": BASE}]}
    figure, axes = plt.subplots(2, len(sweeps), figsize=(3.4 * len(sweeps) + 1.6, 5.2), squeeze=False)
    by_key = {(r["config"], r["method"]): r for r in summary["rows"]}
    for column, (field, points) in enumerate(sweeps.items()):
        for row, metric in enumerate(("contains_gold", "first_token_s")):
            axis = axes[row][column]
            for method in summary["methods"]:  # a method the sweep did not run (sweep_methods) has base's point only
                present = [(i, by_key[p["config"], method][metric]) for i, p in enumerate(points)
                           if (p["config"], method) in by_key]
                axis.plot(*zip(*present), marker="o", label=method)
            axis.set_xticks(range(len(points)), [_tick(p["value"]) for p in points], fontsize=8)
            axis.set_xlabel(field, fontsize=8)
            axis.set_ylabel(metric, fontsize=8)
            axis.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.suptitle("configurations: one field changed at a time from the base", fontsize=9)
    return _save(plt, figure, path)


def _tick(value):
    """A sweep value as an axis label: a path by its file name."""
    return Path(value).name if isinstance(value, str) and ("/" in value or "\\" in value) else str(value)


def plot_attention_quality(plt, records, path):
    """A point per measured answer: attention quality against token F1; filled when the gold is contained."""
    figure, axes = plt.subplots(figsize=(6, 4))
    for method, color in (("hybrid", "tab:blue"), ("base_rag", "tab:orange")):
        mine = [r for r in records if r["method"] == method and r["analysis"] is not None]
        if not mine:
            continue
        for hit in (True, False):
            points = [r for r in mine if (r["scores"]["contains_gold"] == 1.0) == hit]
            axes.scatter([r["analysis"]["attention_quality"] for r in points],
                         [r["scores"]["token_f1"] for r in points], s=18, alpha=0.7, edgecolors=color,
                         facecolors=color if hit else "none",
                         label=f"{method}, gold {'contained' if hit else 'missed'} ({len(points)})")
    axes.set_xlabel("attention quality (answer-supporting share of passage attention)", fontsize=8)
    axes.set_ylabel("token F1", fontsize=8)
    axes.set_xlim(-0.02, 1.02)
    axes.set_ylim(-0.02, 1.02)
    axes.grid(True, alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=7)
    else:
        axes.text(0.5, 0.5, "no attention mass measured", ha="center", transform=axes.transAxes)
    return _save(plt, figure, path)


def plot_attention_patterns(plt, records, path):
    """Mean share of the passage attention by retrieval rank, per method, base configuration."""
    figure, axes = plt.subplots(figsize=(6, 3.6))
    methods = [m for m in ("hybrid", "base_rag")
               if any(r["method"] == m and r["analysis"] and r["config"] == BASE for r in records)]
    width = 0.8 / max(len(methods), 1)
    for i, method in enumerate(methods):
        shares = [r["analysis"]["per_passage"] for r in records
                  if r["method"] == method and r["analysis"] and r["config"] == BASE]
        ranks = max(len(s) for s in shares)
        means = [_mean([s[k] if k < len(s) else None for s in shares]) for k in range(ranks)]
        axes.bar([k + 1 + (i - (len(methods) - 1) / 2) * width for k in range(ranks)], means, width, label=method)
    axes.set_xlabel("rank of the passage in retrieval", fontsize=8)
    axes.set_ylabel("mean share of passage attention", fontsize=8)
    axes.grid(True, axis="y", alpha=0.3)
    if methods:
        axes.set_xticks(range(1, ranks + 1))
        axes.axhline(1 / ranks, color="gray", linestyle="--", linewidth=0.8, label="uniform")
        axes.legend(fontsize=7)
    else:
        axes.text(0.5, 0.5, "no attention mass measured", ha="center", transform=axes.transAxes)
    axes.set_title("where the answer's attention went, by retrieval rank (base configuration)", fontsize=9)
    return _save(plt, figure, path)
