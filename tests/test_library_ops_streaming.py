"""hybridrag::streaming_attention as a torch.library op: opcheck on both backends, and `streaming_attention` compiled
with fullgraph=True equal to eager over a stream of chunks (outputs and the cache's tensors), with a bounded number
of compiled frames: the stream position (`cache.length`, a Python int) becomes symbolic instead of recompiling per
chunk."""
import pytest
import torch
from conftest import DEVICE
from library_checks import BACKENDS, OPCHECKS
from torch._dynamo.testing import CompileCounterWithBackend

import hybridrag as hr

SINKS, WINDOW = 2, 8


def _chunk(length, device, heads=2, kv_heads=1, dim=16):
    return (torch.randn(1, heads, length, dim, device=device),
            *(torch.randn(1, kv_heads, length, dim, device=device) for _ in range(2)))


@pytest.mark.parametrize("seen", [1, 13])  # the sink slots still filling; the ring wrapped around
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_opcheck(backend, device, seen):
    cache = hr.StreamingKVCache(1, 1, 16, WINDOW, sinks=SINKS, device=device)
    with torch.no_grad():
        hr.streaming_attention(*_chunk(seen, device), cache, backend="reference")
    state = (cache.sink_k, cache.sink_v, cache.ring_k, cache.ring_v, cache.length, SINKS, WINDOW, 0.25, backend)
    torch.library.opcheck(torch.ops.hybridrag.streaming_attention, (*_chunk(3, device), *state),
                          test_utils=OPCHECKS)


def test_compiled_stream_equals_eager_with_a_bounded_number_of_frames():
    caches = [hr.StreamingKVCache(1, 2, 32, WINDOW, sinks=SINKS, device=DEVICE) for _ in range(2)]

    def step(q, k, v, cache):
        return hr.streaming_attention(q, k, v, cache)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    counts = []
    with torch.no_grad():
        for length in (3, 1, 1, 5, 15, 1, 2, 7, 1, 4, 1, 6):
            q, k, v = _chunk(length, DEVICE, heads=4, kv_heads=2, dim=32)
            torch.testing.assert_close(compiled(q, k, v, caches[1]), step(q, k, v, caches[0]), rtol=0, atol=0)
            counts.append(counter.frame_count)
    for eager, traced in zip(*((c.sink_k, c.sink_v, c.ring_k, c.ring_v) for c in caches)):
        torch.testing.assert_close(traced, eager, rtol=0, atol=0)
    assert caches[1].length == caches[0].length == 47
    # frames: the first chunk (position 0 is specialised), chunks of one token (size 1 is specialised), a symbolic
    # position and chunk length, and a chunk longer than the window (which skips its oldest tokens); past those
    # warm-up cases nothing recompiles, at any position or chunk length (the window wraps several times)
    assert counts[-7:] == [counts[-7]] * 7 and counts[-1] <= 4, counts
