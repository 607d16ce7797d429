"""A small writer-preferring readers-writer lock (stdlib only): what lets many searches run together while add, remove
and save of a knowledge base run one at a time and never beside a search."""
import threading
from contextlib import contextmanager


class ReadWriteLock:
    """Any number of readers together, or one writer alone.

    Writer-preferring: once a writer waits, new readers wait behind it, so a steady stream of readers cannot starve
    writers. Reentrant: a thread holding the read lock may take it again (granted at once, even while a writer waits,
    since that writer is waiting for this very thread), and the writing thread may take the read or the write lock
    again. Taking the write lock while holding only the read lock is a RuntimeError: two readers upgrading at once
    would wait for each other forever.

    Use `with lock.read():` and `with lock.write():`.
    """

    def __init__(self):
        self._condition = threading.Condition(threading.Lock())
        self._readers = 0  # read holds over all threads, reentrant ones counted each time
        self._writer = None  # ident of the thread holding the write lock
        self._writes = 0  # that thread's write depth
        self._waiting_writers = 0
        self._local = threading.local()  # .reads: this thread's read depth

    def _read_depth(self):
        return getattr(self._local, "reads", 0)

    def acquire_read(self):
        me = threading.get_ident()
        with self._condition:
            if self._writer != me and not self._read_depth():
                while self._writer is not None or self._waiting_writers:
                    self._condition.wait()
            self._readers += 1
        self._local.reads = self._read_depth() + 1

    def release_read(self):
        depth = self._read_depth()
        if not depth:
            raise RuntimeError("release_read called by a thread that holds no read lock")
        self._local.reads = depth - 1
        with self._condition:
            self._readers -= 1
            if not self._readers:
                self._condition.notify_all()

    def acquire_write(self):
        me = threading.get_ident()
        with self._condition:
            if self._writer == me:
                self._writes += 1
                return
            if self._read_depth():
                raise RuntimeError("this thread holds the read lock: release it before taking the write lock "
                                   "(an upgrade deadlocks when two readers try it)")
            self._waiting_writers += 1
            try:
                while self._writer is not None or self._readers:
                    self._condition.wait()
            finally:
                self._waiting_writers -= 1
                self._condition.notify_all()  # readers held back by this writer re-check (it may have given up)
            self._writer, self._writes = me, 1

    def release_write(self):
        with self._condition:
            if self._writer != threading.get_ident():
                raise RuntimeError("release_write called by a thread that does not hold the write lock")
            self._writes -= 1
            if not self._writes:
                self._writer = None
                self._condition.notify_all()

    @contextmanager
    def read(self):
        self.acquire_read()
        try:
            yield
        finally:
            self.release_read()

    @contextmanager
    def write(self):
        self.acquire_write()
        try:
            yield
        finally:
            self.release_write()

    def __repr__(self):
        writer = "held" if self._writer is not None else "free"
        return (f"ReadWriteLock(readers={self._readers}, writer={writer}, "
                f"waiting_writers={self._waiting_writers})")
