"""Atomic file writes: a reader sees the old file or the whole new one, never half of it, and the temporaries of
writers that died are cleaned up. Standard library only, so every layer can write its files through it."""
import os
import re
import tempfile
import time

LEGACY_TEMPORARY_AGE = 3600.0  # seconds; see remove_stale_temporaries


def _is_alive(pid):
    """Whether a process `pid` runs on this host. Without a POSIX signal-0 probe, assume it does (keep its file)."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except (OverflowError, ValueError):  # not a possible pid
        return False
    return True


def remove_stale_temporaries(directory, name_pattern, legacy_age=LEGACY_TEMPORARY_AGE):
    """Delete the temporaries of `write_atomically` for the files in `directory` whose names match the regex
    `name_pattern` (fully), when their writer is gone; returns the names removed.

    `.{name}.{pid}.{random}.tmp` goes when no process `pid` runs on this host (and pid is not this process: a thread
    here may be writing it). `.{name}.{random}.tmp`, the name before the pid was added, goes when older than
    `legacy_age` seconds. The pid test assumes the writers share this host: on a folder shared across machines, a
    live writer elsewhere whose pid is free here would lose its temporary (its os.replace then fails; nothing else).
    Removal is best effort: a file that cannot be removed (read-only folder, already gone) is left.
    """
    temporary = re.compile(rf"\.({name_pattern})\.(?:(\d+)\.)?[a-z0-9_]{{8}}\.tmp")
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    removed, now = [], time.time()
    for entry in names:
        match = temporary.fullmatch(entry)
        if match is None:
            continue
        path = os.path.join(directory, entry)
        try:
            if match.group(2) is not None:
                pid = int(match.group(2))
                stale = pid != os.getpid() and not _is_alive(pid)
            else:
                stale = now - os.path.getmtime(path) > legacy_age
            if stale:
                os.unlink(path)
                removed.append(entry)
        except OSError:  # best effort: gone already, or not ours to delete
            continue
    return removed


def write_atomically(path, write):
    """Call `write(file)` on a new temporary file beside `path` (`.{name}.{pid}.{random}.tmp`), fsync it, then
    os.replace it onto `path`. Stale temporaries of `path` are removed first; on any error the temporary is removed
    and `path` is left as it was."""
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    remove_stale_temporaries(directory, re.escape(name))
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
