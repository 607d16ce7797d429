"""Command line: build a knowledge base from JSONL, search it, show its stats.

    python -m hybridrag.retrieval build docs.jsonl kb/ [--chunk-tokens 200 --overlap 40 --index auto]
    python -m hybridrag.retrieval search kb/ "how do I catch an exception" [-k 5 --mode hybrid --json]
    python -m hybridrag.retrieval stats kb/

--encoder takes "minilm" (the bundled all-MiniLM-L6-v2, default), "hashing-<dim>", or a local model directory.
A knowledge base's own encoder is loaded only when a query is encoded: `stats` and `search --mode bm25` load none.
Errors print one line to stderr and exit with status 2: bad arguments, unreadable or damaged input, a target that
cannot be written (a file in the way, no permission, a read-only filesystem, a full disk). Anything else is a bug
and shows its traceback.
"""
import errno
import json
import sys

from .._argparse import one_line_parser, positive_int
from .documents import load_jsonl
from .encoder import make_encoder
from .knowledge_base import MODES, KnowledgeBase
from .vector_index import KINDS


# What to do about an OSError, by errno; the line names the path it failed on.
_OS_HINTS = {
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EACCES: "no permission: choose a location you can write to, or change its permissions",
    errno.EPERM: "the operation is not permitted there (an immutable folder?): choose another location",
    errno.EROFS: "the filesystem is read-only: choose a location on a writable one",
    errno.ENOSPC: "the disk is full: free some space or choose another disk",
    errno.EEXIST: "a file is in the way: remove it or choose another path",
    errno.ENOENT: "check the path",
}


_Parser = one_line_parser("")  # usage errors in one line like every other error (status 2)


def _parser():
    parser = _Parser(prog="python -m hybridrag.retrieval", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="build a knowledge base from a JSONL file of documents")
    build.add_argument("documents", help="JSONL file: one {id, text, title?, metadata?} a line")
    build.add_argument("directory", help="where to write the knowledge base")
    build.add_argument("--encoder", default="minilm", help="minilm (default), hashing-<dim>, or a model directory")
    build.add_argument("--chunk-tokens", type=positive_int, default=None, help="split documents into N-token chunks")
    build.add_argument("--overlap", type=int, default=40, help="tokens shared by consecutive chunks (default 40)")
    build.add_argument("--index", choices=KINDS, default="auto", help="vector index kind (default auto)")

    search = commands.add_parser("search", help="search a knowledge base")
    search.add_argument("directory")
    search.add_argument("query")
    search.add_argument("-k", type=positive_int, default=5, help="results to show (default 5)")
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
        results = _load(args).search(args.query, args.k, args.mode)  # the knowledge base caps k at its size
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


def error_line(error, args):
    """The one line printed for an expected error: the path, what went wrong and what to do."""
    if isinstance(error, OSError) and error.errno is not None:
        where = error.filename if error.filename is not None else args.directory
        hint = _OS_HINTS.get(error.errno, "check the path and its permissions")
        return f"error: {args.command} {args.directory}: {error.strerror}: {where}; {hint}"
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    return " ".join(f"error: {message}".split())


def main(argv=None):
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit:  # usage errors (2) and --help (0) as a status, like every other outcome
        return exit.code
    try:
        run(args)
    except (OSError, ValueError, TypeError, KeyError) as error:
        print(error_line(error, args), file=sys.stderr)
        return 2
    return 0
