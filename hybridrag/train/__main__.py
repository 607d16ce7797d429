"""python -m hybridrag.train rag-finetune | refrag-finetune | reader-finetune: fine-tune the RAG system's LM with
retrieval, or distil base RAG's answers into the hybrid method's reader adapter."""
import argparse
import json
import sys
from pathlib import Path

from .finetune_data import DEFAULT_SYSTEM
from ..nn.lora import DEFAULT_TARGETS

PROG = "python -m hybridrag.train"


def _shared(parser, defaults):
    add = parser.add_argument
    add("--data", required=True, help="JSONL of records {question, answer | answers, documents?}")
    add("--output-dir", required=True, help="checkpoints, log.jsonl, run_config.json and the saved model")
    add("--model-path", default=None, help="a local transformers model folder (default: SmolLM2-135M-Instruct)")
    add("--int8", action="store_true", help="int8 (Int8Linear W8A16) base under the LoRA adapters")
    add("--steps", type=int, default=defaults.steps, help="optimizer steps (default %(default)s)")
    add("--lr", type=float, default=defaults.learning_rate, help="peak learning rate (default %(default)s)")
    add("--warmup-steps", type=int, default=defaults.warmup_steps, help="(default %(default)s)")
    add("--rank", type=int, default=8, help="LoRA rank (default %(default)s)")
    add("--alpha", type=float, default=16.0, help="LoRA alpha; the update is scaled by alpha / rank "
                                                 "(default %(default)s)")
    add("--lora-dropout", type=float, default=0.0, help="(default %(default)s)")
    add("--targets", default=",".join(DEFAULT_TARGETS), help="comma-separated module names to adapt "
                                                              "(default %(default)s)")
    add("--lora-layers", default=None, help="comma-separated decoder layer indices to adapt (default all)")
    add("--corpus", nargs="+", default=[], help="files or folders of documents to retrieve from")
    add("--encoder", default="hashing-256", help="'minilm' or 'hashing-<dim>' for the corpus (default %(default)s)")
    add("--top-k", type=int, default=2, help="passages per question (per hop for refrag) (default %(default)s)")
    add("--max-passage-chars", type=int, default=600, help="cut each passage to this (default %(default)s)")
    add("--system", default=DEFAULT_SYSTEM, help="system message (default: %(default)r)")
    add("--attn-implementation", default="sdpa", choices=("sdpa", "hybridrag", "eager"),
        help="attention while training (default %(default)s: the fastest on CPU)")
    add("--seed", type=int, default=0)
    add("--save-every", type=int, default=None, help="checkpoint every N steps (one is always written at the end)")
    add("--threads", type=int, default=None, help="torch CPU threads (default torch's choice)")
    add("--resume", action="store_true", help="continue the run in --output-dir from its latest checkpoint")
    add("--no-progress", action="store_true", help="no progress bar")


def _parser():
    from .finetune import FinetuneConfig
    from .refrag import RefragConfig

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sft = commands.add_parser("rag-finetune", help="supervised fine-tuning with retrieved passages in the prompt",
                              description="Fine-tune on question/answer records with retrieved passages in the prompt "
                                          "(loss on the answer only); resumable with --resume.")
    _shared(sft, FinetuneConfig("x", "x"))
    sft.add_argument("--method", choices=("lora", "full"), default="lora", help="(default %(default)s)")
    sft.add_argument("--retrieval", choices=("static", "kb"), default="static",
                     help="static: each record's documents; kb: search --corpus (default %(default)s)")
    sft.add_argument("--batch-size", type=int, default=4, help="(default %(default)s)")
    sft.add_argument("--gradient-accumulation", type=int, default=1, help="(default %(default)s)")
    sft.add_argument("--max-length", type=int, default=1024, help="most tokens per example (default %(default)s)")
    rl = commands.add_parser("refrag-finetune", help="reward-driven (GRPO-style) LoRA tuning with multi-hop retrieval",
                             description="Sample answers with multi-hop retrieval over --corpus, score them with "
                                         "compute_rag_reward, update LoRA adapters by group-normalised policy "
                                         "gradient with a KL penalty to the frozen base; resumable with --resume.")
    defaults = RefragConfig("x", "x", corpus=("x",))
    _shared(rl, defaults)
    rl.add_argument("--max-hops", type=int, default=defaults.max_hops, help="(default %(default)s)")
    rl.add_argument("--questions-per-step", type=int, default=defaults.questions_per_step,
                    help="(default %(default)s)")
    rl.add_argument("--group-size", type=int, default=defaults.group_size, help="samples per question "
                                                                                 "(default %(default)s)")
    rl.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, help="(default %(default)s)")
    rl.add_argument("--temperature", type=float, default=defaults.temperature, help="(default %(default)s)")
    rl.add_argument("--kl-coef", type=float, default=defaults.kl_coef, help="(default %(default)s)")
    _reader_parser(commands)
    return parser


def _reader_parser(commands):
    from .reader_finetune import ReaderConfig

    defaults = ReaderConfig()
    reader = commands.add_parser(
        "reader-finetune", help="distil base RAG's answers into the hybrid method's reader adapter",
        description="Answer each question with base RAG (full prompt, full attention), then train LoRA adapters "
                    "that are on only for the hybrid method's question-side rows to give the same answers from "
                    "the stitched passage caches. Writes a reader adapter file for the system's reader_adapter.")
    add = reader.add_argument
    source = reader.add_mutually_exclusive_group(required=True)
    source.add_argument("--documents", nargs="+", help="files or folders (.txt, .md, .jsonl) to build the "
                                                       "knowledge base from")
    source.add_argument("--saved-system", help="a folder written by HybridRAGSystem.save")
    add("--questions", required=True, help="JSONL of training questions ({\"question\": ...} or {\"query\": ...} "
                                           "a line); no answers needed")
    add("--held-out", default=None, help="JSONL of questions whose loss is reported before and after, not trained on")
    add("--output", required=True, help="the reader adapter file to write (.pt)")
    add("--config", default=None, help="system config (.json/.yaml) for --documents; the reader is trained for "
                                       "its recompute_tokens, passage pattern and retrieval")
    add("--epochs", type=int, default=defaults.epochs, help="(default %(default)s)")
    add("--lr", type=float, default=defaults.learning_rate, help="peak learning rate (default %(default)s)")
    add("--warmup-steps", type=int, default=defaults.warmup_steps, help="(default %(default)s)")
    add("--rank", type=int, default=defaults.rank, help="LoRA rank (default %(default)s)")
    add("--alpha", type=float, default=defaults.alpha, help="LoRA alpha (default %(default)s)")
    add("--targets", default=",".join(defaults.targets), help="comma-separated module names to adapt "
                                                                "(default %(default)s)")
    add("--seed", type=int, default=defaults.seed)
    add("--store-passages", type=int, default=4096, help="passages the training store holds, no byte bound: "
                                                         "every training passage should fit (default %(default)s)")
    add("--no-progress", action="store_true", help="no progress bars")


def _reader_main(args, parser):
    from ..system import HybridRAGSystem, SystemConfig, create_hybrid_rag_system
    from ..system.model import load_language_model
    from .reader_finetune import ReaderConfig, read_questions, reader_finetune

    try:
        config = ReaderConfig(epochs=args.epochs, learning_rate=args.lr, warmup_steps=args.warmup_steps,
                              rank=args.rank, alpha=args.alpha, seed=args.seed,
                              targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()))
    except (ValueError, TypeError) as error:
        parser.error(str(error))
    questions = read_questions(args.questions)
    held_out = read_questions(args.held_out) if args.held_out else []
    if args.saved_system and args.config:
        parser.error("--config applies to --documents; a saved system brings its own")
    saved = Path(args.saved_system) / "config.json" if args.saved_system else None
    if saved is not None and not saved.is_file():
        parser.error(f"--saved-system {args.saved_system}: no hybridrag system there (missing config.json)")
    c = SystemConfig.from_any(saved if saved is not None else args.config)
    if c.reader_adapter is not None:
        parser.error(f"the system's config has reader_adapter={c.reader_adapter!r}: train on a config without one")
    lm = load_language_model(c.model_path, cache_dir=c.cache_dir, attn_implementation=c.attn_implementation,
                             int8=c.int8, device=c.device, fresh=True)  # training changes it: a copy of its own
    if saved is not None:
        system = HybridRAGSystem.load(args.saved_system, language_model=lm)
    else:
        system = create_hybrid_rag_system(c, language_model=lm)
        system.create_vectorstore(system.load_documents(args.documents))
    summary = reader_finetune(system, questions, args.output, config, held_out=held_out,
                              progress=not args.no_progress, store_passages=args.store_passages)
    print(json.dumps({key: value for key, value in summary.items() if key != "losses"}, indent=2))
    return 0


def _ints(text, name, parser):
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        parser.error(f"{name} must be comma-separated ints, got {text!r}")


def _config(args, parser):
    from .finetune import FinetuneConfig
    from .refrag import RefragConfig

    common = dict(data=args.data, output_dir=args.output_dir, model_path=args.model_path, int8=args.int8,
                  steps=args.steps, learning_rate=args.lr, warmup_steps=args.warmup_steps, rank=args.rank,
                  alpha=args.alpha, dropout=args.lora_dropout,
                  targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
                  lora_layers=None if args.lora_layers is None else _ints(args.lora_layers, "--lora-layers", parser),
                  corpus=tuple(args.corpus), encoder=args.encoder, top_k=args.top_k,
                  max_passage_chars=args.max_passage_chars, system=args.system,
                  attn_implementation=args.attn_implementation, seed=args.seed, save_every=args.save_every,
                  progress_bar=not args.no_progress, threads=args.threads)
    try:
        if args.command == "rag-finetune":
            return FinetuneConfig(**common, method=args.method, retrieval=args.retrieval, batch_size=args.batch_size,
                                  gradient_accumulation=args.gradient_accumulation, max_length=args.max_length)
        return RefragConfig(**common, max_hops=args.max_hops, questions_per_step=args.questions_per_step,
                            group_size=args.group_size, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, kl_coef=args.kl_coef)
    except (ValueError, TypeError) as error:
        parser.error(str(error))


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "reader-finetune":
        return _reader_main(args, parser)
    config = _config(args, parser)
    if args.command == "rag-finetune":
        from .finetune import rag_finetune
        summary = rag_finetune(config, resume=args.resume)
    else:
        from .refrag import refrag_finetune
        summary = refrag_finetune(config, resume=args.resume)
    last = summary["history"][-1] if summary["history"] else {}
    print(json.dumps({"step": summary["step"], "checkpoint": summary["checkpoint"], "saved": summary["saved"],
                      "last_log": last}, indent=2))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        sys.exit(2)

