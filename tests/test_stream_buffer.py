"""StreamBuffer and StreamProcessor: order, back-pressure, batching, timeouts, close, errors per stream, bad arguments.
Plain pytest functions driving `asyncio.run` (no pytest-asyncio). Every wait is bounded so a bug fails, never hangs."""
import asyncio
import random

import pytest
import torch

from hybridrag.streaming import StreamBuffer, StreamClosed, StreamError, StreamProcessor

LIMIT = 5.0  # seconds any one scenario may take before it counts as a hang


def run(coro):
    async def bounded():
        return await asyncio.wait_for(coro, LIMIT)
    return asyncio.run(bounded())


async def drain(buffer):
    """Every batch until the closed buffer is empty."""
    return [batch async for batch in buffer]


async def settle():
    """Let every ready task run until it blocks."""
    for _ in range(5):
        await asyncio.sleep(0)


# StreamBuffer ---------------------------------------------------------------------------------------------------------

def test_fifo_order_and_len():
    async def main():
        buffer = StreamBuffer(max_items=16, batch_size=4)
        for i in range(10):
            await buffer.put(i)
        assert len(buffer) == 10
        batch = await buffer.get_batch()
        assert batch == [0, 1, 2, 3]
        assert len(buffer) == 6
        buffer.close()
        rest = await drain(buffer)
        assert rest == [[4, 5, 6, 7], [8, 9]]
        assert len(buffer) == 0
    run(main())


def test_put_blocks_when_full_until_a_get():
    async def main():
        buffer = StreamBuffer(max_items=2, batch_size=1)
        await buffer.put("a")
        await buffer.put("b")
        blocked = asyncio.create_task(buffer.put("c"))
        await settle()
        assert not blocked.done(), "put must wait while the buffer is full"
        assert len(buffer) == 2
        assert await buffer.get_batch() == ["a"]
        await settle()
        assert blocked.done() and blocked.exception() is None
        assert len(buffer) == 2
        assert await buffer.get_batch() == ["b"]
        assert await buffer.get_batch() == ["c"]
    run(main())


def test_burst_from_many_producers_small_bound_nothing_dropped():
    producers, per_producer, bound = 8, 125, 4  # 1000 items through 4 slots

    async def main():
        buffer = StreamBuffer(max_items=bound, batch_size=3, timeout=0.001)
        high_water = 0

        async def produce(p):
            nonlocal high_water
            for i in range(per_producer):
                await buffer.put((p, i))
                high_water = max(high_water, len(buffer))
                assert len(buffer) <= bound
                if random.random() < 0.1:
                    await asyncio.sleep(0)

        async def consume():
            got = []
            async for batch in buffer:
                assert 1 <= len(batch) <= 3
                got.extend(batch)
                if random.random() < 0.3:
                    await asyncio.sleep(0)
            return got

        consumer = asyncio.create_task(consume())
        await asyncio.gather(*(produce(p) for p in range(producers)))
        buffer.close()
        got = await consumer
        assert high_water == bound, "the burst should have filled the buffer"
        assert len(got) == producers * per_producer
        assert set(got) == {(p, i) for p in range(producers) for i in range(per_producer)}
        for p in range(producers):  # each producer's items leave in the order it put them
            assert [i for q, i in got if q == p] == list(range(per_producer))
    random.seed(0)
    run(main())


def test_waiting_puts_are_admitted_in_call_order():
    async def main():
        buffer = StreamBuffer(max_items=1, batch_size=1)
        await buffer.put(0)
        waiting = [asyncio.create_task(buffer.put(i)) for i in range(1, 6)]
        await settle()
        assert await buffer.get_batch() == [0]  # the freed slot goes to put(1), which has not run yet
        late = asyncio.create_task(buffer.put(99))  # must queue behind the waiting puts, not take the slot
        await settle()
        got = []
        for _ in range(6):
            got.extend(await buffer.get_batch())
        assert got == [1, 2, 3, 4, 5, 99]
        assert all(t.done() and t.exception() is None for t in waiting + [late])
    run(main())


def test_batches_fill_up_to_batch_size():
    async def main():
        buffer = StreamBuffer(max_items=32, batch_size=5, timeout=1.0)
        for i in range(12):
            await buffer.put(i)
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await buffer.get_batch() == [0, 1, 2, 3, 4]
        assert await buffer.get_batch() == [5, 6, 7, 8, 9]
        assert loop.time() - start < 0.5, "a full batch must not wait for the timeout"
    run(main())


def test_batch_fills_from_items_arriving_within_timeout():
    async def main():
        buffer = StreamBuffer(max_items=8, batch_size=4, timeout=2.0)

        async def trickle():
            for i in range(4):
                await buffer.put(i)
                await asyncio.sleep(0.01)
        producer = asyncio.create_task(trickle())
        assert await buffer.get_batch() == [0, 1, 2, 3]  # it waited for the batch to fill, well inside 2 s
        await producer
    run(main())


def test_timeout_hands_out_partial_batch():
    async def main():
        timeout = 0.05
        buffer = StreamBuffer(max_items=8, batch_size=4, timeout=timeout)
        loop = asyncio.get_running_loop()
        await buffer.put("x")
        await buffer.put("y")
        start = loop.time()
        batch = await buffer.get_batch()
        waited = loop.time() - start
        assert batch == ["x", "y"]
        assert timeout * 0.8 <= waited < timeout + 1.0
    run(main())


def test_zero_timeout_hands_out_at_once():
    async def main():
        buffer = StreamBuffer(max_items=8, batch_size=4, timeout=0)
        getter = asyncio.create_task(buffer.get_batch())
        await settle()
        assert not getter.done(), "get_batch waits for a first item"
        await buffer.put(1)
        await buffer.put(2)  # no await between the two puts and the getter's wake-up: both may be there
        batch = await getter
        assert batch in ([1], [1, 2])
        rest = [] if batch == [1, 2] else await buffer.get_batch()
        assert batch + rest == [1, 2]
    run(main())


def test_close_drains_then_raises_and_refuses_puts():
    async def main():
        buffer = StreamBuffer(max_items=4, batch_size=2, timeout=5.0)
        for i in range(3):
            await buffer.put(i)
        buffer.close()
        assert buffer.closed
        with pytest.raises(StreamClosed):
            await buffer.put(3)
        # closed: a partial batch goes out at once instead of waiting 5 s for more
        assert await buffer.get_batch() == [0, 1]
        assert await buffer.get_batch() == [2]
        for _ in range(2):  # stays ended
            with pytest.raises(StreamClosed):
                await buffer.get_batch()
        buffer.close()  # idempotent
    run(main())


def test_close_wakes_waiting_getter_and_refuses_waiting_puts():
    async def main():
        buffer = StreamBuffer(max_items=1, batch_size=1)
        getter = asyncio.create_task(buffer.get_batch())
        await settle()
        buffer.close()
        with pytest.raises(StreamClosed):
            await getter

        buffer = StreamBuffer(max_items=1, batch_size=1)
        await buffer.put("in")
        waiting = asyncio.create_task(buffer.put("late"))
        await settle()
        buffer.close()
        with pytest.raises(StreamClosed):
            await waiting  # told, not dropped silently
        assert await drain(buffer) == [["in"]]
    run(main())


def test_close_ends_partial_batch_wait():
    async def main():
        buffer = StreamBuffer(max_items=8, batch_size=4, timeout=10.0)
        await buffer.put("only")
        getter = asyncio.create_task(buffer.get_batch())
        await settle()
        assert not getter.done()
        buffer.close()
        assert await getter == ["only"]
    run(main())


def test_cancelled_waits_leave_buffer_intact():
    async def main():
        buffer = StreamBuffer(max_items=1, batch_size=1)
        await buffer.put("a")
        put = asyncio.create_task(buffer.put("cancelled"))
        await settle()
        put.cancel()
        await settle()
        assert put.cancelled()
        assert await buffer.get_batch() == ["a"]
        await buffer.put("b")  # the cancelled put holds no slot
        assert await buffer.get_batch() == ["b"]

        getter = asyncio.create_task(buffer.get_batch())
        await settle()
        getter.cancel()
        await settle()
        await buffer.put("c")
        assert await buffer.get_batch() == ["c"]  # the cancelled getter took nothing
    run(main())


def test_put_cancelled_after_its_slot_was_granted_passes_the_slot_on():
    async def main():
        buffer = StreamBuffer(max_items=1, batch_size=1)
        await buffer.put(0)
        first = asyncio.create_task(buffer.put(1))
        second = asyncio.create_task(buffer.put(2))
        await settle()
        assert await buffer.get_batch() == [0]  # the slot is granted to `first`, which has not run yet
        first.cancel()
        await settle()
        assert first.cancelled()
        assert second.done() and second.exception() is None, "the granted slot must go to the next waiting put"
        assert await buffer.get_batch() == [2]
        assert len(buffer) == 0
    run(main())


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(max_items=0), ValueError, r"max_items must be >= 1, got 0"),
    (dict(max_items=2.0), TypeError, r"max_items must be an int, got float"),
    (dict(max_items=True), TypeError, r"max_items must be an int, got bool"),
    (dict(max_items=4, batch_size=0), ValueError, r"batch_size must be >= 1, got 0"),
    (dict(max_items=4, batch_size="2"), TypeError, r"batch_size must be an int, got str"),
    (dict(max_items=4, batch_size=5), ValueError, r"batch_size must be <= max_items \(4\).*got batch_size=5"),
    (dict(max_items=4, timeout=-0.1), ValueError, r"timeout must be finite and >= 0 seconds, got -0.1"),
    (dict(max_items=4, timeout=float("nan")), ValueError, r"timeout must be finite and >= 0 seconds, got nan"),
    (dict(max_items=4, timeout=None), TypeError, r"timeout must be a number of seconds .*got NoneType"),
])
def test_buffer_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        StreamBuffer(**kwargs)


# StreamProcessor ------------------------------------------------------------------------------------------------------

def make_chunks(streams=5, chunks=40, seed=0):
    """Interleaved (stream_id, chunk) pairs in a random order that keeps each stream's own order."""
    rng = random.Random(seed)
    queues = {f"s{s}": [torch.full((2,), float(100 * s + i)) for i in range(chunks)] for s in range(streams)}
    order = [sid for sid, q in queues.items() for _ in q]
    rng.shuffle(order)
    positions = dict.fromkeys(queues, 0)
    pairs = []
    for sid in order:
        pairs.append((sid, queues[sid][positions[sid]]))
        positions[sid] += 1
    return pairs


class RunningSum:
    """A per-stream state (like a KV cache): the output of a chunk depends on every earlier chunk of its stream."""

    def __init__(self):
        self.state, self.calls = {}, []

    def __call__(self, stream_id, chunk):
        self.calls.append(stream_id)
        self.state[stream_id] = self.state.get(stream_id, torch.zeros(2)) + chunk
        return self.state[stream_id].clone()


def expected_sums(pairs):
    state, out = {}, {}
    for sid, chunk in pairs:
        state[sid] = state.get(sid, torch.zeros(2)) + chunk
        out.setdefault(sid, []).append(state[sid].clone())
    return out


async def collect(processor, into):
    async for item in processor.results():
        into.append(item)


def check_in_order(results, pairs):
    expected = expected_sums(pairs)
    assert len(results) == len(pairs), "every chunk gives exactly one result"
    by_stream = {}
    for sid, index, output in results:
        by_stream.setdefault(sid, []).append((index, output))
    assert by_stream.keys() == expected.keys()
    for sid, outs in by_stream.items():
        assert [i for i, _ in outs] == list(range(len(expected[sid]))), f"stream {sid} out of order or incomplete"
        for (i, out), want in zip(outs, expected[sid]):
            torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_processor_interleaved_burst_in_order_per_stream(kind):
    pairs = make_chunks(streams=6, chunks=50)
    model = RunningSum()
    active, max_active = set(), 0
    if kind == "sync":
        process_fn = model
    else:
        async def process_fn(stream_id, chunk):
            nonlocal max_active
            assert stream_id not in active, "two chunks of one stream ran at once"
            active.add(stream_id)
            max_active = max(max_active, len(active))
            await asyncio.sleep(0)  # let other streams of the batch run in between
            out = model(stream_id, chunk)
            active.remove(stream_id)
            return out

    async def main():
        processor = StreamProcessor(process_fn, max_pending=8, batch_size=4, timeout=0.001)
        results = []
        consumer = asyncio.create_task(collect(processor, results))

        async def produce(part):  # several producers; each stream's chunks come from one of them, in order
            for sid, chunk in pairs:
                if int(sid[1:]) % 2 == part:
                    await processor.submit(sid, chunk)
        await asyncio.gather(produce(0), produce(1))
        await processor.close()
        await consumer
        return results

    results = run(main())
    check_in_order(results, pairs)
    assert len(model.calls) == len(pairs)
    if kind == "async":  # chunks of different streams in one batch ran concurrently
        assert max_active > 1


def test_processor_submit_all_then_close_then_read():
    pairs = make_chunks(streams=3, chunks=20, seed=1)

    async def main():
        # room for every result: nothing reads them until after close() (with the default bound, max_pending, submit
        # would wait for a reader)
        processor = StreamProcessor(RunningSum(), max_pending=4, batch_size=2, max_results=len(pairs))
        indices = {}
        for sid, chunk in pairs:  # back-pressure: the worker frees room as it processes, results wait to be read
            indices.setdefault(sid, []).append(await processor.submit(sid, chunk))
        await processor.close()
        assert all(ix == list(range(len(ix))) for ix in indices.values()), "submit returns 0, 1, 2, ... per stream"
        with pytest.raises(StreamClosed):
            await processor.submit("s0", torch.zeros(2))
        results = []
        await collect(processor, results)
        again = []
        await collect(processor, again)
        assert again == [], "results() stays ended"
        return results

    check_in_order(run(main()), pairs)


def test_processor_back_pressure_on_submit():
    async def main():
        gate = asyncio.Event()

        async def slow(stream_id, chunk):
            await gate.wait()
            return chunk

        processor = StreamProcessor(slow, max_pending=3, batch_size=1, max_results=5)  # read only after close()
        for i in range(4):  # one is taken by the worker, three wait
            await processor.submit("a", i)
            await settle()
        blocked = asyncio.create_task(processor.submit("a", 4))
        await settle()
        assert not blocked.done(), "submit waits while max_pending chunks wait"
        gate.set()
        assert await blocked == 4
        await processor.close()
        results = []
        await collect(processor, results)
        assert results == [("a", i, i) for i in range(5)]
    run(main())


def test_processor_error_in_one_stream_does_not_stop_others():
    pairs = make_chunks(streams=4, chunks=30, seed=2)
    bad, bad_index = "s2", 7

    async def main():
        seen = {}

        async def process_fn(stream_id, chunk):
            await asyncio.sleep(0)
            n = seen.get(stream_id, 0)
            seen[stream_id] = n + 1
            if stream_id == bad and n == bad_index:
                raise ZeroDivisionError("bad chunk")
            return (stream_id, n)

        processor = StreamProcessor(process_fn, max_pending=6, batch_size=3)
        results = []
        consumer = asyncio.create_task(collect(processor, results))
        refused = 0
        for sid, chunk in pairs:
            try:
                await processor.submit(sid, chunk)
            except StreamError as error:  # the failure was known by then: later chunks are refused at submit
                assert error.stream_id == bad and error.index is None and error.failed_index == bad_index
                assert isinstance(error.error, ZeroDivisionError)
                refused += 1
        await processor.close()
        await consumer
        return results, refused, seen, processor

    results, refused, seen, processor = run(main())
    assert seen[bad] == bad_index + 1, "no chunk of the failed stream is processed after the failure"
    bad_results = [(i, out) for sid, i, out in results if sid == bad]
    assert len(bad_results) + refused == 30, "every chunk of the failed stream is accounted for"
    assert [i for i, _ in bad_results] == list(range(len(bad_results)))
    for i, out in bad_results:
        if i < bad_index:
            assert out == (bad, i)
        else:
            assert isinstance(out, StreamError)
            assert (out.stream_id, out.index, out.failed_index) == (bad, i, bad_index)
            assert isinstance(out.error, ZeroDivisionError) and out.__cause__ is out.error
    first = bad_results[bad_index][1]
    assert "stream 's2', chunk 7" in str(first) and "ZeroDivisionError: bad chunk" in str(first)
    assert processor.failed(bad) is first
    for sid in ("s0", "s1", "s3"):  # the other streams ran to the end, in order
        assert [(i, out) for s, i, out in results if s == sid] == [(i, (sid, i)) for i in range(30)]
        assert processor.failed(sid) is None


def test_processor_sync_error_and_async_context_manager():
    def process_fn(stream_id, chunk):
        if chunk == 2 and stream_id == "x":
            raise ValueError("broken state")
        return chunk * 10

    async def main():
        results = []
        async with StreamProcessor(process_fn, max_pending=16, batch_size=16) as processor:
            for i in range(4):
                for sid in ("x", "y"):
                    await processor.submit(sid, i)
        await collect(processor, results)
        return results

    results = run(main())
    y = [(i, out) for sid, i, out in results if sid == "y"]
    x = [(i, out) for sid, i, out in results if sid == "x"]
    assert y == [(i, 10 * i) for i in range(4)]
    assert x[:2] == [(0, 0), (1, 10)]
    assert [(out.index, out.failed_index, type(out.error)) for _, out in x[2:]] == [(2, 2, ValueError),
                                                                                  (3, 2, ValueError)]


def test_processor_refuses_submit_to_failed_stream():
    def process_fn(stream_id, chunk):
        if chunk < 0:
            raise RuntimeError("negative chunk")
        return chunk

    async def main():
        processor = StreamProcessor(process_fn, max_pending=4, batch_size=1)
        assert await processor.submit("bad", -1) == 0
        assert await processor.submit("good", 1) == 0
        await settle()
        assert processor.failed("bad") is not None
        refused = r"stream 'bad', a new chunk refused: chunk 0 of this stream failed"
        with pytest.raises(StreamError, match=refused) as info:
            await processor.submit("bad", 5)
        assert (info.value.stream_id, info.value.index, info.value.failed_index) == ("bad", None, 0)
        assert isinstance(info.value.error, RuntimeError)
        assert await processor.submit("good", 2) == 1  # other streams are still accepted
        await processor.close()
        results = []
        await collect(processor, results)
        assert [(sid, i) for sid, i, _ in results if sid == "bad"] == [("bad", 0)], "the refused chunk got no index"
        assert [(i, out) for sid, i, out in results if sid == "good"] == [(0, 1), (1, 2)]
    run(main())


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(process_fn=None), TypeError, r"process_fn must be callable .*got NoneType"),
    (dict(max_pending=0), ValueError, r"max_pending must be >= 1, got 0"),
    (dict(max_pending=1.5), TypeError, r"max_pending must be an int, got float"),
    (dict(batch_size=-1), ValueError, r"batch_size must be >= 1, got -1"),
    (dict(max_pending=4, batch_size=8), ValueError, r"batch_size must be <= max_pending \(4\), got batch_size=8"),
    (dict(timeout=-1), ValueError, r"timeout must be finite and >= 0 seconds, got -1"),
])
def test_processor_bad_arguments(kwargs, error, match):
    kwargs.setdefault("process_fn", lambda stream_id, chunk: chunk)
    with pytest.raises(error, match=match):
        StreamProcessor(**kwargs)


def test_processor_unhashable_stream_id():
    async def main():
        processor = StreamProcessor(lambda stream_id, chunk: chunk)
        with pytest.raises(TypeError, match=r"stream_id must be hashable, got list"):
            await processor.submit(["a"], 0)
        await processor.close()
    run(main())
