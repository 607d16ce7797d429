"""Streaming attention suite: `StreamingKVCache` + `streaming_attention` (inference only), in three parts.

decode       One new token (C = 1) against a full cache (the ring has wrapped: sinks + window slots hold keys); ours
             reads the cache in place and appends the token (timed: it is part of the op). The peers get the same keys
             gathered into contiguous K/V (sinks, then the ring with the new token written in its slot) outside the
             timed call. GB/s = 2 * B * Hkv * (sinks + window) * D * element size / time, held against the measured
             copy bandwidth. Target (CUDA): ours >= 80% of it at a 32k window.
prefill      T tokens fed in chunks of C through one cache against one-shot `hybrid_attention` with the same pattern
             (landmarks = the sinks, global_queries=False). tokens/s = B * T / time. Target (CUDA): >= 0.9x one-shot.
long_stream  A long stream (1,000,000 tokens; 50,000 in the quick run), B1 H4 Hkv2 D64, window 256, sinks 4, chunks of
             4096, timed once end to end. Memory must stay constant over its second half: cache.nbytes unchanged, and
             the growth of resident memory (/proc/self/statm), of peak RSS (getrusage maxrss; earlier suites may have
             set that peak already) and on CUDA of the allocator's peak below MEMORY_GROWTH_BOUND.
"""
import gc
import os
import resource
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

import hybridrag as hr
from hybridrag.kernels.streaming import ring_positions, stream_visibility

from .common import (TOLERANCE_CHECK_COLUMNS, LoadMeter, PeerUnavailable, compare_to_truth, compared_to, fmt_number,
                     note_flagged, plot_bars, plot_line, progress, release_memory, time_ms, verdict_text)

SUITE = "streaming"
EXPECTED_S = {"quick": 40, "full": 120}  # on the 2-core AMD EPYC of the recorded results (the 1M stream: ~25 s)
DECODE_PEERS = ("ours", "sdpa_gathered", "flash_attn_kvcache", "flex_decoding")
DECODE_TARGET = (32768, 80.0)     # (window, % of copy GB/s), CUDA
PREFILL_TARGET = 0.9              # ours chunked / one-shot tokens/s, CUDA
MEMORY_GROWTH_BOUND = 16 * 2**20  # bytes
MEMORY_KINDS = ("resident", "peak_rss", "cuda_peak")

PEER_NOTES = {
    "ours": "hr.streaming_attention on the full cache; cache.length set back before each call (same fill every call)",
    "sdpa_gathered": "F.scaled_dot_product_attention over the gathered K/V with a bool mask for empty slots; the GROUP "
                     "query heads of a KV head ride as query rows (q viewed (B, Hkv, GROUP, D)): K/V never expanded",
    "flash_attn_kvcache": "flash_attn_with_kvcache on the gathered K/V as (B, N, Hkv, D), cache_seqlens = N",
    "flex_decoding": "torch.compile(flex_attention, dynamic=False), enable_gqa=True, block mask of the empty slots "
                     "built outside the timed call; compile excluded",
    "ours_chunked": "cache.reset(), then hr.streaming_attention chunk after chunk (outputs dropped)",
    "hybrid_one_shot": "hr.hybrid_attention(window, landmarks=torch.arange(sinks), global_queries=False), same backend",
    "ours_stream": "hr.streaming_attention over the whole stream, q/k/v cycling through 2 chunks made beforehand",
}



@dataclass(frozen=True)
class Case:
    part: str       # "decode" | "prefill" | "long_stream"
    heads: int
    kv_heads: int
    head_dim: int
    window: int
    seqlen: int     # decode: stream length before the call; otherwise tokens fed
    chunk: int      # tokens per streaming_attention call
    dtype: str
    batch: int = 1
    sinks: int = 4

    @property
    def label(self):
        sizes = "" if self.part == "decode" else f" T={self.seqlen} C={self.chunk}"
        return f"{self.part}{sizes} H{self.heads}/{self.kv_heads} D{self.head_dim} w={self.window} s={self.sinks}"


def bench_dtype(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def ours_backend(device):
    return "triton" if device.type == "cuda" else "cpu"


def cases(device, quick=False):
    """CUDA: bf16 H32 Hkv8 D128; decode windows 4k, 32k; prefill T=32k (8k quick), window 4096. CPU: fp32 H8 Hkv2 D64;
    decode windows 1k, 4k; prefill T=4096, window 1024. Prefill chunks 512 and 2048; then the long stream."""
    gpu = device.type == "cuda"
    dtype, (heads, kv_heads, dim) = ("bfloat16", (32, 8, 128)) if gpu else ("float32", (8, 2, 64))
    windows = (4096, 32768) if gpu else (1024, 4096)
    out = [Case("decode", heads, kv_heads, dim, w, 2 * w + 4, 1, dtype) for w in windows]  # ring wrapped
    seqlen, window = ((8192 if quick else 32768), 4096) if gpu else (4096, 1024)
    out += [Case("prefill", heads, kv_heads, dim, window, seqlen, c, dtype) for c in (512, 2048)]
    return out + [Case("long_stream", 4, 2, 64, 256, 50_000 if quick else 1_000_000, 4096, dtype)]


def _cache(case, device):
    return hr.StreamingKVCache(case.batch, case.kv_heads, case.head_dim, case.window, sinks=case.sinks,
                               dtype=getattr(torch, case.dtype), device=device)


def _randn(case, device, heads, tokens):
    return torch.randn(case.batch, heads, tokens, case.head_dim, device=device, dtype=getattr(torch, case.dtype))


# ----------------------------------------------------------------------------------------------------------------
# Peers: each builder returns a zero-argument callable (prepare runs it under torch.no_grad)
# ----------------------------------------------------------------------------------------------------------------

def decode_inputs(case, device):
    """A cache of random keys at length case.seqlen, and the new token's q (B, H, 1, D), k/v (B, Hkv, 1, D)."""
    torch.manual_seed(0)
    cache = _cache(case, device)
    for t in (cache.sink_k, cache.sink_v, cache.ring_k, cache.ring_v):
        t.normal_()
    cache.length = case.seqlen
    return cache, _randn(case, device, case.heads, 1), _randn(case, device, case.kv_heads, 1), \
        _randn(case, device, case.kv_heads, 1)


def gathered(case, device):
    """q, contiguous K/V (B, Hkv, sinks + window, D) holding the cache after the new token's append, and the bool
    (sinks + window,) mask of the slots the new query sees (empty slots False)."""
    cache, q, k, v = decode_inputs(case, device)
    length, sinks, window = cache.length, cache.sinks, cache.window
    assert length >= sinks, "decode cases start past the sinks: the new token goes to the ring"
    ring_k, ring_v = cache.ring_k.clone(), cache.ring_v.clone()
    ring_k[:, :, (length - sinks) % window], ring_v[:, :, (length - sinks) % window] = k[:, :, 0], v[:, :, 0]
    keys, values = torch.cat([cache.sink_k, ring_k], dim=2), torch.cat([cache.sink_v, ring_v], dim=2)
    key_pos = torch.cat([torch.arange(sinks, device=device), ring_positions(length + 1, sinks, window, device)])
    mask = stream_visibility(torch.tensor([length], device=device), key_pos, sinks, window)[0]
    return q, keys, values, mask


def _ours(case, device):
    cache, q, k, v = decode_inputs(case, device)

    def run():
        cache.length = case.seqlen
        return hr.streaming_attention(q, k, v, cache, backend=ours_backend(device))
    return run


def _sdpa_gathered(case, device):
    q, keys, values, mask = gathered(case, device)
    batch, heads, _, dim = q.shape
    rows = q.view(batch, case.kv_heads, heads // case.kv_heads, dim)  # head h reads KV head h // GROUP
    return lambda: F.scaled_dot_product_attention(rows, keys, values, attn_mask=mask[None]).view(batch, heads, 1, dim)


def _flash_attn_kvcache(case, device):
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError as err:
        raise PeerUnavailable(f"flash_attn not importable ({err})") from None
    if device.type != "cuda":
        raise PeerUnavailable("flash_attn_with_kvcache needs CUDA")
    q, keys, values, mask = gathered(case, device)
    if not bool(mask.all()):
        raise PeerUnavailable("cache_seqlens cannot skip slots in the middle")
    q, k_cache, v_cache = (t.transpose(1, 2).contiguous() for t in (q, keys, values))
    seqlens = torch.full((case.batch,), keys.shape[2], dtype=torch.int32, device=device)
    return lambda: flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens)


def _flex_decoding(case, device):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as err:
        raise PeerUnavailable(f"flex_attention not importable ({err})") from None
    q, keys, values, mask = gathered(case, device)
    torch._dynamo.reset()
    block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: mask[kv_idx], None, None, 1, keys.shape[2],
                                   device=device)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda: compiled(q, keys, values, block_mask=block_mask, enable_gqa=True)


def _prefill_inputs(case, device):
    torch.manual_seed(0)
    return [_randn(case, device, h, case.seqlen) for h in (case.heads, case.kv_heads, case.kv_heads)]


def stream(q, k, v, cache, chunks, backend):
    """Feed q/k/v (B, *, T, D) through `cache` in chunks of the given sizes; the list of outputs."""
    starts = [sum(chunks[:i]) for i in range(len(chunks))]
    return [hr.streaming_attention(q[:, :, s:s + c], k[:, :, s:s + c], v[:, :, s:s + c], cache, backend=backend)
            for s, c in zip(starts, chunks)]


def _ours_chunked(case, device):
    q, k, v = _prefill_inputs(case, device)
    cache, chunks = _cache(case, device), [min(case.chunk, case.seqlen - s) for s in range(0, case.seqlen, case.chunk)]

    def run():
        cache.reset()
        stream(q, k, v, cache, chunks, ours_backend(device))
    return run


def _hybrid_one_shot(case, device):
    q, k, v = _prefill_inputs(case, device)
    landmarks = torch.arange(case.sinks, device=device)
    return lambda: hr.hybrid_attention(q, k, v, case.window, landmarks=landmarks, global_queries=False,
                                       backend=ours_backend(device))


BUILDERS = {"ours": _ours, "sdpa_gathered": _sdpa_gathered, "flash_attn_kvcache": _flash_attn_kvcache,
            "flex_decoding": _flex_decoding, "ours_chunked": _ours_chunked, "hybrid_one_shot": _hybrid_one_shot}


def prepare(peer, case, device):
    """(run, reason): the peer's call under no_grad after one untimed call (compile, warm-up), or (None, why not)."""
    try:
        attend = BUILDERS[peer](case, device)
    except PeerUnavailable as err:
        return None, str(err)

    def run():
        with torch.no_grad():
            return attend()
    run()
    return run, None


def long_stream(case, device):
    """Feed case.seqlen tokens once: (seconds, share of the CPU other processes used, memory record)."""
    torch.manual_seed(0)
    pool = [_prefill_inputs(replace(case, seqlen=case.chunk), device) for _ in range(2)]
    cache, backend, cuda = _cache(case, device), ours_backend(device), device.type == "cuda"

    def feed(tokens, desc=None):
        starts = range(0, tokens, case.chunk)
        with torch.no_grad():
            for i, lo in enumerate(starts if desc is None else progress(starts, desc, unit="chunk")):
                q, k, v = (t[:, :, :min(case.chunk, tokens - lo)] for t in pool[i % 2])
                hr.streaming_attention(q, k, v, cache, backend=backend)
        if cuda:
            torch.cuda.synchronize(device)

    def memory():
        with open("/proc/self/statm") as f:
            resident = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        return cache.nbytes, resident, peak, torch.cuda.max_memory_allocated(device) if cuda else 0

    feed(2 * case.chunk + case.seqlen % case.chunk)  # warm-up (allocator; compile, the last chunk's size too)
    cache.reset()
    first = case.seqlen // 2 // case.chunk * case.chunk
    meter, start = LoadMeter().start(), time.perf_counter()
    feed(first, f"{case.label}, first half")
    mid = memory()
    feed(case.seqlen - first, f"{case.label}, second half")  # the same stream carries on
    seconds = time.perf_counter() - start
    other = meter.stop()
    end = memory()
    assert cache.length == case.seqlen
    record = {"cache_nbytes": [mid[0], end[0]], "bound": MEMORY_GROWTH_BOUND,
              **{f"{name}_growth": e - m for name, m, e in zip(MEMORY_KINDS, mid[1:], end[1:])}}
    record["constant"] = bool(mid[0] == end[0] and all(record[f"{name}_growth"] < MEMORY_GROWTH_BOUND
                                                       for name in MEMORY_KINDS))
    return seconds, other, record


# ----------------------------------------------------------------------------------------------------------------
# Suite entry points (used by benchmarks.report)
# ----------------------------------------------------------------------------------------------------------------

def _row(case, peer, **values):
    return {"part": case.part, "case": asdict(case), "label": case.label, "peer": peer, "status": "ok", "reason": None,
            "ms": None, "gbps": None, "pct_copy": None, "tokens_per_s": None, "speedup_vs_peer": None, "target": None,
            "memory": None, "timing": None, "other_load": None, "note": PEER_NOTES[peer], **values}


def _cpu_timing(case, device, quick):
    """CPU: decode calls repeat for a fixed time (at least half a second, so that other_load's 10 ms ticks mean
    something), prefill calls a few times."""
    if device.type == "cuda":
        return {}
    if case.part == "decode":
        return {"cpu_reps": 10**6, "cpu_budget_s": 0.5 if quick else 2.0}
    return {"cpu_reps": 5 if quick else 10, "cpu_budget_s": 2.0 if quick else 5.0}


def _timed(peer, case, device, quick, ceilings):
    run, reason = prepare(peer, case, device)
    if run is None:
        return _row(case, peer, status="unavailable", reason=reason)
    timing = time_ms(run, device, **_cpu_timing(case, device, quick))
    del run
    gc.collect()
    release_memory(device)
    row = _row(case, peer, ms=timing.ms, timing=timing.method, other_load=timing.other_load)
    if case.part == "decode":
        row["gbps"] = 2 * case.batch * case.kv_heads * (case.sinks + case.window) * case.head_dim * \
            torch.finfo(getattr(torch, case.dtype)).bits // 8 / (timing.ms * 1e-3) / 1e9
        row["pct_copy"] = 100 * row["gbps"] / ceilings["copy_gbps"] if ceilings else None
    else:
        row["tokens_per_s"] = case.batch * case.seqlen / (timing.ms * 1e-3)
    return row


def _target(value, limit, ratio):
    return {"ratio": ratio, "value": value, "limit": limit, "met": None if limit is None else bool(value >= limit)}


def targets_elsewhere(device):
    """The targets this device cannot measure: both are set for CUDA."""
    if device.type == "cuda":
        return []
    return [f"decode >= {DECODE_TARGET[1]:.0f}% of copy bandwidth at a {DECODE_TARGET[0] // 1024}k window (CUDA)",
            f"chunked prefill >= {PREFILL_TARGET}x one-shot tokens/s (CUDA)"]


def benchmark(device, quick=False, ceilings=None, log=print):
    """Rows: decode (ours and the peers per window), prefill (one-shot once per T, ours per chunk), the long stream."""
    gpu, rows, one_shot = device.type == "cuda", [], {}
    bar = progress(cases(device, quick), SUITE)
    for case in bar:
        bar.set_postfix_str(case.label)
        if case.part == "decode":
            group = [_timed(peer, case, device, quick, ceilings) for peer in DECODE_PEERS]
            ours = group[0]
            for row in group[1:]:
                if row["ms"] and ours["ms"]:
                    row["speedup_vs_peer"] = row["ms"] / ours["ms"]
                    compared_to(row, ours)
            if gpu and case.window == DECODE_TARGET[0] and ours["pct_copy"] is not None:
                ours["target"] = _target(ours["pct_copy"], DECODE_TARGET[1], "% copy GB/s")
        elif case.part == "prefill":
            group = []
            if case.seqlen not in one_shot:  # one-shot does not depend on the chunk: one row per T
                one_shot[case.seqlen] = _timed("hybrid_one_shot", case, device, quick, ceilings)
                one_shot[case.seqlen]["label"] = case.label.replace(f" C={case.chunk}", "")
                group.append(one_shot[case.seqlen])
            ours, peer = _timed("ours_chunked", case, device, quick, ceilings), one_shot[case.seqlen]
            if ours["ms"] and peer["ms"]:
                ours["target"] = _target(peer["ms"] / ours["ms"], PREFILL_TARGET if gpu else None, "x one-shot tok/s")
                compared_to(ours, peer)
            group.append(ours)
        else:
            seconds, other, memory = long_stream(case, device)
            group = [_row(case, "ours_stream", ms=seconds * 1e3, tokens_per_s=case.batch * case.seqlen / seconds,
                          memory=memory, timing="one pass, perf_counter", other_load=None if gpu else other)]
        for row in group:
            log(f"  {SUITE} {row['label']} {row['peer']} " + (f"{row['ms']:.3f} ms" if row["ms"] is not None
                                                              else f"{row['status']}: {row['reason']}"))
        rows += group
    return rows


def _target_text(row):
    target, memory = row["target"], row["memory"]
    if memory is not None:
        growth = ", ".join(f"{name} +{memory[name + '_growth'] / 2**20:.1f} MiB" for name in MEMORY_KINDS)
        return f"memory {'constant' if memory['constant'] else 'GREW'}: {growth}, cache {memory['cache_nbytes'][-1]} B"
    if target is None:
        return "-"
    verdict = "" if target["limit"] is None else f" (target >= {target['limit']} {verdict_text(target)})"
    return f"{target['value']:.2f} {target['ratio']}{verdict}"


BENCH_COLUMNS = [
    ("case", lambda r: r["label"]),
    ("peer", lambda r: r["peer"]),
    ("ms", lambda r: fmt_number(r["ms"], ".3f")),
    ("GB/s", lambda r: fmt_number(r["gbps"], ".2f")),
    ("%copy", lambda r: fmt_number(r["pct_copy"], ".1f")),
    ("tokens/s", lambda r: fmt_number(r["tokens_per_s"], ".0f")),
    ("ours speedup", lambda r: fmt_number(r["speedup_vs_peer"], ".2f") + ("x" if r["speedup_vs_peer"] else "")),
    ("target", _target_text),
    ("status", lambda r: r["status"] if r["reason"] is None else f"{r['status']}: {r['reason'][:60]}"),
]


# ----------------------------------------------------------------------------------------------------------------
# Correctness: streamed chunk by chunk against one-shot hybrid attention over the whole sequence (flash-attn rule)
# ----------------------------------------------------------------------------------------------------------------

# (batch, heads, kv_heads, head_dim, window, sinks, chunks): decode steps, chunks longer than the window, chunks that
# cross the sinks, no sinks, a window longer than the stream
CHECK_CASES = [
    (2, 4, 2, 64, 64, 4, [1, 2, 1, 100, 1, 64, 131]),
    (1, 4, 1, 128, 32, 0, [50, 50, 1, 1, 1, 97]),
    (1, 2, 2, 80, 512, 4, [3, 1, 1, 150, 45]),
    (1, 8, 2, 64, 16, 2, [1] * 40 + [17, 1, 1]),
]
CHECK_FLOOR = 1e-5


def check(device):
    """Max abs error of every streamed output: ours (the benchmark's backend) must be within 2x the error of one-shot
    reference hybrid attention in the input dtype, plus 1e-5 * max|truth|, both against the float64 one-shot."""
    dtype, rows = bench_dtype(device), []
    for batch, heads, kv_heads, dim, window, sinks, chunks in CHECK_CASES:
        torch.manual_seed(0)
        q = torch.randn(batch, heads, sum(chunks), dim, device=device, dtype=dtype)
        k, v = (torch.randn(batch, kv_heads, sum(chunks), dim, device=device, dtype=dtype) for _ in range(2))
        cache = hr.StreamingKVCache(batch, kv_heads, dim, window, sinks=sinks, dtype=dtype, device=device)
        with torch.no_grad():
            truth, plain = (hr.hybrid_attention(q.to(dt), k.to(dt), v.to(dt), window, global_queries=False,
                                                landmarks=torch.arange(sinks, device=device), backend="reference")
                            for dt in (torch.float64, dtype))
            ours = torch.cat(stream(q, k, v, cache, chunks, ours_backend(device)), dim=2)
        label = f"B={batch} H={heads} Hkv={kv_heads} T={sum(chunks)} D={dim} window={window} sinks={sinks} " \
                f"{len(chunks)} chunks (max {max(chunks)})"
        rows.append({"case": label, "dtype": str(dtype).removeprefix("torch."), "tensor": "o",
                     **compare_to_truth(ours, plain, truth, CHECK_FLOOR)})
    return rows


CHECK_COLUMNS = TOLERANCE_CHECK_COLUMNS


def plot(rows, ceilings, env, path):
    """Decode GB/s against window on a log axis (one line per peer, copy bandwidth dotted); prefill tokens/s against
    chunk size (one-shot dashed); the long stream's tokens/s with its memory verdict."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.6))
    for i, peer in enumerate(DECODE_PEERS):
        points = [(r["case"]["window"], r["gbps"], r.get("flagged")) for r in rows if r["peer"] == peer and r["gbps"]]
        if points:
            plot_line(left, points, label=peer, color=f"C{i}")
    if ceilings:
        left.axhline(ceilings["copy_gbps"], color="gray", linestyle=":", label="copy (measured)")
    left.set_xscale("log", base=2)
    left.set_yscale("log")  # the peers and ours differ by an order of magnitude on a CPU
    left.set(xlabel="window", ylabel="GB/s of cache read (log)", title="decode (C = 1), full cache")
    for i, ref in enumerate(r for r in rows if r["peer"] == "hybrid_one_shot" and r["tokens_per_s"]):
        seqlen = ref["case"]["seqlen"]
        middle.axhline(ref["tokens_per_s"], color=f"C{i}", linestyle="--", label=f"one-shot T={seqlen}")
        points = [(r["case"]["chunk"], r["tokens_per_s"], r.get("flagged")) for r in rows
                  if r["peer"] == "ours_chunked" and r["tokens_per_s"] and r["case"]["seqlen"] == seqlen]
        plot_line(middle, points, color=f"C{i}", label=f"ours chunked T={seqlen}")
    middle.set_xscale("log", base=2)
    middle.set(xlabel="chunk C", ylabel="tokens/s", title="chunked prefill")
    streams = [r for r in rows if r["peer"] == "ours_stream"]
    plot_bars(right, [f"T={r['case']['seqlen']:,}" for r in streams], [r["tokens_per_s"] for r in streams],
              [r.get("flagged") for r in streams], color="C0", width=0.8)
    for x, r in enumerate(streams):
        right.annotate(_target_text(r).replace(": ", ":\n").replace(", ", "\n"), (x, r["tokens_per_s"]),
                       xytext=(0, -6), textcoords="offset points", ha="center", va="top", fontsize=7,
                       bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85})  # readable on a hatched bar
    right.set_xlim(-0.75, len(streams) - 0.25)
    right.set(ylabel="tokens/s", title="long stream\n(B1 H4/2 D64, window 256, chunks 4096)")
    for ax in (left, middle):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    right.grid(True, axis="y", alpha=0.3)
    dtype = rows[0]["case"]["dtype"] if rows else ""
    fig.suptitle(f"streaming attention, {dtype}\n{env['device']}, torch {env['torch']}, commit "
                 f"{env['git_commit'][:12]}, {env['date'][:10]}", fontsize=9)
    note_flagged(fig, rows)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
