"""pytest-benchmark suite for int8 matmul: ours (W8A16, W8A16 group 128, W8A16 fp16-accumulate, W8A8) against the
peers, forward only.

    pytest benchmarks/test_bench_int8_matmul.py --benchmark-only

Not part of the normal test run (pyproject's testpaths is ["tests"]). CPU sizes always (small: this file should run
in well under a minute); GPU sizes when CUDA is present. A peer that cannot run here is skipped with its reason.
"""
import math

import pytest
import torch

import hybridrag as hr
from benchmarks import int8_matmul as im
from benchmarks.common import default_device, release_memory

DEVICE = default_device()
ROUNDS = 20 if DEVICE.type == "cuda" else 5
SMALL_DTYPE = "float16" if DEVICE.type == "cuda" else "float32"  # float16 on CUDA: the fp16-accumulate peer runs too


def _synchronized(run):
    if DEVICE.type != "cuda":
        return run

    def call():
        run()
        torch.cuda.synchronize(DEVICE)
    return call


@pytest.mark.parametrize("peer", im.PEERS)
@pytest.mark.parametrize("case", im.pytest_cases(DEVICE), ids=lambda c: f"M{c.m}-N{c.n}-K{c.k}-{c.dtype}")
def test_int8_matmul(benchmark, case, peer):
    if not im.peer_applies(peer, case):
        pytest.skip(f"{peer} has no {case.dtype} row")
    prepared = im.prepare(peer, case, DEVICE)
    if prepared.status != "ok":
        pytest.skip(f"{peer} {prepared.status}: {prepared.reason}")
    flops, nbytes = im.matmul_flops(case), im.moved_bytes(peer, case)
    benchmark.group = case.label
    benchmark.extra_info.update(peer=peer, flops=flops, bytes=nbytes, rate_unit=im.compute_kind(peer),
                                case=case.label, dtype=case.dtype)
    benchmark.pedantic(_synchronized(prepared.run), rounds=ROUNDS, warmup_rounds=1, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        benchmark.extra_info.update(rate_at_median=flops / median / 1e12, gbps_at_median=nbytes / median / 1e9)
    del prepared
    release_memory(DEVICE)


@pytest.mark.parametrize("peer", im.PEERS)
def test_bytes_count_the_tensors(peer):
    """The byte count is the size of the tensors the call reads plus its output (peers built on our tensors)."""
    case = im.Case(20, 64, 256, SMALL_DTYPE)
    if not im.peer_applies(peer, case):
        pytest.skip(f"{peer} has no {case.dtype} row")
    prepared = im.prepare(peer, case, DEVICE)
    if prepared.status != "ok" or prepared.reads is None:
        pytest.skip(f"{peer}: {prepared.reason or 'a library module; credited with ours bytes'}")
    out = prepared.run()
    assert out.shape == (case.m, case.n) and out.dtype == im.peer_dtype(peer, case)
    assert sum(t.nbytes for t in prepared.reads) + out.nbytes == im.moved_bytes(peer, case)


@pytest.mark.parametrize("peer", im.PEERS)
def test_peers_compute_the_matmul(peer):
    """Every peer, set up as the suite sets it up, gives x @ W.T (float64, unquantized) within int8 quantization
    error: catches a transposed weight or a wrong scale."""
    case = im.Case(20, 64, 256, SMALL_DTYPE)
    if not im.peer_applies(peer, case):
        pytest.skip(f"{peer} has no {case.dtype} row")
    out = im.forward_output(peer, case, DEVICE)
    if out is None:
        pytest.skip(f"{peer} cannot run here")
    x, weight = im.make_inputs(case, DEVICE)
    truth = x.double() @ weight.double().T
    error = (out.double() - truth).abs().max().item()
    assert error <= 3e-2 * truth.abs().max().item(), f"{peer}: max error {error:.3g}"


@pytest.mark.parametrize("peer", ["int_mm", "int_mm_prequant"])
def test_int_mm_peers_compute_what_ours_w8a8_computes(peer):
    """The _int_mm peers use ours' quantization of x and W: the same products, so nearly the same outputs."""
    case = im.Case(20, 64, 256, SMALL_DTYPE)
    theirs = im.forward_output(peer, case, DEVICE)
    if theirs is None:
        pytest.skip(f"{peer} cannot run here")
    ours = im.forward_output("ours_w8a8", case, DEVICE)
    tolerance = 1e-2 if DEVICE.type == "cuda" else 1e-5
    torch.testing.assert_close(theirs.float(), ours.float(), atol=tolerance, rtol=tolerance)


def test_moved_bytes_formula():
    case = im.Case(16, 4096, 4096, "bfloat16")
    weight, scales, x, out = 4096 * 4096, 4 * 4096, 16 * 4096 * 2, 16 * 4096 * 2
    assert im.moved_bytes("ours_w8a16", case) == weight + scales + x + out
    assert im.moved_bytes("ours_w8a16_g128", case) == weight + scales * 4096 // 128 + x + out
    assert im.moved_bytes("torch_matmul", case) == 2 * weight + x + out
    assert im.moved_bytes("int_mm_prequant", case) == weight + scales + 16 * 4096 + 4 * 16 + out
    assert im.moved_bytes("weight_int8pack_mm", case) == weight + 2 * 4096 + x + out
    assert im.moved_bytes("ours_w8a16_cached", case) == 2 * weight + x + out
    fp32 = im.Case(16, 4096, 4096, "float32")
    assert im.moved_bytes("torch_matmul_bf16", fp32) == 2 * weight + x + out  # bfloat16 whatever the case
    assert im.moved_bytes("ours_w8a16_cached", fp32) == 4 * weight + 2 * x + 2 * out
    assert not im.peer_applies("torch_matmul_bf16", case) and im.peer_applies("torch_matmul_fp32", case)
    assert im.matmul_flops(case) == 2 * 16 * 4096 * 4096
    assert math.isclose(im.moved_bytes("torch_matmul", case) / im.moved_bytes("ours_w8a16", case), 2, rel_tol=0.02)


def test_cpu_cases_cover_the_issue_sizes_and_dtypes():
    """Issue 11: the CPU suite times N = K = 4096 (and 1024) in every activation dtype, M 1 to 128, with the bf16 and
    fp32 matmuls and _weight_int8pack_mm side by side."""
    cpu = im.cases(torch.device("cpu"))
    assert {(c.n, c.k) for c in cpu} == {(1024, 1024), (4096, 4096)} and {c.m for c in cpu} == {1, 16, 128}
    assert {c.dtype for c in cpu} == {"float32", "bfloat16", "float16"}
    assert {"torch_matmul_bf16", "torch_matmul_fp32", "weight_int8pack_mm", "ours_w8a16_cached"} <= set(im.PEERS)


def test_quantized_weight_is_shared_by_ours_and_int_mm():
    """ours and the _int_mm peers quantize the same weight with quantize_int8 (one reference for both)."""
    case = im.Case(20, 64, 256, SMALL_DTYPE)
    _, weight = im.make_inputs(case, DEVICE)
    _, again = im.make_inputs(case, DEVICE)
    assert torch.equal(hr.quantize_int8(weight).data, hr.quantize_int8(again).data)
