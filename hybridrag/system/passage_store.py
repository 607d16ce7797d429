"""The passage store: passage KV caches kept per model and pattern, bounded in passages and bytes, evicted by the
retention MemoryManager's policy, held as computed or compressed (float16, bfloat16, int8), saved to disk.

- Key: a digest of (the pattern, the prefix's token ids, the passage's token ids), so a passage is computed once
  whatever document or question brings it, and a different pattern or prefix never reads another's cache.
- Bounds: at most `capacity` passages and `max_bytes` bytes of stored tensors. Adding past either evicts stored
  passages in the MemoryManager's eviction order ("lru", "lfu" or "importance"; see hybridrag.retention.memory),
  never the one being added; a passage larger than max_bytes alone is refused (ValueError).
- Importance (policy "importance"): `reward(key, value)` adds to a passage's importance, so passages that answers
  attend to outlive the rest (the system calls it with each answer's attention share).
- Storage: "model" keeps the tensors as computed; "float16"/"bfloat16" cast; "int8" keeps one int8 per element and
  a float32 scale per (layer, head, token) row of D elements (symmetric absmax, error <= scale / 2 per element):
  about 0.27x the float32 bytes. Tensors come back in the model's dtype.
- `save(folder)` writes one safetensors file per passage and the MemoryManager (eviction state), then an index.json
  naming the store's fingerprint (model, dtype, storage) last; `load(folder, fingerprint)` restores it, or refuses
  a folder written for another fingerprint.

Thread-safe: one lock around the table; encoding runs outside it (two threads missing on one passage both encode
it, and the second result replaces the first: the same tensors).
"""
import hashlib
import json
import threading
import time
from pathlib import Path

import numpy as np
import torch

from ..retention.memory import POLICIES, MemoryManager, write_atomically
from .passage_cache import PassageKV, encode_passage, passage_pattern

__all__ = ["PassageKVStore", "STORAGES", "quantize_rows", "fingerprint"]

STORAGES = ("model", "float16", "bfloat16", "int8")
FORMAT = "hybridrag.PassageKVStore"
VERSION = 1
_ONE = np.ones(1, dtype=np.float32)  # the MemoryManager keeps eviction state only: every entry's vector is [1]


def quantize_rows(x):
    """x (..., D) float -> (int8 (..., D), float32 scale (..., 1)) with x ~= q * scale, per row absmax / 127."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-30) / 127.0
    return torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8), scale


def _pack(part, storage):
    """PassageKV -> {name: tensor} in `storage` form."""
    tensors = {}
    for kind, layers in (("k", part.keys), ("v", part.values)):
        for layer, tensor in enumerate(layers):
            if storage == "int8":
                tensors[f"{kind}{layer}"], tensors[f"{kind}{layer}.scale"] = quantize_rows(tensor)
            elif storage == "model":
                tensors[f"{kind}{layer}"] = tensor.contiguous()
            else:
                tensors[f"{kind}{layer}"] = tensor.to(getattr(torch, storage)).contiguous()
    return tensors


def _unpack(tensors, layers, start, dtype):
    """{name: tensor} from _pack -> PassageKV in `dtype`."""
    def layer_tensor(name):
        tensor = tensors[name]
        scale = tensors.get(f"{name}.scale")
        return (tensor.float() * scale).to(dtype) if scale is not None else tensor.to(dtype)

    return PassageKV([layer_tensor(f"k{i}") for i in range(layers)], [layer_tensor(f"v{i}") for i in range(layers)],
                     start)


def _nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors.values())


class _Entry:
    __slots__ = ("tensors", "layers", "start", "dtype", "nbytes")

    def __init__(self, tensors, layers, start, dtype):
        self.tensors, self.layers, self.start, self.dtype = tensors, layers, start, dtype
        self.nbytes = _nbytes(tensors)

    def part(self):
        """The stored PassageKV, in the model's dtype."""
        return _unpack(self.tensors, self.layers, self.start, self.dtype)


class PassageKVStore:
    """A bounded store of passage KV caches for one model (module docstring).

    Args:
        capacity: the most passages held (>= 1).
        max_bytes: the most bytes of stored tensors (None = no byte bound).
        storage: "model", "float16", "bfloat16" or "int8".
        policy: the MemoryManager's eviction policy, "lru", "lfu" or "importance".

    `hits`, `misses`, `evictions` count; `encode_seconds` sums the time spent encoding.
    Memory: the stored tensors (at most max_bytes) and the MemoryManager's per-slot arrays (~45 bytes a slot).
    """

    def __init__(self, capacity=32, *, max_bytes=None, storage="model", policy="lru"):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1):
            raise ValueError(f"max_bytes must be None or an int >= 1, got {max_bytes!r}")
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.capacity, self.max_bytes, self.storage, self.policy = capacity, max_bytes, storage, policy
        self._memory = MemoryManager(capacity, 1, policy=policy, decay=1.0, boost=0.0)
        self._entries = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0
        self.encode_seconds = 0.0

    def __len__(self):
        return len(self._entries)

    def __contains__(self, key):
        return key in self._entries

    def __repr__(self):
        return (f"PassageKVStore(passages={len(self)}/{self.capacity}, bytes={self._bytes}/{self.max_bytes}, "
                f"storage={self.storage!r}, policy={self.policy!r})")

    @property
    def nbytes(self):
        """Bytes of the stored tensors."""
        return self._bytes

    @property
    def tokens(self):
        """Tokens of the stored passages."""
        with self._lock:
            return sum(next(iter(e.tensors.values())).shape[2] for e in self._entries.values())

    @staticmethod
    def key(token_ids, pattern=None, prefix_ids=None):
        """The store key of a passage: sha256 of the pattern, the prefix's ids and the passage's ids."""
        digest = hashlib.sha256(repr(tuple(pattern) if pattern is not None else None).encode())
        for ids in (prefix_ids, token_ids):
            digest.update(b"|" if ids is None else ids.cpu().numpy().astype(np.int64).tobytes() + b"|")
        return digest.hexdigest()

    def get(self, model, token_ids, pattern, prefix=None, prefix_ids=None):
        """The PassageKV of token_ids (1, L), encoded under `pattern` (passage_pattern's arguments) after the
        PassageKV `prefix` (whose ids are prefix_ids), unless stored. A hit is a touch of the eviction policy."""
        key = self.key(token_ids, pattern, prefix_ids)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._memory.get(key)
                self.hits += 1
                return entry.part()
            self.misses += 1
        start = time.perf_counter()
        with passage_pattern(model, *pattern):
            part = encode_passage(model, token_ids, prefix)
        self.encode_seconds += time.perf_counter() - start
        entry = self.put(key, part)
        # a compressed store answers a miss with what its hits will give (the first answer equals the later ones)
        return part if self.storage == "model" else entry.part()

    def put(self, key, part, importance=1.0):
        """Store PassageKV `part` under `key`, evicting as the bounds require; returns the stored entry."""
        entry = _Entry(_pack(part, self.storage), len(part.keys), part.start, part.keys[0].dtype)
        if self.max_bytes is not None and entry.nbytes > self.max_bytes:
            raise ValueError(f"a passage of {part.length} tokens needs {entry.nbytes} bytes, more than the store's "
                             f"max_bytes={self.max_bytes}: raise passage_cache_bytes or shorten the passages "
                             "(attention.segment_length)")
        with self._lock:
            if key in self._entries:
                self._bytes -= self._entries.pop(key).nbytes
                self._memory.remove(key)
            while self._entries and (len(self._entries) >= self.capacity or
                                     (self.max_bytes is not None and self._bytes + entry.nbytes > self.max_bytes)):
                self._evict(self._memory.eviction_order()[0])
            self._memory.add(key, _ONE, importance=importance)
            self._entries[key] = entry
            self._bytes += entry.nbytes
        return entry

    def _evict(self, key):
        self._bytes -= self._entries.pop(key).nbytes
        self._memory.remove(key)
        self.evictions += 1

    def reward(self, key, value):
        """Add `value` (>= 0) to the importance of the stored passage `key` (a no-op for a key not stored)."""
        with self._lock:
            if key in self._entries:
                self._memory.add(key, _ONE, importance=self._memory.importance(key) + float(value))

    def clear(self):
        with self._lock:
            for key in list(self._entries):
                self._memory.remove(key)
            self._entries.clear()
            self._bytes = 0

    def stats(self):
        return {"passages": len(self), "bytes": self.nbytes, "hits": self.hits, "misses": self.misses,
                "evictions": self.evictions, "encode_seconds": round(self.encode_seconds, 4),
                "storage": self.storage, "policy": self.policy}

    # ---------------------------------------------------------------- persistence

    def save(self, folder, fingerprint):
        """Write the store into `folder`: <key>.safetensors per passage, eviction.npz, then index.json (last, so a
        folder without it is incomplete). Files of passages no longer stored are removed."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with self._lock:
            entries = dict(self._entries)
            reusable = self._reusable_files(folder, fingerprint)
            (folder / "index.json").unlink(missing_ok=True)
            for key, entry in entries.items():
                path = folder / f"{key}.safetensors"
                if not (reusable and path.is_file()):
                    write_atomically(str(path), lambda file, e=entry: file.write(_safetensors_bytes(e)))
            for stale in folder.glob("*.safetensors"):
                if stale.stem not in entries:
                    stale.unlink()
            self._memory.save(folder / "eviction.npz")
            index = {"format": FORMAT, "version": VERSION, "fingerprint": fingerprint, "capacity": self.capacity,
                     "max_bytes": self.max_bytes, "storage": self.storage, "policy": self.policy,
                     "passages": {key: {"layers": e.layers, "start": e.start, "dtype": str(e.dtype)}
                                  for key, e in entries.items()}}
        write_atomically(str(folder / "index.json"),
                         lambda file: file.write(json.dumps(index, indent=0).encode("utf-8")))

    def _reusable_files(self, folder, fingerprint):
        """True when the passage files in `folder` were written for this fingerprint and storage (a file's name is
        its key, so an existing file then holds the same tensors)."""
        try:
            index = json.loads((folder / "index.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return index.get("fingerprint") == fingerprint and index.get("storage") == self.storage

    def load(self, folder, fingerprint):
        """Replace this store's contents with the passages saved in `folder` (written by `save` for the same
        fingerprint; ValueError otherwise). The bounds and storage are this store's: passages past them are evicted
        in the saved eviction order, and a folder saved with another storage is refused."""
        from safetensors.torch import load_file

        folder = Path(folder)
        index_path = folder / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"no passage store at {folder} (missing index.json: never saved, or the save "
                                    "was interrupted)")
        index = json.loads(index_path.read_text(encoding="utf-8"))
        if index.get("format") != FORMAT:
            raise ValueError(f"{index_path} is not a {FORMAT} index")
        if index["fingerprint"] != fingerprint:
            raise ValueError(f"the passage store at {folder} was computed for {index['fingerprint']}, not for "
                             f"{fingerprint}: delete the folder to recompute it")
        if index["storage"] != self.storage:
            raise ValueError(f"the passage store at {folder} holds storage={index['storage']!r}, this store "
                             f"{self.storage!r}: delete the folder or set passage_cache_storage={index['storage']!r}")
        memory = MemoryManager.load(folder / "eviction.npz")
        self.clear()
        for key in reversed(memory.eviction_order()):  # the most valuable first, so bounds drop the least
            meta = index["passages"][key]
            tensors = load_file(str(folder / f"{key}.safetensors"))
            entry = _Entry(tensors, meta["layers"], meta["start"], getattr(torch, meta["dtype"].split(".")[-1]))
            if len(self._entries) >= self.capacity or (self.max_bytes is not None and
                                                       self._bytes + entry.nbytes > self.max_bytes):
                break
            self._entries[key] = entry
            self._bytes += entry.nbytes
        if (memory.capacity, memory.policy) == (self.capacity, self.policy):
            for key in set(memory.keys()) - set(self._entries):
                memory.remove(key)
            self._memory = memory  # clock, counts and importances as saved
        else:
            self._memory = MemoryManager(self.capacity, 1, policy=self.policy, decay=1.0, boost=0.0)
            for key in memory.eviction_order():  # the saved order re-played, least valuable first
                if key in self._entries:
                    self._memory.add(key, _ONE, importance=memory.importance(key))
        return self


def _safetensors_bytes(entry):
    from safetensors.torch import save

    return save(entry.tensors)


def fingerprint(language_model):
    """What a passage's KV cache depends on besides its tokens: the model (name, config, weights' dtype and int8)."""
    config = language_model.model.config.to_json_string(use_diff=False)
    digest = hashlib.sha256(config.encode("utf-8")).hexdigest()[:16]
    return (f"{language_model.name}|config={digest}|dtype={str(language_model.dtype).split('.')[-1]}|"
            f"int8={language_model.int8}")
