"""The server's generation queue: a bounded StreamBuffer of accepted requests, handed in batches to one worker thread
that runs them one after another on the one language model.

- `submit` accepts a job only while the buffer has room (no waiting: a full queue is the caller's 429), so every
  accepted job is in the buffer exactly once, and the worker settles each exactly once: completed, failed (the
  exception), or cancelled (its client left or timed out before or while it ran). `stats()` adds up:
  accepted == completed + failed + cancelled + pending + running.
- A cancelled job that has not started is skipped; one that is generating stops at its next token
  (`Job.on_token` raises GenerationCancelled inside the generation loop).
- Streaming jobs get their text pieces on an asyncio queue, then None when the job is settled.
"""
import asyncio
import collections
import math
import threading
import time
import uuid

from ..streaming import StreamBuffer, StreamClosed


class GenerationCancelled(Exception):
    """Raised inside a generation whose job was cancelled (its client disconnected or timed out)."""


class Job:
    """One request: `payload` for the worker's `answer(job)`, its future (the answer dict, or the exception) on the
    event loop, and, when streaming, the queue of text pieces."""

    def __init__(self, payload, loop, *, stream=False):
        self.id = uuid.uuid4().hex
        self.payload = payload
        self.future = loop.create_future()
        self.pieces = asyncio.Queue() if stream else None
        self._loop = loop
        self._cancelled = threading.Event()

    @property
    def cancelled(self):
        return self._cancelled.is_set()

    def cancel(self):
        """Stop the job: skipped if it has not started, stopped at its next token if it runs."""
        self._cancelled.set()

    def on_token(self, piece):
        """The generation's on_token callback (worker thread)."""
        if self._cancelled.is_set():
            raise GenerationCancelled(f"request {self.id} was cancelled")
        if self.pieces is not None:
            self._loop.call_soon_threadsafe(self.pieces.put_nowait, piece)

    def _settle(self, result=None, error=None):
        """On the loop: the future's outcome (once), then the end of the stream."""
        if not self.future.done():
            if error is None:
                self.future.set_result(result)
            else:
                self.future.set_exception(error)
        if self.pieces is not None:
            self.pieces.put_nowait(None)


class GenerationQueue:
    """Bounded queue of Jobs in front of `answer(job) -> dict`, which runs in a worker thread one job at a time.

    capacity: the most jobs waiting (the running batch not counted); batch_size: jobs the worker takes at once (it
    still runs them in turn: there is one model). Start with `start()` inside the event loop, stop with `close()`.
    """

    def __init__(self, answer, capacity=16, batch_size=4):
        self._answer = answer
        self._buffer = StreamBuffer(capacity, batch_size=min(batch_size, capacity))
        self.capacity = capacity
        self._counts = collections.Counter()
        self._running = 0
        self._durations = collections.deque(maxlen=20)
        self._task = None
        self._loop = None

    def start(self):
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._dispatch())

    async def close(self):
        """Stop accepting; jobs already accepted are still run, then the worker ends."""
        self._buffer.close()
        if self._task is not None:
            await self._task

    async def submit(self, job):
        """Accept `job` if there is room now -> True, else False (nothing queued). Never waits for room."""
        if self._buffer.closed or len(self._buffer) >= self.capacity:
            self._counts["rejected"] += 1
            return False
        try:
            await self._buffer.put(job)  # there is room: it appends at once
        except StreamClosed:
            self._counts["rejected"] += 1
            return False
        self._counts["accepted"] += 1
        return True

    def retry_after(self):
        """Seconds until a slot is likely free: the recent mean job time times the jobs ahead (at least 1)."""
        mean = sum(self._durations) / len(self._durations) if self._durations else 1.0
        return max(1, math.ceil(mean * (len(self._buffer) + self._running)))  # jobs run one at a time

    def count_timeout(self):
        self._counts["timed_out"] += 1

    def stats(self):
        return {"pending": len(self._buffer), "running": self._running, "capacity": self.capacity,
                **{name: self._counts[name] for name in ("accepted", "completed", "failed", "cancelled",
                                                          "timed_out", "rejected")}}

    async def _dispatch(self):
        async for batch in self._buffer:
            self._running = len(batch)
            try:
                await asyncio.to_thread(self._run_batch, batch)
            finally:
                self._running = 0

    def _run_batch(self, batch):
        """Worker thread: each job in turn, settled on the loop."""
        for job in batch:
            outcome = "cancelled"
            result = error = None
            if not job.cancelled:
                start = time.perf_counter()
                try:
                    result, outcome = self._answer(job), "completed"
                except GenerationCancelled as cancelled:
                    error = cancelled
                except Exception as failure:  # noqa: BLE001  (handed to the request that owns the job)
                    error, outcome = failure, "failed"
                self._durations.append(time.perf_counter() - start)
            else:
                error = GenerationCancelled(f"request {job.id} was cancelled before it ran")
            self._counts[outcome] += 1
            self._running -= 1
            self._loop.call_soon_threadsafe(job._settle, result, error)
