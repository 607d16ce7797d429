"""A knowledge base on disk, written so that a crash mid-save never leaves a broken one.

Layout of the directory:
    manifest.json     format, encoder name and dimension, index kind, document count, sha256 and size of each file
    documents.jsonl   the documents, one JSON object a line
    keys.npy          int64 key of each document in the vector index, in documents.jsonl's order
    vectors.npz       the VectorIndex
    bm25/             the BM25 index

`save` writes everything into a fresh sibling folder, fsyncs it, writes the manifest last, then swaps the folder in
with two renames (old aside, new in) and deletes the old one. `load` checks the manifest, every file's size and
sha256 and the counts before it trusts any of them, so a corrupted or truncated file is a clear ValueError.
"""
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from .bm25 import BM25Index
from .documents import embedding_text, load_jsonl, save_jsonl
from .encoder import check_encoder, encoder_from_manifest
from .vector_index import VectorIndex

FORMAT = "hybridrag-knowledge-base"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def _sha256(path, *, fsync=False):
    """The file's sha256; with fsync=True it is also flushed to disk in the same pass."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
        if fsync:
            os.fsync(stream.fileno())
    return digest.hexdigest()


def _synced_file_table(folder):
    """{relative path: {bytes, sha256}} of every file but the manifest, each file fsynced as it is hashed."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    return {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p, fsync=True)} for p in files}


def save_knowledge_base(knowledge_base, directory):
    directory = Path(directory)
    if directory.exists() and not (directory / MANIFEST).is_file() and any(directory.iterdir()):
        raise ValueError(f"{directory} exists and is not a knowledge base (no {MANIFEST}); refusing to replace it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(f".{directory.name}.saving-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    documents = knowledge_base.documents
    save_jsonl(documents, staging / "documents.jsonl")
    np.save(staging / "keys.npy", np.array([knowledge_base._keys[d.id] for d in documents], dtype=np.int64))
    knowledge_base.index.save(staging / "vectors.npz")
    knowledge_base.bm25.save(staging / "bm25")
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "documents": len(documents),
                "next_key": knowledge_base._next_key,
                "encoder": {"name": knowledge_base.encoder.name, "dimension": knowledge_base.encoder.dimension},
                "index": {"kind": knowledge_base.index.kind, "requested_kind": knowledge_base.index.requested_kind},
                "files": _synced_file_table(staging)}
    with open(staging / MANIFEST, "w", encoding="utf-8") as out:
        json.dump(manifest, out, indent=1)
        out.flush()
        os.fsync(out.fileno())
    retired = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    if directory.exists():
        os.replace(directory, retired)
    os.replace(staging, directory)
    if retired.exists():
        shutil.rmtree(retired)


def read_manifest(directory):
    """The checked manifest of the knowledge base in `directory` (files not yet verified)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        leftovers = sorted(p.name for p in directory.parent.glob(f".{directory.name}.*"))
        hint = f"; an interrupted save left {leftovers} beside it" if leftovers else ""
        raise FileNotFoundError(f"no knowledge base at {directory} (missing {MANIFEST}){hint}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is corrupted: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a hybridrag knowledge-base manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} has version {manifest.get('version')}; this hybridrag reads {FORMAT_VERSION}")
    for key in ("documents", "next_key", "encoder", "index", "files"):
        if key not in manifest:
            raise ValueError(f"{path} is missing {key!r}")
    return manifest


def verify_files(directory, manifest):
    """Every file the manifest lists exists with its size and sha256."""
    directory = Path(directory)
    for name, expected in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise ValueError(f"knowledge base {directory} is missing {name}")
        if path.stat().st_size != expected["bytes"] or _sha256(path) != expected["sha256"]:
            raise ValueError(f"knowledge base file {path} is corrupted (its size or sha256 differs from the manifest)")


def load_knowledge_base(cls, directory, encoder, *, device="auto"):
    directory = Path(directory)
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    name, dimension = manifest["encoder"]["name"], manifest["encoder"]["dimension"]
    if encoder is None:
        encoder = encoder_from_manifest(name, dimension)
    check_encoder(encoder)
    if encoder.name != name or encoder.dimension != dimension:
        raise ValueError(f"knowledge base {directory} was built with encoder {name!r} ({dimension}-dim), but the "
                         f"encoder given is {encoder.name!r} ({encoder.dimension}-dim): its vectors would not match")
    documents = load_jsonl(directory / "documents.jsonl")
    keys = np.load(directory / "keys.npy", allow_pickle=False)
    index = VectorIndex.load(directory / "vectors.npz", device=device)
    if index.dimension != dimension:
        raise ValueError(f"knowledge base {directory}: the vector index is {index.dimension}-dim but the manifest "
                         f"says {dimension}")
    if not (len(documents) == len(keys) == len(index) == manifest["documents"]):
        raise ValueError(f"knowledge base {directory} is inconsistent: {len(documents)} documents, {len(keys)} keys, "
                         f"{len(index)} vectors, manifest {manifest['documents']}")
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
