"""The C++ attention kernels as ops (csrc/window_attention.cpp, hybrid_attention.cpp, hybrid_mass.cpp,
streaming_decode.cpp): schema
and fake (opcheck), their own checks, the routes that take them, and the second pass that a non-finite output
triggers. Their accuracy over shapes, GQA, patterns, dtypes, strides and chunk schedules is tested with every
backend in test_sliding_window_kernel.py, test_hybrid_kernel.py, test_streaming_ops.py and
test_attention_nonfinite.py."""
import pytest
import torch

import hybridrag as hr

pytestmark = pytest.mark.parametrize("cpu_kernels", ["cpp"], indirect=True)


def inputs(dtype=torch.float32, tq=37, tk=37, heads=4, kv_heads=2, dim=40):
    return (torch.randn(2, heads, tq, dim, dtype=dtype), torch.randn(2, kv_heads, tk, dim, dtype=dtype),
            torch.randn(2, kv_heads, tk, dim, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_ops_pass_opcheck(dtype, cpu_kernels):
    q, k, v = inputs(dtype)
    ops = torch.ops.hybridrag_cpu
    torch.library.opcheck(ops.window_attention_fwd.default, (q, k, v, 7, 0, 0.25))
    out, lse, _ = ops.window_attention_fwd(q, k, v, 7, 0, 0.25)
    for grad_lse in (None, torch.randn(lse.shape)):
        torch.library.opcheck(ops.window_attention_bwd.default,
                              (q, k, v, out, lse, torch.randn_like(out), grad_lse, 7, 0, 0.25))


def test_the_cpu_backend_runs_the_cpp_kernels(cpu_kernels):
    q, k, v = (t.requires_grad_(True) for t in inputs())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        hr.sliding_window_attention(q, k, v, 8, backend="cpu").sum().backward()
    names = {event.name for event in prof.events()}
    assert {"hybridrag_cpu::window_attention_fwd", "hybridrag_cpu::window_attention_bwd"} <= names


def test_a_hidden_nan_is_reported_and_the_route_keeps_it_out(cpu_kernels):
    """Key 0 holds NaN; with a window of 4 only the first 4 rows see it. The kernel multiplies it into a key tile
    that other rows share, reports a non-finite output, and the route's second pass gives the reference's rows."""
    q, k, v = inputs(tq=40, tk=40)
    v[:, :, 0] = float("nan")
    *_, finite = torch.ops.hybridrag_cpu.window_attention_fwd(q, k, v, 3, 0, 0.25)
    assert not finite
    out = hr.sliding_window_attention(q, k, v, 4, scale=0.25, backend="cpu")
    truth = hr.sliding_window_attention(q.double(), k.double(), v.double(), 4, scale=0.25, backend="reference")
    assert torch.isnan(out[:, :, :4]).all() and not torch.isnan(out[:, :, 4:]).any()
    torch.testing.assert_close(out[:, :, 4:].double(), truth[:, :, 4:], atol=1e-5, rtol=1e-5)


def test_finite_inputs_report_finite_outputs(cpu_kernels):
    q, k, v = inputs()
    out, lse, finite = torch.ops.hybridrag_cpu.window_attention_fwd(q, k, v, 7, 0, 0.25)
    *grads, grad_finite = torch.ops.hybridrag_cpu.window_attention_bwd(q, k, v, out, lse, torch.randn_like(out),
                                                                       None, 7, 0, 0.25)
    assert finite and grad_finite and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("change, match", [
    ({"q": torch.randn(2, 4, 37, 40).double()}, "float32, bfloat16 or float16"),
    ({"k": torch.randn(2, 2, 37, 40).half()}, "must share a dtype"),
    ({"q": torch.randn(2, 3, 37, 40)}, "H must be a multiple of Hkv"),
    ({"v": torch.randn(2, 2, 36, 40)}, "must match q"),
    ({"q": torch.randn(2, 4, 40, 37).transpose(2, 3)}, "unit last strides"),
    ({"scale": 0.0}, "scale must be positive"),
], ids=["dtype", "mixed", "heads", "shapes", "strides", "scale"])
def test_the_op_refuses_what_it_cannot_compute(change, match, cpu_kernels):
    q, k, v = inputs()
    if change.get("q") is not None and change["q"].dtype == torch.float64:
        k, v = k.double(), v.double()
    args = {"q": q, "k": k, "v": v, "scale": 0.25, **change}
    with pytest.raises(RuntimeError, match=match):
        torch.ops.hybridrag_cpu.window_attention_fwd(args["q"], args["k"], args["v"], 7, 0, args["scale"])


def decode_state(window=16, sinks=4, length=40, dtype=torch.float32):
    cache = hr.StreamingKVCache(1, 2, 32, window, sinks=sinks, dtype=dtype)
    for t in (cache.sink_k, cache.sink_v, cache.ring_k, cache.ring_v):
        t.normal_()
    cache.length = length
    return cache, torch.randn(1, 4, 1, 32, dtype=dtype), torch.randn(1, 2, 1, 32, dtype=dtype), \
        torch.randn(1, 2, 1, 32, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_decode_op_passes_opcheck(dtype, cpu_kernels):
    cache, q, k, v = decode_state(dtype=dtype)
    args = (q, k, v, cache.sink_k, cache.sink_v, cache.ring_k, cache.ring_v, 40, 4, 16, 0.25)
    torch.library.opcheck(torch.ops.hybridrag_cpu.streaming_decode.default, args)
    # the appending op mutates the cache and is for eager calls only: torch.compile traces the functional one and
    # the cache's copies (functionalization refuses a mutating custom op that returns a bool)
    torch.library.opcheck(torch.ops.hybridrag_cpu.streaming_decode_append.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_streaming_decode_runs_the_decode_kernel_and_prefill_the_hybrid_kernel(cpu_kernels):
    cache, q, k, v = decode_state()
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        hr.streaming_attention(q, k, v, cache, backend="cpu")
        long = torch.randn(1, 4, 17, 32), torch.randn(1, 2, 17, 32), torch.randn(1, 2, 17, 32)
        hr.streaming_attention(*long, cache, backend="cpu")
    calls = [event.name for event in prof.events() if event.name.startswith("hybridrag_cpu::")]
    assert calls == ["hybridrag_cpu::streaming_decode_append", "hybridrag_cpu::hybrid_attention_fwd"]
    assert cache.length == 40 + 1 + 17


@pytest.mark.parametrize("length, chunk, window", [(40, 1, 16), (2, 5, 16), (30, 16, 8), (0, 3, 2)],
                         ids=["decode", "across-the-sinks", "chunk-over-window", "empty-cache"])
def test_the_append_op_stores_the_chunk_as_the_cache_does(length, chunk, window, cpu_kernels):
    torch.manual_seed(0)
    cache = hr.StreamingKVCache(1, 2, 32, window, sinks=4)
    if length:
        cache.append(torch.randn(1, 2, length, 32), torch.randn(1, 2, length, 32))
    q, k, v = torch.randn(1, 4, chunk, 32), torch.randn(1, 2, chunk, 32), torch.randn(1, 2, chunk, 32)
    tensors = (cache.sink_k, cache.sink_v, cache.ring_k, cache.ring_v)
    before = [t.clone() for t in tensors]
    out, finite = torch.ops.hybridrag_cpu.streaming_decode_append(q, k, v, *tensors, length, 4, window, 0.25)
    plain, _ = torch.ops.hybridrag_cpu.streaming_decode(q, k, v, *before, length, 4, window, 0.25)
    assert finite and torch.equal(out, plain)  # the attention is computed before the store
    cache.length = 0  # the same chunk through the Python append, from the state before
    for t, old in zip(tensors, before):
        t.copy_(old)
    stored = [t.clone() for t in (cache.sink_k, cache.sink_v, cache.ring_k, cache.ring_v)]
    reference = hr.StreamingKVCache(1, 2, 32, window, sinks=4)
    for t, old in zip((reference.sink_k, reference.sink_v, reference.ring_k, reference.ring_v), before):
        t.copy_(old)
    reference.length = length
    reference.append(k, v)
    torch.ops.hybridrag_cpu.streaming_decode_append(q, k, v, *tensors, length, 4, window, 0.25)
    for mine, theirs in zip(tensors, (reference.sink_k, reference.sink_v, reference.ring_k, reference.ring_v)):
        assert torch.equal(mine, theirs)
    assert any(not torch.equal(a, b) for a, b in zip(stored, tensors))  # the chunk did land


def test_a_nan_in_the_slot_no_query_sees_stays_out_of_the_decode(cpu_kernels):
    """After 40 tokens (sinks 4, window 16), the new token's query at 40 cannot see position 24, which the ring
    still holds in slot (24 - 4) % 16 = 4 until the token takes it; a NaN there meets a zero probability in the
    kernel's matmul, which reports it, and the route's second pass keeps it out."""
    cache, q, k, v = decode_state()
    cache.ring_k[:, :, 4] = float("nan")
    cache.ring_v[:, :, 4] = float("nan")
    *_, finite = torch.ops.hybridrag_cpu.streaming_decode(q, k, v, cache.sink_k, cache.sink_v, cache.ring_k,
                                                          cache.ring_v, 40, 4, 16, 0.25)
    state = [t.clone() for t in (cache.sink_k, cache.sink_v, cache.ring_k, cache.ring_v)]
    with torch.no_grad():
        out = hr.streaming_attention(q, k, v, cache, scale=0.25, backend="cpu")
    truth = hr.kernels.streaming.streaming_attention_reference(q.double(), k.double(), v.double(),
                                                              *(t.double() for t in state), 40, 4, 16, 0.25)
    assert not finite and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), truth, atol=1e-5, rtol=1e-5)
    # the append op left the cache alone on its non-finite output; the route stored the token as append does
    assert cache.length == 41 and torch.equal(cache.ring_k[:, :, 4], k[:, :, 0])


def test_the_decode_op_refuses_what_it_cannot_compute(cpu_kernels):
    cache, q, k, v = decode_state()
    args = [q, k, v, cache.sink_k, cache.sink_v, cache.ring_k, cache.ring_v]
    with pytest.raises(RuntimeError, match=r"ring_k/v \(B, Hkv, window, D\)"):
        torch.ops.hybridrag_cpu.streaming_decode(*args, 40, 4, 15, 0.25)
    with pytest.raises(RuntimeError, match="of q's dtype"):
        torch.ops.hybridrag_cpu.streaming_decode(q.double(), *args[1:], 40, 4, 16, 0.25)


def hybrid_args(dtype=torch.float32, memory=True):
    q, k, v = inputs(dtype, tq=45, tk=45)
    memory_k = torch.randn(1, 2, 3, 40, dtype=dtype) if memory else None
    memory_v = torch.randn(1, 2, 3, 40, dtype=dtype) if memory else None
    return q, k, v, torch.tensor([0, 9, 30]), memory_k, memory_v, torch.tensor([0, 4]), torch.rand(2, 45) > 0.2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_hybrid_ops_pass_opcheck(dtype, cpu_kernels):
    q, k, v, landmarks, memory_k, memory_v, kv_start, key_mask = hybrid_args(dtype)
    ops = torch.ops.hybridrag_cpu
    hidden, pattern = (kv_start, key_mask), (7, 0, True, True, 0.25)
    torch.library.opcheck(ops.hybrid_attention_fwd.default, (q, k, v, landmarks, memory_k, memory_v, *hidden, *pattern))
    out, lse, _ = ops.hybrid_attention_fwd(q, k, v, landmarks, memory_k, memory_v, *hidden, *pattern)
    torch.library.opcheck(ops.hybrid_attention_bwd.default, (q, k, v, out, lse, torch.randn_like(out), None, landmarks,
                                                             memory_k, memory_v, *hidden, *pattern))


@pytest.mark.parametrize("kwargs, op", [
    ({}, "window_attention"),
    ({"landmarks": torch.tensor([0, 20])}, "hybrid_attention"),
    ({"memory_k": torch.randn(1, 2, 3, 40), "memory_v": torch.randn(1, 2, 3, 40)}, "hybrid_attention"),
    ({"kv_start": torch.tensor([0, 4])}, "hybrid_attention"),
    ({"key_mask": torch.rand(2, 37) > 0.3}, "hybrid_attention"),
], ids=["window", "landmarks", "memory", "kv_start", "key_mask"])
def test_hybrid_attention_takes_the_cpp_kernel_its_pattern_needs(kwargs, op, cpu_kernels):
    q, k, v = (t.requires_grad_(True) for t in inputs())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        hr.hybrid_attention(q, k, v, 8, backend="cpu", **kwargs).sum().backward()
    names = {event.name for event in prof.events() if event.name.startswith("hybridrag_cpu::")}
    assert names == {f"hybridrag_cpu::{op}_fwd", f"hybridrag_cpu::{op}_bwd"}


@pytest.mark.parametrize("change, match", [
    ({"landmarks": torch.tensor([9, 0, 30])}, "sorted, distinct positions"),
    ({"landmarks": torch.tensor([0, 45])}, r"in \[0, Tk\)"),
    ({"landmarks": torch.tensor([0, 9], dtype=torch.int32)}, "contiguous int64"),
    ({"kv_start": torch.tensor([0, 4], dtype=torch.int32)}, "kv_start must be contiguous int64"),
    ({"memory_k": torch.randn(3, 2, 3, 40)}, r"memory_k/v must be \(1 or B, Hkv, M, D\)"),
    ({"key_mask": torch.ones(2, 44, dtype=torch.bool)}, r"key_mask must be contiguous bool \(B, Tk\)"),
], ids=["unsorted", "range", "landmark-dtype", "kv-start-dtype", "memory-batch", "key-mask"])
def test_the_hybrid_op_refuses_what_it_cannot_compute(change, match, cpu_kernels):
    q, k, v, landmarks, memory_k, memory_v, kv_start, key_mask = hybrid_args()
    args = {"landmarks": landmarks, "memory_k": memory_k, "memory_v": memory_v, "kv_start": kv_start,
            "key_mask": key_mask, **change}
    if "memory_k" in change:
        args["memory_v"] = torch.randn(3, 2, 3, 40)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.hybridrag_cpu.hybrid_attention_fwd(q, k, v, args["landmarks"], args["memory_k"], args["memory_v"],
                                                     args["kv_start"], args["key_mask"], 7, 0, True, True, 0.25)


def mass_args(dtype=torch.float32):
    q, k, _, landmarks, memory_k, _, kv_start, key_mask = hybrid_args(dtype)
    segments = torch.randint(-1, 5, (2, 45))
    row_weights = torch.rand(2, 45)
    return q, k, segments, 5, row_weights, landmarks, memory_k, kv_start, key_mask, 7, 0, True, True, 0.25


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_mass_op_passes_opcheck(dtype, cpu_kernels):
    torch.library.opcheck(torch.ops.hybridrag_cpu.hybrid_attention_mass.default, mass_args(dtype))


def test_attention_mass_runs_the_cpp_kernel_in_one_call(cpu_kernels):
    q, k, _ = inputs()
    segments = torch.randint(-1, 4, (2, 37))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        hr.attention_mass(q, k, segments, 4, 8, landmarks=torch.tensor([0, 20]), backend="cpu")
    names = [event.name for event in prof.events() if event.name.startswith("hybridrag_cpu::")]
    assert names == ["hybridrag_cpu::hybrid_attention_mass"]  # the lse pass included: no forward call


def test_a_hidden_nan_stays_out_of_the_mass_of_other_heads(cpu_kernels):
    """Key 0 of kv head 0 holds NaN; every row sees it through landmark 0. The kernel reports it, and the route gives
    the reference's NaN for kv head 0's query heads and the exact mass for the others."""
    q, k, _ = inputs(tq=40, tk=40)
    k[:, 0, 0] = float("nan")
    segments = torch.randint(0, 3, (2, 40))
    mass, finite = torch.ops.hybridrag_cpu.hybrid_attention_mass(
        q, k, segments, 3, torch.full((2, 40), 1 / 40), torch.tensor([0]), None, None, None, 4, 0, True, False, 0.25)
    assert not finite
    got = hr.attention_mass(q, k, segments, 3, 4, landmarks=torch.tensor([0]), global_queries=False, scale=0.25,
                            backend="cpu")
    truth = hr.attention_mass(q.double(), k.double(), segments, 3, 4, landmarks=torch.tensor([0]),
                              global_queries=False, scale=0.25, backend="reference")
    assert torch.isnan(got[:, :2]).all() and torch.isfinite(got[:, 2:]).all()
    torch.testing.assert_close(got[:, 2:].double(), truth[:, 2:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change, match", [
    ({2: torch.randint(0, 5, (2, 45), dtype=torch.int32)}, r"segments must be contiguous int64 \(B, Tk\)"),
    ({2: torch.full((2, 45), 5)}, "segment ids must be < num_segments"),
    ({4: torch.rand(2, 44)}, r"row_weights must be contiguous float32 \(B, Tq\)"),
    ({6: torch.randn(3, 2, 3, 40)}, r"memory_k must be \(1 or B, Hkv, M, D\)"),
], ids=["segment-dtype", "segment-range", "row-weights", "memory-batch"])
def test_the_mass_op_refuses_what_it_cannot_compute(change, match, cpu_kernels):
    args = list(mass_args())
    for index, value in change.items():
        args[index] = value
    with pytest.raises(RuntimeError, match=match):
        torch.ops.hybridrag_cpu.hybrid_attention_mass(*args)
