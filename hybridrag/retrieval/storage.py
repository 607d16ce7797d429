"""A knowledge base on disk, written so that an interrupted save never leaves a broken one.

Layout of the directory:
    manifest.json     format, encoder name and dimension, index kind, document count, sha256 and size of each file
    documents.jsonl   the documents, one JSON object a line
    keys.npy          int64 key of each document in the vector index, in documents.jsonl's order
    vectors.npz       the VectorIndex
    bm25/             the BM25 index

Save protocol, for `kb/` (PID is the saving process, TOKEN tells apart saves by threads of one process):
    1. Write every file into the sibling `.kb.saving-PID-TOKEN/`, fsync each file and folder.
    2. Write the manifest (a temporary name, fsync, rename, fsync the folder). From here the staging folder is
       complete: its manifest lists and hashes every file.
    3. Rename `kb/` to `.kb.old-PID-TOKEN/`, fsync the parent; rename the staging folder to `kb/`, fsync the parent.
    4. Delete the old folder (its manifest first, so a half-deleted folder is never taken for a complete one).
A save that raises (disk full, permissions) rolls back: the old folder goes back in place and the staging folder
is deleted.

Recovery, at the start of every load and save: when `kb/` is missing (or an empty folder), the newest complete
leftover takes its place: a staging folder whose manifest verifies (fully written, so the save's new state), else
an old folder that verifies (the previous state). Then the leftovers of saves that are no longer running are
deleted: `.kb.saving-*`, `.kb.old-*`, `.kb.tmp-*` (the temporary files a save writes lie inside its staging
folder). So whichever step a killed save reached, the next load gives the previous knowledge base (killed before
step 3's first rename) or the new one (killed after it), whole.

A leftover belongs to a running save when its PID is a live process (os.kill(pid, 0); POSIX, and the folder must
be on a filesystem that only this host's processes write) or, for this process's own PID, a save under way in
another thread. Such leftovers are never touched. A reused PID only delays the cleanup until that process ends. In
one process, saves and loads take a lock and run one at a time; across processes, one saver per directory at a
time, and a reader in another process that loads during step 3 may get an error and should retry.

`load` checks every manifest field, every file's size and sha256 and the counts before it trusts any of them, so a
damaged or edited file is a ValueError naming the file.
"""
import hashlib
import json
import os
import re
import secrets
import shutil
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .bm25 import BM25Index
from .documents import embedding_text, load_jsonl, save_jsonl
from .encoder import check_encoder, encoder_from_manifest
from .manifest import FORMAT, FORMAT_VERSION, check_manifest
from .vector_index import VectorIndex

MANIFEST = "manifest.json"

_LOCK = threading.RLock()
_IN_PROGRESS = set()  # names of this process's staging and retired folders while their save runs
# Tests set this to a callable(step) that stops a save at a named step, as a crash would; None otherwise.
_crash_point = None


def _step(name):
    if _crash_point is not None:
        _crash_point(name)


# ---------------------------------------------------------------- files


def _sha256(path, *, fsync=False):
    """The file's sha256; with fsync=True it is also flushed to disk in the same pass."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
        if fsync:
            os.fsync(stream.fileno())
    return digest.hexdigest()


def _fsync_dir(path):
    """Make the folder's entries (files created or renamed in it) durable."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _synced_file_table(folder):
    """{relative path: {bytes, sha256}} of every file but the manifest, each file and folder fsynced."""
    table = {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_dir():
            _fsync_dir(path)
        elif name != MANIFEST:
            table[name] = {"bytes": path.stat().st_size, "sha256": _sha256(path, fsync=True)}
    _fsync_dir(folder)
    return table


def _write_manifest(folder, manifest):
    """Write the manifest under a temporary name, fsync it, rename it in: the folder is complete once it is there."""
    temporary = folder / f".{MANIFEST}.tmp"
    with open(temporary, "w", encoding="utf-8") as out:
        json.dump(manifest, out, indent=1)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, folder / MANIFEST)
    _fsync_dir(folder)


def _remove(path):
    """Delete a leftover file or folder; a folder loses its manifest first, so it never looks complete again."""
    if path.is_dir() and not path.is_symlink():
        (path / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


# ---------------------------------------------------------------- leftovers and recovery


def _leftover_pattern(directory):
    return re.compile(re.escape(f".{directory.name}.") + r"(saving|old|tmp)-(\d+)(?:-[0-9a-f]+)?")


def _save_running(pid, name):
    """Whether the save that named a leftover `name` after `pid` may still be writing it."""
    if pid == os.getpid():
        return name in _IN_PROGRESS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _leftovers(directory):
    """(dead, running): the leftovers of interrupted saves beside `directory`, as {path: kind}."""
    dead, running = {}, {}
    if not directory.parent.is_dir():
        return dead, running
    pattern = _leftover_pattern(directory)
    for path in sorted(directory.parent.iterdir()):
        match = pattern.fullmatch(path.name)
        if match:
            kind, pid = match.group(1), int(match.group(2))
            (running if _save_running(pid, path.name) else dead)[path] = kind
    return dead, running


def _complete(folder):
    """True when `folder` holds a knowledge base whose manifest and files verify."""
    if not folder.is_dir() or folder.is_symlink():
        return False
    try:
        verify_files(folder, read_manifest(folder))
    except (ValueError, FileNotFoundError):
        return False
    return True


def _vacant(directory):
    """No knowledge base there: nothing at the path, or an empty folder."""
    if not os.path.lexists(directory):
        return True
    return directory.is_dir() and not directory.is_symlink() and not any(directory.iterdir())


def _newest_complete(dead):
    """The leftover to put in place: a complete staging folder (the newest state) before a complete old one."""
    complete = [path for path in dead if dead[path] != "tmp" and _complete(path)]
    if not complete:
        return None
    return max(complete, key=lambda p: (dead[p] == "saving", (p / MANIFEST).stat().st_mtime_ns))


def _remove_or_warn(path):
    try:
        _remove(path)
    except OSError as error:  # a read-only filesystem must not stop a load; the next save retries
        warnings.warn(f"could not remove {path}, left by an interrupted save ({error}); delete it by hand",
                      stacklevel=4)


def _recover(directory):
    """Put the newest complete state of an interrupted save in place when `directory` holds none, then delete the
    leftovers of saves that are no longer running."""
    dead, _ = _leftovers(directory)
    if dead and _vacant(directory):
        best = _newest_complete(dead)
        if best is not None:
            if directory.is_dir():
                directory.rmdir()
            os.replace(best, directory)
            _fsync_dir(directory.parent)
            del dead[best]
    for path in dead:
        _remove_or_warn(path)


# ---------------------------------------------------------------- save


def _check_target(directory):
    if os.path.lexists(directory) and not directory.is_dir():
        raise ValueError(f"{directory} is a file, not a knowledge-base folder; choose another path or remove it")
    if directory.is_dir() and not (directory / MANIFEST).is_file() and any(directory.iterdir()):
        raise ValueError(f"{directory} exists and is not a knowledge base (no {MANIFEST}); refusing to replace it")


def _write_staging(knowledge_base, staging):
    staging.mkdir()
    documents = knowledge_base.documents
    save_jsonl(documents, staging / "documents.jsonl")
    _step("staging-partial")
    np.save(staging / "keys.npy", np.array([knowledge_base._keys[d.id] for d in documents], dtype=np.int64))
    knowledge_base.index.save(staging / "vectors.npz")
    knowledge_base.bm25.save(staging / "bm25")
    _step("files-written")
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "documents": len(documents),
                "next_key": knowledge_base._next_key,
                "encoder": {"name": knowledge_base.encoder.name, "dimension": knowledge_base.encoder.dimension},
                "index": {"kind": knowledge_base.index.kind, "requested_kind": knowledge_base.index.requested_kind},
                "files": _synced_file_table(staging)}
    _write_manifest(staging, manifest)
    _step("manifest-written")


def _swap(staging, directory, retired):
    if os.path.lexists(directory):
        os.replace(directory, retired)
        _fsync_dir(directory.parent)
        _step("old-moved-aside")
    os.replace(staging, directory)
    _step("new-moved-in")
    _fsync_dir(directory.parent)
    _step("before-old-deleted")


def _roll_back(staging, directory, retired):
    """After a save raised: the old folder back in place, the staging folder gone."""
    if not os.path.lexists(directory) and retired.is_dir():
        os.replace(retired, directory)
        _fsync_dir(directory.parent)
    if staging.exists():
        _remove(staging)


def _path(directory):
    directory = Path(directory)
    return Path(os.path.abspath(directory)) if directory.name in ("", ".", "..") else directory


def save_knowledge_base(knowledge_base, directory):
    """Write the knowledge base to `directory` (see the module docstring for the protocol)."""
    directory = _path(directory)
    with _LOCK:
        _check_target(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        _recover(directory)
        token = f"{os.getpid()}-{secrets.token_hex(4)}"
        staging = directory.with_name(f".{directory.name}.saving-{token}")
        retired = directory.with_name(f".{directory.name}.old-{token}")
        _IN_PROGRESS.update((staging.name, retired.name))
        try:
            _write_staging(knowledge_base, staging)
            _swap(staging, directory, retired)
        except Exception:
            _roll_back(staging, directory, retired)
            raise
        finally:
            _IN_PROGRESS.difference_update((staging.name, retired.name))
        if retired.exists():
            _remove_or_warn(retired)  # the new state is in place: a failure here only leaves a leftover


# ---------------------------------------------------------------- manifest


def read_manifest(directory):
    """The checked manifest of the knowledge base in `directory` (files not yet verified)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        dead, running = _leftovers(directory)
        hint = "".join([f"; {sorted(p.name for p in running)} beside it belong to a save still running (retry when "
                        "it ends)" if running else "",
                        f"; {sorted(p.name for p in dead)} beside it were left by an interrupted save and hold no "
                        "complete knowledge base" if dead else ""])
        raise FileNotFoundError(f"no knowledge base at {directory} (missing {MANIFEST}){hint}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is corrupted: {error}") from None
    return check_manifest(path, manifest)


def verify_files(directory, manifest):
    """Every file the manifest lists exists with its size and sha256."""
    directory = Path(directory)
    for name, expected in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise ValueError(f"knowledge base {directory} is missing {name}")
        if path.stat().st_size != expected["bytes"] or _sha256(path) != expected["sha256"]:
            raise ValueError(f"knowledge base file {path} is corrupted (its size or sha256 differs from the manifest)")


# ---------------------------------------------------------------- load


@contextmanager
def _reading(path):
    """Errors from parsing a file that passed its checksum (a bad writer, or an edited file and manifest) become a
    ValueError naming the file."""
    try:
        yield
    except UnicodeDecodeError as error:
        raise ValueError(f"knowledge base file {path} is not valid UTF-8 ({error}); restore or rebuild the "
                         "knowledge base") from error
    except (ValueError, KeyError, TypeError, IndexError, EOFError) as error:
        if isinstance(error, ValueError) and str(path) in str(error):
            raise
        raise ValueError(f"knowledge base file {path} cannot be read ({type(error).__name__}: {error}); restore "
                         "or rebuild the knowledge base") from error


def _read_keys(path, manifest):
    with _reading(path):
        keys = np.load(path, allow_pickle=False)
    if keys.dtype != np.int64 or keys.ndim != 1:
        raise ValueError(f"knowledge base file {path} must hold a 1-D int64 array, got {keys.dtype} of shape "
                         f"{keys.shape}")
    if len(keys) and (keys.min() < 0 or keys.max() >= manifest["next_key"] or len(np.unique(keys)) != len(keys)):
        raise ValueError(f"knowledge base file {path}: keys must be distinct and in [0, next_key="
                         f"{manifest['next_key']})")
    return keys


def _check_index(directory, index, manifest):
    dimension = manifest["encoder"]["dimension"]
    if index.dimension != dimension:
        raise ValueError(f"knowledge base {directory}: the vector index is {index.dimension}-dim but the manifest "
                         f"says {dimension}")
    stored = (index.kind, index.requested_kind)
    listed = (manifest["index"]["kind"], manifest["index"]["requested_kind"])
    if stored != listed:
        raise ValueError(f"knowledge base {directory}: the vector index is (kind, requested_kind) {stored} but the "
                         f"manifest says {listed}")


def _resolve_encoder(directory, manifest, encoder):
    name, dimension = manifest["encoder"]["name"], manifest["encoder"]["dimension"]
    if encoder is None:
        encoder = encoder_from_manifest(name, dimension)
    check_encoder(encoder)
    if encoder.name != name or encoder.dimension != dimension:
        raise ValueError(f"knowledge base {directory} was built with encoder {name!r} ({dimension}-dim), but the "
                         f"encoder given is {encoder.name!r} ({encoder.dimension}-dim): its vectors would not match")
    return encoder


def load_knowledge_base(cls, directory, encoder, *, device="auto"):
    """Read a knowledge base written by save_knowledge_base, recovering from an interrupted save first."""
    directory = _path(directory)
    with _LOCK:
        _recover(directory)
        return _load_verified(cls, directory, encoder, device)


def _load_verified(cls, directory, encoder, device):
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    encoder = _resolve_encoder(directory, manifest, encoder)
    with _reading(directory / "documents.jsonl"):
        documents = load_jsonl(directory / "documents.jsonl")
    keys = _read_keys(directory / "keys.npy", manifest)
    with _reading(directory / "vectors.npz"):
        index = VectorIndex.load(directory / "vectors.npz", device=device)
    _check_index(directory, index, manifest)
    if not (len(documents) == len(keys) == len(index) == manifest["documents"]):
        raise ValueError(f"knowledge base {directory} is inconsistent: {len(documents)} documents, {len(keys)} keys, "
                         f"{len(index)} vectors, manifest {manifest['documents']}")
    with _reading(directory / "bm25"):
        bm25 = BM25Index.load(directory / "bm25", {d.id: embedding_text(d) for d in documents})
    knowledge_base = cls(encoder, index=index, bm25=bm25)
    for key, document in zip(keys.tolist(), documents):
        if key not in index:
            raise ValueError(f"knowledge base {directory}: document {document.id!r} has key {key}, not in the index")
        knowledge_base._documents[document.id] = document
        knowledge_base._keys[document.id] = key
        knowledge_base._by_key[key] = document.id
    knowledge_base._next_key = manifest["next_key"]
    return knowledge_base
