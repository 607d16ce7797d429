"""Hybrid attention suite (window | landmarks | global landmark rows | memory tokens): ours against window-only
attention, FlexAttention and SDPA with a dense mask, side by side on the same inputs; plus attention_mass.

Each case fixes the window, the number of landmarks L (an int stride T // L: positions 0, s, 2s, ...; with
global_queries=True the L landmark rows see every earlier key) and the number of memory tokens M (learned keys and
values of shape (1, Hkv, M, D) that every query sees).

FLOPs are counted on the pattern only. With n_i the number of keys query row i sees (hybrid_key_counts, memory
tokens included):
    forward          = 4 * D * sum_i(n_i) * B * H     (QK^T and PV: two matmuls, 2 FLOPs per multiply-add)
    backward         = 2.5 * forward                  (recomputed QK^T, dV, dP, dQ, dK: five matmuls against two)
    forward+backward = 3.5 * forward
Ours, FlexAttention and dense-mask SDPA compute the same thing and are credited with the same FLOPs (the dense-mask
peer does more work than it is credited for; that is the point of the comparison). attention_mass is credited with
the forward count too: it does two QK^T passes (the lse, then the probabilities) where the forward does QK^T and PV.
The window-only row is credited with its own, smaller band count.

Targets, recorded in each row's `target` (the ratio is recorded for every case, the verdict where a target is set):
    ours_window_only:  ours ms / window-only ms <= 1.15 with 64 landmarks and no memory tokens (what the landmarks and
                       the global rows cost). The pattern's pair count over the window's ("work") is recorded beside it:
                       about 1.11 at T=8k, w=512, L=64 and 1.45 with L=256, a floor no kernel gets under.
    attention_mass:    attention_mass ms / ours forward ms <= 1.5, every case.
    ours_key_mask, ours_packed: the key-padding path with an all-True key_mask, and the packed-sequence path with the
                       batch's rows as sequences, each <= 1.05 x ours: with no padding the new paths cost at most 5%.
                       The ratio is timed in alternation with ours (common.paired_ratio, recorded under "paired"):
                       separately timed medians move by tens of percent between identical calls on a small CPU.
"""
import gc
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import hybridrag as hr
from hybridrag.kernels.patterns import (UNBOUNDED, hybrid_key_counts, hybrid_mask, resolve_landmarks, resolve_window,
                                        visible_key_counts)

from .common import (TOLERANCE_CHECK_COLUMNS, PeerSkipped, PeerUnavailable, compare_to_truth, compared_to,
                     figure_legend, fmt_number, free_memory_bytes, note_flagged, paired_ratio, plot_line,
                     prepare_attention, progress, release_memory, time_ms, verdict_text)

SUITE = "hybrid"
EXPECTED_S = {"quick": 35, "full": 600}  # on the 2-core AMD EPYC of the recorded results (FlexAttention compiles)
PEERS = ("ours", "ours_window_only", "ours_key_mask", "ours_packed", "flex_attention", "sdpa_dense_mask",
         "attention_mass")
MODES = ("fwd", "fwd+bwd")
PEER_MODES = {"attention_mass": ("fwd",)}  # attention_mass is not differentiable
BACKWARD_FACTOR = 2.5
DENSE_MASK_MEMORY_FRACTION = 0.25  # the dense-mask peer runs only if its T x (T + M) tensors fit in this share
FLEX_EAGER_MASK_TEMPORARIES = 8   # bool (T, T + M) tensors eager create_block_mask may hold at once (a generous bound)
NUM_SEGMENTS = 64                  # attention_mass: the keys split into this many equal segments
WINDOW_ONLY_TARGET = 1.15  # ours / window-only, for (landmarks, memory) == WINDOW_ONLY_TARGET_VARIANT
WINDOW_ONLY_TARGET_VARIANT = (64, 0)
MASS_TARGET = 1.5         # attention_mass / ours forward
NO_PADDING_TARGET = 1.05  # ours with an all-True key_mask, or as one packed sequence, / ours without either
PAIRED_PEERS = ("ours_key_mask", "ours_packed")  # their target ratio is timed in alternation with ours (paired_ratio)

PEER_NOTES = {
    "ours": "hr.hybrid_attention(landmarks=T // L (int stride), global_queries=True, memory_k/v (1, Hkv, M, D) "
            'when M > 0, backend="cpu" on CPU, "triton" on CUDA)',
    "ours_window_only": 'hr.sliding_window_attention with the same window and backend: no landmarks, no global rows, '
                        "no memory tokens",
    "flex_attention": "torch.compile(flex_attention, dynamic=False) with a create_block_mask built outside the timed "
                      "call from mask_mod = memory | (causal & (window | key is landmark | query is landmark)); "
                      "landmark flags are bool lookup tables indexed by kv_idx and q_idx; memory tokens are "
                      "concatenated after the T keys/values outside the timed call (KV_LEN = T + M; that copy is "
                      "not timed, which favours Flex) and mask_mod sees every kv_idx >= T; create_block_mask runs "
                      "eager where its dense (T, T + M) temporaries fit, else compiled; compile time excluded",
    "sdpa_dense_mask": "F.scaled_dot_product_attention with the dense bool (T, T + M) hybrid mask (memory columns "
                       "last, all True) built outside the timed call; memory tokens concatenated after the keys and, "
                       "when H != Hkv, k/v expanded to H heads, outside the timed call (SDPA's fused kernels that "
                       "take a mask reject grouped heads; enable_gqa=True would route to the math path)",
    "ours_key_mask": "ours with key_mask=torch.ones(B, T, dtype=torch.bool): the key-padding path with nothing "
                     "hidden",
    "ours_packed": "ours on the batch's rows packed as (1, H, B * T, D) with cu_seqlens_q = cu_seqlens_k = "
                   "[0, T, 2T, ...] (the varlen path; B = 1 packs nothing)",
    "attention_mass": f"hr.attention_mass with the same pattern and memory_k, {NUM_SEGMENTS} equal key segments, "
                      "every query row selected (query_mask=None); same backend as ours; not differentiable",
}




@dataclass(frozen=True)
class Case:
    batch: int
    heads: int
    kv_heads: int
    seqlen: int
    head_dim: int
    window: int          # int w: the w most recent keys, causal
    landmarks: int       # L: landmark stride T // L, so L landmarks at 0, s, 2s, ...
    memory: int          # M memory tokens (0: none)
    dtype: str
    causal: bool = True

    @property
    def band(self):
        return resolve_window(self.window, self.causal)

    @property
    def stride(self):
        return self.seqlen // self.landmarks

    @property
    def torch_dtype(self):
        return getattr(torch, self.dtype)

    @property
    def label(self):
        return f"T={self.seqlen} w={self.window} L={self.landmarks} M={self.memory}"

    def landmark_positions(self, device=None):
        return resolve_landmarks(self.stride, self.seqlen, device)


def bench_dtype(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def ours_backend(device):
    """The backend ours is timed and checked with: named explicitly, so HYBRIDRAG_BACKEND cannot change it."""
    return "triton" if device.type == "cuda" else "cpu"


# (landmarks, memory tokens): 64 landmarks; more landmarks; 64 landmarks with 16 memory tokens
VARIANTS = ((64, 0), (256, 0), (64, 16))


def cases(device, quick=False):
    """GPU: bf16, B=1, H=32, Hkv=8, D=128, window 512 and 4096; 64 landmarks at T 8k..128k, the other variants at
    8k, 32k and 128k (every case compiles Flex anew). CPU: fp32, B=1, H=Hkv=8, D=64, T 2048..8192, window 512,
    every variant; quick CPU: H=4, Hkv=2, T=1024, window 256."""
    if device.type == "cuda":
        if quick:
            return [Case(1, 32, 8, 8192, 128, w, lm, mem, "bfloat16") for w in (512, 4096) for lm, mem in VARIANTS]
        return [Case(1, 32, 8, t, 128, w, lm, mem, "bfloat16") for w in (512, 4096)
                for t in (8192, 16384, 32768, 65536, 131072) for lm, mem in VARIANTS
                if (lm, mem) == VARIANTS[0] or t in (8192, 32768, 131072)]
    if quick:
        return [Case(1, 4, 2, 1024, 64, 256, lm, mem, "float32") for lm, mem in VARIANTS]
    return [Case(1, 8, 8, t, 64, 512, lm, mem, "float32") for t in (2048, 4096, 8192) for lm, mem in VARIANTS]


def pytest_cases(device):
    """The sizes the pytest-benchmark suite times (CPU: small, to keep it fast)."""
    if device.type == "cuda":
        return [Case(1, 32, 8, t, 128, w, 64, mem, "bfloat16") for w in (512, 4096)
                for t, mem in ((8192, 0), (32768, 0), (32768, 16))]
    return [Case(1, 4, 2, 1024, 64, 256, 64, mem, "float32") for mem in (0, 16)]


# ----------------------------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------------------------

def hybrid_pairs(case):
    """sum_i n_i: visible (query, key) pairs of one head under the hybrid pattern, memory tokens included."""
    left, right = case.band
    counts = hybrid_key_counts(case.seqlen, case.seqlen, left, right, case.causal, case.landmark_positions(), True,
                               memory=case.memory)
    return int(counts.sum())


def window_pairs(case):
    """sum_i n_i for the window alone (what ours_window_only computes)."""
    return int(visible_key_counts(case.seqlen, case.seqlen, *case.band).sum())


def pattern_flops(case, mode, peer="ours"):
    pairs = window_pairs(case) if peer == "ours_window_only" else hybrid_pairs(case)
    forward = 4 * case.head_dim * pairs * case.batch * case.heads
    return forward if mode == "fwd" else (1 + BACKWARD_FACTOR) * forward


# ----------------------------------------------------------------------------------------------------------------
# Peers: each builder returns attend(*inputs) and the inputs it wants (the tensors gradients are taken for)
# ----------------------------------------------------------------------------------------------------------------

def make_inputs(case, device, requires_grad, seed=0):
    """q (B, H, T, D), k/v (B, Hkv, T, D), memory_k/v (1, Hkv, M, D) or None, in the case dtype."""
    torch.manual_seed(seed)
    shape_q = (case.batch, case.heads, case.seqlen, case.head_dim)
    shape_kv = (case.batch, case.kv_heads, case.seqlen, case.head_dim)
    shape_mem = (1, case.kv_heads, case.memory, case.head_dim)
    tensors = [torch.randn(s, device=device, dtype=case.torch_dtype) for s in (shape_q, shape_kv, shape_kv)]
    memory = [torch.randn(shape_mem, device=device, dtype=case.torch_dtype) for _ in range(2)] if case.memory \
        else [None, None]
    return [None if t is None else t.requires_grad_(requires_grad) for t in tensors + memory]


def _with_memory_keys(case, k, v, memory_k, memory_v):
    """k/v with the memory tokens appended after the T keys, (B, Hkv, T + M, D): the layout of the Flex and SDPA
    peers (and of the reference). New leaves, so the peers' gradients are taken with respect to them."""
    if memory_k is None:
        return k, v
    return [torch.cat([t.detach(), m.detach().expand(case.batch, -1, -1, -1)], dim=2).requires_grad_(t.requires_grad)
            for t, m in ((k, memory_k), (v, memory_v))]


def _ours(case, device, mode, **padding):
    """hybrid_attention on the case; `padding` adds key_mask or packs the batch's rows (cu_seqlens)."""
    q, k, v, memory_k, memory_v = make_inputs(case, device, mode != "fwd")
    backend = ours_backend(device)
    packed = padding.pop("packed", False)
    offsets = torch.arange(0, case.batch + 1, device=device, dtype=torch.int32) * case.seqlen

    def attend(q, k, v, *memory):
        memory_k, memory_v = memory or (None, None)
        if packed:  # (B, H, T, D) -> (1, H, B * T, D): a copy for B > 1, a view for B = 1
            q, k, v = (t.transpose(0, 1).reshape(1, t.shape[1], -1, t.shape[3]) for t in (q, k, v))
            padding.update(cu_seqlens_q=offsets, cu_seqlens_k=offsets)
        return hr.hybrid_attention(q, k, v, case.window, landmarks=case.stride, global_queries=True,
                                   memory_k=memory_k, memory_v=memory_v, causal=case.causal, backend=backend,
                                   **padding)
    return attend, [q, k, v] + ([memory_k, memory_v] if case.memory else [])


def _ours_key_mask(case, device, mode):
    return _ours(case, device, mode, key_mask=torch.ones(case.batch, case.seqlen, dtype=torch.bool, device=device))


def _ours_packed(case, device, mode):
    return _ours(case, device, mode, packed=True)


def _ours_window_only(case, device, mode):
    q, k, v, _, _ = make_inputs(case, device, mode != "fwd")
    backend = ours_backend(device)

    def attend(q, k, v):
        return hr.sliding_window_attention(q, k, v, case.window, causal=case.causal, backend=backend)
    return attend, [q, k, v]


def _attention_mass(case, device, mode):
    if mode != "fwd":
        raise PeerUnavailable("attention_mass is not differentiable (forward only)")
    q, k, _, memory_k, _ = make_inputs(case, device, False)
    segments = (torch.arange(case.seqlen, device=device) * NUM_SEGMENTS // case.seqlen).expand(case.batch, -1)
    backend = ours_backend(device)

    def attend(q, k):
        return hr.attention_mass(q, k, segments, NUM_SEGMENTS, case.window, landmarks=case.stride,
                                 global_queries=True, memory_k=memory_k, causal=case.causal, backend=backend)
    return attend, [q, k]


def dense_mask_bytes(case):
    """The bool (T, T + M) mask plus the additive copy SDPA makes of it in the input dtype."""
    return case.seqlen * (case.seqlen + case.memory) * (1 + torch.finfo(case.torch_dtype).bits // 8)


def dense_hybrid_mask(case, device):
    """Bool (T, T + M): the hybrid pattern, memory columns last and all True (the reference's layout)."""
    visible = hybrid_mask(case.seqlen, case.seqlen, *case.band, case.causal, case.landmark_positions(device), True)
    return torch.cat([visible, visible.new_ones(case.seqlen, case.memory)], dim=1)


def _sdpa_dense_mask(case, device, mode):
    need, free = dense_mask_bytes(case), free_memory_bytes(device)
    if need > DENSE_MASK_MEMORY_FRACTION * free:
        raise PeerSkipped(f"dense {case.seqlen}x{case.seqlen + case.memory} mask needs {need / 2**30:.1f} GiB, over "
                          f"{DENSE_MASK_MEMORY_FRACTION:.0%} of {free / 2**30:.1f} GiB free")
    q, k, v, memory_k, memory_v = make_inputs(case, device, mode != "fwd")
    k, v = _with_memory_keys(case, k, v, memory_k, memory_v)
    if case.heads != case.kv_heads:
        group = case.heads // case.kv_heads
        k, v = (t.detach().repeat_interleave(group, dim=1).requires_grad_(t.requires_grad) for t in (k, v))
    mask = dense_hybrid_mask(case, device)

    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return attend, [q, k, v]


def flex_mask_mod(case, device):
    """mask_mod(b, h, q_idx, kv_idx) of the hybrid pattern over T queries and T + M keys (memory keys last).

    Landmark flags are bool lookup tables, padded past T + M so that indices Flex evaluates beyond the sequence end
    (partial last blocks) stay in bounds. Queries and keys share positions (Tq == Tk)."""
    total = case.seqlen + case.memory
    padded = (total + 127) // 128 * 128 + 128
    is_landmark = torch.zeros(padded, dtype=torch.bool, device=device)
    is_landmark[case.landmark_positions(device)] = True
    left, right = case.band
    seqlen, memory, causal = case.seqlen, case.memory, case.causal

    def mask_mod(b, h, q_idx, kv_idx):
        # comparisons against shifted query indices only: no int64 (T, T) temporaries while the mask is built
        lower = kv_idx >= q_idx - left if left != UNBOUNDED else kv_idx >= 0
        upper = kv_idx <= q_idx + right if right != UNBOUNDED else kv_idx >= 0
        seen = (lower & upper) | is_landmark[kv_idx] | is_landmark[q_idx]  # window | landmark key | landmark row
        if causal:
            seen = seen & (kv_idx <= q_idx)
        if memory:
            seen = seen | (kv_idx >= seqlen)  # memory tokens: every query sees them
        return seen
    return mask_mod


def _flex_attention(case, device, mode):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch._dynamo.reset()  # a fresh compile per case: no recompile limit, no silent fall back to eager
    # Eager create_block_mask materializes the dense (T, T + M) mask and a few temporaries like it (16 GiB each at
    # T = 128k); compiled, it fuses them away but costs a compile per case. Compile only where eager would not fit.
    eager_fits = FLEX_EAGER_MASK_TEMPORARIES * case.seqlen * (case.seqlen + case.memory) \
        <= DENSE_MASK_MEMORY_FRACTION * free_memory_bytes(device)
    build = create_block_mask if eager_fits else torch.compile(create_block_mask)
    block_mask = build(flex_mask_mod(case, device), None, None, case.seqlen, case.seqlen + case.memory,
                       device=device)
    compiled = torch.compile(flex_attention, dynamic=False)
    q, k, v, memory_k, memory_v = make_inputs(case, device, mode != "fwd")
    k, v = _with_memory_keys(case, k, v, memory_k, memory_v)

    def attend(q, k, v):
        return compiled(q, k, v, block_mask=block_mask, enable_gqa=case.heads != case.kv_heads)
    return attend, [q, k, v]


BUILDERS = {"ours": _ours, "ours_window_only": _ours_window_only, "ours_key_mask": _ours_key_mask,
            "ours_packed": _ours_packed, "flex_attention": _flex_attention,
            "sdpa_dense_mask": _sdpa_dense_mask, "attention_mass": _attention_mass}

# Failures seen on the first call that mean "this peer cannot do this here", recorded rather than raised.
FIRST_CALL_FAILURES = {
    "flex_attention": ((NotImplementedError,), "unavailable"),   # "FlexAttention does not support backward on CPU"
    "sdpa_dense_mask": ((torch.cuda.OutOfMemoryError,), "skipped"),
}


def prepare(peer, case, device, mode):
    """Build the peer's timed call for one case and mode, and make its first call (compile, warm caches)."""
    return prepare_attention(lambda: BUILDERS[peer](case, device, mode), device, mode,
                             FIRST_CALL_FAILURES.get(peer, ((), None)))


def forward_output(peer, case, device):
    """The peer's forward output, or None when it cannot run here: checks the peers agree.
    (B, H, T, D) for the attention peers, (B, H, NUM_SEGMENTS) for attention_mass."""
    prepared = prepare(peer, case, device, "fwd")
    return prepared.run() if prepared.status == "ok" else None


# ----------------------------------------------------------------------------------------------------------------
# Suite entry points (used by benchmarks.report)
# ----------------------------------------------------------------------------------------------------------------

def _timing_options(case, device, quick):
    if device.type == "cuda":
        return {}
    return {"cpu_reps": 5 if quick else 10, "cpu_budget_s": 3.0 if quick else 10.0}


def peer_modes(peer):
    return PEER_MODES.get(peer, MODES)


def _target(row, case, ours_ms):
    """The row's target record, or None for rows without one (ours and the outside peers)."""
    peer, peer_ms = row["peer"], row["ms"]
    if peer == "ours_window_only":
        ratio, limit = ours_ms / peer_ms, None
        if (case.landmarks, case.memory) == WINDOW_ONLY_TARGET_VARIANT:
            limit = WINDOW_ONLY_TARGET
        record = {"ratio": "ours / window-only", "value": ratio, "work": hybrid_pairs(case) / window_pairs(case)}
    elif peer == "attention_mass":
        ratio, limit = peer_ms / ours_ms, MASS_TARGET
        record = {"ratio": "mass / ours fwd", "value": ratio, "work": None}
    elif peer in PAIRED_PEERS:
        paired = row.get("paired")
        ratio, limit = (paired["ratio"] if paired else peer_ms / ours_ms), NO_PADDING_TARGET
        name = f"{peer.removeprefix('ours_').replace('_', ' ')} / ours" + (" (paired)" if paired else "")
        record = {"ratio": name, "value": ratio, "work": None}
    else:
        return None
    return {**record, "limit": limit, "met": None if limit is None else bool(ratio <= limit)}


def _apply_ratios(group, case):
    """ours speedup = peer ms / ours ms for the outside peers; the target ratio for our own other rows."""
    ours = next((r for r in group if r["peer"] == "ours"), None)
    for row in group:
        if row is ours or row["ms"] is None or ours is None or ours["ms"] is None:
            continue
        compared_to(row, ours)
        row["target"] = _target(row, case, ours["ms"])
        if row["target"] is None:
            row["speedup_vs_peer"] = row["ms"] / ours["ms"]


def benchmark(device, quick=False, peers=PEERS, ceilings=None, log=print):
    """One row per (case, mode, peer): ms, TFLOP/s on the pattern, peer_ms / ours_ms, and the targets."""
    rows = []
    bar = progress(cases(device, quick), SUITE)
    for case in bar:
        for mode in MODES:
            group = []
            for peer in peers:
                if mode not in peer_modes(peer):
                    continue
                bar.set_postfix_str(f"{case.label} {mode} {peer}")  # what runs now (compiles take tens of seconds)
                flops = pattern_flops(case, mode, peer)
                prepared = prepare(peer, case, device, mode)
                row = {"case": asdict(case), "label": case.label, "mode": mode, "peer": peer,
                       "status": prepared.status, "reason": prepared.reason, "pattern_flops": flops,
                       "ms": None, "tflops": None, "pct_matmul_peak": None, "speedup_vs_peer": None, "target": None,
                       "setup_s": prepared.setup_s, "timing": None, "other_load": None, "note": PEER_NOTES[peer]}
                if prepared.status == "ok":
                    timing = time_ms(prepared.run, device, **_timing_options(case, device, quick))
                    row.update(ms=timing.ms, tflops=flops / (timing.ms * 1e-3) / 1e12, timing=timing.method,
                               other_load=timing.other_load)
                    if ceilings:
                        row["pct_matmul_peak"] = 100 * row["tflops"] / ceilings["matmul_tflops"]
                    if peer in PAIRED_PEERS:
                        row["paired"] = _paired_with_ours(prepared, case, device, mode, quick)
                        if row["paired"] and row["paired"]["other_load"] is not None:
                            row["other_load"] = max(row["other_load"], row["paired"]["other_load"])
                del prepared
                gc.collect()
                release_memory(device)
                busy = f"  (other processes: {row['other_load']:.0%} of the CPU)" if (row["other_load"] or 0) > 0.05 else ""
                log(f"  {SUITE} {case.label} {mode:7s} {peer:16s} "
                    + (f"{row['ms']:10.3f} ms{busy}" if row["ms"] is not None else f"{row['status']}: {row['reason']}"))
                group.append(row)
            _apply_ratios(group, case)  # attention_mass runs in the "fwd" group only: held against ours' forward
            rows += group
    return rows


def _paired_with_ours(prepared, case, device, mode, quick):
    """paired_ratio of the peer's call against a fresh `ours` on the same case, or None when ours cannot run."""
    base = prepare("ours", case, device, mode)
    if base.status != "ok":
        return None
    pairs = {} if device.type == "cuda" else {"pairs": 6 if quick else 10, "budget_s": 3.0 if quick else 10.0}
    paired = paired_ratio(prepared.run, base.run, device, **pairs)
    del base
    gc.collect()
    release_memory(device)
    return paired


def _target_text(target):
    if target is None:
        return "-"
    text = f"{target['ratio']} {target['value']:.2f}"
    details = [] if target["work"] is None else [f"work {target['work']:.2f}"]
    if target["limit"] is not None:
        details.append(f"target <= {target['limit']} {verdict_text(target)}")
    return text + (f" ({'; '.join(details)})" if details else "")


BENCH_COLUMNS = [
    ("case", lambda r: r["label"]),
    ("mode", lambda r: r["mode"]),
    ("peer", lambda r: r["peer"]),
    ("ms", lambda r: fmt_number(r["ms"], ".3f")),
    ("TFLOP/s", lambda r: fmt_number(r["tflops"], ".3f")),
    ("%mm", lambda r: fmt_number(r["pct_matmul_peak"], ".1f")),
    ("ours speedup", lambda r: fmt_number(r["speedup_vs_peer"], ".2f") + ("x" if r["speedup_vs_peer"] else "")),
    ("target", lambda r: _target_text(r["target"])),
    ("status", lambda r: r["status"] if r["reason"] is None else f"{r['status']}: {_shorten(r['reason'], 70)}"),
]


def _shorten(text, width):
    return text if len(text) <= width else text[:width - 3] + "..."


# ----------------------------------------------------------------------------------------------------------------
# Correctness: ours against the reference, in the flash-attn rule
# ----------------------------------------------------------------------------------------------------------------

# (batch, heads, kv_heads, tq, tk, head_dim, window, landmarks, global_queries, memory, causal, hidden): odd lengths,
# grouped heads, Tq != Tk, a bidirectional band, stride and explicit landmarks, memory tokens shared by the batch, and
# a random key_mask hiding that share of the keys (0: no mask)
CHECK_CASES = [
    (2, 4, 2, 300, 300, 64, 64, 37, True, 16, True, 0.0),
    (1, 4, 1, 200, 333, 80, (48, 16), torch.tensor([0, 5, 140, 141, 290, 332]), True, 0, False, 0.0),
    (1, 2, 2, 257, 257, 128, 32, 64, False, 7, True, 0.0),
    (2, 4, 2, 300, 300, 64, 64, 37, True, 4, True, 0.3),
]
CHECK_FLOOR = 1e-5


def _output_and_grads(inputs, grad_out, window, landmarks, global_queries, causal, key_mask, backend, dtype):
    inputs = [None if t is None else t.detach().to(dtype).requires_grad_() for t in inputs]
    q, k, v, memory_k, memory_v = inputs
    out = hr.hybrid_attention(q, k, v, window, landmarks=landmarks, global_queries=global_queries, memory_k=memory_k,
                              memory_v=memory_v, causal=causal, key_mask=key_mask, backend=backend)
    leaves = [t for t in inputs if t is not None]
    return [out.detach(), *torch.autograd.grad(out, leaves, grad_out.to(dtype))]


def _mass(q, k, memory_k, segments, window, landmarks, global_queries, query_mask, causal, key_mask, backend, dtype):
    return hr.attention_mass(q.to(dtype), k.to(dtype), segments, NUM_SEGMENTS, window, landmarks=landmarks,
                             global_queries=global_queries, query_mask=query_mask,
                             memory_k=None if memory_k is None else memory_k.to(dtype), causal=causal,
                             key_mask=key_mask, backend=backend)


def check(device):
    """Max abs error of o, dq, dk, dv (and d memory_k, d memory_v) and of attention_mass: ours (the benchmark's
    backend) must be within 2x the error of the reference computed in the input dtype, plus 1e-5 * max|truth|, both
    measured against the float64 reference."""
    dtype = bench_dtype(device)
    backend = ours_backend(device)
    rows = []
    for batch, heads, kv_heads, tq, tk, dim, window, landmarks, global_queries, memory, causal, hidden in CHECK_CASES:
        torch.manual_seed(0)
        key_mask = (torch.rand(batch, tk, device=device) >= hidden) if hidden else None
        q = torch.randn(batch, heads, tq, dim, device=device, dtype=dtype)
        k, v = (torch.randn(batch, kv_heads, tk, dim, device=device, dtype=dtype) for _ in range(2))
        memory_k, memory_v = (torch.randn(1, kv_heads, memory, dim, device=device, dtype=dtype) if memory else None
                              for _ in range(2))
        if isinstance(landmarks, torch.Tensor):
            landmarks = landmarks.to(device)
        grad_out = torch.randn_like(q)
        args = (window, landmarks, global_queries, causal, key_mask)
        inputs = (q, k, v, memory_k, memory_v)
        truth = _output_and_grads(inputs, grad_out, *args, "reference", torch.float64)
        plain = _output_and_grads(inputs, grad_out, *args, "reference", dtype)
        ours = _output_and_grads(inputs, grad_out, *args, backend, dtype)
        names = ["o", "dq", "dk", "dv"] + (["dmemory_k", "dmemory_v"] if memory else [])
        segments = (torch.arange(tk, device=device) * NUM_SEGMENTS // tk).expand(batch, -1).clone()
        segments[:, ::5] = -1  # some keys in no segment
        query_mask = torch.rand(batch, tq, device=device) < 0.5
        mass_args = (q, k, memory_k, segments, window, landmarks, global_queries, query_mask, causal, key_mask)
        truth.append(_mass(*mass_args, "reference", torch.float64))
        plain.append(_mass(*mass_args, "reference", dtype))
        ours.append(_mass(*mass_args, backend, dtype))
        names.append("mass")
        lm = f"stride {landmarks}" if isinstance(landmarks, int) else f"{landmarks.numel()} positions"
        label = (f"B={batch} H={heads} Hkv={kv_heads} Tq={tq} Tk={tk} D={dim} window={window} landmarks={lm} "
                 f"global={global_queries} M={memory} causal={causal}"
                 + (f" key_mask hides {hidden:.0%}" if hidden else ""))
        for name, t, p, o in zip(names, truth, plain, ours):
            rows.append({"case": label, "dtype": str(dtype).removeprefix("torch."), "tensor": name,
                         **compare_to_truth(o, p, t, CHECK_FLOOR)})
    return rows


CHECK_COLUMNS = TOLERANCE_CHECK_COLUMNS


# ----------------------------------------------------------------------------------------------------------------
# Plot
# ----------------------------------------------------------------------------------------------------------------

def plot(rows, ceilings, env, path):
    """Milliseconds against T, one panel per (mode, window, landmarks/memory variant), one line per peer; measured
    points only. (Time rather than TFLOP/s: the window-only row does less work than the others.)"""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = sorted({(r["case"]["window"], r["case"]["landmarks"], r["case"]["memory"]) for r in rows})
    fig, axes = plt.subplots(len(MODES), len(columns), squeeze=False,
                             figsize=(4.5 * len(columns), 3.8 * len(MODES)))
    for i, mode in enumerate(MODES):
        for j, (window, landmarks, memory) in enumerate(columns):
            ax = axes[i][j]
            panel = [r for r in rows if r["mode"] == mode and (r["case"]["window"], r["case"]["landmarks"],
                                                               r["case"]["memory"]) == (window, landmarks, memory)]
            for number, peer in enumerate(PEERS):
                points = [(r["case"]["seqlen"], r["ms"], r.get("flagged")) for r in panel if r["peer"] == peer
                          and r["status"] == "ok"]
                if points:
                    plot_line(ax, points, label=peer, color=f"C{number}")
            missing = sorted({f"{r['peer']} ({r['status']})" for r in panel if r["status"] != "ok"})
            if missing:
                ax.text(0.01, 0.99, "not measured:\n" + "\n".join(missing), transform=ax.transAxes, fontsize=7,
                        color="dimgray", va="top")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length T")
            ax.set_ylabel("ms per call (lower is better)")
            ax.set_title(f"{mode}, window {window}, L={landmarks}, M={memory}", fontsize=9)
            ax.grid(True, alpha=0.3)
    dtype = rows[0]["case"]["dtype"] if rows else ""
    fig.suptitle(f"hybrid attention (window + landmarks + memory tokens), {dtype}\n{env['device']}, torch "
                 f"{env['torch']}, commit {env['git_commit'][:12]}, {env['date'][:10]}", fontsize=9)
    figure_legend(fig, axes.flat)
    note_flagged(fig, rows)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
