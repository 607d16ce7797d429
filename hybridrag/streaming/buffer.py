"""StreamBuffer: a bounded asyncio FIFO of arriving chunks that hands them out in batches.

Semantics, in one place:
- `await put(item)` appends at the tail. When the buffer holds `max_items`, put waits for room (back-pressure); it never
  drops an item. Waiting puts are admitted strictly in the order they were called, and a new put never overtakes one
  that is waiting, so the order items enter is the order of the put calls.
- `await get_batch()` returns a list of 1..`batch_size` items from the head, oldest first. It waits for a first item,
  then up to `timeout` seconds more for the batch to fill; when the time is up (or the buffer is closed) it hands out
  what is there. `timeout=0` hands out what is there at once.
- `close()` ends input: a later put raises `StreamClosed`, and so does a put still waiting for room when close() is
  called (its item is not in the buffer, so the caller knows it was not taken). Items already in the buffer are still
  handed out; once it is empty, get_batch raises `StreamClosed`. A get_batch never returns an empty list.
  `async for batch in buffer` yields batches until then.
- A put or get_batch that is cancelled while it waits leaves the buffer as if it had not been called.
- One buffer belongs to one event loop and is not thread-safe (like `asyncio.Queue`).
"""
import asyncio
import math
from collections import deque

__all__ = ["StreamBuffer", "StreamClosed"]


class StreamClosed(Exception):
    """Raised by `put` after `close()`, and by `get_batch` once a closed buffer is empty."""


def check_count(name, value, minimum=1):
    """An int (not a bool) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_timeout(name, value):
    """A finite number of seconds >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds (int or float), got {type(value).__name__}")
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be finite and >= 0 seconds, got {value}")
    return float(value)


def _forget(waiters, fut):
    try:
        waiters.remove(fut)
    except ValueError:  # already taken off by whoever woke it
        pass


class StreamBuffer:
    """Bounded FIFO of chunks handed out in batches; see the module docstring for the exact semantics.

    Args:
        max_items: the most items the buffer holds; put waits beyond it.
        batch_size: the most items one get_batch returns (at most max_items).
        timeout: seconds get_batch waits, after a first item is there, for the batch to fill.
    """

    def __init__(self, max_items, batch_size=1, timeout=0.0):
        self._max_items = check_count("max_items", max_items)
        self._batch_size = check_count("batch_size", batch_size)
        if batch_size > max_items:
            raise ValueError(f"batch_size must be <= max_items ({max_items}): a fuller batch could never form, "
                             f"got batch_size={batch_size}")
        self._timeout = check_timeout("timeout", timeout)
        self._items = deque()
        self._putters = deque()  # futures of puts waiting for room, oldest first
        self._getters = deque()  # futures of get_batch calls waiting for items
        self._reserved = 0       # slots granted to woken putters that have not appended yet
        self._closed = False

    @property
    def max_items(self):
        return self._max_items

    @property
    def batch_size(self):
        return self._batch_size

    @property
    def timeout(self):
        return self._timeout

    @property
    def closed(self):
        return self._closed

    def __len__(self):
        """Items in the buffer now (not counting puts still waiting for room)."""
        return len(self._items)

    def __repr__(self):
        state = "closed" if self._closed else "open"
        return (f"StreamBuffer({len(self._items)}/{self._max_items} items, batch_size={self._batch_size}, "
                f"timeout={self._timeout}, {state})")

    async def put(self, item):
        """Append item at the tail, waiting while the buffer is full. Raises StreamClosed if the buffer is closed
        before the item got in."""
        if self._closed:
            raise StreamClosed("put() on a closed StreamBuffer")
        if self._putters or self._reserved or len(self._items) >= self._max_items:
            fut = asyncio.get_running_loop().create_future()
            self._putters.append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():  # a slot was granted just before the cancel: pass it on
                    self._reserved -= 1
                    self._wake_putters()
                else:
                    _forget(self._putters, fut)
                raise
            self._reserved -= 1
            if self._closed:
                raise StreamClosed("the StreamBuffer was closed while put() waited for room; the item was not added")
        self._items.append(item)
        self._wake(self._getters)

    async def get_batch(self):
        """The next 1..batch_size items, oldest first. Raises StreamClosed once the buffer is closed and empty."""
        loop = asyncio.get_running_loop()
        while True:
            while not self._items:
                if self._closed:
                    raise StreamClosed("the StreamBuffer is closed and empty")
                await self._wait_for_items(None)
            if self._timeout > 0:
                deadline = loop.time() + self._timeout
                while self._items and len(self._items) < self._batch_size and not self._closed:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    await self._wait_for_items(remaining)
            if self._items:  # another consumer may have emptied it while this one waited
                break
        batch = [self._items.popleft() for _ in range(min(len(self._items), self._batch_size))]
        self._wake_putters()
        return batch

    def close(self):
        """No more items: later puts raise StreamClosed; get_batch drains what is left, then raises StreamClosed.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        while self._putters:  # they wake, see the buffer closed and raise StreamClosed
            fut = self._putters.popleft()
            if not fut.done():
                self._reserved += 1
                fut.set_result(None)
        self._wake(self._getters)

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            return await self.get_batch()
        except StreamClosed:
            raise StopAsyncIteration from None

    async def _wait_for_items(self, timeout):
        """Wait until a put or close (or until timeout seconds pass, when timeout is not None)."""
        fut = asyncio.get_running_loop().create_future()
        self._getters.append(fut)
        try:
            if timeout is None:
                await fut
            else:
                await asyncio.wait((fut,), timeout=timeout)
        finally:
            if not fut.done():
                fut.cancel()
            _forget(self._getters, fut)

    def _wake_putters(self):
        """Grant free slots to waiting putters, oldest first."""
        while self._putters and len(self._items) + self._reserved < self._max_items:
            fut = self._putters.popleft()
            if not fut.done():
                self._reserved += 1
                fut.set_result(None)

    @staticmethod
    def _wake(waiters):
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
