"""pytest-benchmark suite for hybrid attention: ours against the peers, forward and forward+backward.

    pytest benchmarks/test_bench_hybrid.py --benchmark-only

Not part of the normal test run (pyproject's testpaths is ["tests"]). CPU sizes always (small: this file should run
in a minute or two); GPU sizes when CUDA is present. A peer that cannot run here is skipped with its reason.
"""
import pytest
import torch

import hybridrag as hr
from benchmarks import hybrid as hy
from benchmarks.common import default_device, release_memory

DEVICE = default_device()
ROUNDS = 20 if DEVICE.type == "cuda" else 3
PEER_MODES = [(peer, mode) for peer in hy.PEERS for mode in hy.peer_modes(peer)]


def _synchronized(run):
    if DEVICE.type != "cuda":
        return run

    def call():
        run()
        torch.cuda.synchronize(DEVICE)
    return call


@pytest.mark.parametrize("peer, mode", PEER_MODES, ids=[f"{p}-{m}" for p, m in PEER_MODES])
@pytest.mark.parametrize("case", hy.pytest_cases(DEVICE),
                         ids=lambda c: f"T{c.seqlen}-w{c.window}-L{c.landmarks}-M{c.memory}-{c.dtype}")
def test_hybrid(benchmark, case, peer, mode):
    prepared = hy.prepare(peer, case, DEVICE, mode)
    if prepared.status != "ok":
        pytest.skip(f"{peer} {prepared.status}: {prepared.reason}")
    flops = hy.pattern_flops(case, mode, peer)
    benchmark.group = f"{case.label} {mode}"
    benchmark.extra_info.update(peer=peer, mode=mode, pattern_flops=flops, case=case.label, dtype=case.dtype)
    benchmark.pedantic(_synchronized(prepared.run), rounds=ROUNDS, warmup_rounds=1, iterations=1)
    benchmark.extra_info["tflops_at_median"] = flops / benchmark.stats.stats.median / 1e12
    del prepared
    release_memory(DEVICE)


@pytest.mark.parametrize("seqlen, window, landmarks, memory", [(1024, 256, 64, 0), (1000, 100, 8, 16), (640, 1, 5, 3),
                                                               (512, 512, 512, 0), (300, 64, 1, 0)])
def test_pattern_pairs_count_the_mask(seqlen, window, landmarks, memory):
    """The FLOP count's pair total equals the dense mask's True count (memory columns included)."""
    case = hy.Case(1, 1, 1, seqlen, 16, window, landmarks, memory, "float32")
    assert hy.hybrid_pairs(case) == int(hy.dense_hybrid_mask(case, "cpu").sum())
    assert hy.window_pairs(case) == int(torch.ones(seqlen, seqlen, dtype=torch.bool).tril().triu(-(window - 1)).sum())


@pytest.mark.parametrize("memory", [0, 16])
@pytest.mark.parametrize("peer", ["flex_attention", "sdpa_dense_mask"])
def test_peers_compute_what_ours_computes(peer, memory):
    """Every attention peer, set up as the suite sets it up, gives ours' output on a small grouped-head case."""
    dtype = "bfloat16" if DEVICE.type == "cuda" else "float32"
    case = hy.Case(1, 8, 2, 384, 64, 100, 6, memory, dtype)  # stride 64; landmarks inside and outside the window
    theirs = hy.forward_output(peer, case, DEVICE)
    if theirs is None:
        pytest.skip(f"{peer} cannot run here")
    ours = hy.forward_output("ours", case, DEVICE)
    tolerance = 2e-2 if DEVICE.type == "cuda" else 1e-4
    torch.testing.assert_close(theirs.float(), ours.float(), atol=tolerance, rtol=tolerance)


def test_attention_mass_peer_matches_reference():
    """The attention_mass peer, set up as the suite sets it up, gives the float64 reference's masses (which sum to at
    most 1 per head: memory tokens take the rest)."""
    case = hy.Case(1, 4, 2, 384, 64, 100, 6, 16, "float32")
    ours = hy.forward_output("attention_mass", case, DEVICE)
    q, k, _, memory_k, _ = (t.double() for t in hy.make_inputs(case, DEVICE, False))
    segments = (torch.arange(case.seqlen, device=DEVICE) * hy.NUM_SEGMENTS // case.seqlen).expand(case.batch, -1)
    truth = hr.attention_mass(q, k, segments, hy.NUM_SEGMENTS, case.window, landmarks=case.stride,
                              memory_k=memory_k, backend="reference")
    tolerance = 2e-3 if DEVICE.type == "cuda" else 1e-5  # float32 dots may run in TF32 on the GPU
    torch.testing.assert_close(ours.double(), truth, atol=tolerance, rtol=0)
    assert bool((ours.sum(-1) <= 1 + 1e-5).all())
