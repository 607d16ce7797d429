"""Shared benchmark plumbing: environment record, device slug, timing, measured ceilings, results files, tables."""
import json
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_ROOT = Path(__file__).resolve().parent / "results"


def default_device():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------------------

def cpu_count():
    """CPUs this process may run on (the container's share, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def cpu_model():
    """CPU model name from lscpu, else platform.processor(), else the machine type."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except FileNotFoundError:
        out = ""
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({cpu_count()} cores)"


def device_slug(device):
    """Folder name for results: "nvidia-h100-80gb-hbm3", "cpu-amd-epyc-2cores"."""
    def slug(text):
        return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    if device.type == "cuda":
        return slug(torch.cuda.get_device_name(device))
    return f"cpu-{slug(cpu_model())}-{cpu_count()}cores"


def package_version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_commit():
    """HEAD of the repository, with "-dirty" when tracked or untracked files (results aside) differ from it."""
    def git(*args):
        try:
            return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, check=False)
        except FileNotFoundError:
            return None
    head = git("rev-parse", "HEAD")
    if head is None:
        return "unknown (git not installed)"
    if head.returncode != 0:
        inside = git("rev-parse", "--is-inside-work-tree")
        if inside.returncode != 0:
            return "unknown (not a git checkout)"
        commit = "no-commit"
    else:
        commit = head.stdout.strip()
    status = git("status", "--porcelain", "--", ".", ":(exclude)benchmarks/results")
    return commit + ("-dirty" if status.stdout.strip() else "")


def environment(device):
    """What a result depends on: device, versions, thread count, commit and date."""
    record = {
        "device": device_name(device),
        "device_type": device.type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "flash_attn": package_version("flash-attn") or package_version("flash_attn"),
        "hybridrag": package_version("hybridrag"),
        "cuda": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(),
        "load_avg_1m": os.getloadavg()[0],  # other work on the machine skews CPU timings
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        record["device_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return record


def free_memory_bytes(device):
    """Free device memory (CUDA) or MemAvailable (CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def release_memory(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Timing:
    ms: float                 # median milliseconds per call
    method: str               # how it was measured
    other_load: float = None  # CPU: share of the machine's CPU time used by other processes while timing


def _busy_cpu_seconds():
    """CPU seconds spent busy by the whole machine (all processes, all CPUs) since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def time_ms(fn, device, *, warmup_ms=25, rep_ms=100, cpu_warmup=1, cpu_reps=10, cpu_min_reps=3, cpu_budget_s=10.0):
    """Median time of fn() in milliseconds.

    CUDA: triton.testing.do_bench (CUDA events, L2 flushed between calls). CPU: perf_counter around each call after
    `cpu_warmup` calls; stops after `cpu_reps` calls, or earlier once `cpu_budget_s` is spent and `cpu_min_reps` ran.
    """
    if device.type == "cuda":
        from triton.testing import do_bench
        ms = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
        return Timing(float(ms), f"triton.testing.do_bench(warmup={warmup_ms}, rep={rep_ms}, median)")
    for _ in range(cpu_warmup):
        fn()
    times = []
    busy, own, start = _busy_cpu_seconds(), time.process_time(), time.perf_counter()
    while len(times) < cpu_reps and (len(times) < cpu_min_reps or time.perf_counter() - start < cpu_budget_s):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    wall = time.perf_counter() - start
    other = (_busy_cpu_seconds() - busy) - (time.process_time() - own)
    return Timing(statistics.median(times), f"perf_counter median of {len(times)} after {cpu_warmup} warm-up",
                  max(other, 0.0) / (wall * cpu_count()))


# ----------------------------------------------------------------------------------------------------------------
# Measured ceilings
# ----------------------------------------------------------------------------------------------------------------

def _matmul_timing(n, device, dtype):
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    c = torch.empty(n, n, device=device, dtype=dtype)
    return time_ms(lambda: torch.matmul(a, b, out=c), device)


def _copy_timing(nbytes, device):
    src = torch.ones(nbytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    return time_ms(lambda: dst.copy_(src), device)


def _int_mm_timing(n, device):
    """int8 x int8 -> int32 with torch._int_mm, the second operand column-major (cuBLASLt's fast int8 layout)."""
    a, b = (torch.randint(-127, 128, (n, n), device=device, dtype=torch.int8) for _ in range(2))
    c = torch.empty(n, n, device=device, dtype=torch.int32)
    return time_ms(lambda: torch._int_mm(a, b.T, out=c), device)


def measure_ceilings(device, dtype):
    """Dense matmul rate in `dtype` (TFLOP/s), copy bandwidth (GB/s, read + write bytes) and, on CUDA, the int8
    matmul rate of torch._int_mm (TOPS; None on CPU), timed like the kernels."""
    n = 8192 if device.type == "cuda" else 2048
    nbytes = 2**30 if device.type == "cuda" else 2**28
    matmul = _matmul_timing(n, device, dtype)
    copy = _copy_timing(nbytes, device)
    int8 = _int_mm_timing(n, device) if device.type == "cuda" else None
    release_memory(device)
    return {
        "matmul_tflops": 2 * n**3 / (matmul.ms * 1e-3) / 1e12,
        "matmul": f"{n}x{n} @ {n}x{n} {str(dtype).removeprefix('torch.')}, {matmul.ms:.3f} ms, {matmul.method}",
        "copy_gbps": 2 * nbytes / (copy.ms * 1e-3) / 1e9,
        "copy": f"{nbytes / 2**20:.0f} MiB tensor copy (read + write counted), {copy.ms:.3f} ms, {copy.method}",
        "int8_tops": None if int8 is None else 2 * n**3 / (int8.ms * 1e-3) / 1e12,
        "int8": "not measured (CUDA only)" if int8 is None else
                f"{n}x{n} @ {n}x{n} int8 -> int32 torch._int_mm, {int8.ms:.3f} ms, {int8.method}",
    }


# ----------------------------------------------------------------------------------------------------------------
# Correctness in the flash-attn rule (DESIGN.md, Evidence)
# ----------------------------------------------------------------------------------------------------------------

class PeerUnavailable(Exception):
    """The peer cannot run here (not installed, no such device support)."""


class PeerSkipped(Exception):
    """The peer could run but this case is outside the budget (memory)."""


@dataclass
class Prepared:
    run: object          # zero-argument callable, or None when status != "ok"
    status: str          # "ok" | "skipped" | "unavailable"
    reason: str = None
    setup_s: float = None  # building the inputs plus the first call (compile included)
    reads: list = None     # the tensors the call reads, where a suite counts bytes from them


def prepare_attention(build, device, mode, first_call_failures=((), None)):
    """Build an attention peer's timed call and make its first call (compile, warm caches).

    build() -> (attend, inputs): attend(*inputs) returns the output; mode "fwd" times it under no_grad, "fwd+bwd"
    times the gradient of every input. first_call_failures = (exception types, status) recorded rather than
    raised when the first call fails with them ("this peer cannot do this here")."""
    start = time.perf_counter()
    try:
        attend, inputs = build()
    except PeerUnavailable as err:
        return Prepared(None, "unavailable", str(err))
    except PeerSkipped as err:
        return Prepared(None, "skipped", str(err))
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return attend(*inputs)
    else:
        grad_out = torch.randn_like(inputs[0])

        def run():
            return torch.autograd.grad(attend(*inputs), inputs, grad_out)
    failures, status = first_call_failures
    try:
        run()
    except failures as err:  # the caller frees the tensors (gc + empty_cache) once this frame is gone
        return Prepared(None, status, f"{type(err).__name__}: {str(err).splitlines()[0]}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return Prepared(run, "ok", None, time.perf_counter() - start)


def compare_to_truth(ours, plain, truth, floor):
    """One check row's numbers: max abs errors of `ours` and of `plain` (the reference computed in the input dtype)
    against `truth` (the float64 reference); ours passes when its error is at most 2x plain's + floor * max|truth|."""
    err_ours = (ours.double() - truth).abs().max().item()
    err_plain = (plain.double() - truth).abs().max().item()
    tolerance = 2 * err_plain + floor * truth.abs().max().item()
    return {"err_ours": err_ours, "err_reference_in_dtype": err_plain, "tolerance": tolerance,
            "passed": bool(err_ours <= tolerance)}


TOLERANCE_CHECK_COLUMNS = [
    ("case", lambda r: r["case"]),
    ("dtype", lambda r: r["dtype"]),
    ("tensor", lambda r: r["tensor"]),
    ("err ours", lambda r: f"{r['err_ours']:.2e}"),
    ("err ref(dtype)", lambda r: f"{r['err_reference_in_dtype']:.2e}"),
    ("tolerance", lambda r: f"{r['tolerance']:.2e}"),
    ("result", lambda r: "pass" if r["passed"] else "FAIL"),
]


# ----------------------------------------------------------------------------------------------------------------
# Results and tables
# ----------------------------------------------------------------------------------------------------------------

def results_dir(slug):
    path = RESULTS_ROOT / slug
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path, payload):
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


def format_table(title, rows, columns):
    """Plain-text table. columns: (header, function of a row returning a string)."""
    cells = [[header for header, _ in columns]] + [[fmt(row) for _, fmt in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]

    def justify(cell, width):
        return cell.rjust(width) if re.fullmatch(r"-|[-+0-9.e]+x?", cell) else cell.ljust(width)
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(cells[0], widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(justify(c, w) for c, w in zip(line, widths)).rstrip() for line in cells[1:]]
    return "\n".join(lines)


def fmt_number(value, spec):
    return "-" if value is None else format(value, spec)
