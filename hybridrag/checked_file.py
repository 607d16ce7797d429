"""Checkpoint files with a checksum: a torch.save payload of plain data and tensors behind one header line,

    b"hybridrag.<Kind> checkpoint <format> sha256=<64 hex digits>\n" + payload

read back with weights_only=True. The HybridEncoder, the DocumentGenerator and the ContinualLearner write them
(`write_checked`, through atomic_file.write_atomically); a missing, empty, foreign, truncated or altered file is a clear error naming it,
never a half-loaded state.
"""
import hashlib
import io
import pickle
import re
from pathlib import Path

import torch

from .atomic_file import write_atomically

# what torch.load raises on a payload it cannot read (besides the checksum, which catches most damage first)
_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError,
                AttributeError, ImportError, UnicodeDecodeError)


def checked_bytes(kind, version, state):
    """The file's bytes for `state` (a dict of plain data and tensors): the header line, then torch.save(state)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    return f"hybridrag.{kind} checkpoint {version} sha256={hashlib.sha256(payload).hexdigest()}\n".encode() + payload


def write_checked(path, kind, version, state):
    """Write `state` as a `kind` checkpoint of format `version` to `path` (its folder made if missing), atomically:
    a reader sees the old file or the whole new one. Returns the path as a Path."""
    data = checked_bytes(kind, version, state)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda out: out.write(data))
    return path


def read_checked(path, kind, version, keys, map_location="cpu"):
    """The state dict in the checkpoint at `path` (a Path), after checking its header, format `version`, checksum
    and that the payload is a dict holding `keys`. FileNotFoundError for a missing file, ValueError naming the path
    and what is wrong otherwise."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"no {kind} checkpoint at {str(path)!r}") from None
    if not data:
        raise ValueError(f"{path} is empty, not a {kind} checkpoint (an interrupted copy?)")
    magic = f"hybridrag.{kind} checkpoint"
    header = re.match(re.escape(magic).encode() + rb" (\d+) sha256=([0-9a-f]{64})\n", data[:len(magic) + 96])
    if header is None:
        what = "a torch.save file without the header" if data[:2] == b"PK" else "garbage"
        raise ValueError(f"{path} is not a {kind} checkpoint of format {version}: it starts with no "
                         f"'{magic} {version} sha256=...' line ({what})")
    if int(header.group(1)) != version:
        raise ValueError(f"{path} is a {kind} checkpoint of format {int(header.group(1))}; this version reads "
                         f"format {version}")
    payload = memoryview(data)[header.end():]
    digest = hashlib.sha256(payload).hexdigest()
    if digest != header.group(2).decode():
        raise ValueError(f"{path} is corrupt: its {len(payload)} payload bytes have sha256 {digest}, the header "
                         f"records {header.group(2).decode()} (truncated or altered)")
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except _LOAD_ERRORS as error:
        raise ValueError(f"{path}: torch.load cannot read its payload: {type(error).__name__}: {error}") from None
    if not isinstance(state, dict) or not set(keys) <= state.keys():
        raise ValueError(f"{path} is not a {kind} checkpoint of format {version}: its payload lacks "
                         f"{sorted(set(keys) - state.keys()) if isinstance(state, dict) else 'a state dict'}")
    return state


def header_digest(path, kind):
    """The SHA-256 (64 hex digits) that the header of the `kind` checkpoint at `path` records, read from the header
    line alone (the payload is not hashed again); ValueError when the file does not start with such a header."""
    magic = f"hybridrag.{kind} checkpoint"
    with open(path, "rb") as handle:
        start = handle.read(len(magic) + 96)
    found = re.match(re.escape(magic).encode() + rb" \d+ sha256=([0-9a-f]{64})\n", start)
    if found is None:
        raise ValueError(f"{path} is not a {kind} checkpoint")
    return found.group(1).decode()


def state_mismatches(saved, current, *, dtypes=True):
    """What keeps the state dict `saved` from loading into a module whose state dict is `current`: a list of
    "missing [...]", "unexpected [...]" and "<name> is <saved> in the checkpoint but <current> here" parts (empty
    when the names and shapes, and with `dtypes` the dtypes, all agree). Non-tensor entries count by type name."""
    def describe(value):
        if not isinstance(value, torch.Tensor):
            return type(value).__name__
        return (tuple(value.shape), value.dtype) if dtypes else tuple(value.shape)
    mine = {name: describe(value) for name, value in current.items()}
    theirs = {name: describe(value) for name, value in saved.items()}
    missing, unexpected = sorted(mine.keys() - theirs.keys()), sorted(theirs.keys() - mine.keys())
    differ = [f"{name} is {theirs[name]} in the checkpoint but {mine[name]} here"
              for name in sorted(mine.keys() & theirs.keys()) if mine[name] != theirs[name]]
    return ([f"missing {missing}"] if missing else []) + ([f"unexpected {unexpected}"] if unexpected else []) + differ
