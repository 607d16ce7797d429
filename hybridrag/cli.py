"""Command line of the hybrid RAG system: ask questions over your documents with the offline model.

    hybridrag ask "What does the assert statement raise?" --docs notes/ faq.md
    hybridrag ask "What does the assert statement raise?" --docs notes/ --save my-system/   # build once, keep it
    hybridrag ask "How do I leave a loop early?" --system my-system/ --method base_rag --json
    hybridrag ask "Is this about loops?" --system my-system/ --task classification --labels yes,no
    hybridrag compare "How do I leave a loop early?" --system my-system/
    hybridrag analyze "How do I leave a loop early?" --system my-system/ --plot attention.png
    hybridrag experiment questions.jsonl --system my-system/ --out runs/top-k --sweep retriever.top_k=2,4,8
    hybridrag serve --kb served/ --docs notes/ --port 8000      # HTTP API; later runs: hybridrag serve --kb served/
    hybridrag train-generator --kb served/ --out gen.pt   # synthetic passages: serve --kb served/ --generator gen.pt
    python -m hybridrag ...                                                                  # the same

--docs takes .txt, .md and .jsonl files and folders of them; --system a folder written by --save (or by
HybridRAGSystem.save). --config names a JSON/YAML SystemConfig for building from --docs; --encoder,
--max-new-tokens and --top-k override single fields of it (--encoder hashing-256 skips loading MiniLM: quick, crude
retrieval). `ask` streams the answer to stdout as it is generated, then lists the passages used and the timings on
stderr; --json prints one JSON object on stdout instead.

`experiment` takes a JSONL file of {"id", "question", "answers": [gold, ...]} instead of a question and runs
hybridrag.system.experiments.run_research_experiment: each of --methods (default all three) on each question (the
first --limit N), for the configuration and for each --sweep FIELD=V1,V2 (a dotted SystemConfig field, one changed
at a time; values read as JSON when they parse: 8, 0.5, true, null, else as strings). It writes results.json and four
PNGs into --out, prints the summary table (or the summary JSON with --json) and lists the files on stderr.

Errors (bad arguments, missing or unreadable files, a prompt too long for the model) print one line
`hybridrag: error: ...` on stderr and exit with status 2; Ctrl-C exits with 130. Anything else is a bug and shows its
traceback.
"""
import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from ._argparse import one_line_parser, positive_int

PROG = "hybridrag"
METHODS = ("hybrid", "base_rag", "direct")
TASKS = ("qa", "generation", "classification")


_Parser = one_line_parser(f"{PROG}: ")  # usage errors in one line like every other error (status 2)


def _methods(text):
    """argparse type: a comma-separated list of distinct methods."""
    methods = [method.strip() for method in text.split(",")]
    unknown = [method for method in methods if method not in METHODS]
    if unknown or len(set(methods)) != len(methods):
        raise argparse.ArgumentTypeError(f"{text!r} must be distinct methods out of {','.join(METHODS)} separated by "
                                         f"commas{f', unknown {unknown}' if unknown else ''}")
    return methods


def _sweep_value(text):
    """A --sweep value: JSON when it parses (8, 0.5, true, null, "x"), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _sweep(text):
    """argparse type: FIELD=V1,V2,... as (field, [values])."""
    field, equals, values = text.partition("=")
    values = [value.strip() for value in values.split(",")]
    if not equals or not field.strip() or not all(values):
        raise argparse.ArgumentTypeError(f"{text!r} must be FIELD=V1,V2,... (a dotted config field such as "
                                         "retriever.top_k, then one or more values separated by commas)")
    return field.strip(), [_sweep_value(value) for value in values]


def _common_options(question=True):
    """The options every command shares: where the system comes from, config overrides and --json; with `question`
    the positional question and --save, of the commands that answer one question."""
    common = argparse.ArgumentParser(add_help=False)
    if question:
        common.add_argument("question", help="the question (or request, or text to classify)")
    source = common.add_mutually_exclusive_group(required=True)
    source.add_argument("--docs", nargs="+", metavar="PATH", help="build from these files and folders "
                        "(.txt, .md, .jsonl)")
    source.add_argument("--system", metavar="DIR", help="a system saved with --save")
    common.add_argument("--config", metavar="FILE", help="a JSON/YAML SystemConfig (with --docs)")
    common.add_argument("--encoder", help="override the config's encoder: minilm, hashing-<dim> or a model folder "
                        "(with --docs)")
    common.add_argument("--max-new-tokens", type=positive_int, metavar="N", help="override generation."
                        "max_new_tokens")
    common.add_argument("--top-k", type=positive_int, metavar="N", help="override retriever.top_k")
    if question:
        common.add_argument("--save", metavar="DIR", help="save the system after building (later: --system DIR)")
    common.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return common


def _parser():
    parser = _Parser(prog=PROG, description=__doc__.split("\n")[0], epilog="examples:\n" + __doc__.split("\n\n")[1],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True,
                                     metavar="{ask,compare,analyze,experiment,serve,train-generator}")
    common = [_common_options()]

    ask = commands.add_parser("ask", parents=common, help="answer a question, streaming the answer")
    ask.add_argument("--method", choices=METHODS, default="hybrid", help="hybrid (cached passages, default), "
                     "base_rag (one prompt, full attention) or direct (no documents)")
    ask.add_argument("--task", choices=TASKS, default="qa", help="default qa")
    ask.add_argument("--labels", metavar="L1,L2", help="comma-separated labels (with --task classification)")

    commands.add_parser("compare", parents=common, help="answer with each method: answers and speeds side by side")

    analyze = commands.add_parser("analyze", parents=common, help="where the answer's attention went, per passage")
    analyze.add_argument("--method", choices=METHODS[:2], default="hybrid", help="default hybrid")
    analyze.add_argument("--plot", metavar="FILE.png", help="also write a heatmap (layers x passages) there")

    experiment = commands.add_parser("experiment", parents=[_common_options(question=False)], help="score methods and "
                                     "configurations on a questions file: summary table, results.json and plots")
    experiment.add_argument("questions", metavar="QUESTIONS.jsonl", help='one {"id", "question", "answers": '
                            '[gold, ...]} object a line')
    experiment.add_argument("--out", required=True, metavar="DIR", help="write results.json and the PNGs here")
    experiment.add_argument("--methods", type=_methods, default=list(METHODS), metavar="M1,M2",
                            help=f"methods to run, out of {','.join(METHODS)} (default all)")
    experiment.add_argument("--sweep", type=_sweep, action="append", default=[], metavar="FIELD=V1,V2",
                            help="also run the configuration with FIELD set to each value (repeatable: one field "
                            "changed at a time), e.g. retriever.top_k=2,8")
    experiment.add_argument("--limit", type=positive_int, metavar="N", help="only the first N questions")

    serve = commands.add_parser("serve", help="serve the system over HTTP (FastAPI + uvicorn): queries, streamed "
                                "answers, documents added and removed, kept in --kb")
    serve.add_argument("--kb", required=True, metavar="DIR", help="the state folder: the system saved there is "
                       "reloaded; a new folder is built from --docs first. Every change is saved back")
    serve.add_argument("--docs", nargs="+", metavar="PATH", help="build from these files and folders (a new --kb)")
    serve.add_argument("--config", metavar="FILE", help="a JSON/YAML SystemConfig (with --docs)")
    serve.add_argument("--encoder", help="override the config's encoder (with --docs)")
    serve.add_argument("--max-new-tokens", type=positive_int, metavar="N", help="override generation.max_new_tokens "
                       "(with --docs)")
    serve.add_argument("--top-k", type=positive_int, metavar="N", help="override retriever.top_k (with --docs)")
    serve.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="default 8000")
    serve.add_argument("--api-key", metavar="KEY", help="require header X-API-Key: KEY on the endpoints that change "
                       "state (default: $HYBRIDRAG_API_KEY; none: open)")
    serve.add_argument("--queue", type=positive_int, default=16, metavar="N", help="generation requests waiting at "
                       "most (more get 429 with Retry-After; default 16)")
    serve.add_argument("--timeout", type=float, default=120.0, metavar="S", help="seconds a request may take before "
                       "504 (default 120)")
    serve.add_argument("--cascade-measure", choices=("margin", "entropy", "attention"), default="margin",
                       help="the confidence /distillation/cascade's student is judged by (default margin: top-1 minus "
                       "top-2 retrieval score)")
    serve.add_argument("--cascade-threshold", type=float, metavar="T", help="/distillation/cascade keeps the student's "
                       "answer when its confidence is at least T (default: none, each request gives its own)")
    serve.add_argument("--hybrid-encoder", metavar="FILE", help="a HybridEncoder checkpoint: /query/hybrid retrieves "
                       "from its index of the knowledge base (built at start)")
    serve.add_argument("--generator", metavar="FILE", help="the document generator of /diffusion/generate (written by "
                       "train-generator for this --kb; default: none, the endpoint answers 409)")

    train = commands.add_parser("train-generator", help="train the diffusion document generator of a served "
                                "knowledge base (for serve --generator)")
    train.add_argument("--kb", required=True, metavar="DIR", help="the state folder of `serve` (or a --save folder)")
    train.add_argument("--out", required=True, metavar="FILE", help="the checkpoint to write")
    train.add_argument("--steps", type=positive_int, default=600, metavar="N", help="training steps (default 600)")
    train.add_argument("--length", type=positive_int, default=48, metavar="N", help="words per passage (default 48)")
    train.add_argument("--seed", type=int, default=0, help="default 0")
    return parser


# ---------------------------------------------------------------- checks before anything is loaded


def _labels(args):
    """--labels as a list (None without it); ValueError when it does not fit --task."""
    labels = getattr(args, "labels", None)
    task = getattr(args, "task", "qa")
    if labels is None:
        if task == "classification":
            raise ValueError("--task classification needs --labels L1,L2")
        return None
    if task != "classification":
        raise ValueError(f"--labels applies to --task classification only, got --task {task}")
    labels = [label.strip() for label in labels.split(",")]
    if len(labels) < 2 or not all(labels):
        raise ValueError(f"--labels must be two or more non-empty labels separated by commas, got {args.labels!r}")
    return labels


def _check_arguments(args):
    """ValueError (FileNotFoundError) for arguments that cannot work, before documents or the model are loaded."""
    if args.command != "experiment" and not args.question.strip():
        raise ValueError("the question is empty: ask something")
    if args.system is not None and args.config is not None:
        raise ValueError(f"--config applies to building from --docs; the system at {args.system} has its own "
                         "config.json")
    if getattr(args, "plot", None) is not None:
        _check_plot(args.plot)
    if args.command == "ask":
        _labels(args)
    if args.command == "experiment":
        fields = [field for field, _ in args.sweep]
        twice = sorted({field for field in fields if fields.count(field) > 1})
        if twice:
            raise ValueError(f"--sweep {twice[0]} given more than once: list all its values in one --sweep")


def _check_plot(plot):
    """The heatmap is written after the answer: its folder and matplotlib are checked first."""
    if not Path(plot).parent.is_dir():
        raise FileNotFoundError(f"--plot {plot}: no such folder {Path(plot).parent}")
    from ._optional import import_optional
    try:
        import_optional("matplotlib", "matplotlib>=3.7", extra="bench")
    except ImportError as error:
        raise ValueError(f"--plot needs matplotlib: {error}") from error


# ---------------------------------------------------------------- building the system


def _config(args, base):
    """The SystemConfig `base` (None, a path, or a SystemConfig) with the command line's overrides merged in."""
    from .system import SystemConfig

    values = SystemConfig.from_any(base).to_dict()
    if args.encoder is not None:
        values["encoder"] = args.encoder
    if args.max_new_tokens is not None:
        values["generation"]["max_new_tokens"] = args.max_new_tokens
    if args.top_k is not None:
        values["retriever"]["top_k"] = args.top_k
    return SystemConfig.from_any(values)


def _say(message):
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _load_documents(paths):
    """The documents of `paths`, a progress bar when stderr is a terminal, each warning as one line."""
    from .system import load_documents

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        documents = load_documents(paths, progress=None)
    for warning in caught:
        _say(f"warning: {' '.join(str(warning.message).split())}")
    return documents


def _load_system(args):
    """The HybridRAGSystem saved at --system, with the command line's overrides in its config."""
    from .system import HybridRAGSystem

    system = HybridRAGSystem.load(args.system)
    if args.encoder is not None and args.encoder != system.config.encoder:
        raise ValueError(f"--encoder applies to building from --docs; the system at {args.system} was built "
                         f"with encoder {system.config.encoder!r}")
    system.config = _config(args, system.config)
    return system


def _build(args):
    """The HybridRAGSystem of --docs or --system, saved to --save when given."""
    from .system import create_hybrid_rag_system

    if args.system is not None:
        system = _load_system(args)
    else:
        system = create_hybrid_rag_system(_config(args, args.config))
        documents = _load_documents(args.docs)
        start = time.perf_counter()
        knowledge_base = system.create_vectorstore(documents)
        _say(f"{len(documents)} documents -> {len(knowledge_base)} passages, encoder {system.config.encoder}, "
             f"in {time.perf_counter() - start:.1f} s")
    if args.save is not None:
        system.save(args.save)
        _say(f"saved the system to {args.save} (ask again with --system {args.save})")
    return system


# ---------------------------------------------------------------- the commands


def _ask(system, args, out, err):
    labels = _labels(args)
    if args.json:
        result = system.generate_response(args.question, method=args.method, task_type=args.task, labels=labels)
        print(json.dumps(result, indent=1), file=out)
        return
    streamed = []

    def on_token(piece):
        streamed.append(piece)
        out.write(piece)
        out.flush()

    result = system.generate_response(args.question, method=args.method, task_type=args.task, labels=labels,
                                      on_token=on_token)
    if not streamed:  # classification picks a label: nothing streams
        out.write(result["response"])
    print(file=out, flush=True)
    _report(result, err)


def _report(result, err):
    """The passages used and the timings, on `err`."""
    passages = result["passages"]
    if passages:
        print(f"passages ({result['method']}; * cited):", file=err)
        for rank, passage in enumerate(passages, 1):
            mass = passage["attention_mass"]
            mass = "-" if mass is None else f"{mass:.3f}"
            cited = " *" if passage["id"] in result["citations"] else ""
            print(f"  {rank}. {passage['id']}  score {passage['score']:.4f}  attention {mass}{cited}", file=err)
    if "label_scores" in result:
        scores = ", ".join(f"{label} {score:.3f}" for label, score in result["label_scores"].items())
        print(f"label scores (mean log-probability): {scores}", file=err)
    timings = ", ".join(f"{name.replace('_', ' ')} {seconds:.3f} s" for name, seconds in result["timings"].items())
    print(f"timings: {timings}; {result['tokens_per_second']:.1f} tokens/s; {result['prompt_tokens']} prompt tokens",
          file=err)


def _compare(system, args, out):
    results = system.compare_methods(args.question)
    if args.json:
        print(json.dumps(results, indent=1), file=out)
        return
    print(f"{'method':<9} {'answer':<60} {'first token s':>13} {'tokens/s':>9}", file=out)
    for method, result in results.items():
        answer = " ".join(result["response"].split())[:60]
        print(f"{method:<9} {answer:<60} {result['timings']['first_token']:>13.3f} "
              f"{result['tokens_per_second']:>9.1f}", file=out)


def _analyze(system, args, out):
    if system.config.attn_implementation != "hybridrag":
        raise ValueError("analyze needs attn_implementation 'hybridrag' (the attention mass comes from the kernels), "
                         f"the config has {system.config.attn_implementation!r}")
    analysis = system.analyze_attention_patterns(args.question, method=args.method, plot=args.plot)
    if args.json:
        print(json.dumps(analysis, indent=1), file=out)
        return
    print(f"answer: {analysis['response']}", file=out)
    print(f"entropy {analysis['entropy']:.3f}  focus {analysis['focus']:.3f}  coverage {analysis['coverage']:.3f}  "
          f"attention quality {analysis['attention_quality']:.3f}", file=out)
    print("share of the answer's attention per passage:", file=out)
    for identifier, share in zip(analysis["passage_ids"], analysis["per_passage"]):
        print(f"  {identifier}  {share:.3f}", file=out)
    if args.plot is not None:
        print(f"heatmap: {args.plot}", file=out)


# (header, width, row key, format) of the experiment's summary table
_EXPERIMENT_COLUMNS = (("exact match", 11, "exact_match", ".3f"), ("contains gold", 13, "contains_gold", ".3f"),
                       ("token F1", 8, "token_f1", ".3f"), ("success", 7, "success_rate", ".3f"),
                       ("context quality", 15, "context_quality", ".3f"),
                       ("attention quality", 17, "attention_quality", ".3f"),
                       ("first token s", 13, "first_token_s", ".3f"))


def _experiment(args, out, err):
    """run_research_experiment on the questions file, the documents of --docs or the system of --system."""
    from .system.experiments import expand_sweeps, load_questions, run_research_experiment

    questions = load_questions(args.questions)[:args.limit]
    sweeps = dict(args.sweep)
    if args.system is not None:
        system, config, documents = _load_system(args), None, None
        expand_sweeps(system.config, sweeps)  # unknown fields and bad values before any answer
    else:
        system, config = None, _config(args, args.config)
        expand_sweeps(config, sweeps)  # before the documents are read
        documents = _load_documents(args.docs)
    summary = run_research_experiment(config, questions, out_dir=args.out, methods=args.methods, sweeps=sweeps,
                                      documents=documents, system=system)
    if args.json:
        print(json.dumps(summary, indent=1), file=out)
    else:
        _experiment_table(summary, out)
    print(f"{len(summary['configs'])} configurations x {len(summary['methods'])} methods x {summary['questions']} "
          f"questions; wrote:", file=err)
    for path in summary["files"]:
        print(f"  {path}", file=err)


def _experiment_table(summary, out):
    width = max(len("config"), *(len(row["config"]) for row in summary["rows"]))
    header = " ".join(f"{name:>{size}}" for name, size, _, _ in _EXPERIMENT_COLUMNS)
    print(f"{'config':<{width}} {'method':<9} {header}", file=out)
    for row in summary["rows"]:
        cells = " ".join(f"{'-' if row[key] is None else format(row[key], spec):>{size}}"
                         for _, size, key, spec in _EXPERIMENT_COLUMNS)
        print(f"{row['config']:<{width}} {row['method']:<9} {cells}", file=out)


def run(args, out=None, err=None):
    """Run the parsed command; output to `out` (default sys.stdout), reports to `err` (default sys.stderr)."""
    out, err = out or sys.stdout, err or sys.stderr
    if args.command == "serve":
        _serve(args)
        return
    if args.command == "train-generator":
        _train_generator(args)
        return
    _check_arguments(args)
    if args.command == "experiment":
        _experiment(args, out, err)
        return
    system = _build(args)
    if args.command == "ask":
        _ask(system, args, out, err)
    elif args.command == "compare":
        _compare(system, args, out)
    else:
        _analyze(system, args, out)


def _serve(args):
    from .distillation.config import check_threshold
    from .server import open_system, serve

    if args.docs is None and any(v is not None for v in (args.config, args.encoder, args.max_new_tokens, args.top_k)):
        raise ValueError("--config, --encoder, --max-new-tokens and --top-k apply to building from --docs")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if not args.timeout > 0:
        raise ValueError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    if args.cascade_threshold is not None:
        check_threshold(args.cascade_threshold, args.cascade_measure, "--cascade-threshold")
    for flag, path in (("--generator", args.generator), ("--hybrid-encoder", args.hybrid_encoder)):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{flag} {path}: no such file")
    documents = _load_documents(args.docs) if args.docs is not None else None
    config = _config(args, args.config) if args.docs is not None else None
    system = open_system(args.kb, documents, config)
    generator = None
    if args.generator is not None:
        from .diffusion import DocumentGenerator
        generator = DocumentGenerator.load(args.generator, system.knowledge_base.encoder)
    hybrid_encoder = None
    if args.hybrid_encoder is not None:
        from .encoders import HybridEncoder
        hybrid_encoder = HybridEncoder.load(args.hybrid_encoder)
    _say(f"serving {len(system.knowledge_base)} passages from {args.kb} on http://{args.host}:{args.port} "
         f"(API docs at /docs)")
    serve(system, args.kb, host=args.host, port=args.port, api_key=args.api_key, capacity=args.queue,
          timeout_s=args.timeout, cascade_measure=args.cascade_measure, cascade_threshold=args.cascade_threshold,
          generator=generator, hybrid_encoder=hybrid_encoder)


def _train_generator(args):
    from .diffusion import DocumentGenerator
    from .diffusion.quality import SYNTHETIC
    from .system import load_knowledge_base

    knowledge_base = load_knowledge_base(args.kb)
    texts = [d.text for d in knowledge_base.documents if d.metadata.get(SYNTHETIC) is not True]  # real ones only
    _say(f"training a document generator on {len(texts)} passages of {args.kb} ({knowledge_base.encoder.name})")
    start = time.perf_counter()
    generator = DocumentGenerator.train(texts, knowledge_base.encoder, length=args.length, steps=args.steps,
                                        seed=args.seed)
    generator.save(args.out)
    _say(f"wrote {args.out} ({len(generator.vocabulary)} words, {time.perf_counter() - start:.0f} s)")


def error_line(error):
    """The one line printed for an expected error."""
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        message = f"{error.strerror}: {error.filename}"
    else:
        message = str(error)
    return f"{PROG}: error: {' '.join(message.split())}"


def main(argv=None):
    """Parse `argv` (default sys.argv[1:]), run, and return the exit status."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit:  # usage errors (2) and --help (0) as a status, like every other outcome
        return exit.code
    try:
        run(args)
    except (ValueError, TypeError, OSError) as error:
        print(error_line(error), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0
