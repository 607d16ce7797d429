"""pytest-benchmark suite for streaming attention: decode against the gathered-cache peers, chunked prefill against
one-shot hybrid attention.

    pytest benchmarks/test_bench_streaming.py --benchmark-only

Not part of the normal test run (pyproject's testpaths is ["tests"]). Small sizes on CPU (this file runs in well under
a minute); GPU sizes when CUDA is present. A peer that cannot run here is skipped with its reason. FlexAttention is
left to benchmarks.report (its compile costs more than this whole file on CPU).
"""
import pytest
import torch

import hybridrag as hr
from benchmarks import streaming as st
from benchmarks.common import default_device, release_memory

DEVICE = default_device()
GPU = DEVICE.type == "cuda"
ROUNDS = 20 if GPU else 5
DTYPE = "bfloat16" if GPU else "float32"
HEADS = (32, 8, 128) if GPU else (8, 2, 64)
DECODE = [st.Case("decode", *HEADS, w, 2 * w + 4, 1, DTYPE) for w in ((4096, 32768) if GPU else (256, 1024))]
PREFILL = [st.Case("prefill", *HEADS, w, t, c, DTYPE) for t, w, c in
           (((16384, 4096, 512), (16384, 4096, 2048)) if GPU else ((1024, 256, 256), (1024, 256, 1024)))]


def _synchronized(run):
    if not GPU:
        return run

    def call():
        run()
        torch.cuda.synchronize(DEVICE)
    return call


def _bench(benchmark, peer, case):
    run, reason = st.prepare(peer, case, DEVICE)
    if run is None:
        pytest.skip(f"{peer} unavailable: {reason}")
    benchmark.group = case.label if case.part == "decode" else case.label.replace(f" C={case.chunk}", "")
    benchmark.extra_info.update(peer=peer, case=case.label, dtype=case.dtype)
    benchmark.pedantic(_synchronized(run), rounds=ROUNDS, warmup_rounds=1, iterations=1)
    del run
    release_memory(DEVICE)


@pytest.mark.parametrize("peer", ["ours", "sdpa_gathered", "flash_attn_kvcache"])
@pytest.mark.parametrize("case", DECODE, ids=lambda c: f"decode-w{c.window}-{c.dtype}")
def test_decode(benchmark, case, peer):
    _bench(benchmark, peer, case)
    elem = torch.finfo(getattr(torch, case.dtype)).bits // 8
    cache_bytes = 2 * case.batch * case.kv_heads * (case.sinks + case.window) * case.head_dim * elem
    if benchmark.stats:  # None under --benchmark-disable
        benchmark.extra_info["gbps_at_median"] = cache_bytes / benchmark.stats.stats.median / 1e9


@pytest.mark.parametrize("peer", ["ours_chunked", "hybrid_one_shot"])
@pytest.mark.parametrize("case", PREFILL, ids=lambda c: f"prefill-T{c.seqlen}-C{c.chunk}-{c.dtype}")
def test_prefill(benchmark, case, peer):
    if peer == "hybrid_one_shot" and case.chunk != PREFILL[0].chunk:
        pytest.skip("one-shot does not depend on the chunk: timed once per T")
    _bench(benchmark, peer, case)
    if benchmark.stats:
        benchmark.extra_info["tokens_per_s_at_median"] = case.batch * case.seqlen / benchmark.stats.stats.median


@pytest.mark.parametrize("peer", ["sdpa_gathered", "flash_attn_kvcache", "flex_decoding"])
def test_decode_peers_compute_what_ours_computes(peer):
    """Every decode peer, set up as the suite sets it up, gives ours' output (the cache's ring has wrapped)."""
    if peer == "flex_decoding" and not GPU:
        pytest.skip("flex compiles for ~15 s on CPU: compared on CUDA only (benchmarks.report still times it on CPU)")
    case = st.Case("decode", 8, 2, 64, 100, 237, 1, DTYPE)
    theirs, _ = st.prepare(peer, case, DEVICE)
    if theirs is None:
        pytest.skip(f"{peer} cannot run here")
    ours, _ = st.prepare("ours", case, DEVICE)
    tolerance = 2e-2 if GPU else 1e-5
    torch.testing.assert_close(theirs().float(), ours().float(), atol=tolerance, rtol=tolerance)


def test_gathered_mask_marks_empty_slots():
    """Before the ring wraps, the gathered peers' mask leaves the slots not yet written out."""
    case = st.Case("decode", 4, 2, 32, 64, 20, 1, "float32")
    _, keys, _, mask = st.gathered(case, "cpu")
    assert keys.shape[2] == case.sinks + case.window
    assert int(mask.sum()) == case.seqlen + 1 and bool(mask[:case.sinks].all())


def test_long_stream_memory_is_constant():
    """A short stream: tokens/s measured, cache bytes and resident memory unchanged over the second half."""
    case = st.Case("long_stream", 4, 2, 64, 256, 8 * 512, 512, DTYPE)
    seconds, _, memory = st.long_stream(case, DEVICE)
    assert seconds > 0 and memory["constant"], memory
    assert memory["cache_nbytes"] == [2 * 2 * (256 + 4) * 64 * (2 if GPU else 4)] * 2


def test_check_passes_and_can_fail():
    """check() passes for the streaming op, and the same tolerance rejects a stream with the wrong window."""
    assert all(row["passed"] for row in st.check(DEVICE))
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, 200, 64) for h in (4, 2, 2))
    cache = hr.StreamingKVCache(1, 2, 64, 33, sinks=4)  # one more than the reference's window
    with torch.no_grad():
        wrong = torch.cat(st.stream(q, k, v, cache, [50] * 4, "cpu"), dim=2)
        truth, plain = (hr.hybrid_attention(q.to(dt), k.to(dt), v.to(dt), 32, landmarks=torch.arange(4),
                                            global_queries=False, backend="reference")
                        for dt in (torch.float64, torch.float32))
    assert not st.compare_to_truth(wrong, plain, truth, st.CHECK_FLOOR)["passed"]
