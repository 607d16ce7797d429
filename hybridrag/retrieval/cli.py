"""Command line: build a knowledge base from JSONL, search it, show its stats.

    python -m hybridrag.retrieval build docs.jsonl kb/ [--chunk-tokens 200 --overlap 40 --index auto]
    python -m hybridrag.retrieval search kb/ "how do I catch an exception" [-k 5 --mode hybrid --json]
    python -m hybridrag.retrieval stats kb/

--encoder takes "minilm" (the bundled all-MiniLM-L6-v2, default), "hashing-<dim>", or a local model directory.
A knowledge base's own encoder is loaded only when a query is encoded: `stats` and `search --mode bm25` load none.
Errors print one line to stderr and exit with status 2.
"""
import argparse
import json
import sys

from .documents import load_jsonl
from .encoder import DEFAULT_MODEL_NAME, DenseEncoder, HashingEncoder
from .knowledge_base import MODES, KnowledgeBase
from .vector_index import KINDS


def make_encoder(spec):
    if spec in (None, "minilm", DEFAULT_MODEL_NAME):
        return DenseEncoder()
    if spec.startswith("hashing-") and spec[len("hashing-"):].isdigit():
        return HashingEncoder(int(spec[len("hashing-"):]))
    return DenseEncoder(spec)


def _parser():
    parser = argparse.ArgumentParser(prog="python -m hybridrag.retrieval", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="build a knowledge base from a JSONL file of documents")
    build.add_argument("documents", help="JSONL file: one {id, text, title?, metadata?} a line")
    build.add_argument("directory", help="where to write the knowledge base")
    build.add_argument("--encoder", default="minilm", help="minilm (default), hashing-<dim>, or a model directory")
    build.add_argument("--chunk-tokens", type=int, default=None, help="split documents into chunks of N tokens")
    build.add_argument("--overlap", type=int, default=40, help="tokens shared by consecutive chunks (default 40)")
    build.add_argument("--index", choices=KINDS, default="auto", help="vector index kind (default auto)")

    search = commands.add_parser("search", help="search a knowledge base")
    search.add_argument("directory")
    search.add_argument("query")
    search.add_argument("-k", type=int, default=5, help="results to show (default 5)")
    search.add_argument("--mode", choices=MODES, default="hybrid", help="default hybrid")
    search.add_argument("--encoder", default=None, help="the encoder it was built with, when not rebuildable")
    search.add_argument("--json", action="store_true", help="print JSON lines instead of text")

    stats = commands.add_parser("stats", help="show what a knowledge base holds")
    stats.add_argument("directory")
    stats.add_argument("--encoder", default=None)
    return parser


def _load(args):
    encoder = make_encoder(args.encoder) if args.encoder else None
    return KnowledgeBase.load(args.directory, encoder)


def run(args, out=None):
    out = out or sys.stdout
    if args.command == "build":
        documents = load_jsonl(args.documents)
        knowledge_base = KnowledgeBase.build(documents, make_encoder(args.encoder), chunk_tokens=args.chunk_tokens,
                                             overlap=args.overlap, index_kind=args.index)
        knowledge_base.save(args.directory)
        print(f"built {args.directory}: {len(documents)} documents -> {len(knowledge_base)} entries, "
              f"{knowledge_base.index.kind} index, encoder {knowledge_base.encoder.name}", file=out)
    elif args.command == "search":
        results = _load(args).search(args.query, args.k, args.mode)
        for result in results:
            document = result.document
            if args.json:
                print(json.dumps({"rank": result.rank, "score": result.score, **document.to_json()}), file=out)
            else:
                snippet = " ".join(document.text.split())[:160]
                title = f" {document.title}" if document.title else ""
                print(f"{result.rank:>3}. [{result.score:.4f}] {document.id}{title}\n     {snippet}", file=out)
        if not results and not args.json:
            print("no results", file=out)
    else:
        for key, value in _load(args).stats().items():
            print(f"{key:>15}: {value}", file=out)


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, TypeError, KeyError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
