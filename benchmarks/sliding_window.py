"""Sliding-window attention suite: ours against SDPA with a dense mask, FlexAttention and flash-attn, side by side.

FLOPs are counted on the band only. With n_i the number of keys query row i sees:
    forward          = 4 * D * sum_i(n_i) * B * H     (QK^T and PV: two matmuls, 2 FLOPs per multiply-add)
    backward         = 2.5 * forward                  (recomputed QK^T, dV, dP, dQ, dK: five matmuls against two)
    forward+backward = 3.5 * forward
Every peer is credited with the same band FLOPs, so TFLOP/s compares like with like (the dense-mask peer does
more work than it is credited for; that is the point of the comparison).
"""
import gc
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

import hybridrag as hr
from hybridrag.kernels.cpp import set_cpu_kernels
from hybridrag.kernels.patterns import UNBOUNDED, resolve_window, visible_key_counts, window_mask

from .common import (TOLERANCE_CHECK_COLUMNS, PeerSkipped, PeerUnavailable, compare_to_truth, compared_to,
                     figure_legend, fmt_number, free_memory_bytes, note_flagged, plot_line, prepare_attention, progress,
                     release_memory, time_ms)

SUITE = "sliding_window"
EXPECTED_S = {"quick": 40, "full": 150}  # on the 2-core AMD EPYC of the recorded results (FlexAttention compiles)
PEERS = ("ours", "ours_blockwise", "sdpa_dense_mask", "flex_attention", "flash_attn")
MODES = ("fwd", "fwd+bwd")
BACKWARD_FACTOR = 2.5
DENSE_MASK_MEMORY_FRACTION = 0.25  # the dense-mask peer runs only if its T x T tensors fit in this share of free memory

PEER_NOTES = {
    "ours": 'hr.sliding_window_attention(backend="auto")' + " (on CPU tensors: the C++ kernels where they build)",
    "ours_blockwise": "as ours on the CPU backend's PyTorch path (HYBRIDRAG_CPU_KERNELS=blockwise), forward and "
                      "backward; CPU only",
    "sdpa_dense_mask": "F.scaled_dot_product_attention with a dense bool (T, T) mask built outside the timed call; "
                       "when H != Hkv, k/v are expanded to H heads outside the timed call (SDPA's fused kernels that "
                       "take a mask reject grouped heads; enable_gqa=True would route to the math path)",
    "flex_attention": "torch.compile(flex_attention, dynamic=False) with a sliding-window create_block_mask built "
                      "outside the timed call; compile time excluded",
    "flash_attn": "flash_attn_func(window_size=(left, right)) on (B, T, H, D) copies made outside the timed call",
}




@dataclass(frozen=True)
class Case:
    batch: int
    heads: int
    kv_heads: int
    seqlen: int
    head_dim: int
    window: int          # int w: the w most recent keys, causal
    dtype: str
    causal: bool = True

    @property
    def band(self):
        return resolve_window(self.window, self.causal)

    @property
    def torch_dtype(self):
        return getattr(torch, self.dtype)

    @property
    def label(self):
        return f"T={self.seqlen} w={self.window}"


def bench_dtype(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def cases(device, quick=False):
    """GPU: bf16, B=1, H=32, Hkv=8, D=128. CPU: fp32, B=1, H=Hkv=8, D=64 (target T=8192, w=512)."""
    if device.type == "cuda":
        lengths = (8192,) if quick else (8192, 16384, 32768, 65536)
        return [Case(1, 32, 8, t, 128, w, "bfloat16") for w in (512, 4096) for t in lengths]
    lengths = (2048,) if quick else (2048, 8192)
    return [Case(1, 8, 8, t, 64, 512, "float32") for t in lengths]


def pytest_cases(device):
    """The sizes the pytest-benchmark suite times."""
    if device.type == "cuda":
        return [Case(1, 32, 8, t, 128, w, "bfloat16") for w in (512, 4096) for t in (8192, 32768)]
    return [Case(1, 8, 8, t, 64, 512, "float32") for t in (2048, 8192)]


# ----------------------------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------------------------

def band_pairs(tq, tk, left, right):
    """sum_i n_i: visible (query, key) pairs of one head, from per-row arithmetic (no tq x tk matrix)."""
    return int(visible_key_counts(tq, tk, left, right).sum())


def band_flops(case, mode):
    left, right = case.band
    forward = 4 * case.head_dim * band_pairs(case.seqlen, case.seqlen, left, right) * case.batch * case.heads
    return forward if mode == "fwd" else (1 + BACKWARD_FACTOR) * forward


# ----------------------------------------------------------------------------------------------------------------
# Peers: each builder returns attend(q, k, v) and the inputs in the layout it wants
# ----------------------------------------------------------------------------------------------------------------

def make_inputs(case, device, requires_grad, seed=0):
    """q (B, H, T, D), k/v (B, Hkv, T, D) in the case dtype."""
    torch.manual_seed(seed)
    shape_q = (case.batch, case.heads, case.seqlen, case.head_dim)
    shape_kv = (case.batch, case.kv_heads, case.seqlen, case.head_dim)
    tensors = [torch.randn(s, device=device, dtype=case.torch_dtype) for s in (shape_q, shape_kv, shape_kv)]
    return [t.requires_grad_(requires_grad) for t in tensors]


def _ours(case, device, mode):
    q, k, v = make_inputs(case, device, mode != "fwd")

    def attend(q, k, v):
        return hr.sliding_window_attention(q, k, v, case.window, causal=case.causal, backend="auto")
    return attend, (q, k, v)


def _ours_blockwise(case, device, mode):
    if device.type != "cpu":
        raise PeerUnavailable("the PyTorch path of the CPU backend (CPU only)")
    return _ours(case, device, mode)


@contextmanager
def _cpu_kernels(choice):
    previous = set_cpu_kernels(choice)
    try:
        yield
    finally:
        set_cpu_kernels(previous)


def dense_mask_bytes(case):
    """The bool (T, T) mask plus the additive copy SDPA makes of it in the input dtype."""
    return case.seqlen * case.seqlen * (1 + torch.finfo(case.torch_dtype).bits // 8)


def _sdpa_dense_mask(case, device, mode):
    need, free = dense_mask_bytes(case), free_memory_bytes(device)
    if need > DENSE_MASK_MEMORY_FRACTION * free:
        raise PeerSkipped(f"dense {case.seqlen}x{case.seqlen} mask needs {need / 2**30:.1f} GiB, over "
                          f"{DENSE_MASK_MEMORY_FRACTION:.0%} of {free / 2**30:.1f} GiB free")
    q, k, v = make_inputs(case, device, mode != "fwd")
    if case.heads != case.kv_heads:
        group = case.heads // case.kv_heads
        k, v = (t.detach().repeat_interleave(group, dim=1).requires_grad_(t.requires_grad) for t in (k, v))
    mask = window_mask(case.seqlen, case.seqlen, *case.band, device=device)

    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return attend, (q, k, v)


def _flex_attention(case, device, mode):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch._dynamo.reset()  # a fresh compile per case: no recompile limit, no silent fall back to eager
    left, right = case.band

    def mask_mod(b, h, q_idx, kv_idx):
        # comparisons against shifted query indices only: no int64 (T, T) temporaries while the mask is built
        lower = kv_idx >= q_idx - left if left != UNBOUNDED else kv_idx >= 0
        upper = kv_idx <= q_idx + right if right != UNBOUNDED else kv_idx >= 0
        return lower & upper

    block_mask = create_block_mask(mask_mod, None, None, case.seqlen, case.seqlen, device=device)
    compiled = torch.compile(flex_attention, dynamic=False)
    q, k, v = make_inputs(case, device, mode != "fwd")

    def attend(q, k, v):
        return compiled(q, k, v, block_mask=block_mask, enable_gqa=case.heads != case.kv_heads)
    return attend, (q, k, v)


def _flash_attn(case, device, mode):
    try:
        from flash_attn import flash_attn_func
    except ImportError as err:
        raise PeerUnavailable(f"flash_attn cannot be imported ({err})") from None
    if device.type != "cuda":
        raise PeerUnavailable("flash-attn runs on CUDA tensors only")
    q, k, v = make_inputs(case, device, False)
    q, k, v = (t.transpose(1, 2).contiguous().requires_grad_(mode != "fwd") for t in (q, k, v))  # (B, T, H, D)

    def attend(q, k, v):
        return flash_attn_func(q, k, v, causal=case.causal, window_size=case.band)
    return attend, (q, k, v)


BUILDERS = {"ours": _ours, "ours_blockwise": _ours_blockwise, "sdpa_dense_mask": _sdpa_dense_mask, "flex_attention": _flex_attention,
            "flash_attn": _flash_attn}

# Failures seen on the first call that mean "this peer cannot do this here", recorded rather than raised.
FIRST_CALL_FAILURES = {
    "flex_attention": ((NotImplementedError,), "unavailable"),   # "FlexAttention does not support backward on CPU"
    "sdpa_dense_mask": ((torch.cuda.OutOfMemoryError,), "skipped"),
}


def prepare(peer, case, device, mode):
    """Build the peer's timed call for one case and mode, and make its first call (compile, warm caches)."""
    if peer != "ours_blockwise":
        return prepare_attention(lambda: BUILDERS[peer](case, device, mode), device, mode,
                                 FIRST_CALL_FAILURES.get(peer, ((), None)))
    with _cpu_kernels("blockwise"):  # the backward reads the choice when it runs: the whole call holds it
        prepared = prepare_attention(lambda: BUILDERS[peer](case, device, mode), device, mode)
    if prepared.run is None:
        return prepared

    def run():
        with _cpu_kernels("blockwise"):
            return prepared.run()
    return replace(prepared, run=run)


def forward_output(peer, case, device):
    """The peer's forward output as (B, H, T, D), or None when it cannot run here: checks the peers agree."""
    prepared = prepare(peer, case, device, "fwd")
    if prepared.status != "ok":
        return None
    out = prepared.run()
    return out.transpose(1, 2) if peer == "flash_attn" else out


# ----------------------------------------------------------------------------------------------------------------
# Suite entry points (used by benchmarks.report)
# ----------------------------------------------------------------------------------------------------------------

def _timing_options(case, device, quick):
    if device.type == "cuda":
        return {}
    return {"cpu_reps": 5 if quick else 10, "cpu_budget_s": 3.0 if quick else 10.0}


def benchmark(device, quick=False, peers=PEERS, ceilings=None, log=print):
    """One row per (case, mode, peer): ms, TFLOP/s on the band, and peer_ms / ours_ms."""
    rows = []
    bar = progress(cases(device, quick), SUITE)
    for case in bar:
        for mode in MODES:
            flops = band_flops(case, mode)
            group = []
            for peer in peers:
                bar.set_postfix_str(f"{case.label} {mode} {peer}")  # what runs now (compiles take tens of seconds)
                prepared = prepare(peer, case, device, mode)
                row = {"case": asdict(case), "label": case.label, "mode": mode, "peer": peer,
                       "status": prepared.status, "reason": prepared.reason, "band_flops": flops,
                       "ms": None, "tflops": None, "pct_matmul_peak": None, "speedup_vs_peer": None,
                       "setup_s": prepared.setup_s, "timing": None, "other_load": None, "note": PEER_NOTES[peer]}
                if prepared.status == "ok":
                    timing = time_ms(prepared.run, device, **_timing_options(case, device, quick))
                    row.update(ms=timing.ms, tflops=flops / (timing.ms * 1e-3) / 1e12, timing=timing.method,
                               other_load=timing.other_load)
                    if ceilings:
                        row["pct_matmul_peak"] = 100 * row["tflops"] / ceilings["matmul_tflops"]
                del prepared
                gc.collect()
                release_memory(device)
                busy = f"  (other processes: {row['other_load']:.0%} of the CPU)" if (row["other_load"] or 0) > 0.05 else ""
                log(f"  {SUITE} {case.label} {mode:7s} {peer:16s} "
                    + (f"{row['ms']:10.3f} ms{busy}" if row["ms"] is not None else f"{row['status']}: {row['reason']}"))
                group.append(row)
            ours = next((r for r in group if r["peer"] == "ours"), None)
            for row in group:
                if row is not ours and row["ms"] is not None and ours is not None and ours["ms"] is not None:
                    row["speedup_vs_peer"] = row["ms"] / ours["ms"]
                    compared_to(row, ours)
            rows += group
    return rows


BENCH_COLUMNS = [
    ("case", lambda r: r["label"]),
    ("mode", lambda r: r["mode"]),
    ("peer", lambda r: r["peer"]),
    ("ms", lambda r: fmt_number(r["ms"], ".3f")),
    ("TFLOP/s", lambda r: fmt_number(r["tflops"], ".3f")),
    ("%mm", lambda r: fmt_number(r["pct_matmul_peak"], ".1f")),
    ("ours speedup", lambda r: fmt_number(r["speedup_vs_peer"], ".2f") + ("x" if r["speedup_vs_peer"] else "")),
    ("status", lambda r: r["status"] if r["reason"] is None else f"{r['status']}: {_shorten(r['reason'], 70)}"),
]


def _shorten(text, width):
    return text if len(text) <= width else text[:width - 3] + "..."


# ----------------------------------------------------------------------------------------------------------------
# Correctness: ours against the reference, in the flash-attn rule
# ----------------------------------------------------------------------------------------------------------------

# (batch, heads, kv_heads, tq, tk, head_dim, window, causal): odd lengths, grouped heads, Tq != Tk, a bidirectional band
CHECK_CASES = [
    (2, 4, 2, 300, 300, 64, 64, True),
    (1, 4, 1, 200, 333, 80, (48, 16), False),
    (1, 2, 2, 129, 129, 128, (-1, 0), True),
]
CHECK_FLOOR = 1e-5


def _output_and_grads(q, k, v, grad_out, window, causal, backend, dtype):
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out = hr.sliding_window_attention(q, k, v, window, causal=causal, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(dtype))
    return [out.detach(), *grads]


def check(device):
    """Max abs error of o, dq, dk, dv: ours (backend="auto") must be within 2x the error of the reference computed
    in the input dtype, plus 1e-5 * max|truth|, both measured against the float64 reference."""
    dtype = bench_dtype(device)
    rows = []
    for batch, heads, kv_heads, tq, tk, dim, window, causal in CHECK_CASES:
        torch.manual_seed(0)
        q = torch.randn(batch, heads, tq, dim, device=device, dtype=dtype)
        k, v = (torch.randn(batch, kv_heads, tk, dim, device=device, dtype=dtype) for _ in range(2))
        grad_out = torch.randn_like(q)
        truth = _output_and_grads(q, k, v, grad_out, window, causal, "reference", torch.float64)
        plain = _output_and_grads(q, k, v, grad_out, window, causal, "reference", dtype)
        ours = _output_and_grads(q, k, v, grad_out, window, causal, "auto", dtype)
        label = f"B={batch} H={heads} Hkv={kv_heads} Tq={tq} Tk={tk} D={dim} window={window} causal={causal}"
        for name, t, p, o in zip(("o", "dq", "dk", "dv"), truth, plain, ours):
            rows.append({"case": label, "dtype": str(dtype).removeprefix("torch."), "tensor": name,
                         **compare_to_truth(o, p, t, CHECK_FLOOR)})
    return rows


CHECK_COLUMNS = TOLERANCE_CHECK_COLUMNS


# ----------------------------------------------------------------------------------------------------------------
# Plot
# ----------------------------------------------------------------------------------------------------------------

def plot(rows, ceilings, env, path):
    """TFLOP/s on the band against T, one panel per (mode, window), one line per peer; measured points only."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    windows = sorted({r["case"]["window"] for r in rows})
    fig, axes = plt.subplots(len(MODES), len(windows), squeeze=False, figsize=(5.5 * len(windows), 4 * len(MODES)))
    for i, mode in enumerate(MODES):
        for j, window in enumerate(windows):
            ax = axes[i][j]
            for number, peer in enumerate(PEERS):
                points = [(r["case"]["seqlen"], r["tflops"], r.get("flagged")) for r in rows if r["mode"] == mode
                          and r["case"]["window"] == window and r["peer"] == peer and r["status"] == "ok"]
                if points:
                    plot_line(ax, points, label=peer, color=f"C{number}")
            missing = sorted({f"{r['peer']} ({r['status']})" for r in rows if r["mode"] == mode
                              and r["case"]["window"] == window and r["status"] != "ok"})
            if missing:
                ax.text(0.01, 0.01, "not measured: " + ", ".join(missing), transform=ax.transAxes, fontsize=7,
                        color="dimgray", va="bottom")
            if ceilings:
                ax.axhline(ceilings["matmul_tflops"], color="gray", linestyle="--", label="dense matmul (measured)")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length T")
            ax.set_ylabel("TFLOP/s on the band")
            ax.set_title(f"{mode}, window {window}")
            ax.grid(True, alpha=0.3)
    dtype = rows[0]["case"]["dtype"] if rows else ""
    fig.suptitle(f"sliding-window attention, {dtype}\n{env['device']}, torch {env['torch']}, "
                 f"commit {env['git_commit'][:12]}, {env['date'][:10]}", fontsize=9)
    figure_legend(fig, axes.flat)
    note_flagged(fig, rows)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
