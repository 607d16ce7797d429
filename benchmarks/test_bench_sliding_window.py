"""pytest-benchmark suite: ours against the peers, forward and forward+backward.

    pytest benchmarks/ --benchmark-only

Not part of the normal test run (pyproject's testpaths is ["tests"]). CPU sizes always; GPU sizes when CUDA is present.
A peer that cannot run here is skipped with its reason.
"""
import pytest
import torch

from benchmarks import sliding_window as sw
from benchmarks.common import default_device, release_memory

DEVICE = default_device()
ROUNDS = 20 if DEVICE.type == "cuda" else 3


def _synchronized(run):
    if DEVICE.type != "cuda":
        return run

    def call():
        run()
        torch.cuda.synchronize(DEVICE)
    return call


@pytest.mark.parametrize("mode", sw.MODES)
@pytest.mark.parametrize("peer", sw.PEERS)
@pytest.mark.parametrize("case", sw.pytest_cases(DEVICE), ids=lambda c: f"T{c.seqlen}-w{c.window}-{c.dtype}")
def test_sliding_window(benchmark, case, peer, mode):
    prepared = sw.prepare(peer, case, DEVICE, mode)
    if prepared.status != "ok":
        pytest.skip(f"{peer} {prepared.status}: {prepared.reason}")
    flops = sw.band_flops(case, mode)
    benchmark.group = f"{case.label} {mode}"
    benchmark.extra_info.update(peer=peer, mode=mode, band_flops=flops, case=case.label, dtype=case.dtype)
    benchmark.pedantic(_synchronized(prepared.run), rounds=ROUNDS, warmup_rounds=1, iterations=1)
    benchmark.extra_info["tflops_at_median"] = flops / benchmark.stats.stats.median / 1e12
    del prepared
    release_memory(DEVICE)


@pytest.mark.parametrize("tq, tk, left, right", [(300, 300, 63, 0), (200, 333, 48, 16), (129, 129, -1, 0),
                                                  (50, 40, 3, -1), (10, 500, -1, -1)])
def test_band_pairs_counts_the_mask(tq, tk, left, right):
    """The FLOP count's pair total equals the dense mask's True count."""
    from hybridrag.kernels.patterns import window_mask
    assert sw.band_pairs(tq, tk, left, right) == int(window_mask(tq, tk, left, right).sum())


@pytest.mark.parametrize("peer", [p for p in sw.PEERS if p != "ours"])
def test_peers_compute_what_ours_computes(peer):
    """Every peer, set up as the suite sets it up, gives ours' output on a small grouped-head case."""
    dtype = "bfloat16" if DEVICE.type == "cuda" else "float32"
    case = sw.Case(1, 8, 2, 384, 64, 100, dtype)
    theirs = sw.forward_output(peer, case, DEVICE)
    if theirs is None:
        pytest.skip(f"{peer} cannot run here")
    ours = sw.forward_output("ours", case, DEVICE)
    tolerance = 2e-2 if DEVICE.type == "cuda" else 1e-4
    torch.testing.assert_close(theirs.float(), ours.float(), atol=tolerance, rtol=tolerance)
