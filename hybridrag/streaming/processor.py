"""StreamProcessor: runs the arriving chunks of many streams through one model callable, in order per stream.

    async with StreamProcessor(step, max_pending=64, batch_size=8, timeout=0.002) as processor:
        ...  # producers: index = await processor.submit(stream_id, chunk)
        ...  # one consumer: async for stream_id, index, output in processor.results(): ...

Semantics, in one place:
- `process_fn(stream_id, chunk)` returns the output for that chunk. It may be a plain function or return an awaitable
  (an `async def`), which is awaited. It may keep per-stream state (a `StreamingKVCache` per stream, say): the chunks of
  one stream reach it one at a time, in submission order, each call finished before the next starts. Chunks of
  different streams in one batch run concurrently when process_fn awaits; a plain function runs on the event loop
  (wrap it in `asyncio.to_thread` inside an async process_fn to keep the loop free during long calls).
- `await submit(stream_id, chunk)` accepts a chunk and returns its index: 0, 1, 2, ... per stream, in call order. It
  waits while `max_pending` chunks are waiting to be processed (back-pressure; nothing is dropped). A submit that raises
  (cancelled, or the processor closed while it waited) did not accept the chunk; its index is not reused.
- `results()` yields `(stream_id, index, output)` once for every accepted chunk, in index order within each stream
  (streams interleave in completion order). It ends after `close()` once every result has been yielded. One consumer
  at a time. At most `max_results` results wait to be read (`results_waiting`); when they are there the worker waits
  for the reader, the pending chunks fill up and `submit` waits: a lagging reader slows the producers instead of
  growing memory. So read results while submitting: with no reader, submit (and close) wait once about
  max_results + batch_size + max_pending chunks are outstanding. Pass a larger max_results to submit a known number
  of chunks before reading any.
- Errors: when process_fn raises for a chunk, that chunk's result is a `StreamError` instance (yielded as `output`,
  not raised, so the other streams' results keep coming); `.error` is the exception, with its traceback. The stream's
  state is then unknown, so it is failed: its chunks already accepted are not processed and get a `StreamError` with
  the same `.error` and `.failed_index`, and a later `submit` for it raises that `StreamError` (index None).
  Other streams go on untouched. Only `Exception`s are caught; a `BaseException` (a cancellation, or a custom
  BaseException subclass) stops the processor: the other chunks of its batch are cancelled, nothing more is processed,
  `error` holds it and `closed` is True; every submit waiting for room, and every later one, raises `StreamClosed`
  saying why (its chunk not accepted); `results()` yields the results already made, then raises it (RuntimeError for a
  cancellation) rather than ending as if complete; `close()` raises the same.
- `await close()` accepts no more chunks (later submits raise `StreamClosed`, as do submits still waiting for room)
  and returns once every accepted chunk has been processed and its result queued for the reader. `async with` closes
  on exit.
"""
import asyncio
import inspect

from .buffer import StreamBuffer, StreamClosed, check_count, check_timeout

__all__ = ["StreamProcessor", "StreamError"]

_END = object()  # marks the end of the results queue


class StreamError(Exception):
    """The result of a chunk that failed, or that was not processed because an earlier chunk of its stream failed.

    Attributes:
        stream_id: the stream.
        index: this chunk's index in its stream (None when raised by submit for a chunk that was refused).
        error: the exception process_fn raised for chunk `failed_index` of this stream.
        failed_index: the index of the chunk whose processing raised (== index for that chunk itself).
    """

    def __init__(self, stream_id, index, error, failed_index=None):
        self.stream_id = stream_id
        self.index = index
        self.error = error
        self.failed_index = index if failed_index is None else failed_index
        what = f"process_fn raised {type(error).__name__}: {error}"
        if self.failed_index == index:
            message = f"stream {stream_id!r}, chunk {index}: {what}"
        else:
            chunk = "a new chunk" if index is None else f"chunk {index}"
            message = (f"stream {stream_id!r}, {chunk} refused: chunk {self.failed_index} of this stream failed "
                       f"earlier ({what})")
        super().__init__(message)
        self.__cause__ = error


class StreamProcessor:
    """Feeds chunks of many streams through `process_fn(stream_id, chunk)`; see the module docstring for the semantics.

    Args:
        process_fn: callable `(stream_id, chunk) -> output`, or returning an awaitable of the output.
        max_pending: the most accepted chunks waiting to be processed; submit waits beyond it.
        batch_size: the most chunks taken in one batch (at most max_pending).
        timeout: seconds a batch waits, after its first chunk, for more chunks to fill it.
        max_results: the most results waiting to be read; the worker waits beyond it. Default: max_pending.
    """

    def __init__(self, process_fn, *, max_pending=64, batch_size=8, timeout=0.0, max_results=None):
        if not callable(process_fn):
            raise TypeError("process_fn must be callable (stream_id, chunk) -> output, "
                            f"got {type(process_fn).__name__}")
        check_count("max_pending", max_pending)
        check_count("batch_size", batch_size)
        if batch_size > max_pending:
            raise ValueError(f"batch_size must be <= max_pending ({max_pending}), got batch_size={batch_size}")
        check_timeout("timeout", timeout)
        self._max_results = max_pending if max_results is None else check_count("max_results", max_results)
        self._process_fn = process_fn
        self._buffer = StreamBuffer(max_pending, batch_size, timeout)
        self._next_index = {}  # stream_id -> index of its next chunk
        self._failed = {}      # stream_id -> the StreamError of the chunk that failed
        self._results = asyncio.Queue()  # unbounded, so that the end marker always fits: _room is the bound
        self._room = asyncio.Semaphore(self._max_results)
        self._waiting = 0  # results in _results, not counting the end marker
        self._worker = None
        self._closed = False
        self._error = None

    @property
    def closed(self):
        return self._closed

    @property
    def max_results(self):
        return self._max_results

    @property
    def results_waiting(self):
        """Results made and not yet read (at most max_results)."""
        return self._waiting

    @property
    def error(self):
        """The BaseException that stopped the processor (a CancelledError if its worker was cancelled), or None."""
        return self._error

    def failed(self, stream_id):
        """The StreamError of the chunk whose processing failed in this stream, or None."""
        return self._failed.get(stream_id)

    async def submit(self, stream_id, chunk):
        """Accept chunk as the next chunk of stream_id and return its index, waiting while max_pending chunks wait.
        Raises StreamClosed after close(), StreamError if the stream has failed, TypeError if stream_id is
        unhashable."""
        try:
            hash(stream_id)
        except TypeError:
            raise TypeError(f"stream_id must be hashable, got {type(stream_id).__name__}") from None
        if self._error is not None:
            raise self._stopped("submit() refused") from self._error
        if self._closed:
            raise StreamClosed("submit() on a closed StreamProcessor")
        failure = self._failed.get(stream_id)
        if failure is not None:
            raise StreamError(stream_id, None, failure.error, failure.failed_index)
        self._start()
        index = self._next_index.get(stream_id, 0)
        self._next_index[stream_id] = index + 1
        try:
            await self._buffer.put((stream_id, index, chunk))
        except StreamClosed:
            if self._error is not None:
                raise self._stopped("the chunk was not accepted") from self._error
            raise
        return index

    async def results(self):
        """Yield (stream_id, index, output) for every accepted chunk, in order per stream, until closed and drained.
        output is a StreamError instance for a chunk that failed or was refused."""
        self._start()
        while True:
            item = await self._results.get()
            if item is _END:
                self._results.put_nowait(_END)  # a later results() ends too
                self._raise_if_stopped()
                return
            self._waiting -= 1
            self._room.release()
            yield item

    async def close(self):
        """Accept no more chunks and return once every accepted chunk has been processed and its result queued (so it
        waits for the reader while max_results results are unread). Idempotent. Raises what stopped the processor,
        if something did (see `error`)."""
        self._closed = True
        self._buffer.close()
        self._start()
        await asyncio.wait((self._worker,))  # not `await worker`: its cancellation must not look like ours
        self._raise_if_stopped()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc_info):
        await self.close()

    def _start(self):
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run())
            self._worker.add_done_callback(self._worker_done)

    def _worker_done(self, task):
        """The worker ended: after close() (error None) or stopped by a BaseException, which fails the processor."""
        if task.cancelled():
            self._error = asyncio.CancelledError("the StreamProcessor's worker was cancelled")
        elif task.exception() is not None:
            self._error = task.exception()
        if self._error is not None:
            self._closed = True
            self._buffer.close()  # submits waiting for room wake up and raise StreamClosed
        self._results.put_nowait(_END)

    def _stopped(self, what):
        if isinstance(self._error, asyncio.CancelledError):
            why = "its worker was cancelled (CancelledError)"
        else:
            why = f"process_fn raised {type(self._error).__name__}: {self._error}"
        return StreamClosed(f"the StreamProcessor stopped: {why}; {what}")

    def _raise_if_stopped(self):
        if isinstance(self._error, asyncio.CancelledError):
            raise RuntimeError("the StreamProcessor's worker was cancelled before it processed every chunk") \
                from self._error
        if self._error is not None:
            raise self._error

    async def _run(self):
        while True:
            try:
                batch = await self._buffer.get_batch()
            except StreamClosed:
                return
            by_stream = {}
            for stream_id, index, chunk in batch:
                by_stream.setdefault(stream_id, []).append((index, chunk))
            if len(by_stream) == 1:
                await self._run_stream(*next(iter(by_stream.items())))
            else:
                await _together(self._run_stream(stream_id, chunks) for stream_id, chunks in by_stream.items())

    async def _run_stream(self, stream_id, chunks):
        """One stream's chunks of a batch, one after another, in index order."""
        for index, chunk in chunks:
            failure = self._failed.get(stream_id)
            if failure is not None:
                output = StreamError(stream_id, index, failure.error, failure.failed_index)
            else:
                try:
                    output = self._process_fn(stream_id, chunk)
                    if inspect.isawaitable(output):
                        output = await output
                except Exception as error:  # not swallowed: delivered as this chunk's result, and the stream is failed
                    output = StreamError(stream_id, index, error)
                    self._failed[stream_id] = output
            await self._room.acquire()  # back-pressure: wait while max_results results are unread
            self._results.put_nowait((stream_id, index, output))
            self._waiting += 1


async def _together(coros):
    """Run coros concurrently; when one raises (only a BaseException can), cancel the others and re-raise."""
    tasks = [asyncio.ensure_future(coro) for coro in coros]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
        for task in tasks:  # mark every outcome retrieved; the first error is the one raised
            if not task.cancelled():
                task.exception()
        raise
