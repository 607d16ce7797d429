"""The manifest of a knowledge base on disk (`manifest.json`): its format and every field checked, so a damaged or
edited manifest is a ValueError naming the file and the field, never an AttributeError or KeyError later."""
import re
from pathlib import PurePosixPath

from .vector_index import KINDS

FORMAT = "hybridrag-knowledge-base"
FORMAT_VERSION = 1
REQUIRED_FILES = ("documents.jsonl", "keys.npy", "vectors.npz", "bm25/bm25.json")
_DAMAGED = "the manifest was damaged or edited: restore the knowledge base from a copy or rebuild it"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def check_manifest(path, manifest):
    """The parsed manifest of file `path`, every field checked for presence, type and value: a ValueError naming
    the file and the field otherwise."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = _describe(manifest.get("format")) if isinstance(manifest, dict) else _describe(manifest)
        raise ValueError(f"{path} is not a hybridrag knowledge-base manifest (field 'format' must be {FORMAT!r}, "
                         f"got {found})")
    version = _field(path, manifest, "version", int, "an int")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path} has version {version}; this hybridrag reads {FORMAT_VERSION}")
    _field(path, manifest, "documents", int, "an int >= 0", lambda v: v >= 0)
    _field(path, manifest, "next_key", int, "an int >= 0", lambda v: v >= 0)
    _field(path, manifest, "encoder.name", str, "a non-empty string", bool)
    _field(path, manifest, "encoder.dimension", int, "an int >= 1", lambda v: v >= 1)
    kinds = tuple(k for k in KINDS if k != "auto")
    _field(path, manifest, "index.kind", (str, type(None)), f"one of {kinds} or null",
           lambda v: v is None or v in kinds)
    _field(path, manifest, "index.requested_kind", str, f"one of {KINDS}", lambda v: v in KINDS)
    _check_file_table(path, _field(path, manifest, "files", dict, "a JSON object"))
    return manifest


def _describe(value):
    return f"{type(value).__name__} {value!r:.60}"


def _field(path, record, dotted, types, expected, valid=None, *, label=None):
    """record's field `dotted` ("encoder.name"), checked: a ValueError naming the file and the field (as `label`
    when given) otherwise."""
    value, walked = record, [label] if label else []
    for part in dotted.split("."):
        if not isinstance(value, dict):
            raise ValueError(f"{path}: field {'.'.join(walked)!r} must be a JSON object, got {_describe(value)}; "
                             f"{_DAMAGED}")
        walked.append(part)
        if part not in value:
            raise ValueError(f"{path}: field {'.'.join(walked)!r} is missing; {_DAMAGED}")
        value = value[part]
    types = types if isinstance(types, tuple) else (types,)
    wrong_type = not isinstance(value, types) or (isinstance(value, bool) and bool not in types)
    if wrong_type or (valid is not None and not valid(value)):
        raise ValueError(f"{path}: field {'.'.join(walked)!r} must be {expected}, got {_describe(value)}; "
                         f"{_DAMAGED}")
    return value


def _check_file_table(path, files):
    """Each entry of the manifest's files table: a safe relative name, bytes an int >= 0, sha256 64 hex digits."""
    for name, entry in files.items():
        parts = PurePosixPath(name).parts
        if not name or name.startswith("/") or ".." in parts or "\\" in name:
            raise ValueError(f"{path}: field 'files' names {name!r}, not a path inside the knowledge base; {_DAMAGED}")
        where = f"files.{name}"
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: field {where!r} must be a JSON object, got {_describe(entry)}; {_DAMAGED}")
        _field(path, entry, "bytes", int, "an int >= 0", lambda v: v >= 0, label=where)
        _field(path, entry, "sha256", str, "64 lowercase hex digits", _SHA256.fullmatch, label=where)
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        raise ValueError(f"{path}: field 'files' does not list {missing}; {_DAMAGED}")
