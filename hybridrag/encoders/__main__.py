"""python -m hybridrag.encoders train | evaluate: train a HybridEncoder (distillation from the bundled
all-MiniLM-L6-v2, contrastive, or both) on passages of Python's bundled documentation, or score a checkpoint's
retrieval quality on the pydoc question set against all-MiniLM-L6-v2.

    python -m hybridrag.encoders train --output encoder.pt [--config train.yaml] [--steps N] [--loss both] ...
    python -m hybridrag.encoders evaluate encoder.pt [--int8 w8a16] [--split all test]

train writes the checkpoint (HybridEncoder.save's format) and its summary, encoder.training.json, next to it; the
options override the fields of --config (an EncoderTrainingConfig JSON/YAML file), which override the defaults.
"""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .._argparse import one_line_parser, positive_int

PROG = "python -m hybridrag.encoders"
_Parser = one_line_parser(f"{PROG}: ")

# (option, EncoderTrainingConfig field), applied in this order (the loss first: distill_weight is checked against it;
# warmup before steps: a shorter run with its own warmup)
OVERRIDES = [("--loss", "loss"), ("--warmup", "warmup"), ("--steps", "steps"), ("--batch-size", "batch_size"),
             ("--lr", "learning_rate"), ("--weight-decay", "weight_decay"), ("--max-grad-norm", "max_grad_norm"),
             ("--distill-weight", "distill_weight"), ("--distill-metric", "distill_metric"),
             ("--temperature", "temperature"), ("--max-length", "max_length"), ("--eval-size", "eval_size"),
             ("--eval-every", "eval_every"), ("--seed", "seed"), ("--teacher-cache", "teacher_cache"),
             ("--init-embeddings", "init_embeddings")]


def _non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an int >= 0, got {text!r}")
    return value


def _parser():
    from .train import DISTILL_METRICS, LOSSES

    parser = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = commands.add_parser("train", help="train a HybridEncoder and save it",
                                description="Train a HybridEncoder on passages of pydoc_data.topics (or --texts) and "
                                            "write the checkpoint and its summary JSON.")
    add = train.add_argument
    add("--output", required=True, metavar="PATH", help="the checkpoint to write (its summary goes next to it)")
    add("--config", metavar="FILE", help="an EncoderTrainingConfig JSON/YAML file (the options below override it)")
    add("--encoder-config", metavar="FILE",
        help="a HybridEncoderConfig JSON/YAML file for the student (default hybridrag.encoders.train.STUDENT_CONFIG)")
    add("--texts", metavar="FILE", help="training texts instead of the pydoc passages: a .txt file (one text a "
                                        "line) or a .jsonl file of {\"text\": ...}")
    add("--loss", choices=LOSSES, help="distill (default), contrastive or both")
    add("--steps", type=positive_int, metavar="N", help="optimizer steps (default 700)")
    add("--warmup", type=_non_negative_int, metavar="N", help="linear warmup steps (default 100)")
    add("--batch-size", type=positive_int, metavar="N", help="(default 32)")
    add("--lr", type=float, metavar="X", help="peak learning rate (default 5e-4)")
    add("--weight-decay", type=float, metavar="X", help="(default 0.01)")
    add("--max-grad-norm", type=float, metavar="X", help="gradient clipping (default 1.0)")
    add("--distill-weight", type=float, metavar="W", help="--loss both: W * distill + (1 - W) * contrastive "
                                                          "(default 0.5)")
    add("--distill-metric", choices=DISTILL_METRICS, help="(default cosine)")
    add("--temperature", type=float, metavar="T", help="InfoNCE temperature (default 0.05)")
    add("--max-length", type=positive_int, metavar="N",
        help="tokens per training text (default the encoder's max_length)")
    add("--eval-size", type=_non_negative_int, metavar="N", help="held-out texts (default 64)")
    add("--eval-every", type=positive_int, metavar="N", help="(default 100)")
    add("--seed", type=_non_negative_int, metavar="N", help="(default 0)")
    add("--teacher-cache", metavar="FILE.npz", help="keep the teacher's embeddings of the texts in this file")
    add("--init-embeddings", action=argparse.BooleanOptionalAction, default=None,
        help="start from the teacher's token embeddings (default yes)")
    add("--threads", type=positive_int, metavar="N", help="torch CPU threads (default torch's choice)")
    add("--no-progress", action="store_true", help="no progress bar")

    evaluate = commands.add_parser("evaluate", help="retrieval quality on the pydoc questions against MiniLM",
                                   description="Recall@1/5/10, MRR and nDCG@10 of a checkpoint on the pydoc questions "
                                               "(benchmarks/data/pydoc_queries.jsonl) over the 200-token chunks of "
                                               "pydoc_data.topics, next to the bundled all-MiniLM-L6-v2.")
    add = evaluate.add_argument
    add("checkpoint", metavar="CHECKPOINT", help="a checkpoint written by `train` (HybridEncoder.save)")
    add("--queries", metavar="FILE", help="the question set (default the checkout's benchmarks/data/"
                                          "pydoc_queries.jsonl)")
    add("--split", nargs="+", choices=("all", "train", "test"), default=["all", "test"],
        help="query splits to score (default: all test); the encoder never trains on any question")
    add("--int8", choices=("w8a16", "w8a8"), help="also score the checkpoint quantized this way")
    add("--no-minilm", action="store_true", help="leave out the all-MiniLM-L6-v2 rows")
    add("--json", metavar="FILE", help="also write the rows to this JSON file")
    add("--threads", type=positive_int, metavar="N", help="torch CPU threads (default torch's choice)")
    return parser


def _training_config(parser, args):
    from .train import EncoderTrainingConfig

    try:
        config = EncoderTrainingConfig.from_any(args.config)
    except (ValueError, TypeError, OSError) as error:
        parser.error(f"--config {args.config}: {error}")
    for option, field in OVERRIDES:
        value = getattr(args, field if option != "--lr" else "lr")
        if value is None:
            continue
        try:
            config = dataclasses.replace(config, **{field: value})
        except (ValueError, TypeError) as error:
            hint = " (pass a smaller --warmup too)" if option == "--steps" and args.warmup is None \
                and config.warmup > value else ""
            parser.error(f"{option} {value}: {error}{hint}")
    output = Path(args.output)
    if output.is_dir():
        parser.error(f"--output {args.output} is a folder; give the checkpoint's file path (such as "
                     f"{output / 'encoder.pt'})")
    return dataclasses.replace(config, output=str(output))


def _read_texts(parser, path):
    path = Path(path)
    if not path.is_file():
        parser.error(f"--texts {path}: no such file")
    if path.suffix.lower() not in (".txt", ".jsonl"):
        parser.error(f"--texts {path}: must be a .txt (one text a line) or .jsonl file")
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix.lower() == ".txt":
            texts.append(line)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            parser.error(f"--texts {path} line {number}: not JSON ({error.msg})")
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            parser.error(f"--texts {path} line {number}: each line must be an object with a str 'text'")
        texts.append(record["text"])
    if not texts:
        parser.error(f"--texts {path} holds no text")
    return texts


def _train(parser, args):
    import torch

    from .config import HybridEncoderConfig
    from .model import HybridEncoder
    from .train import STUDENT_CONFIG, pydoc_passages, summary_path, train_encoder

    config = _training_config(parser, args)
    try:
        shape = HybridEncoderConfig.from_any(args.encoder_config or dict(STUDENT_CONFIG))
    except (ValueError, TypeError, OSError) as error:
        parser.error(f"--encoder-config {args.encoder_config}: {error}")
    if config.max_length is not None and config.max_length > shape.max_length:
        parser.error(f"--max-length {config.max_length} is more than the encoder's max_length {shape.max_length}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(config.seed)  # the student's initial weights
    encoder = HybridEncoder(shape)
    texts = _read_texts(parser, args.texts) if args.texts else pydoc_passages(encoder.tokenizer)
    if config.eval_size >= len(texts):
        parser.error(f"--eval-size {config.eval_size}: must be less than the {len(texts)} training texts")
    if config.batch_size > len(texts) - config.eval_size:
        parser.error(f"--batch-size {config.batch_size}: more than the {len(texts) - config.eval_size} texts left "
                     f"to train on ({len(texts)} texts, eval size {config.eval_size})")
    print(f"training a HybridEncoder ({encoder.num_parameters() / 1e6:.1f} M parameters) on {len(texts)} "
          f"{'texts' if args.texts else 'pydoc passages'}: loss {config.loss}, {config.steps} steps of "
          f"{config.batch_size}", file=sys.stderr)
    summary = train_encoder(encoder, texts, config, progress=not args.no_progress)
    final = summary["evals"][-1] if summary["evals"] else {}
    held_out = ", ".join(f"{key} {value:.4f}" for key, value in final.items() if key != "step")
    print(f"trained {config.steps} steps in {summary['train_seconds']:.0f} s"
          + (f"; held-out {held_out}" if held_out else ""))
    print(f"wrote {summary['checkpoint']} and {summary_path(summary['checkpoint'])}")
    return 0


def _format_rows(rows):
    columns = ["method", "split", "queries", "recall@1", "recall@5", "recall@10", "mrr", "ndcg@10"]
    cells = [columns] + [[str(r[c]) if isinstance(r[c], (str, int)) else f"{r[c]:.3f}" for c in columns]
                         for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cells[0], widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
              for line in cells[1:]]
    return "\n".join(lines)


def _evaluate(parser, args):
    import torch

    from ..retrieval.encoder import DenseEncoder
    from .model import HybridEncoder
    from .retrieval import HybridTextEncoder, load_queries, pydoc_retrieval_quality

    try:
        queries = load_queries(args.queries)
    except (ValueError, OSError) as error:
        parser.error(f"--queries: {error}")
    present = {q.get("split") for q in queries}
    missing = [s for s in args.split if s != "all" and s not in present]
    if missing:
        parser.error(f"--split {' '.join(missing)}: the query file has no such split (it has {sorted(present)})")
    try:
        student = HybridTextEncoder(args.checkpoint)
    except (ValueError, OSError) as error:
        parser.error(f"CHECKPOINT {args.checkpoint}: {error}")
    if args.threads:
        torch.set_num_threads(args.threads)
    encoders = {"hybrid-encoder": student}
    if args.int8:
        if student.encoder.quantization is not None:
            parser.error(f"--int8 {args.int8}: the checkpoint is int8 already ({student.encoder.quantization.mode}); "
                         f"its rows are the hybrid-encoder rows")
        quantized = HybridEncoder.load(args.checkpoint)
        quantized.quantize({"mode": args.int8})
        encoders[f"hybrid-encoder int8 {args.int8}"] = HybridTextEncoder(quantized, name=f"{student.name}-int8")
    if not args.no_minilm:
        encoders["minilm"] = DenseEncoder(show_progress=False)
    rows = pydoc_retrieval_quality(encoders, queries, splits=tuple(args.split))
    print(_format_rows(rows))
    model = student.encoder
    print(f"hybrid encoder: {model.num_parameters() / 1e6:.1f} M parameters, {model.size_bytes() / 2**20:.1f} MiB"
          + ("" if model.quantization is None else f" (int8 {model.quantization.mode})"))
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": str(args.checkpoint), "rows": rows}, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def main(argv=None):
    """Parse `argv` (default sys.argv[1:]), run, and return the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "train":
            return _train(parser, args)
        return _evaluate(parser, args)
    except SystemExit as exit:  # usage errors (2) and --help (0) as a status
        return exit.code
    except (ValueError, TypeError, OSError, FloatingPointError) as error:
        print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
