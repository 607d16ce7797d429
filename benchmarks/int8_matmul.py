"""int8 matmul suite: ours (W8A16 per channel and per group of 128, W8A16 with float16 accumulation, W8A8) against
torch.matmul with the float weight, torch._int_mm with a dequantizing epilogue, torchao and bitsandbytes, side by
side on the same inputs: y = x @ W.T with x (M, K) and W (N, K), no bias, forward only.

Every peer gets the same x (the case dtype) and the same float32 weight; the quantized peers quantize it outside the
timed call (ours and _int_mm share one `quantize_int8` weight; torchao and bitsandbytes quantize it their own way).

FLOPs: 2 * M * N * K for every peer. Rates are TFLOP/s for peers that multiply in floating point (the W8A16 kinds
and torch.matmul, against the measured dense matmul rate) and TOPS for peers that multiply int8 x int8 (the W8A8
kinds, against the measured torch._int_mm rate; measured on CUDA only).

Bytes moved: what the call must read and write at the least, each tensor once, with e = the case dtype's size:
    int8 weight      N * K  +  scales 4 * N (per channel) or 4 * N * K / 128 (group_size=128); 2 * N for
                     weight_int8pack_mm's bfloat16 scales
    float weight     N * K * e                                   (torch.matmul; ours_w8a16_cached: its cache's e)
    x                M * K * e, or M * K + 4 * M when x is quantized outside the timed call (int_mm_prequant)
    out              M * N * e
e is the peer's dtype: the case's, or bfloat16 / float32 for torch_matmul_bf16, torch_matmul_fp32 and
weight_int8pack_mm (x cast outside the timed call). Intermediates are not counted (W8A8's int8 x and int32
accumulator when they go through memory: _int_mm's do).
torchao and bitsandbytes are credited with the bytes of ours for the same scheme (their scale layouts differ by a
few N-sized vectors). GB/s is held against the measured copy bandwidth (read + write counted).

Ceilings (benchmarks.report measures them once per suite dtype, bfloat16 on CUDA): the float16 rows' %peak uses the
bfloat16 matmul rate (the same tensor-core rate on the GPUs this targets).

Targets, recorded in our rows' `target` (ratios for every case; verdicts only where a target is set, CUDA only,
since they name cuBLAS; the baseline is torch.matmul of the same case, so in its named dtype):
    W8A16 (all three of ours), M <= 16: >= 1.7x fp16 cuBLAS (float16 cases) and >= 80% of measured copy bandwidth
    W8A16 (all three of ours), M = 4096: >= 0.9x fp16 cuBLAS (float16 cases)
    W8A8, M = 4096: >= 1.5x bf16 cuBLAS (bfloat16 cases)
"""
import gc
import math
import time
from dataclasses import asdict, dataclass

import torch

import hybridrag as hr
from hybridrag.kernels.cpp import set_cpu_kernels
from hybridrag.kernels.int8 import quantize_activations

from .common import (TOLERANCE_CHECK_COLUMNS, PeerSkipped, PeerUnavailable, Prepared, compare_to_truth, compared_to,
                     figure_legend, fmt_number, legend_handles, note_flagged, plot_line, progress, release_memory,
                     time_ms, verdict_text)

SUITE = "int8_matmul"
EXPECTED_S = {"quick": 15, "full": 570}  # on the 2-core AMD EPYC (AVX2) of the recorded results, W8A8 most of it
GROUP_SIZE = 128
PEERS = ("ours_w8a16", "ours_w8a16_g128", "ours_w8a16_fp16acc", "ours_w8a8", "ours_w8a16_cached",
         "ours_w8a16_blockwise", "ours_w8a16_g128_blockwise", "torch_matmul",
         "torch_matmul_bf16", "torch_matmul_fp32", "weight_int8pack_mm", "int_mm", "int_mm_prequant", "torchao_w8a16",
         "torchao_w8a8", "bnb_w8a8")
OURS = ("ours_w8a16", "ours_w8a16_g128", "ours_w8a16_fp16acc", "ours_w8a8", "ours_w8a16_cached")
W8A16_OURS = ("ours_w8a16", "ours_w8a16_g128", "ours_w8a16_fp16acc")
INT8_COMPUTE = ("ours_w8a8", "int_mm", "int_mm_prequant", "torchao_w8a8", "bnb_w8a8")  # int8 x int8 products: TOPS
# The outside peers' "ours speedup" is taken against ours of the same scheme.
COUNTERPART = {"ours_w8a16_blockwise": "ours_w8a16", "ours_w8a16_g128_blockwise": "ours_w8a16_g128",
               "torch_matmul": "ours_w8a16", "torch_matmul_bf16": "ours_w8a16", "torch_matmul_fp32": "ours_w8a16",
               "weight_int8pack_mm": "ours_w8a16", "torchao_w8a16": "ours_w8a16", "int_mm": "ours_w8a8",
               "int_mm_prequant": "ours_w8a8", "torchao_w8a8": "ours_w8a8", "bnb_w8a8": "ours_w8a8"}
# Peers that compute in a fixed dtype whatever the case's (x cast outside the timed call): "the same layer in bf16"
PEER_DTYPE = {"torch_matmul_bf16": "bfloat16", "torch_matmul_fp32": "float32", "weight_int8pack_mm": "bfloat16"}
FLOAT_BASELINE = "torch_matmul"

PEER_NOTES = {
    "ours_w8a16": 'hr.int8_matmul(activations="fp") with a per-channel quantize_int8 weight; backend="cpu" on CPU '
                  '(the C++ kernel of csrc/ at M <= 8 where it is built), "triton" on CUDA',
    "ours_w8a16_g128": f"as ours_w8a16 with quantize_int8(group_size={GROUP_SIZE})",
    "ours_w8a16_fp16acc": 'as ours_w8a16 with accumulate="fp16" (Triton only; float16 cases)',
    "ours_w8a8": 'hr.int8_matmul(activations="int8"): x quantized per token inside the call, per-channel weight',
    "ours_w8a16_cached": 'as ours_w8a16 with the opt-in QuantizedWeight.cpu_cache ("bf16" for bfloat16 cases, "fp32" '
                         'otherwise; built outside the timed call): one dense matmul on the cached dequantized '
                         'weight (CPU only)',
    "ours_w8a16_blockwise": "as ours_w8a16 on the CPU backend's PyTorch path (HYBRIDRAG_CPU_KERNELS=blockwise): "
                            "what the C++ kernel (M <= 8) replaces; CPU only",
    "ours_w8a16_g128_blockwise": "as ours_w8a16_g128 on the PyTorch path; CPU only",
    "torch_matmul": "torch.matmul(x, W.T) with the float weight in the case dtype (cuBLAS on CUDA; MKL / oneDNN "
                    "on CPU)",
    "torch_matmul_bf16": "torch.matmul(x, W.T) in bfloat16 (x cast outside the timed call; output bfloat16): the "
                         "same layer in bf16, the yardstick of issue 11 on CPU (non-bfloat16 cases)",
    "torch_matmul_fp32": "torch.matmul(x, W.T) in float32 (x cast outside the timed call; non-float32 cases)",
    "weight_int8pack_mm": "PyTorch's torch._weight_int8pack_mm(x_bf16, W_int8, scale_bf16): bfloat16 x (cast "
                          "outside the timed call), ours' per-channel int8 weight, its scales rounded to bfloat16; "
                          "CPU only here",
    "int_mm": "x quantized per token inside the timed call (hybridrag's quantize_activations, eager PyTorch), "
              "torch._int_mm(x_int8, W_int8.T) -> int32, then the dequantizing epilogue "
              "(acc.float() * x_scale[:, None] * w_scale[None, :]).to(dtype): the same work as ours_w8a8",
    "int_mm_prequant": "as int_mm with x quantized outside the timed call: the int8 GEMM and the epilogue only "
                       "(a lower bound for W8A8 done with PyTorch ops)",
    "torchao_w8a16": "torchao quantize_(nn.Linear, Int8WeightOnlyConfig()), torch.compile(dynamic=False); "
                     "compile time excluded",
    "torchao_w8a8": "torchao quantize_(nn.Linear, Int8DynamicActivationInt8WeightConfig()) (per-token dynamic "
                    "activations), torch.compile(dynamic=False); compile time excluded",
    "bnb_w8a8": "bitsandbytes Linear8bitLt(has_fp16_weights=False, threshold=0.0) (LLM.int8 without outliers: "
                "per-token x, per-channel W); CUDA only; bitsandbytes casts non-float16 x to float16",
}




@dataclass(frozen=True)
class Case:
    m: int
    n: int
    k: int
    dtype: str

    @property
    def torch_dtype(self):
        return getattr(torch, self.dtype)

    @property
    def element_size(self):
        return torch.finfo(self.torch_dtype).bits // 8

    @property
    def label(self):
        return f"M={self.m} N={self.n} K={self.k} {self.dtype}"


def bench_dtype(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def ours_backend(device):
    """The backend ours is timed and checked with: named explicitly, so HYBRIDRAG_BACKEND cannot change it."""
    return "triton" if device.type == "cuda" else "cpu"


def cases(device, quick=False):
    """GPU: M in 1, 16, 128, 4096; N = K in 4096, 8192; bfloat16 and float16 (quick: M 1 and 4096, N = K = 4096).
    CPU: float32, bfloat16 and float16, M in 1, 16, 128, N = K in 1024 and 4096 (quick: float32 and bfloat16,
    M 1 and 128, N = K = 512)."""
    if device.type == "cuda":
        ms, sizes = ((1, 4096), (4096,)) if quick else ((1, 16, 128, 4096), (4096, 8192))
        return [Case(m, nk, nk, dtype) for dtype in ("bfloat16", "float16") for nk in sizes for m in ms]
    if quick:
        return [Case(m, 512, 512, dtype) for dtype in ("float32", "bfloat16") for m in (1, 128)]
    return [Case(m, nk, nk, dtype) for dtype in ("float32", "bfloat16", "float16") for nk in (1024, 4096)
            for m in (1, 16, 128)]


def pytest_cases(device):
    """The sizes the pytest-benchmark suite times (CPU: small, to keep it fast)."""
    if device.type == "cuda":
        return [Case(m, 8192, 8192, dtype) for dtype in ("bfloat16", "float16") for m in (1, 16, 4096)]
    return [Case(m, 512, 512, dtype) for dtype in ("float32", "bfloat16") for m in (1, 128)]


def peer_applies(peer, case):
    """Whether the peer has a row for this case: float16 accumulation is a float16-only option; the fixed-dtype
    matmul peers only where they differ from torch_matmul (which runs in the case dtype)."""
    if peer == "ours_w8a16_fp16acc":
        return case.dtype == "float16"
    if peer in ("torch_matmul_bf16", "torch_matmul_fp32"):
        return case.dtype != PEER_DTYPE[peer]
    return True


def peer_dtype(peer, case):
    """The dtype the peer's x and output have: the case's, or the peer's own (PEER_DTYPE)."""
    return getattr(torch, PEER_DTYPE.get(peer, case.dtype))


# ----------------------------------------------------------------------------------------------------------------
# FLOPs and bytes
# ----------------------------------------------------------------------------------------------------------------

def matmul_flops(case):
    return 2 * case.m * case.n * case.k


def moved_bytes(peer, case):
    """Bytes the call must read and write at the least (module docstring)."""
    m, n, k = case.m, case.n, case.k
    e = peer_dtype(peer, case).itemsize
    out = m * n * e
    if peer in (FLOAT_BASELINE, "torch_matmul_bf16", "torch_matmul_fp32"):
        return n * k * e + m * k * e + out
    if peer == "ours_w8a16_cached":  # the cached dense weight, bfloat16 or float32
        return n * k * (2 if case.dtype == "bfloat16" else 4) + m * k * e + out
    if peer == "weight_int8pack_mm":  # bfloat16 scales
        return n * k + 2 * n + m * k * e + out
    scales = 4 * n * (k // GROUP_SIZE if peer in ("ours_w8a16_g128", "ours_w8a16_g128_blockwise") else 1)
    x = m * k + 4 * m if peer == "int_mm_prequant" else m * k * e
    return n * k + scales + x + out


def compute_kind(peer):
    return "int8" if peer in INT8_COMPUTE else "float"


# ----------------------------------------------------------------------------------------------------------------
# Peers: each builder returns call() and the tensors the call reads (None for library modules)
# ----------------------------------------------------------------------------------------------------------------

def make_inputs(case, device, seed=0):
    """x (M, K) in the case dtype, weight (N, K) float32 scaled by K ** -0.5 (outputs of order 1)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(case.m, case.k, device=device, generator=generator).to(case.torch_dtype)
    weight = torch.randn(case.n, case.k, device=device, generator=generator) / math.sqrt(case.k)
    return x, weight


def _ours(activations, group_size=None, accumulate="fp32"):
    def build(case, device):
        if accumulate == "fp16" and device.type != "cuda":
            raise PeerUnavailable("accumulate='fp16' is a Triton kernel option (CUDA)")
        x, weight = make_inputs(case, device)
        qweight = hr.quantize_int8(weight, group_size=group_size)
        backend = ours_backend(device)

        def call():
            return hr.int8_matmul(x, qweight, activations=activations, accumulate=accumulate, backend=backend)
        return call, [x, qweight.data, qweight.scale]
    return build


def _ours_blockwise(group_size=None):
    def build(case, device):
        if device.type != "cpu":
            raise PeerUnavailable("the PyTorch path of the CPU backend (CPU only)")
        x, weight = make_inputs(case, device)
        qweight = hr.quantize_int8(weight, group_size=group_size)

        def call():
            previous = set_cpu_kernels("blockwise")
            try:
                return hr.int8_matmul(x, qweight, backend="cpu")
            finally:
                set_cpu_kernels(previous)
        return call, [x, qweight.data, qweight.scale]
    return build


def _ours_cached(case, device):
    if device.type != "cpu":
        raise PeerUnavailable("cpu_cache serves the CPU backend only")
    x, weight = make_inputs(case, device)
    qweight = hr.quantize_int8(weight)
    qweight.cpu_cache = "bf16" if case.dtype == "bfloat16" else "fp32"
    qweight.cached_dense()  # built outside the timed call

    def call():
        return hr.int8_matmul(x, qweight, backend="cpu")
    return call, [x, qweight.cached_dense()]


def _torch_matmul_in(dtype_name):
    def build(case, device):
        dtype = getattr(torch, dtype_name) if dtype_name else case.torch_dtype
        x, weight = make_inputs(case, device)
        x, weight = x.to(dtype), weight.to(dtype)
        return (lambda: torch.matmul(x, weight.T)), [x, weight]
    return build


_torch_matmul = _torch_matmul_in(None)


def _weight_int8pack_mm(case, device):
    if device.type != "cpu":
        raise PeerUnavailable("measured on CPU only here")
    if case.k % 16:
        raise PeerSkipped(f"_weight_int8pack_mm's CPU kernel reads K in steps of 16 unchecked; got K={case.k}")
    x, weight = make_inputs(case, device)
    x = x.to(torch.bfloat16)
    qweight = hr.quantize_int8(weight)
    scale = qweight.scale.to(torch.bfloat16)
    return (lambda: torch._weight_int8pack_mm(x, qweight.data, scale)), [x, qweight.data, scale]


def _check_int_mm_shape(case, device):
    if device.type == "cuda" and (case.m <= 16 or case.k % 8 or case.n % 8):
        raise PeerSkipped(f"torch._int_mm on CUDA needs M > 16 and K, N multiples of 8; got M={case.m}, "
                          f"K={case.k}, N={case.n}")


def dequantize_epilogue(acc, x_scale, w_scale, dtype):
    """int32 (M, N) accumulator -> (M, N) in dtype: per-token times per-channel scale, in float32."""
    return (acc.float() * x_scale[:, None] * w_scale[None, :]).to(dtype)


def _int_mm(case, device):
    _check_int_mm_shape(case, device)
    x, weight = make_inputs(case, device)
    qweight = hr.quantize_int8(weight)
    w_t = qweight.data.T  # (K, N) column-major view: cuBLASLt's fast int8 layout, no copy

    def call():
        x_data, x_scale = quantize_activations(x)
        return dequantize_epilogue(torch._int_mm(x_data, w_t), x_scale, qweight.scale, x.dtype)
    return call, [x, qweight.data, qweight.scale]


def _int_mm_prequant(case, device):
    _check_int_mm_shape(case, device)
    x, weight = make_inputs(case, device)
    qweight = hr.quantize_int8(weight)
    w_t = qweight.data.T
    x_data, x_scale = quantize_activations(x)
    dtype = x.dtype

    def call():
        return dequantize_epilogue(torch._int_mm(x_data, w_t), x_scale, qweight.scale, dtype)
    return call, [x_data, x_scale, qweight.data, qweight.scale]


def _torchao(config_name):
    def build(case, device):
        try:
            from torchao import quantization
            from torchao.quantization import quantize_
        except ImportError as err:
            raise PeerUnavailable(f"torchao cannot be imported ({err})") from None
        config = getattr(quantization, config_name, None)
        if config is None:
            raise PeerUnavailable(f"this torchao has no torchao.quantization.{config_name} (torchao >= 0.9 has)")
        x, weight = make_inputs(case, device)
        linear = torch.nn.Linear(case.k, case.n, bias=False, device=device, dtype=case.torch_dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
        model = torch.nn.Sequential(linear)  # quantize_ swaps the weights of the Linear modules inside a model
        quantize_(model, config())
        torch._dynamo.reset()  # a fresh compile per case: no recompile limit, no silent fall back to eager
        compiled = torch.compile(model, dynamic=False)
        return (lambda: compiled(x)), None
    return build


def _bnb_w8a8(case, device):
    if device.type != "cuda":
        raise PeerUnavailable("the bitsandbytes peer runs on CUDA only")
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise PeerUnavailable(f"bitsandbytes cannot be imported ({err})") from None
    x, weight = make_inputs(case, device)
    layer = bnb.nn.Linear8bitLt(case.k, case.n, bias=False, has_fp16_weights=False, threshold=0.0)
    layer.load_state_dict({"weight": weight.to(torch.float16).cpu()})
    layer = layer.to(device)  # bitsandbytes quantizes the weight on the move to the GPU
    return (lambda: layer(x)), None


BUILDERS = {
    "ours_w8a16": _ours("fp"),
    "ours_w8a16_g128": _ours("fp", group_size=GROUP_SIZE),
    "ours_w8a16_fp16acc": _ours("fp", accumulate="fp16"),
    "ours_w8a8": _ours("int8"),
    "ours_w8a16_cached": _ours_cached,
    "ours_w8a16_blockwise": _ours_blockwise(),
    "ours_w8a16_g128_blockwise": _ours_blockwise(GROUP_SIZE),
    "torch_matmul": _torch_matmul,
    "torch_matmul_bf16": _torch_matmul_in("bfloat16"),
    "torch_matmul_fp32": _torch_matmul_in("float32"),
    "weight_int8pack_mm": _weight_int8pack_mm,
    "int_mm": _int_mm,
    "int_mm_prequant": _int_mm_prequant,
    "torchao_w8a16": _torchao("Int8WeightOnlyConfig"),
    "torchao_w8a8": _torchao("Int8DynamicActivationInt8WeightConfig"),
    "bnb_w8a8": _bnb_w8a8,
}


def prepare(peer, case, device):
    """Build the peer's timed call for one case and make its first call (compile, warm caches)."""
    start = time.perf_counter()
    try:
        call, reads = BUILDERS[peer](case, device)
    except PeerUnavailable as err:
        return Prepared(None, "unavailable", str(err))
    except PeerSkipped as err:
        return Prepared(None, "skipped", str(err))

    def run():
        with torch.no_grad():
            return call()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return Prepared(run, "ok", None, time.perf_counter() - start, reads)


def forward_output(peer, case, device):
    """The peer's output (M, N), or None when it cannot run here: checks the peers agree."""
    prepared = prepare(peer, case, device)
    return prepared.run() if prepared.status == "ok" else None


# ----------------------------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------------------------

# (what, peers, applies to the case, metric, limit): CUDA only (they name cuBLAS); metric "speedup" is
# torch_matmul ms / ours ms in the same case, "pct_bandwidth" is % of the measured copy bandwidth.
TARGETS = (
    ("W8A16 M<=16 >= 1.7x fp16 cuBLAS", W8A16_OURS, lambda c: c.m <= 16 and c.dtype == "float16", "speedup", 1.7),
    ("W8A16 M<=16 >= 80% bandwidth", W8A16_OURS, lambda c: c.m <= 16, "pct_bandwidth", 80.0),
    ("W8A16 M=4096 >= 0.9x fp16 cuBLAS", W8A16_OURS, lambda c: c.m == 4096 and c.dtype == "float16", "speedup",
     0.9),
    ("W8A8 M=4096 >= 1.5x bf16 cuBLAS", ("ours_w8a8",), lambda c: c.m == 4096 and c.dtype == "bfloat16", "speedup",
     1.5),
)


def targets_elsewhere(device):
    """The targets this device cannot measure: all of them name cuBLAS (CUDA)."""
    return [] if device.type == "cuda" else [f"{what} (CUDA)" for what, *_ in TARGETS]


def _target(row, case, device, baseline_ms):
    """Our row's target record: speedup over torch.matmul, % bandwidth, and the verdicts that apply."""
    values = {"speedup": None if baseline_ms is None else baseline_ms / row["ms"],
              "pct_bandwidth": row["pct_bandwidth"]}
    checks = []
    for what, peers, applies, metric, limit in TARGETS:
        if device.type == "cuda" and row["peer"] in peers and applies(case):
            value = values[metric]
            checks.append({"target": what, "metric": metric, "value": value, "limit": limit,
                           "met": None if value is None else bool(value >= limit)})
    return {"speedup_vs_torch_matmul": values["speedup"], "pct_bandwidth": values["pct_bandwidth"],
            "checks": checks}


def _apply_ratios(group, case, device):
    """Outside peers: ours speedup = peer ms / ours ms (ours of the same scheme). Ours: the target record."""
    by_peer = {r["peer"]: r for r in group}
    ms = {peer: r["ms"] for peer, r in by_peer.items()}
    for row in group:
        if row["ms"] is None:
            continue
        if row["peer"] in OURS:
            row["target"] = _target(row, case, device, ms.get(FLOAT_BASELINE))
            if ms.get(FLOAT_BASELINE) is not None:
                compared_to(row, by_peer[FLOAT_BASELINE])
        elif ms.get(COUNTERPART[row["peer"]]) is not None:
            row["vs"] = COUNTERPART[row["peer"]]
            row["speedup_vs_peer"] = row["ms"] / ms[row["vs"]]
            compared_to(row, by_peer[row["vs"]])


# ----------------------------------------------------------------------------------------------------------------
# Suite entry points (used by benchmarks.report)
# ----------------------------------------------------------------------------------------------------------------

def _timing_options(device, quick):
    """CPU: calls take from tens of microseconds to tens of milliseconds, so time by budget, not by count: many
    samples for the median, and a window long enough for other_load (read from /proc/stat ticks) to mean something."""
    if device.type == "cuda":
        return {}
    return {"cpu_warmup": 2, "cpu_reps": 100_000, "cpu_min_reps": 5, "cpu_budget_s": 0.5 if quick else 2.0}


def benchmark(device, quick=False, peers=PEERS, ceilings=None, log=print):
    """One row per (case, peer): ms, TFLOP/s or TOPS, GB/s, ratios to the ceilings, peer_ms / ours_ms, targets."""
    rows = []
    for case in progress(cases(device, quick), SUITE):
        group = []
        for peer in peers:
            if not peer_applies(peer, case):
                continue
            flops, nbytes, kind = matmul_flops(case), moved_bytes(peer, case), compute_kind(peer)
            prepared = prepare(peer, case, device)
            row = {"case": asdict(case), "label": case.label, "peer": peer, "compute": kind,
                   "status": prepared.status, "reason": prepared.reason, "flops": flops, "bytes": nbytes,
                   "ms": None, "rate": None, "rate_unit": "TOPS" if kind == "int8" else "TFLOP/s",
                   "pct_compute_peak": None, "gbps": None, "pct_bandwidth": None, "speedup_vs_peer": None,
                   "vs": None, "target": None, "setup_s": prepared.setup_s, "timing": None, "other_load": None,
                   "note": PEER_NOTES[peer]}
            if prepared.status == "ok":
                timing = time_ms(prepared.run, device, **_timing_options(device, quick))
                seconds = timing.ms * 1e-3
                row.update(ms=timing.ms, rate=flops / seconds / 1e12, gbps=nbytes / seconds / 1e9,
                           timing=timing.method, other_load=timing.other_load)
                if ceilings:
                    peak = ceilings.get("int8_tops") if kind == "int8" else ceilings["matmul_tflops"]
                    row["pct_compute_peak"] = None if peak is None else 100 * row["rate"] / peak
                    row["pct_bandwidth"] = 100 * row["gbps"] / ceilings["copy_gbps"]
            del prepared
            gc.collect()
            release_memory(device)
            busy = f"  (other processes: {row['other_load']:.0%} of the CPU)" if (row["other_load"] or 0) > 0.05 else ""
            log(f"  {SUITE} {case.label} {peer:18s} "
                + (f"{row['ms']:10.4f} ms{busy}" if row["ms"] is not None else f"{row['status']}: {row['reason']}"))
            group.append(row)
        _apply_ratios(group, case, device)
        rows += group
    return rows


def _speedup_text(row):
    if row["speedup_vs_peer"] is None:
        return "-"
    return f"{row['speedup_vs_peer']:.2f}x vs {row['vs'].removeprefix('ours_')}"


def _target_text(target):
    if target is None:
        return "-"
    parts = []
    if target["speedup_vs_torch_matmul"] is not None:
        parts.append(f"{target['speedup_vs_torch_matmul']:.2f}x torch.matmul")
    verdicts = [f"{c['target']} {verdict_text(c)}" for c in target["checks"]]
    return "; ".join(parts + verdicts) or "-"


BENCH_COLUMNS = [
    ("case", lambda r: r["label"]),
    ("peer", lambda r: r["peer"]),
    ("ms", lambda r: fmt_number(r["ms"], ".4f")),
    ("rate", lambda r: "-" if r["rate"] is None else f"{r['rate']:.3f} {r['rate_unit']}"),
    ("%peak", lambda r: fmt_number(r["pct_compute_peak"], ".1f")),
    ("GB/s", lambda r: fmt_number(r["gbps"], ".1f")),
    ("%bw", lambda r: fmt_number(r["pct_bandwidth"], ".1f")),
    ("ours speedup", _speedup_text),
    ("target", lambda r: _target_text(r["target"])),
    ("status", lambda r: r["status"] if r["reason"] is None else f"{r['status']}: {_shorten(r['reason'], 70)}"),
]


def _shorten(text, width):
    return text if len(text) <= width else text[:width - 3] + "..."


# ----------------------------------------------------------------------------------------------------------------
# Correctness: ours against the reference, in the flash-attn rule
# ----------------------------------------------------------------------------------------------------------------

# (M, N, K, group_size of the grouped variant, bias): one row, odd M and N, K not a multiple of 16
CHECK_CASES = [
    (1, 96, 256, 128, True),
    (17, 200, 384, 128, False),
    (130, 72, 200, 40, True),
]
# (name, activations, grouped, accumulate)
CHECK_VARIANTS = [
    ("w8a16", "fp", False, "fp32"),
    ("w8a16 grouped", "fp", True, "fp32"),
    ("w8a8", "int8", False, "fp32"),
    ("w8a16 fp16-acc", "fp", False, "fp16"),
]
CHECK_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}  # tests/tolerance.py's floors


def check_dtypes(device):
    """CPU: every activation dtype, since each takes its own W8A16 route (kernels/int8/cpu.py)."""
    return (torch.bfloat16, torch.float16) if device.type == "cuda" else (torch.float32, torch.bfloat16, torch.float16)


def _variant_applies(accumulate, dtype, device):
    return accumulate == "fp32" or (device.type == "cuda" and dtype == torch.float16)


def _plain(x, qweight, bias, activations, dtype):
    """The same computation done by PyTorch in the input dtype: dequantize (x too for W8A8) to dtype, one matmul."""
    if activations == "int8":
        x_data, x_scale = quantize_activations(x)
        x = (x_data.float() * x_scale[:, None]).to(dtype)
    out = x.to(dtype) @ qweight.dequantize(dtype).T
    return out if bias is None else out + bias.to(dtype)


def _fp16_accumulated_matmul(a, b, step=16):
    """a (M, R) @ b (R, C) with an fp16 accumulator updated once per `step` of the reduction (the k-size of an fp16
    MMA): PyTorch doing what accumulate="fp16" does, as the baseline of the tolerance rule for that variant."""
    acc = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float16, device=a.device)
    for start in range(0, a.shape[1], step):
        acc = (acc.float() + a[:, start:start + step].float() @ b[start:start + step].float()).half()
    return acc


def check(device):
    """Max abs error of y (and dx for W8A16) of ours (the benchmark's backend) against the float64 reference
    (backend="reference"): within 2x the error of the same computation done by PyTorch in the input dtype, plus
    floor * max|truth| (tests/tolerance.py's floors); for accumulate="fp16" the same computation is PyTorch with an
    fp16 accumulator (`_fp16_accumulated_matmul`). W8A8 has no dx row: its gradient passes straight through
    the activation quantization, which the reference does not differentiate."""
    backend = ours_backend(device)
    rows = []
    for m, n, k, group_size, with_bias in CHECK_CASES:
        for dtype in check_dtypes(device):
            for name, activations, grouped, accumulate in CHECK_VARIANTS:
                if not _variant_applies(accumulate, dtype, device):
                    continue
                torch.manual_seed(0)
                weight = torch.randn(n, k, device=device) / math.sqrt(k)
                x = torch.randn(m, k, device=device).to(dtype)
                bias = torch.randn(n, device=device).to(dtype) if with_bias else None
                grad_out = torch.randn(m, n, device=device).to(dtype)
                qweight = hr.quantize_int8(weight, group_size=group_size if grouped else None)
                differentiable = activations == "fp"

                x64 = x.double().requires_grad_(differentiable)
                truth = [hr.int8_matmul(x64, qweight, None if bias is None else bias.double(),
                                        activations=activations, backend="reference")]
                plain = [_plain(x, qweight, bias, activations, dtype)]
                x_ours = x.detach().requires_grad_(differentiable)
                ours = [hr.int8_matmul(x_ours, qweight, bias, activations=activations, accumulate=accumulate,
                                       backend=backend)]
                if differentiable:
                    truth.append(torch.autograd.grad(truth[0], x64, grad_out.double())[0])
                    plain.append(grad_out @ qweight.dequantize(dtype))
                    ours.append(torch.autograd.grad(ours[0], x_ours, grad_out)[0])
                grouping = f" g={group_size}" if grouped else ""
                label = f"M={m} N={n} K={k} {name}{grouping}{' bias' if with_bias else ''}"
                if accumulate == "fp16":  # the baseline accumulates in fp16 too
                    w16 = qweight.dequantize(dtype)
                    plain = [_fp16_accumulated_matmul(x, w16.T) + (0 if bias is None else bias),
                             _fp16_accumulated_matmul(grad_out, w16)]
                for tensor, o, p, t in zip(("y", "dx"), ours, plain, truth):
                    rows.append({"case": label, "dtype": str(dtype).removeprefix("torch."), "tensor": tensor,
                                 **compare_to_truth(o.detach(), p, t.detach(), CHECK_FLOOR[dtype])})
    return rows


CHECK_COLUMNS = TOLERANCE_CHECK_COLUMNS


# ----------------------------------------------------------------------------------------------------------------
# Plot
# ----------------------------------------------------------------------------------------------------------------

def plot(rows, ceilings, env, path):
    """Against M, one column per dtype and two rows per N = K: GB/s (with the measured copy bandwidth) and TFLOP/s
    or TOPS (with the measured matmul and int8 rates); one line per peer; measured points only, rows flagged under
    load hollow. One legend under the panels, and the peers that did not run listed beside it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["case"]["dtype"] for r in rows})
    sizes = sorted({(r["case"]["n"], r["case"]["k"]) for r in rows})
    metrics = (("gbps", "GB/s (bytes moved / time)"), ("rate", "TFLOP/s (float) or TOPS (int8)"))
    panels_in = 3.6 * len(metrics) * len(sizes)
    fig, axes = plt.subplots(len(metrics) * len(sizes), len(dtypes), squeeze=False,
                             figsize=(5.5 * len(dtypes), panels_in))
    colors = matplotlib.colormaps["tab20"]  # more peers than the default cycle's 10 colours
    for j, dtype in enumerate(dtypes):
        for s, (n, k) in enumerate(sizes):
            panel = [r for r in rows if (r["case"]["n"], r["case"]["k"], r["case"]["dtype"]) == (n, k, dtype)]
            for i, (key, ylabel) in enumerate(metrics):
                ax = axes[len(metrics) * s + i][j]
                for peer in PEERS:
                    points = [(r["case"]["m"], r[key], r.get("flagged")) for r in panel
                              if r["peer"] == peer and r["status"] == "ok"]
                    if points:
                        plot_line(ax, points, linestyle="-" if peer in OURS else "--", label=peer,
                                  color=colors(PEERS.index(peer)), marker="o" if peer in OURS else "s")
                if ceilings and key == "gbps":
                    ax.axhline(ceilings["copy_gbps"], color="gray", linestyle=":", label="copy (measured)")
                if ceilings and key == "rate":
                    ax.axhline(ceilings["matmul_tflops"], color="gray", linestyle=":", label="dense matmul (measured)")
                    if ceilings.get("int8_tops") is not None:
                        ax.axhline(ceilings["int8_tops"], color="black", linestyle=":", label="_int_mm (measured)")
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("M (tokens)")
                ax.set_ylabel(ylabel)
                ax.set_title(f"N={n} K={k} {dtype}", fontsize=9)
                ax.grid(True, alpha=0.3)
    ncol = max(2, int(fig.get_figwidth() / 2.4))  # legend columns that fit the figure's width
    bottom_in = 0.7 + 0.22 * math.ceil(len(legend_handles(axes.flat)) / ncol)  # the legend's rows, then the notes
    fig.set_figheight(panels_in + bottom_in)
    height = fig.get_figheight()
    figure_legend(fig, axes.flat, ncol=ncol, top=bottom_in / height)
    missing = sorted({f"{r['peer']} ({r['status']})" for r in rows if r["status"] != "ok"})
    if missing:
        fig.text(0.5, 0.3 / height, "not measured: " + ", ".join(missing), ha="center", va="bottom", fontsize=7,
                 color="dimgray", wrap=True)
    fig.suptitle(f"int8 matmul y = x @ W.T\n{env['device']}, torch {env['torch']}, commit {env['git_commit'][:12]}, "
                 f"{env['date'][:10]}", fontsize=9)
    note_flagged(fig, rows)
    fig.tight_layout(rect=(0, bottom_in / height, 1, 1 - 0.45 / height))  # the two-line title above the panels
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
