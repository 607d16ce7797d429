"""Inner-product vector index over FAISS: exact (flat), IVF or HNSW, with int64 ids that can be added and removed.

Vectors are expected L2-normalised (the encoders' output), so scores are cosine similarities.
"""
import json
import math
import os
import threading
from pathlib import Path

import numpy as np

from .._optional import import_optional
from ..ops.validation import check_int

faiss = import_optional("faiss", "faiss-cpu", "retrieval")

KINDS = ("auto", "flat", "ivf", "hnsw")
DEVICES = ("auto", "cpu", "gpu")
# "auto" picks exact search below this many vectors, IVF from there on (benchmarks/retrieval_speed.py).
AUTO_FLAT_LIMIT = 100_000
FORMAT_VERSION = 1


def gpu_available():
    """True when the installed faiss is the GPU build and sees at least one GPU (feature-detected, never assumed)."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class VectorIndex:
    """A FAISS inner-product index with user ids.

    Args:
        dimension: vector size d.
        kind: "flat" (exact), "ivf" (inverted lists over k-means cells; trained on the first `add`), "hnsw" (graph),
            or "auto": flat below 100,000 vectors in the first `add`, IVF from there on.
        device: "auto" searches on a GPU when faiss's GPU build sees one (flat and IVF; FAISS has no GPU HNSW),
            "cpu" never, "gpu" requires one (ValueError otherwise). The CPU index stays the authoritative copy for
            add/remove/save; the GPU copy is rebuilt lazily before the first search after a change.
        nlist: IVF cells (default round(sqrt(N)) of the first add, at most N / 39 so k-means has enough points).
        nprobe: IVF cells searched per query (default 32, at most nlist).
        hnsw_m, ef_construction, ef_search: HNSW graph degree and beam widths.

    Removal: flat and IVF remove vectors outright. FAISS's HNSW cannot delete graph nodes, so removed HNSW ids are
    kept as tombstones that every search excludes with an id selector; the graph is rebuilt from the live vectors
    once tombstones exceed a quarter of it.

    Memory: 4 * d bytes a vector (flat, IVF), plus 2 * hnsw_m * 8 bytes of graph links (HNSW), plus an id table.

    Threads: not safe by itself against writers. Calls that only read (`search`, `reconstruct`, `ids`, `save`) may
    run together: FAISS CPU indexes are documented thread-safe for concurrent searches (HNSW's per-call
    SearchParameters and id selector included: each search builds its own), nothing here changes during a search,
    and the GPU copy is rebuilt and searched under an internal mutex (FAISS GPU resources take one user at a time).
    `add` and `remove` (which may rebuild an HNSW graph) must not overlap any other call: KnowledgeBase's
    readers-writer lock serves that.
    """

    def __init__(self, dimension, *, kind="auto", device="auto", nlist=None, nprobe=32, hnsw_m=32,
                 ef_construction=80, ef_search=64):
        check_int("dimension", dimension, 1)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
        if device == "gpu" and not gpu_available():
            raise ValueError("device='gpu' needs faiss's GPU build (pip install faiss-gpu) and a visible GPU; "
                             "this faiss has no GPU support or sees none")
        if nlist is not None:
            check_int("nlist", nlist, 1)
        for name, value in (("nprobe", nprobe), ("hnsw_m", hnsw_m), ("ef_construction", ef_construction),
                            ("ef_search", ef_search)):
            check_int(name, value, 1)
        self.dimension = dimension
        self.requested_kind = kind
        self.kind = None if kind == "auto" else kind
        self.device = device
        self.nlist, self.nprobe = nlist, nprobe
        self.hnsw_m, self.ef_construction, self.ef_search = hnsw_m, ef_construction, ef_search
        self._index = None
        self._ids = set()
        self._tombstones = set()
        self._gpu_index = None
        self._gpu_stale = True
        self._gpu_lock = threading.Lock()

    # ---------------------------------------------------------------- building

    def _create(self, vectors):
        count = len(vectors)
        if self.kind is None:
            self.kind = "flat" if count < AUTO_FLAT_LIMIT else "ivf"
        d = self.dimension
        if self.kind == "flat":
            self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
        elif self.kind == "hnsw":
            graph = faiss.IndexHNSWFlat(d, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            graph.hnsw.efConstruction = self.ef_construction
            graph.hnsw.efSearch = self.ef_search
            self._index = faiss.IndexIDMap2(graph)
        else:
            self.nlist = self.nlist or max(1, min(round(math.sqrt(count)), count // 39))
            if count < self.nlist:
                raise ValueError(f"an IVF index with nlist={self.nlist} needs at least {self.nlist} vectors in its "
                                 f"first add, got {count}")
            ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, self.nlist, faiss.METRIC_INNER_PRODUCT)
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # reconstruct and remove by arbitrary id
            ivf.train(_training_sample(vectors, self.nlist))
            ivf.nprobe = min(self.nprobe, self.nlist)
            self._index = ivf

    def _check_vectors(self, name, vectors):
        array = np.asarray(vectors)
        if array.ndim != 2 or array.shape[1] != self.dimension:
            raise ValueError(f"{name} must have shape (N, {self.dimension}), got {array.shape}")
        if not np.issubdtype(array.dtype, np.floating):
            raise TypeError(f"{name} must be floating point, got dtype {array.dtype}")
        array = np.ascontiguousarray(array, dtype=np.float32)
        if not np.isfinite(array).all():
            raise ValueError(f"{name} holds NaN or inf")
        return array

    @staticmethod
    def _check_ids(ids, count):
        array = np.asarray(ids)
        if array.ndim != 1 or len(array) != count:
            raise ValueError(f"ids must have shape ({count},), got {array.shape}")
        if len(array) and not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"ids must be integers, got dtype {array.dtype}")
        array = array.astype(np.int64)
        if len(array) and array.min() < 0:
            raise ValueError(f"ids must be >= 0 (-1 marks an empty result slot), got {int(array.min())}")
        return array

    def add(self, vectors, ids):
        """Add float (N, d) vectors under int64 ids (N,), each new to the index."""
        vectors = self._check_vectors("vectors", vectors)
        ids = self._check_ids(ids, len(vectors))
        if len(np.unique(ids)) != len(ids):
            raise ValueError("ids must be unique within one add")
        clashes = [int(i) for i in ids if int(i) in self._ids]
        if clashes:
            raise ValueError(f"ids already in the index: {clashes[:5]}{' ...' if len(clashes) > 5 else ''}")
        if not len(ids):
            return
        if self._tombstones.intersection(ids.tolist()):
            self._compact()  # an HNSW id coming back: its old node must go before the id can mean the new vector
        if self._index is None:
            self._create(vectors)
        self._index.add_with_ids(vectors, ids)
        self._ids.update(ids.tolist())
        self._gpu_stale = True

    def remove(self, ids):
        """Remove the given ids; returns how many were present (unknown ids are ignored and not counted)."""
        ids = self._check_ids(ids, len(np.asarray(ids)))
        present = [i for i in set(ids.tolist()) if i in self._ids]
        if not present:
            return 0
        self._ids.difference_update(present)
        if self.kind == "hnsw":
            self._tombstones.update(present)
            if len(self._tombstones) * 4 > self._index.ntotal:
                self._compact()
        else:
            removed = self._index.remove_ids(faiss.IDSelectorArray(np.asarray(present, dtype=np.int64)))
            assert removed == len(present), (removed, len(present))
        self._gpu_stale = True
        return len(present)

    def _compact(self):
        """Rebuild the HNSW graph from its live vectors (drops tombstones)."""
        live = np.fromiter(sorted(self._ids), dtype=np.int64, count=len(self._ids))
        vectors = self.reconstruct(live) if len(live) else None
        self._index, self._tombstones = None, set()
        if len(live):
            self._create(vectors)
            self._index.add_with_ids(vectors, live)

    # ---------------------------------------------------------------- queries

    def __len__(self):
        return len(self._ids)

    @property
    def ntotal(self):
        return len(self._ids)

    def __contains__(self, item):
        return int(item) in self._ids

    def ids(self):
        """The stored ids, sorted, int64 (N,)."""
        return np.fromiter(sorted(self._ids), dtype=np.int64, count=len(self._ids))

    def reconstruct(self, ids):
        """The stored float32 vectors (n, d) of the given ids (KeyError for one not in the index)."""
        ids = self._check_ids(ids, len(np.asarray(ids)))
        missing = [int(i) for i in ids if int(i) not in self._ids]
        if missing:
            raise KeyError(f"ids not in the index: {missing[:5]}")
        out = np.empty((len(ids), self.dimension), dtype=np.float32)
        for row, item in enumerate(ids.tolist()):
            out[row] = self._index.reconstruct(item)
        return out

    def search(self, queries, k):
        """Top-k by inner product: (scores float32 (Q, n), ids int64 (Q, n)) with n = min(k, len(self)), best
        first: k beyond the stored vectors is clamped before anything is allocated, so k = 2**31 costs what
        k = len(self) does. Slots the index did not fill (fewer than n in IVF's probed cells, or HNSW's beam) have
        id -1 and score -inf."""
        check_int("k", k, 1)
        queries = self._check_vectors("queries", queries)
        width = min(k, len(self._ids))
        if self._index is None or not width or not len(queries):
            return np.full((len(queries), width), -np.inf, dtype=np.float32), np.full((len(queries), width), -1)
        found_scores, found = self._search(queries, width)
        return np.where(found >= 0, found_scores, -np.inf).astype(np.float32), found.astype(np.int64)

    def _search(self, queries, k):
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(self.ef_search, k))
            if self._tombstones:
                excluded = faiss.IDSelectorBatch(np.fromiter(self._tombstones, dtype=np.int64))
                params.sel = faiss.IDSelectorNot(excluded)
            return self._index.search(queries, k, params=params)
        if self._use_gpu():
            return self._gpu_search(queries, k)
        return self._index.search(queries, k)

    # ---------------------------------------------------------------- GPU copy

    def _use_gpu(self):
        return self.device != "cpu" and self.kind in ("flat", "ivf") and gpu_available()

    def _gpu_search(self, queries, k):
        with self._gpu_lock:  # one thread at a time rebuilds the copy and uses its StandardGpuResources
            if self._gpu_stale:
                resources = faiss.StandardGpuResources()
                # A flat IndexIDMap2 keeps ids on the host: only its storage goes to the GPU, labels map back below.
                source = self._index.index if self.kind == "flat" else self._index
                self._gpu_index = (faiss.index_cpu_to_gpu(resources, 0, source), resources)
                self._gpu_stale = False
            scores, labels = self._gpu_index[0].search(queries, k)
        if self.kind == "flat":
            id_map = faiss.vector_to_array(self._index.id_map)
            labels = np.where(labels >= 0, id_map[np.maximum(labels, 0)], -1)
        return scores, labels

    @property
    def on_gpu(self):
        return self._use_gpu()

    def __repr__(self):
        kind = self.kind or f"{self.requested_kind} (chosen on the first add)"
        settings = {"ivf": f", nlist={self.nlist}, nprobe={self.nprobe}",
                    "hnsw": f", hnsw_m={self.hnsw_m}, ef_search={self.ef_search}"}.get(self.kind, "")
        removed = f", tombstones={len(self._tombstones)}" if self._tombstones else ""
        return (f"VectorIndex(dimension={self.dimension}, kind={kind!r}{settings}, size={len(self)}{removed}, "
                f"on_gpu={self.on_gpu})")

    # ---------------------------------------------------------------- persistence

    def _state(self):
        return {"format": FORMAT_VERSION, "dimension": self.dimension, "kind": self.kind,
                "requested_kind": self.requested_kind, "nlist": self.nlist, "nprobe": self.nprobe,
                "hnsw_m": self.hnsw_m, "ef_construction": self.ef_construction, "ef_search": self.ef_search,
                "count": len(self._ids)}

    def save(self, path):
        """One .npz file, written to a temporary name and renamed: a crash never leaves a half-written index."""
        path = Path(path)
        blob = faiss.serialize_index(self._index) if self._index is not None else np.zeros(0, dtype=np.uint8)
        temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with temporary.open("wb") as out:
            np.savez(out, state=np.frombuffer(json.dumps(self._state()).encode(), dtype=np.uint8), index=blob,
                     ids=self.ids(), tombstones=np.fromiter(sorted(self._tombstones), dtype=np.int64))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)

    @classmethod
    def load(cls, path, *, device="auto"):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no vector index file at {path}")
        try:
            with np.load(path, allow_pickle=False) as stored:
                state = json.loads(stored["state"].tobytes().decode())
                blob, ids, tombstones = stored["index"], stored["ids"], stored["tombstones"]
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as error:
            raise ValueError(f"vector index file {path} is corrupted or not an index ({error})") from None
        if state.get("format") != FORMAT_VERSION:
            raise ValueError(f"vector index file {path} has format {state.get('format')}, expected {FORMAT_VERSION}")
        index = cls(state["dimension"], kind=state["requested_kind"], device=device, nlist=state["nlist"],
                    nprobe=state["nprobe"], hnsw_m=state["hnsw_m"], ef_construction=state["ef_construction"],
                    ef_search=state["ef_search"])
        index.kind = state["kind"]
        if len(blob):
            index._index = faiss.deserialize_index(blob)
        index._ids = set(ids.tolist())
        index._tombstones = set(tombstones.tolist())
        expected = len(index._ids) + len(index._tombstones)
        if (index._index.ntotal if index._index is not None else 0) != expected or len(ids) != state["count"]:
            raise ValueError(f"vector index file {path} is inconsistent: {len(ids)} ids for a FAISS index of "
                             f"{index._index.ntotal if index._index is not None else 0} vectors")
        return index


def _training_sample(vectors, nlist, per_cell=64, seed=0):
    """k-means needs tens of points a cell, not all of them: 64 a cell keeps 1M-vector builds to seconds."""
    limit = nlist * per_cell
    if len(vectors) <= limit:
        return vectors
    rows = np.random.default_rng(seed).choice(len(vectors), size=limit, replace=False)
    return vectors[np.sort(rows)]
