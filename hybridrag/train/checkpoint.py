"""Checkpoint files: written atomically, checked by a SHA-256 on load, and the RNG states they carry.

File layout: MAGIC (8 bytes) | payload length (8 bytes, little endian) | SHA-256 of the payload (32 bytes) | payload,
where the payload is torch.save of a dict of tensors and plain Python values, loaded with weights_only=True.
A truncated, corrupted or foreign file is a ValueError naming it; nothing is half-loaded.
"""
import hashlib
import io
import random
import re
from pathlib import Path

import numpy as np
import torch

from ..atomic_file import write_atomically

MAGIC = b"HRCKPT01"
_HEADER = len(MAGIC) + 8 + 32
_NAME = re.compile(r"checkpoint-(\d+)\.pt")


def checkpoint_path(output_dir, step):
    return Path(output_dir) / f"checkpoint-{step:08d}.pt"


def latest_checkpoint(output_dir):
    """The checkpoint of the highest step in output_dir, or None."""
    found = [(int(m.group(1)), p) for p in Path(output_dir).glob("checkpoint-*.pt")
             if (m := _NAME.fullmatch(p.name))]
    return max(found)[1] if found else None


def save_checkpoint(state, path):
    """torch.save(state) to `path` through `write_atomically` (a temporary file in the same folder, fsync,
    os.replace; a dead writer's temporary is cleaned up on the next save): a reader sees the old file or the whole
    new one, never a part."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda out: out.write(MAGIC + len(payload).to_bytes(8, "little")
                                                 + hashlib.sha256(payload).digest() + payload))
    return path


def load_checkpoint(path):
    """The state dict saved by save_checkpoint; ValueError when the file is not one, is truncated or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    data = path.read_bytes()
    if len(data) < _HEADER or data[:len(MAGIC)] != MAGIC:
        raise ValueError(f"checkpoint {path} is not a hybridrag training checkpoint (no {MAGIC!r} header; "
                         f"{len(data)} bytes)")
    length = int.from_bytes(data[len(MAGIC):len(MAGIC) + 8], "little")
    payload = data[_HEADER:]
    if len(payload) != length:
        raise ValueError(f"checkpoint {path} is truncated or padded: its header says {length} payload bytes, the file "
                         f"holds {len(payload)}")
    if hashlib.sha256(payload).digest() != data[len(MAGIC) + 8:_HEADER]:
        raise ValueError(f"checkpoint {path} is corrupt: its SHA-256 does not match the one written with it")
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


def rng_state():
    """The RNG states of torch (CPU and every CUDA device), numpy and python's random, as tensors and plain values."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(gauss)],
            "python": random.getstate()}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
