"""Documents from files and folders: .txt and .md (one Document a file) and .jsonl (one a line)."""
import os
import re
import sys
import warnings
from collections import Counter
from pathlib import Path

from ..retrieval.documents import Document, load_jsonl

TEXT_SUFFIXES = (".txt", ".md")
SUFFIXES = TEXT_SUFFIXES + (".jsonl",)
_HEADING = re.compile(r"#{1,6}[ \t]+(.*?)[ \t#]*")
_FENCE = re.compile(r"(```|~~~)")


def load_documents(paths, *, recursive=True, on_error="raise", progress=None):
    """Documents from `paths` (a str/Path or a list of them: files and folders).

    A .txt or .md file is one Document: id = its path relative to the folder given (POSIX separators), or its name
    when the file itself is given; title = the first markdown heading (.md only) or the file stem; text = the content;
    metadata {"source": str(path)}. A .jsonl file holds Documents as `load_jsonl` reads them. Inside folders, files
    with other extensions are skipped and counted in a warning, as are empty files; names starting with "." are
    skipped silently (.git, editor files). `recursive=False` reads only the top level of each folder.

    Unreadable, binary (NUL bytes), non-UTF-8 or malformed .jsonl files: on_error="raise" raises one ValueError
    naming every such file and why; "warn" warns the same list and loads the rest. A missing path is a
    FileNotFoundError; a named file of another extension, a repeated id or no document at all is a ValueError.
    `progress`: a tqdm bar over files (None: on when stderr is a terminal).
    """
    paths = _check_arguments(paths, recursive, on_error, progress)
    files, skipped, bad = _collect(paths, recursive)
    documents, empty = [], []
    for path, base in _progress(files, progress):
        try:
            loaded = _read(path, base)
        except (OSError, ValueError) as error:
            bad.append(f"{path}: {_reason(error)}")
            continue
        if not loaded:
            empty.append(str(path))
        documents.extend(loaded)
    _report_bad(bad, on_error)
    _report_skipped(skipped, empty)
    if not documents:
        raise ValueError(f"no documents found in {', '.join(map(str, paths))} (looked for {', '.join(SUFFIXES)})")
    return _check_ids(documents)


def _check_arguments(paths, recursive, on_error, progress):
    """`paths` as a non-empty list of Path; TypeError/ValueError naming the argument otherwise."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    elif isinstance(paths, (list, tuple)):
        paths = list(paths)
    else:
        raise TypeError(f"paths must be a str, a Path or a list of them, got {type(paths).__name__}")
    if not paths:
        raise ValueError("paths must name at least one file or folder, got an empty list")
    for position, path in enumerate(paths):
        if not isinstance(path, (str, Path)):
            raise TypeError(f"paths[{position}] must be a str or a Path, got {type(path).__name__}")
    if not isinstance(recursive, bool):
        raise TypeError(f"recursive must be True or False, got {recursive!r}")
    if on_error not in ("raise", "warn"):
        raise ValueError(f"on_error must be 'raise' or 'warn', got {on_error!r}")
    if progress not in (None, True, False):
        raise TypeError(f"progress must be True, False or None, got {progress!r}")
    paths = [Path(path) for path in paths]
    missing = [str(path) for path in paths if not path.exists()]
    if missing:
        raise FileNotFoundError(f"no such file or folder: {', '.join(missing)}")
    return paths


def _collect(paths, recursive):
    """([(file, base folder or None)], Counter of skipped extensions, [problems]), each file once."""
    files, skipped, bad, seen = [], Counter(), [], set()

    def add(path, base):
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            files.append((path, base))

    for path in paths:
        if path.is_dir():
            for found in _walk(path, recursive, bad):
                if found.suffix.lower() in SUFFIXES:
                    add(found, path)
                else:
                    skipped[found.suffix.lower() or "(no extension)"] += 1
        elif path.suffix.lower() in SUFFIXES:
            add(path, None)
        else:
            raise ValueError(f"{path}: unsupported file type {path.suffix or '(no extension)'!r}; load_documents "
                             f"reads {', '.join(SUFFIXES)}")
    return files, skipped, bad


def _walk(folder, recursive, bad):
    """Files under `folder` in sorted order, hidden names left out; folders that cannot be listed go to `bad`."""
    def unlistable(error):
        bad.append(f"{error.filename}: {_reason(error)}")

    for root, folders, names in os.walk(folder, onerror=unlistable):
        folders[:] = sorted(name for name in folders if not name.startswith(".")) if recursive else []
        for name in sorted(names):
            if not name.startswith(".") and os.path.isfile(os.path.join(root, name)):
                yield Path(root, name)


def _progress(files, progress):
    if progress is None:
        progress = sys.stderr is not None and sys.stderr.isatty()
    if not progress:
        return files
    from tqdm.auto import tqdm

    return tqdm(files, desc="loading documents", unit="file")


def _read(path, base):
    """The Documents of one file ([] for an empty one); OSError/ValueError on a bad one."""
    if path.suffix.lower() == ".jsonl":
        _check_not_binary(path.read_bytes())
        return load_jsonl(path)
    raw = path.read_bytes()
    _check_not_binary(raw)
    text = raw.decode("utf-8-sig")
    if not text.strip():
        return []
    identifier = path.relative_to(base).as_posix() if base is not None else path.name
    title = (_first_heading(text) if path.suffix.lower() == ".md" else None) or path.stem
    return [Document(identifier, text, title, {"source": str(path)})]


def _check_not_binary(raw):
    position = raw.find(b"\0")
    if position >= 0:
        raise ValueError(f"binary file (a NUL byte at offset {position})")


def _first_heading(text):
    """The text of the first ATX heading ("# Title") outside fenced code blocks, or None."""
    fenced = False
    for line in text.splitlines():
        if _FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        match = None if fenced else _HEADING.fullmatch(line)
        if match and match.group(1):
            return match.group(1)
    return None


def _reason(error):
    if isinstance(error, UnicodeDecodeError):
        return f"not valid UTF-8 ({error.reason} at byte {error.start})"
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return str(error)


def _report_bad(bad, on_error):
    if not bad:
        return
    listing = "\n  ".join(bad)
    if on_error == "raise":
        raise ValueError(f"{len(bad)} file(s) could not be loaded (pass on_error='warn' to load the rest):\n"
                         f"  {listing}")
    warnings.warn(f"{len(bad)} file(s) could not be loaded and were left out:\n  {listing}", stacklevel=3)


def _report_skipped(skipped, empty):
    parts = [f"{count} {suffix}" for suffix, count in sorted(skipped.items())]
    if parts:
        warnings.warn(f"skipped {sum(skipped.values())} file(s) of unsupported types ({', '.join(parts)}); "
                      f"load_documents reads {', '.join(SUFFIXES)}", stacklevel=3)
    if empty:
        warnings.warn(f"skipped {len(empty)} empty file(s): {', '.join(empty)}", stacklevel=3)


def _check_ids(documents):
    counts = Counter(document.id for document in documents)
    repeated = sorted(identifier for identifier, count in counts.items() if count > 1)
    if repeated:
        raise ValueError(f"document ids appear more than once: {repeated} (ids of .txt/.md files are their paths "
                         "relative to the folder given; .jsonl ids are their own)")
    return documents
