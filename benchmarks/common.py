"""Shared benchmark plumbing: environment record, device slug, progress, timing and the load it ran under,
measured ceilings, flagging rows timed under load, results files, tables, plot markers."""
import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_ROOT = Path(__file__).resolve().parent / "results"  # recorded runs: written only by a --record run
RUNS_ROOT = Path(__file__).resolve().parent / "runs"        # every other run (ignored by git)


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
    """HEAD of the repository, with "-dirty" when tracked or untracked files (results aside) differ from it; in a
    copy without .git (a lent GPU machine's), the HYBRIDRAG_COMMIT the run was given (benchmarks/gpu_check.sh)."""
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
            return os.environ.get("HYBRIDRAG_COMMIT") or "unknown (not a git checkout)"
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
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # AVX2 or AVX512: one "AMD EPYC" may be either
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
# Progress: tqdm bars on stderr (shown on a terminal, left out when stderr is a file or a pipe) and log lines that
# print above them
# ----------------------------------------------------------------------------------------------------------------

def log(message):
    """A line on stderr that does not break the progress bars."""
    tqdm.write(str(message), file=sys.stderr)


def progress(iterable, desc, *, unit="case", leave=False):
    """tqdm over `iterable` on stderr; disabled when stderr is not a terminal (log lines say what runs)."""
    return tqdm(iterable, desc=desc, unit=unit, leave=leave, file=sys.stderr, disable=None, dynamic_ncols=True,
                mininterval=0.5)


@contextlib.contextmanager
def long_step(desc, expected_s=None):
    """A bar for one long call that reports nothing itself (an HNSW build, a k-means): seconds elapsed against the
    expected seconds, refreshed by a thread once a second; a log line before and after it either way."""
    log(f"  {desc}" + ("" if expected_s is None else f" (expected ~{format_seconds(expected_s)})") + " ...")
    bar = tqdm(desc=desc, total=None if expected_s is None else max(1, round(expected_s)), unit="s", leave=False,
               file=sys.stderr, disable=None, dynamic_ncols=True, bar_format="{l_bar}{bar}| {n:.0f}/{total} s"
               if expected_s is not None else "{desc}: {n:.0f} s")
    done, start = threading.Event(), time.perf_counter()

    def tick():
        while not done.wait(1.0):
            bar.n = time.perf_counter() - start
            bar.refresh()
    thread = threading.Thread(target=tick, daemon=True)
    if not bar.disable:
        thread.start()
    try:
        yield
    finally:
        done.set()
        if thread.is_alive():
            thread.join()
        bar.close()
        log(f"  {desc}: {format_seconds(time.perf_counter() - start)}")


def format_seconds(seconds):
    """"45 s", "3.2 min", "1.5 h"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


# ----------------------------------------------------------------------------------------------------------------
# Timing, and the load it ran under
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


class LoadMeter:
    """Share of the machine's CPU time that other processes used between start() and stop(): the machine's busy CPU
    seconds (/proc/stat) minus this process's, over wall time x CPUs, at most 1. /proc/stat counts in 10 ms ticks, so
    a window under half a second says little (the cap keeps its rounding from reading above 100%). It counts every
    thread of this process as its own (a progress bar's refresh thread too: a few microseconds a second)."""

    def start(self):
        self.busy, self.own, self.wall = _busy_cpu_seconds(), time.process_time(), time.perf_counter()
        return self

    def stop(self):
        wall = time.perf_counter() - self.wall
        other = (_busy_cpu_seconds() - self.busy) - (time.process_time() - self.own)
        return min(max(other, 0.0) / (max(wall, 1e-9) * cpu_count()), 1.0)


def time_ms(fn, device, *, warmup_ms=25, rep_ms=100, cpu_warmup=1, cpu_reps=10, cpu_min_reps=3, cpu_budget_s=10.0):
    """Median time of fn() in milliseconds.

    CUDA: triton.testing.do_bench (CUDA events, L2 flushed between calls). CPU: perf_counter around each call after
    `cpu_warmup` calls; stops after `cpu_reps` calls, or earlier once `cpu_budget_s` is spent and `cpu_min_reps` ran;
    other_load from a LoadMeter over the timed calls.
    """
    if device.type == "cuda":
        from triton.testing import do_bench
        ms = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
        return Timing(float(ms), f"triton.testing.do_bench(warmup={warmup_ms}, rep={rep_ms}, median)")
    for _ in range(cpu_warmup):
        fn()
    times = []
    meter, start = LoadMeter().start(), time.perf_counter()
    while len(times) < cpu_reps and (len(times) < cpu_min_reps or time.perf_counter() - start < cpu_budget_s):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(times), f"perf_counter median of {len(times)} after {cpu_warmup} warm-up",
                  meter.stop())


def paired_ratio(fn, base_fn, device, *, pairs=10, min_pairs=3, budget_s=10.0, cuda_rounds=5):
    """Median over pairs of time(fn) / time(base_fn), the two called in turn (the order alternating pair by pair),
    so a drift of the machine's speed moves both sides of each ratio alike: what resolves a few percent on a CPU
    whose medians move by tens of percent between runs. CUDA: triton.testing.do_bench of each in turn,
    `cuda_rounds` rounds. Returns {"ratio", "pairs", "method", "other_load"}."""
    if device.type == "cuda":
        from triton.testing import do_bench
        ratios = [do_bench(fn, return_mode="median") / do_bench(base_fn, return_mode="median")
                  for _ in range(cuda_rounds)]
        return {"ratio": statistics.median(ratios), "pairs": cuda_rounds, "other_load": None,
                "method": f"median of {cuda_rounds} rounds of do_bench medians, in turn"}
    fn()
    base_fn()
    ratios = []
    meter, start = LoadMeter().start(), time.perf_counter()
    while len(ratios) < pairs and (len(ratios) < min_pairs or time.perf_counter() - start < budget_s):
        first, second = (fn, base_fn) if len(ratios) % 2 == 0 else (base_fn, fn)
        t0 = time.perf_counter()
        first()
        t1 = time.perf_counter()
        second()
        t2 = time.perf_counter()
        fn_s, base_s = (t1 - t0, t2 - t1) if first is fn else (t2 - t1, t1 - t0)
        ratios.append(fn_s / base_s)
    return {"ratio": statistics.median(ratios), "pairs": len(ratios), "other_load": meter.stop(),
            "method": f"perf_counter, median of {len(ratios)} alternating pairs after one warm-up call each"}


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
    matmul rate of torch._int_mm (TOPS; None on CPU), timed like the kernels; other_load is the larger of the
    matmul's and the copy's (None on CUDA)."""
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
        "other_load": None if device.type == "cuda" else max(matmul.other_load, copy.other_load),
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
# Rows timed under load: flagged, never counted toward a target, never recorded
# ----------------------------------------------------------------------------------------------------------------

NOT_COUNTED = "not counted (under load)"


def compared_to(row, base):
    """Note that `row`'s ratios (speedup, target) rest on `base`'s timing too: the row is flagged when either was
    timed under load."""
    row["ratio_other_load"] = base.get("other_load")


def target_checks(target):
    """The verdict-bearing records of a row's target: the target itself ({"limit", "met", ...}), the records in its
    "checks" list, or none."""
    if target is None:
        return []
    return target["checks"] if "checks" in target else [target]


def flag_under_load(rows, limit):
    """Flag the rows timed (or compared with a row timed) while other processes used more than `limit` of the CPU:
    row["flagged"] names the load, and every target verdict of a flagged row becomes NOT_COUNTED (met None).
    Every other target with a limit gets verdict "met" or "missed". Rows without a measured load (GPU, quality
    metrics) are never flagged. Returns the rows flagged."""
    if not 0 < limit <= 1:
        raise ValueError(f"limit must be a share of the CPU in (0, 1], got {limit!r}")
    flagged = []
    for row in rows:
        own, base = row.get("other_load"), row.get("ratio_other_load")
        if own is not None and own > limit:
            row["flagged"] = f"other load {own:.0%} (limit {limit:.0%})"
        elif base is not None and base > limit:
            row["flagged"] = f"compared with a row under other load {base:.0%} (limit {limit:.0%})"
        else:
            row["flagged"] = None
        for check in target_checks(row.get("target")):
            if check["limit"] is None:
                check["verdict"] = None
            elif row["flagged"]:
                check.update(met=None, verdict=NOT_COUNTED)
            else:
                check["verdict"] = "met" if check["met"] else "missed"
        if row["flagged"]:
            flagged.append(row)
    return flagged


def verdict_text(check):
    """"met", "MISSED", "not counted (under load)" or "-" (no limit, or not yet judged)."""
    verdict = check.get("verdict")
    if verdict is None:
        return "-" if check.get("met") is None else ("met" if check["met"] else "MISSED")
    return "MISSED" if verdict == "missed" else verdict


def target_text(target, relation):
    """A target's table cell: "-" without one, else "<value> (target <relation> <limit> <verdict>)"."""
    if target is None:
        return "-"
    return f"{target['value']:.3f} (target {relation} {target['limit']} {verdict_text(target)})"


# the correctness table of a suite whose check() returns [{"check", "value", "passed"}]
CHECK_COLUMNS = [("check", lambda r: r["check"]), ("value", lambda r: r["value"]),
                 ("passed", lambda r: str(r["passed"]))]


def load_column(row):
    """The table's load column: other processes' share of the CPU (the larger of the row's and the row its ratio
    rests on), "*" when the row is flagged; the same width either way, so that the column lines up."""
    loads = [x for x in (row.get("other_load"), row.get("ratio_other_load")) if x is not None]
    return (f"{max(loads):.0%}" if loads else "-") + (" *" if row.get("flagged") else "  ")


# ----------------------------------------------------------------------------------------------------------------
# Results and tables
# ----------------------------------------------------------------------------------------------------------------

def results_dir(slug):
    """benchmarks/results/<slug>/, the recorded runs (only `report --record` writes there)."""
    path = RESULTS_ROOT / slug
    path.mkdir(parents=True, exist_ok=True)
    return path


def record_problem():
    """Why this checkout cannot record a run, or None: a recorded figure names the commit that made it, so the tree
    must be clean (benchmarks/results aside) and under git."""
    commit = git_commit()
    if commit.endswith("-dirty"):
        return f"--record needs a clean checkout (commit {commit}): commit or stash first"
    if commit.startswith(("unknown", "no-commit")):
        return f"--record needs a git checkout with a commit, got {commit!r}"
    return None


def record_run(suite, payload, png=None, slug=None):
    """Copy a finished run into benchmarks/results/<slug>/<suite>.json (`payload`) and <suite>.png (a copy of the
    file `png`, when given); slug defaults to this CPU's. Returns the paths written."""
    folder = results_dir(slug or device_slug(torch.device("cpu")))
    paths = [write_json(folder / f"{suite}.json", payload)]
    if png is not None:
        paths.append(folder / f"{suite}.png")
        paths[-1].write_bytes(Path(png).read_bytes())
    return paths


def record_result(suite, result):
    """--record for a suite whose result dict carries its figure's path under "png": record_run of the rest and the
    figure, each path written printed."""
    payload = {key: value for key, value in result.items() if key != "png"}
    for path in record_run(suite, payload, result["png"]):
        print(f"wrote {path}")


def add_output_options(parser, suite, *, files="the JSON and PNG", default=None, default_text=None,
                       record_needs="a clean checkout"):
    """The --out and --record options every recording benchmark takes: --out a folder for `files` (default
    `default`, or None for the caller's benchmarks/runs/<device>/<suite>, which `default_text` names), --record
    also writing benchmarks/results/<device>/<suite>.json and .png, which needs `record_needs`."""
    where = "%(default)s" if default is not None else (default_text or f"benchmarks/runs/<device>/{suite}")
    parser.add_argument("--out", type=Path, default=default,
                        help=f"folder for {files} (default {where}, ignored by git)")
    parser.add_argument("--record", action="store_true",
                        help=f"also write {RESULTS_ROOT.name}/<device>/{suite}.json and .png ({record_needs})")


def check_output_options(parser, out, *, record=False, quick=False):
    """parser.error for an `out` folder inside benchmarks/results/ (only --record writes there), for --record with
    --quick (a recorded run is the full size) and for --record from a checkout record_problem() refuses."""
    if is_inside(out, RESULTS_ROOT):
        parser.error(f"--out {out} lies inside {RESULTS_ROOT}: pick another folder (--record writes there)")
    if record and quick:
        parser.error("--record records the full size: drop --quick")
    problem = record_problem() if record else None
    if problem:
        parser.error(problem)


def is_inside(path, folder):
    """Whether `path` is `folder` or lies under it (both resolved)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def write_json(path, payload):
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


def format_table(title, rows, columns):
    """Plain-text table. columns: (header, function of a row returning a string)."""
    cells = [[header for header, _ in columns]] + [[fmt(row) for _, fmt in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]

    def justify(cell, width):
        return cell.rjust(width) if re.fullmatch(r"-|[-+0-9.e]+x?|(-|[0-9]+%)( \*|  )", cell) else cell.ljust(width)
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(cells[0], widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(justify(c, w) for c, w in zip(line, widths)).rstrip() for line in cells[1:]]
    return "\n".join(lines)


def fmt_number(value, spec):
    return "-" if value is None else format(value, spec)


# ----------------------------------------------------------------------------------------------------------------
# Plots: rows flagged under load drawn hollow (markers) or hatched (bars)
# ----------------------------------------------------------------------------------------------------------------

FLAGGED_NOTE = "hollow / hatched: timed under load (flagged)"


def plot_line(ax, points, *, label, color, marker="o", linestyle="-", **style):
    """A line through (x, y, flagged) points in x order: filled markers for clean points, hollow for flagged."""
    points = sorted(points, key=lambda p: (p[0], p[1]))
    xs, ys, _ = zip(*points)
    ax.plot(xs, ys, linestyle=linestyle, marker=marker, color=color, label=label, **style)
    hollow = [(x, y) for x, y, flagged in points if flagged]
    if hollow:  # drawn over the filled markers
        ax.plot(*zip(*hollow), linestyle="none", marker=marker, color=color, markerfacecolor="white",
                markeredgewidth=1.5)


def plot_bars(ax, xs, heights, flags, **style):
    """Bars, hatched where flagged."""
    bars = ax.bar(xs, heights, **style)
    for bar, flagged in zip(bars, flags):
        if flagged:
            bar.set_hatch("///")
            bar.set_edgecolor("black")
            bar.set_alpha(0.6)
    return bars


def legend_handles(axes):
    """{label: handle} over `axes`, every label once, in the order first seen."""
    handles = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    return handles


def figure_legend(fig, axes, *, ncol=6, top=None):
    """One legend for the whole figure, under the panels, so that it covers no data: every label of `axes` once.
    Leave the bottom ~8% of the figure to it (tight_layout(rect=(0, 0.08, 1, 1))), or hang it from `top` (a figure
    fraction) where more room is kept."""
    handles = legend_handles(axes)
    where = {"loc": "lower center", "bbox_to_anchor": (0.5, 0.025)} if top is None else \
        {"loc": "upper center", "bbox_to_anchor": (0.5, top)}
    fig.legend(list(handles.values()), list(handles), ncol=min(ncol, len(handles)), fontsize=8, frameon=False,
               **where)


def note_flagged(fig, rows):
    """A line under the figure when any row is flagged (the legend meaning of hollow markers and hatched bars)."""
    flagged = [r for r in rows if r.get("flagged")]
    if flagged:
        fig.text(0.5, 0.005, f"{FLAGGED_NOTE}: {len(flagged)} of {len(rows)} rows", ha="center", va="bottom",
                 fontsize=8, color="firebrick")


def _label_offsets():
    """(dx, dy) in points and the alignment that puts a label on that side of its point: 8 directions at growing
    distances, nearest first."""
    sides = [(1, 1, "left", "bottom"), (1, -1, "left", "top"), (-1, 1, "right", "bottom"), (-1, -1, "right", "top"),
             (0, 1, "center", "bottom"), (0, -1, "center", "top"), (1, 0, "left", "center"), (-1, 0, "right", "center")]
    return [(sx * r, sy * r, ha, va) for r in (5, 10, 16, 24) for sx, sy, ha, va in sides]


_LABEL_OFFSETS = _label_offsets()


def place_labels(ax, labels, *, obstacles=(), fontsize=6, marker_radius_pt=4):
    """Annotate points with text that overlaps no other label and no marker: labels are (x, y, text) in data
    coordinates, obstacles more (x, y) points to keep clear of (every plotted marker). Each label takes the nearest
    offset around its point that is clear and inside the axes; a label with no clear place is left out (a crowded
    cluster reads better without it than under a pile of text). Returns the number left out. Call once the axes'
    limits and the figure's layout are final (after tight_layout): placement is measured in display coordinates."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    radius = renderer.points_to_pixels(marker_radius_pt)
    to_display = ax.transData.transform
    taken = [Bbox.from_extents(x - radius, y - radius, x + radius, y + radius)
             for x, y in (to_display(p) for p in list(obstacles) + [(x, y) for x, y, _ in labels])]
    inside = ax.get_window_extent(renderer)
    left_out = 0
    for x, y, text in labels:
        for dx, dy, ha, va in _LABEL_OFFSETS:
            leader = {"arrowprops": {"arrowstyle": "-", "lw": 0.4, "color": "gray", "shrinkA": 0, "shrinkB": 3}} \
                if max(abs(dx), abs(dy)) > 10 else {}  # a thin line back to a point the label sits far from
            note = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                               fontsize=fontsize, **leader)
            note.update_positions(renderer)
            box = Text.get_window_extent(note, renderer)  # the text alone, not its leader line
            if not any(box.overlaps(other) for other in taken) and inside.contains(box.x0, box.y0) \
                    and inside.contains(box.x1, box.y1):
                taken.append(box)
                break
            note.remove()
        else:
            left_out += 1
    return left_out
