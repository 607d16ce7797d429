"""StreamProcessor under faults: a BaseException from process_fn wakes every blocked submit and the results reader
(no hang), and a slow reader bounds the results held (back-pressure reaches the producers).

Every wait is under asyncio.wait_for, so a regression fails in seconds instead of hanging the suite."""
import asyncio

import pytest

from hybridrag.streaming import StreamClosed, StreamProcessor

LIMIT = 5.0  # seconds; each test takes well under one


class Boom(BaseException):
    """A BaseException that is not a cancellation (like KeyboardInterrupt, but safe to raise in a test)."""


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, LIMIT))


async def settle():
    for _ in range(10):
        await asyncio.sleep(0)


def failing_at(n, error):
    """An async process_fn that raises `error` on its n-th call (0-based) and echoes the chunk before that."""
    calls = 0

    async def process_fn(stream_id, chunk):
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)
        if calls > n:
            raise error
        return chunk

    return process_fn


@pytest.mark.parametrize("error", [Boom("stop"), asyncio.CancelledError()], ids=["base_exception", "cancelled"])
@pytest.mark.parametrize("streams", [1, 3], ids=["one_stream", "three_streams"])
def test_base_exception_wakes_blocked_submits_and_the_reader(error, streams):
    async def main():
        processor = StreamProcessor(failing_at(4, error), max_pending=2, batch_size=2, max_results=64)
        accepted, refused = [], []

        async def produce(stream_id):
            for i in range(40):
                try:
                    accepted.append(await processor.submit(stream_id, i))
                except StreamClosed as err:
                    refused.append(err)
                    return

        producers = [asyncio.create_task(produce(f"s{s}")) for s in range(streams)]
        await asyncio.wait_for(asyncio.gather(*producers), 2.0)  # before the fix: blocked for ever
        assert len(refused) == streams, "every producer's blocked submit was woken with an error"
        assert all("stopped" in str(err) and type(error).__name__ in str(err) for err in refused)
        assert processor.closed and processor.error is not None
        assert isinstance(processor.error, type(error))
        results = []
        with pytest.raises((Boom, RuntimeError)) as raised:
            async def read():
                async for item in processor.results():
                    results.append(item)
            await asyncio.wait_for(read(), 2.0)
        if isinstance(error, asyncio.CancelledError):
            assert raised.type is RuntimeError and "cancelled" in str(raised.value)
        assert len(results) < len(accepted), "the reader learns that not every accepted chunk has a result"
        with pytest.raises(StreamClosed, match=r"the StreamProcessor stopped: .*; submit\(\) refused"):
            await processor.submit("s0", 99)
        with pytest.raises((Boom, RuntimeError)):
            await asyncio.wait_for(processor.close(), 2.0)

    run(main())


def test_base_exception_stops_the_other_streams_of_its_batch():
    async def main():
        started, cancelled = [], []

        async def process_fn(stream_id, chunk):
            started.append(stream_id)
            if stream_id == "bad":
                raise Boom("bad stream")
            try:
                await asyncio.Event().wait()  # a sibling in the same batch that would never end by itself
            except asyncio.CancelledError:
                cancelled.append(stream_id)
                raise

        processor = StreamProcessor(process_fn, max_pending=4, batch_size=4, timeout=0.05)
        for stream_id in ("slow", "bad"):
            await processor.submit(stream_id, 0)
        with pytest.raises(Boom, match="bad stream"):
            await asyncio.wait_for(processor.close(), 2.0)
        assert started == ["slow", "bad"] and cancelled == ["slow"], "the sibling is cancelled before close returns"
        assert isinstance(processor.error, Boom) and processor.closed

    run(main())


def test_results_queue_is_bounded_for_a_slow_reader():
    bound = 8

    async def main():
        processor = StreamProcessor(lambda stream_id, chunk: chunk, max_pending=4, batch_size=2, max_results=bound)
        most = 0

        async def produce(stream_id):
            nonlocal most
            for i in range(200):
                await processor.submit(stream_id, i)
                most = max(most, processor.results_waiting)

        async def read_slowly():
            nonlocal most
            seen = []
            async for item in processor.results():
                most = max(most, processor.results_waiting)
                seen.append(item)
                await asyncio.sleep(0.0005 if len(seen) % 50 else 0.01)  # a reader that lags, with stalls
            return seen

        reader = asyncio.create_task(read_slowly())
        await asyncio.gather(*(produce(f"s{s}") for s in range(3)))
        await processor.close()
        seen = await reader
        assert len(seen) == 600
        assert 0 < most <= bound, f"results held reached {most}, over max_results={bound}"

    run(main())


def test_producers_block_while_results_are_unread():
    async def main():
        processor = StreamProcessor(lambda stream_id, chunk: chunk, max_pending=2, batch_size=1, max_results=3)
        accepted = 0

        async def produce():
            nonlocal accepted
            for i in range(100):
                await processor.submit("a", i)
                accepted += 1

        producer = asyncio.create_task(produce())
        await asyncio.sleep(0.05)
        # nobody reads: 3 results held, 1 chunk in the worker waiting for room, 2 pending; the producer waits
        assert processor.results_waiting == 3 and not producer.done() and accepted <= 3 + 1 + 2
        items = []
        async for item in processor.results():
            items.append(item)
            if len(items) == 100:
                break
        await producer
        await processor.close()
        assert [index for _, index, _ in items] == list(range(100))

    run(main())


def test_max_results_bad_arguments():
    with pytest.raises(TypeError, match=r"max_results must be an int, got float"):
        StreamProcessor(lambda s, c: c, max_results=2.0)
    with pytest.raises(ValueError, match=r"max_results must be >= 1, got 0"):
        StreamProcessor(lambda s, c: c, max_results=0)
