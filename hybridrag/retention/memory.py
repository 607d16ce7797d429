"""MemoryManager: a bounded store of embeddings with JSON payloads, evicting by "lru", "lfu" or "importance".

Semantics, in one place:
- A global clock `tick` (an int, 0 at creation) advances by one for every touch: `add` (new or existing key), `get`,
  and each distinct key a `search` returns. A touch sets the key's last access to the new tick, adds one to its access
  count and boosts its importance (below). `remove`, `keys`, `in`, `importance` and `eviction_order` touch nothing.
- Importance: a key added with importance I0 at tick t has importance I0 * decay ** (now - t) at tick `now`. A touch
  at tick t' makes it (its decayed value at t') + boost, from t' on; re-adding a key resets it to the importance given.
- Eviction happens only in `add` of a new key when the store is full; exactly one key leaves, chosen from the keys
  already stored (never the one being added):
    lru:        the least recently touched key;
    lfu:        the fewest touches; ties: the least recently touched;
    importance: the lowest decayed importance (compared in log space, exact even when decay ** age underflows);
                ties: the least recently touched.
  Touch ticks are unique, so every order is total and deterministic. `eviction_order()` lists it.
- Search scores are inner products; with normalize=True embeddings and queries are L2-normalised first (cosine).
  Normalising divides by the max-abs first and takes the norm in float64, so any finite non-zero vector keeps its
  direction (1e20 or 1e-30 entries alike). NaN/inf values are refused, and so is a zero vector when normalize=True
  (it has no direction); with normalize=False a zero vector is stored and scores 0, and values beyond the float32
  range are refused. Raw inner products (normalize=False) are float32 and can overflow to inf for huge vectors.
- Payloads are kept as their JSON round trip (tuples become lists), so what `get` returns is the same before and after
  `save`/`load`, and later changes to the caller's object do not reach the store.
- `save` writes one .npz file atomically (a temporary file `.{name}.{pid}.{random}.tmp` in the same folder, then
  os.replace); `load` restores the store exactly: the same keys, vectors, payloads, clock, counts, importances and free
  slots, hence the same eviction order and the same search ties. The zip members carry CRC-32s, which `load` checks:
  a flipped bit in the data is a ValueError. Temporaries left by a writer that was killed are removed by the next
  `save` or `load` of that path (see `remove_stale_temporaries`).
"""
import json
import math
import os
import re
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

from ..atomic_file import remove_stale_temporaries, write_atomically  # noqa: F401 (re-exported)
from ..ops.validation import check_int

__all__ = ["MemoryManager", "MemoryItem", "MemoryHit", "POLICIES", "write_atomically", "remove_stale_temporaries"]

POLICIES = ("lru", "lfu", "importance")
FORMAT = "hybridrag.MemoryManager"
VERSION = 1
_SLOT_ARRAYS = {"last_access": np.int64, "count": np.int64, "importance": np.float64, "importance_tick": np.int64}
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class MemoryItem:
    """What `get` returns: the stored (normalised, if normalize=True) float32 (d,) embedding, a copy, and payload."""
    key: str
    embedding: np.ndarray
    payload: object


@dataclass(frozen=True)
class MemoryHit:
    """One search result: the key, its inner-product score with the query, and its payload."""
    key: str
    score: float
    payload: object


def _check_number(name, value, rule, ok):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not ok(float(value)):
        raise ValueError(f"{name} must be {rule}, got {value}")
    return float(value)


def _as_rows(name, value, dimension):
    """(d,) or (n, d) real array or tensor -> (finite float64 (n, d), was_1d). float64 so that huge or tiny finite
    values survive until they are normalised (a float32 square of 1e20 overflows)."""
    if isinstance(value, torch.Tensor):
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must hold real numbers, got dtype {value.dtype}")
        value = value.detach().to("cpu", torch.float64).numpy()
    array = np.asarray(value)
    if array.dtype.kind not in "iuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {array.dtype}")
    if array.ndim not in (1, 2) or array.shape[-1] != dimension:
        raise ValueError(f"{name} must have shape ({dimension},) or (n, {dimension}), got {array.shape}")
    one = array.ndim == 1
    array = np.atleast_2d(array).astype(np.float64)
    finite = np.isfinite(array)
    if not finite.all():
        where = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise ValueError(f"{name} has NaN or inf values (the first at index {where[-1] if one else where})")
    return array, one


def _unit_rows(name, rows):
    """float64 (n, d) -> float32 (n, d) rows of L2 norm 1; ValueError for a zero row."""
    scale = np.abs(rows).max(axis=1, keepdims=True)  # [n, 1]; dividing by it first keeps the squares in range
    if (scale == 0).any():
        row = int(np.flatnonzero(scale[:, 0] == 0)[0])
        where = "" if len(rows) == 1 else f" (row {row})"
        raise ValueError(f"{name} has a zero vector{where}, which cannot be normalised (normalize=True)")
    scaled = rows / scale
    return (scaled / np.linalg.norm(scaled, axis=1, keepdims=True)).astype(np.float32)


def _float32_rows(name, rows):
    """float64 (n, d) -> float32 (n, d), refusing values that float32 would turn into inf."""
    largest = float(np.abs(rows).max())
    if largest > _FLOAT32_MAX:
        raise ValueError(f"{name} has values beyond the float32 range (largest magnitude {largest:g} > "
                         f"{_FLOAT32_MAX:g}); with normalize=False vectors are stored as float32 as they are")
    return rows.astype(np.float32)


class MemoryManager:
    """Bounded embedding store with eviction; see the module docstring for the exact semantics.

    Args:
        capacity: the most keys held (>= 1).
        dimension: embedding size d (>= 1).
        policy: "lru", "lfu" or "importance".
        decay: importance factor per tick, in (0, 1] (1 = no decay).
        boost: importance added by each touch, finite >= 0 (0 = touches do not change importance).
        normalize: L2-normalise embeddings and queries, so scores are cosine similarities.

    Memory: the vectors live in one float32 (capacity, d) matrix allocated up front, plus five per-slot arrays
    (capacity,) and a dict of keys and payloads. A freed slot goes on a free list and is the next one filled.
    """

    def __init__(self, capacity, dimension, *, policy="lru", decay=0.99, boost=1.0, normalize=True):
        self.capacity = check_int("capacity", capacity, 1, numpy_ints=True)
        self.dimension = check_int("dimension", dimension, 1, numpy_ints=True)
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.policy = policy
        self.decay = _check_number("decay", decay, "in (0, 1]", lambda x: 0 < x <= 1)
        self.boost = _check_number("boost", boost, "finite and >= 0", lambda x: math.isfinite(x) and x >= 0)
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be True or False, got {normalize!r}")
        self.normalize = normalize
        self.tick = 0
        self._embeddings = np.zeros((self.capacity, self.dimension), dtype=np.float32)
        self._occupied = np.zeros(self.capacity, dtype=bool)
        for name, dtype in _SLOT_ARRAYS.items():
            setattr(self, "_" + name, np.zeros(self.capacity, dtype=dtype))
        self._free = list(range(self.capacity - 1, -1, -1))  # a stack: slot 0 is filled first
        self._slots = {}  # key -> slot, in the order keys were first added
        self._payloads = {}

    def __len__(self):
        return len(self._slots)

    def __contains__(self, key):
        return key in self._slots

    def keys(self):
        """Stored keys, in the order they were first added."""
        return list(self._slots)

    def __repr__(self):
        return (f"MemoryManager(capacity={self.capacity}, dimension={self.dimension}, policy={self.policy!r}, "
                f"decay={self.decay}, boost={self.boost}, normalize={self.normalize}, size={len(self)})")

    # ----------------------------------------------------------------------------------------------------- writing
    def add(self, key, embedding, payload=None, importance=1.0):
        """Store (or update) `key`; returns the list of keys evicted to make room ([] or [one key]).

        embedding: (d,) array or tensor, finite (non-zero when normalize=True; within the float32 range when
        normalize=False). payload: JSON-serialisable.
        importance: finite >= 0, the key's importance from now on (policy "importance").
        """
        if not isinstance(key, str):
            raise TypeError(f"key must be a str, got {type(key).__name__}")
        rows, one = _as_rows("embedding", embedding, self.dimension)
        if not one:
            raise ValueError(f"embedding must have shape ({self.dimension},), got {tuple(np.shape(embedding))}")
        vector = self._prepared("embedding", rows)[0]
        importance = _check_number("importance", importance, "finite and >= 0", lambda x: math.isfinite(x) and x >= 0)
        try:
            payload = json.loads(json.dumps(payload))
        except TypeError as err:
            raise TypeError(f"payload must be JSON-serialisable: {err}") from None
        evicted = []
        if key in self._slots:
            slot = self._slots[key]
        else:
            if not self._free:
                evicted.append(self._keys_at([self._victim()])[0])
                self.remove(evicted[0])
            slot = self._free.pop()
            self._slots[key] = slot
            self._occupied[slot] = True
            self._count[slot] = 0
        self._embeddings[slot] = vector
        self._payloads[key] = payload
        self._touch(slot)
        self._importance[slot], self._importance_tick[slot] = importance, self.tick
        return evicted

    def remove(self, key):
        """Delete `key` (KeyError if absent) and free its slot."""
        slot = self._slot(key)
        del self._slots[key], self._payloads[key]
        self._occupied[slot] = False
        self._embeddings[slot] = 0
        self._free.append(slot)

    # ----------------------------------------------------------------------------------------------------- reading
    def get(self, key):
        """The stored `MemoryItem` of `key` (KeyError if absent); a touch."""
        slot = self._slot(key)
        self._touch(slot)
        return MemoryItem(key, self._embeddings[slot].copy(), self._payloads[key])

    def search(self, query, k):
        """The k best keys by inner product (fewer when fewer are stored), best first.

        query: (d,) -> list[MemoryHit]; (Q, d) -> one such list per row. Ties: the lower slot first.
        Touches each distinct key returned once, from the weakest to the strongest (by its best score over the queries;
        equal scores: the later in result order first), so the strongest hit ends as the most recent.
        Work and memory: one float32 (Q, capacity) matmul over the whole matrix with free slots masked to -inf, and a
        stable sort of each row; no copy of the stored vectors.
        """
        rows, one = _as_rows("query", query, self.dimension)
        k = check_int("k", k, 1, numpy_ints=True)
        queries = self._prepared("query", rows)
        scores = queries @ self._embeddings.T  # [Q, capacity]
        scores[:, ~self._occupied] = -np.inf
        top = np.argsort(-scores, axis=1, kind="stable")[:, :min(k, len(self))]
        slot_keys = self._keys_by_slot()
        results, best = [], {}
        for row, slots in enumerate(top):
            hits = [MemoryHit(slot_keys[s], float(scores[row, s]), self._payloads[slot_keys[s]]) for s in slots]
            for hit in hits:
                order = best.setdefault(hit.key, [hit.score, len(best)])
                order[0] = max(order[0], hit.score)
            results.append(hits)
        for key in sorted(best, key=lambda key: (best[key][0], -best[key][1])):
            self._touch(self._slots[key])
        return results[0] if one else results

    def importance(self, key):
        """Decayed importance of `key` at the current tick (not a touch)."""
        slot = self._slot(key)
        return float(self._importance[slot] * self.decay ** (self.tick - self._importance_tick[slot]))

    def eviction_order(self):
        """Stored keys, the next to be evicted first (not a touch)."""
        live = np.flatnonzero(self._occupied)
        primary = self._primary(live)
        sort_keys = (self._last_access[live],) if primary is None else (self._last_access[live], primary)
        return self._keys_at(live[np.lexsort(sort_keys)])

    # ------------------------------------------------------------------------------------------------- persistence
    def save(self, path):
        """Write the whole store to `path` (one .npz file, written atomically; an existing file is replaced)."""
        path = os.fspath(path)
        state = {"format": FORMAT, "version": VERSION, "capacity": self.capacity, "dimension": self.dimension,
                 "policy": self.policy, "decay": self.decay, "boost": self.boost, "normalize": self.normalize,
                 "tick": self.tick, "free": self._free,
                 "items": [[key, slot, self._payloads[key]] for key, slot in self._slots.items()]}
        arrays = {name: getattr(self, "_" + name) for name in _SLOT_ARRAYS}
        state_bytes = np.frombuffer(json.dumps(state).encode("utf-8"), dtype=np.uint8)
        write_atomically(path, lambda file: np.savez(file, embeddings=self._embeddings, state=state_bytes, **arrays))

    @classmethod
    def load(cls, path):
        """A store saved by `save`. FileNotFoundError if `path` is missing, ValueError if it is not such a file."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no MemoryManager file at {path!r}")
        directory, name = os.path.split(os.path.abspath(path))
        remove_stale_temporaries(directory, re.escape(name))
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in ("embeddings", "state", *_SLOT_ARRAYS)}
            state = json.loads(arrays.pop("state").tobytes().decode("utf-8"))
            if state.get("format") != FORMAT or state.get("version") != VERSION:
                raise ValueError(f"format {state.get('format')!r} version {state.get('version')!r}")
            memory = cls(state["capacity"], state["dimension"], policy=state["policy"], decay=state["decay"],
                         boost=state["boost"], normalize=state["normalize"])
            memory._restore(state, arrays)
        # zipfile raises NotImplementedError for a garbled compression method, RuntimeError for a garbled flag bit
        except (OSError, EOFError, KeyError, TypeError, ValueError, RuntimeError, NotImplementedError,
                zipfile.BadZipFile) as err:
            raise ValueError(f"{path!r} is not a readable {FORMAT} file (version {VERSION}): {err}") from None
        return memory

    def _restore(self, state, arrays):
        shape = (self.capacity, self.dimension)
        if arrays["embeddings"].shape != shape or arrays["embeddings"].dtype != np.float32:
            raise ValueError(f"embeddings must be float32 {shape}, got {arrays['embeddings'].dtype} "
                             f"{arrays['embeddings'].shape}")
        for name, dtype in _SLOT_ARRAYS.items():
            if arrays[name].shape != (self.capacity,) or arrays[name].dtype != dtype:
                raise ValueError(f"{name} must be {np.dtype(dtype)} ({self.capacity},), got {arrays[name].dtype} "
                                 f"{arrays[name].shape}")
            setattr(self, "_" + name, arrays[name].copy())
        if not np.isfinite(arrays["embeddings"]).all():
            raise ValueError("embeddings has NaN or inf values")
        slots = [slot for _, slot, _ in state["items"]]
        if sorted(slots + state["free"]) != list(range(self.capacity)):
            raise ValueError("the stored and free slots do not partition the capacity")
        self._embeddings = arrays["embeddings"].copy()
        self.tick, self._free = int(state["tick"]), [int(slot) for slot in state["free"]]
        for key, slot, payload in state["items"]:
            self._slots[key], self._payloads[key] = int(slot), payload
            self._occupied[slot] = True

    # ---------------------------------------------------------------------------------------------------- internals
    def _slot(self, key):
        if key not in self._slots:
            raise KeyError(f"key {key!r} is not in the memory")
        return self._slots[key]

    def _keys_by_slot(self):
        keys = [None] * self.capacity
        for key, slot in self._slots.items():
            keys[slot] = key
        return keys

    def _keys_at(self, slots):
        keys = self._keys_by_slot()
        return [keys[slot] for slot in slots]

    def _prepared(self, name, rows):
        """Checked float64 (n, d) -> the float32 (n, d) rows to store or search with."""
        return _unit_rows(name, rows) if self.normalize else _float32_rows(name, rows)

    def _touch(self, slot):
        self.tick += 1
        self._last_access[slot] = self.tick
        self._count[slot] += 1
        decayed = self._importance[slot] * self.decay ** (self.tick - self._importance_tick[slot])
        self._importance[slot], self._importance_tick[slot] = decayed + self.boost, self.tick

    def _primary(self, live):
        """The policy's first eviction criterion for the slots `live` (lowest goes first), None for lru."""
        if self.policy == "lfu":
            return self._count[live]
        if self.policy == "importance":
            with np.errstate(divide="ignore"):
                return np.log(self._importance[live]) + (self.tick - self._importance_tick[live]) * math.log(self.decay)
        return None

    def _victim(self):
        live = np.flatnonzero(self._occupied)
        primary = self._primary(live)
        if primary is not None:
            live = live[primary == primary.min()]
        return live[np.argmin(self._last_access[live])]
