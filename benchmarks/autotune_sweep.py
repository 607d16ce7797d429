"""A short autotune sweep of the main Triton kernels' block configs on the GPU at hand: the best config per (kernel,
head dim, dtype) next to the current table entry, for a human to paste into kernels/triton_common.py's
_FWD_CONFIGS and _BWD_CONFIGS (and kernels/int8/triton_kernels.py's _tiled_config).

    python -m benchmarks.autotune_sweep                          # on a GPU: about 90 s, a table and a JSON file
    python -m benchmarks.autotune_sweep --budget-s 60 --kernels window_fwd,int8_tiled
    python -m benchmarks.autotune_sweep --dry-run                # anywhere: the plan, then one tiny config per
                                                                 # kernel under TRITON_INTERPRET=1

Kernels: window_fwd, window_dq and window_dkdv (the sliding-window forward, and the backward timed whole with the
config of its dq or its dk/dv kernel swept; D 64 and 128, fp16 and bf16), hybrid_fwd
(window + landmarks + global rows, D 64 and 128, bf16) and int8_tiled (W8A16 per-channel weight, the tiled launch
at M = N = K = 4096, fp16 and bf16). A config is (BLOCK_M, BLOCK_N, num_warps, num_stages), for int8_tiled
Config(block_m, block_c, block_r, group_m, splits, num_warps, num_stages).

How: each candidate runs through the real launcher with its config function patched (unittest.mock.patch) where the
launcher looks it up: hybridrag.kernels.hybrid.triton_kernels imports _fwd_config and _bwd_config by name, so
patching kernels.triton_common alone would not reach it. Candidates are first compiled in parallel worker processes
(each fills Triton's on-disk cache; --jobs 0 compiles in line), then timed one at a time here with
triton.testing.do_bench (median, L2 flushed between calls; the launcher's host work included). A candidate whose
output differs from the current config's beyond the dtype's tolerance is "wrong" and never suggested; one that fails
to compile or needs more shared memory than the GPU has is listed with its error. Candidates are timed round-robin
over the problems, so a spent budget leaves every problem with its current config and as many candidates as the
others. The suggestion for a table entry is the config with the lowest geometric mean of time / current time over
the problems that share the entry.

Exit status: 0; 1 when a dry run's patched config did not reach the launcher or did not match the default config's
output; 2 for bad arguments or no CUDA device without --dry-run.
"""
import argparse
import contextlib
import importlib
import math
import multiprocessing
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from unittest import mock

import torch

from .common import RUNS_ROOT, device_slug, environment, format_table, log, write_json

KERNELS = ("window_fwd", "window_dq", "window_dkdv", "hybrid_fwd", "int8_tiled")
BACKWARD = {"window_dq": "dq", "window_dkdv": "dkdv"}  # the backward kernel whose config each sweeps
PATCH_TARGETS = {  # where each launcher looks its config function up
    "window_fwd": "hybridrag.kernels.hybrid.triton_kernels._fwd_config",
    "window_dq": "hybridrag.kernels.hybrid.triton_kernels._bwd_config",
    "window_dkdv": "hybridrag.kernels.hybrid.triton_kernels._bwd_config",
    "hybrid_fwd": "hybridrag.kernels.hybrid.triton_kernels._fwd_config",
    "int8_tiled": "hybridrag.kernels.int8.triton_kernels._tiled_config",
}
ATTENTION_CANDIDATES = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 8, 3),
                        (128, 64, 8, 4), (64, 128, 4, 3), (128, 64, 8, 2)]
CANDIDATES = {
    "window_fwd": ATTENTION_CANDIDATES,
    "hybrid_fwd": ATTENTION_CANDIDATES,
    "window_dq": [(64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2), (64, 64, 8, 1),
                  (64, 64, 4, 3), (128, 32, 8, 2)],
    "window_dkdv": [(64, 64, 8, 2), (64, 32, 4, 2), (32, 64, 4, 2), (64, 64, 8, 1), (32, 128, 8, 2), (64, 64, 4, 2),
                    (32, 64, 4, 1), (64, 128, 8, 2)],
    "int8_tiled": [(128, 128, 64, 8, 1, 8, 4), (128, 128, 64, 8, 1, 4, 4), (128, 256, 64, 8, 1, 8, 3),
                   (64, 128, 64, 8, 1, 4, 4), (128, 128, 128, 8, 1, 8, 3), (128, 64, 64, 8, 1, 4, 4),
                   (256, 128, 64, 8, 1, 8, 3), (128, 128, 32, 8, 1, 4, 5)],
}
# a small config that differs from the interpreter's default, per kernel: the dry run's proof that patching works
TINY_CANDIDATE = {"window_fwd": (16, 32, 4, 1), "window_dq": (32, 16, 4, 1), "window_dkdv": (16, 32, 4, 1),
                  "hybrid_fwd": (32, 16, 4, 1),
                  "int8_tiled": (32, 16, 16, 1, 1, 4, 1)}
SHAPES = {  # GPU problem sizes: each call runs for about a millisecond on an H100
    "attention": {"batch": 1, "heads": 32, "kv_heads": 8, "seqlen": 8192, "window": 2048, "landmark_stride": 64},
    "int8": {"m": 4096, "n": 4096, "k": 4096},
}
TINY_SHAPES = {"attention": {"batch": 1, "heads": 2, "kv_heads": 1, "seqlen": 80, "window": 24, "landmark_stride": 16},
               "int8": {"m": 40, "n": 48, "k": 64}}
TOLERANCE = {"float16": 5e-3, "bfloat16": 2e-2, "float32": 1e-4}  # relative L2 distance to the current config's
BACKWARD_FACTOR = 2.5  # backward FLOPs / forward FLOPs, as in benchmarks/sliding_window.py
DEFAULT_BUDGET_S = 90


@dataclass(frozen=True)
class Problem:
    """One problem the sweep times: a kernel at a head dim (0 for int8) and a dtype."""

    kernel: str
    dim: int
    dtype: str

    @property
    def family(self):
        return "int8" if self.kernel == "int8_tiled" else "attention"

    @property
    def torch_dtype(self):
        return getattr(torch, self.dtype)

    @property
    def name(self):
        short = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[self.dtype]
        return f"{self.kernel} {short}" if self.family == "int8" else f"{self.kernel} D{self.dim} {short}"


def problems(kernels=KERNELS):
    out = []
    for kernel in kernels:
        if kernel == "window_fwd" or kernel in BACKWARD:
            out += [Problem(kernel, d, dt) for d in (64, 128) for dt in ("float16", "bfloat16")]
        elif kernel == "hybrid_fwd":
            out += [Problem(kernel, d, "bfloat16") for d in (64, 128)]
        else:
            out += [Problem(kernel, 0, dt) for dt in ("float16", "bfloat16")]
    return out


def shape_text(problem, shapes=SHAPES):
    s = shapes[problem.family]
    if problem.family == "int8":
        return f"M{s['m']} N{s['n']} K{s['k']} per-channel"
    text = f"B{s['batch']} H{s['heads']}/{s['kv_heads']} T{s['seqlen']} w{s['window']}"
    return text + (f" landmarks every {s['landmark_stride']}" if problem.kernel == "hybrid_fwd" else "")


# ----------------------------------------------------------------------------------------------------------------
# The current configs, and where they live
# ----------------------------------------------------------------------------------------------------------------

def current_config(problem, shapes=SHAPES, device=None):
    """What the launcher chooses for the problem now (for the target in force: the GPU's, or compile_for's)."""
    from hybridrag.kernels import triton_common
    from hybridrag.kernels.int8 import triton_kernels as i8

    if problem.kernel == "int8_tiled":
        s = shapes["int8"]
        return tuple(i8._tiled_config(s["m"], s["n"], s["k"], problem.torch_dtype, device or torch.device("cpu")))
    if problem.kernel in BACKWARD:
        return tuple(triton_common._bwd_config(problem.dim, problem.torch_dtype, BACKWARD[problem.kernel]))
    return tuple(triton_common._fwd_config(problem.dim, problem.torch_dtype))


def table_entry(problem, arch):
    """Where a human changes the problem's config."""
    if problem.kernel == "int8_tiled":
        return f"int8 _tiled_config (sm_{arch}, M > 64)"
    key = "d64" if problem.dim <= 64 else ("d128" if problem.dim == 128 else "padded")
    if problem.kernel in BACKWARD:
        return f'_BWD_CONFIGS[{90 if arch >= 90 else 80}]["{BACKWARD[problem.kernel]}"]["{key}"]'
    return f'_FWD_CONFIGS[{90 if arch >= 90 else 80}]["{key}"]'


def candidates(problem, current, limit=None):
    """The current config first, then the kernel's candidates (without the current one), `limit` in all."""
    out = [tuple(current)] + [c for c in CANDIDATES[problem.kernel] if tuple(c) != tuple(current)]
    return out[:limit] if limit else out


# ----------------------------------------------------------------------------------------------------------------
# Running one config through the real launcher
# ----------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def patched(kernel, config):
    """Inside the block the launcher of `kernel` takes `config`; yields the list of the calls it made for it."""
    calls = []
    if kernel == "int8_tiled":
        from hybridrag.kernels.int8.triton_kernels import Config
        chosen = Config(*config)
    else:
        chosen = tuple(config)

    module, name = PATCH_TARGETS[kernel].rsplit(".", 1)
    original = getattr(importlib.import_module(module), name)

    def config_function(*args):
        if kernel in BACKWARD and args[2] != BACKWARD[kernel]:
            return original(*args)  # the other backward kernel keeps its config
        calls.append(args)
        return chosen
    with mock.patch(PATCH_TARGETS[kernel], config_function):
        yield calls


def build(problem, device, shapes=SHAPES, seed=0):
    """(run, flops): run() calls the problem's launcher once on fixed random inputs and returns its output
    tensors; flops is the work of one call (band pairs for attention, 2 M N K for int8)."""
    from hybridrag.kernels.patterns import hybrid_key_counts, visible_key_counts

    torch.manual_seed(seed)
    dtype = problem.torch_dtype
    if problem.family == "int8":
        from hybridrag.kernels.int8 import quantize_weight
        from hybridrag.kernels.int8 import triton_kernels as i8

        s = shapes["int8"]
        data, scale = (t.to(device) for t in quantize_weight(torch.randn(s["n"], s["k"])))
        x = torch.randn(s["m"], s["k"], device=device, dtype=dtype)
        run = lambda: (i8.int8_matmul_triton(x, data, scale, None, None, "fp", "fp32"),)  # noqa: E731
        return run, 2 * s["m"] * s["n"] * s["k"]

    from hybridrag.kernels.hybrid import triton_kernels as hyb
    from hybridrag.kernels.sliding_window import triton_kernels as sw

    s = shapes["attention"]
    q = torch.randn(s["batch"], s["heads"], s["seqlen"], problem.dim, device=device, dtype=dtype)
    k, v = (torch.randn(s["batch"], s["kv_heads"], s["seqlen"], problem.dim, device=device, dtype=dtype)
            for _ in range(2))
    left, scale = s["window"] - 1, problem.dim ** -0.5
    pairs = int(visible_key_counts(s["seqlen"], s["seqlen"], left, 0).sum())
    if problem.kernel == "hybrid_fwd":
        landmarks = torch.arange(0, s["seqlen"], s["landmark_stride"], device=device)
        pairs = int(hybrid_key_counts(s["seqlen"], s["seqlen"], left, 0, True, landmarks, True).sum())
        run = lambda: hyb.hybrid_fwd_triton(q, k, v, left, 0, True, landmarks, True, scale)  # noqa: E731
    elif problem.kernel == "window_fwd":
        run = lambda: sw.sliding_window_fwd_triton(q, k, v, left, 0, scale)  # noqa: E731
    else:
        out, lse = sw.sliding_window_fwd_triton(q, k, v, left, 0, scale)  # the current forward config
        grad_out = torch.randn_like(q)
        run = lambda: sw.sliding_window_bwd_triton(q, k, v, out, lse, grad_out, None, left, 0, scale)  # noqa: E731
    flops = 4 * problem.dim * pairs * s["batch"] * s["heads"]
    return run, flops * (BACKWARD_FACTOR if problem.kernel in BACKWARD else 1)


def relative_error(outputs, reference):
    """Largest relative L2 distance over the output tensors (inf when any is not finite where the reference is)."""
    worst = 0.0
    for got, want in zip(outputs, reference):
        got, want = got.double(), want.double()
        finite = torch.isfinite(want)
        if not torch.equal(torch.isfinite(got), finite):
            return math.inf
        worst = max(worst, ((got - want)[finite].norm() / want[finite].norm().clamp(min=1e-30)).item())
    return worst


def median_ms(run, device):
    """Median ms of run(): do_bench on CUDA (10 ms warm-up, 40 ms of calls), one perf_counter call on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return float(do_bench(run, warmup=10, rep=40, return_mode="median"))
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1e3


def _error_line(error):
    lines = [line for line in f"{type(error).__name__}: {error}".splitlines() if line.strip()]
    return lines[0][:200]


def try_config(problem, run, config, reference, device, is_reference=False):
    """One candidate's result and outputs. Status "ok" (ms, rel_err to `reference`), "wrong" (rel_err over the
    dtype's tolerance: not timed), "unchecked" (timed, but there is no reference: the current config failed) or
    "error: ..." (does not compile, does not fit, fails at launch). is_reference: this is the current config."""
    result = {"config": list(config), "status": None, "ms": None, "rel_err": None, "calls": 0}
    try:
        with patched(problem.kernel, config) as calls:
            outputs = run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            result["calls"] = len(calls)
            if is_reference:
                result["rel_err"] = 0.0
            elif reference is not None:
                result["rel_err"] = relative_error(outputs, reference)
                if result["rel_err"] > TOLERANCE[problem.dtype]:
                    result["status"] = "wrong"
                    return result, outputs
            result["ms"] = median_ms(run, device)
    except Exception as error:  # noqa: BLE001 (a config that does not compile or fit is a result here)
        result["status"] = f"error: {_error_line(error)}"
        return result, None
    result["status"] = "ok" if is_reference or reference is not None else "unchecked"
    return result, outputs


# ----------------------------------------------------------------------------------------------------------------
# Parallel compiles: worker processes run each candidate once, which leaves it in Triton's on-disk cache
# ----------------------------------------------------------------------------------------------------------------

_BUILT = {}


def precompile_one(task):
    """Worker: run (problem, config) once on (device type, shapes). Returns None or the error line."""
    problem, config, device_type, shapes = task
    device = torch.device(device_type)
    key = (problem, device_type, repr(shapes))
    try:
        if key not in _BUILT:
            _BUILT[key] = build(problem, device, shapes)[0]
        with patched(problem.kernel, config):
            _BUILT[key]()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as error:  # noqa: BLE001 (reported; the timing pass tries again)
        return _error_line(error)
    return None


def precompile(tasks, jobs, seconds, first_within_s=30):
    """Compile `tasks` [(problem, config, device type, shapes)] in `jobs` spawned processes for at most `seconds`
    (given up when none has finished after `first_within_s`: workers that cannot start). Returns
    {task[:2]: None | error line} for the tasks that finished."""
    if not tasks or jobs <= 0 or seconds <= 0:
        return {}
    start = time.perf_counter()
    pool = multiprocessing.get_context("spawn").Pool(min(jobs, len(tasks)))
    from benchmarks import autotune_sweep  # pickled by its package name, not as __main__
    pending = [(task, pool.apply_async(autotune_sweep.precompile_one, (task,))) for task in tasks]
    done = {}
    try:
        while pending and time.perf_counter() - start < seconds:
            if not done and time.perf_counter() - start > first_within_s:
                log(f"autotune: no compile finished in {first_within_s} s: compiling in line instead")
                break
            for task, result in [item for item in pending if item[1].ready()]:
                try:
                    done[task[:2]] = result.get()
                except Exception as error:  # noqa: BLE001 (a worker that died: the timing pass compiles in line)
                    done[task[:2]] = f"worker failed: {_error_line(error)}"
                pending.remove((task, result))
            time.sleep(0.1)
    finally:
        pool.terminate()
        pool.join()
    return done


# ----------------------------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------------------------

def sweep(probs, device, budget_s, jobs, limit=None, shapes=SHAPES, progress=None):
    """Time the candidates of every problem round-robin within budget_s (the first 45% at most for the parallel
    compiles). Returns the per-problem records; progress(records), when given, is called after each candidate (the
    caller writes them, so a run stopped from outside keeps what it timed). Off CUDA (tests) it runs under the
    interpreter, one call per time."""
    from hybridrag.kernels.targets import gpu_target

    start = time.perf_counter()
    deadline = start + budget_s
    target = gpu_target(device)
    arch = target.arch if target is not None else 90
    plans = {p: candidates(p, current_config(p, shapes, device), limit) for p in probs}
    order = [(p, plans[p][i]) for i in range(max(len(c) for c in plans.values())) for p in probs if i < len(plans[p])]
    log(f"autotune: {len(order)} candidates over {len(probs)} problems; compiling in {jobs} processes")
    compiled = precompile([(p, c, device.type, shapes) for p, c in order], jobs, 0.45 * budget_s)
    errors = sum(1 for e in compiled.values() if e)
    log(f"autotune: {len(compiled)} compiled ({errors} with errors) in {time.perf_counter() - start:.0f} s")

    records, runs, references = {}, {}, {}
    for p in probs:
        runs[p], flops = build(p, device, shapes)
        records[p] = {"problem": asdict(p), "name": p.name, "shape": shape_text(p, shapes), "flops": flops,
                      "table_entry": table_entry(p, arch), "current": list(plans[p][0]), "results": []}
        finish(records[p])
    for p, config in order:
        record = records[p]
        # a candidate no worker compiled compiles here: seconds, not milliseconds
        needed = 2.0 if compiled.get((p, config), "") is None else 10.0
        if time.perf_counter() > deadline - needed:
            record["results"].append({"config": list(config), "status": "not timed (budget)", "ms": None})
            continue
        is_reference = config == plans[p][0]
        result, outputs = try_config(p, runs[p], config, references.get(p), device, is_reference)
        if is_reference and result["status"] == "ok":
            references[p] = outputs  # the current config's output: what every candidate must match
        if jobs > 0:  # what the worker said: "ok", its error line, or that it did not get to it in time
            outcome = compiled.get((p, config), "not finished")
            result["precompile"] = "ok" if outcome is None else outcome
        record["results"].append(result)
        finish(record)
        log(f"  {p.name:24s} {str(tuple(config)):28s} " + (f"{result['ms']:.3f} ms" if result["ms"] is not None
                                                              else result["status"]))
        if progress is not None:
            progress(list(records.values()))
    return list(records.values())


def finish(record):
    """Add the current and best timings, the speedup and TFLOP/s to a problem's record."""
    ok = [r for r in record["results"] if r["status"] == "ok"]
    for r in ok:
        r["tflops"] = record["flops"] / (r["ms"] * 1e-3) / 1e12
    current = next((r for r in ok if r["config"] == record["current"]), None)
    best = min(ok, key=lambda r: r["ms"], default=None)
    record.update(current_ms=current and current["ms"], best=best and best["config"], best_ms=best and best["ms"],
                  best_tflops=best and best["tflops"],
                  speedup=(current["ms"] / best["ms"]) if current and best else None,
                  timed=f"{len(ok)}/{len(record['results'])}")


def suggestions(records):
    """Per table entry: the config with the lowest geometric mean of ms / current ms over the problems that share
    the entry, among the configs timed ok in all of them."""
    by_entry = {}
    for record in records:
        by_entry.setdefault(record["table_entry"], []).append(record)
    out = []
    for entry, group in by_entry.items():
        if any(r["current_ms"] is None for r in group):
            out.append({"entry": entry, "current": group[0]["current"], "suggested": None,
                        "geomean_time_ratio": None, "over": [r["name"] for r in group],
                        "note": "the current config was not timed in every problem"})
            continue
        times = [{tuple(x["config"]): x["ms"] / r["current_ms"] for x in r["results"] if x["status"] == "ok"}
                 for r in group]
        common = set.intersection(*(set(t) for t in times))
        score = {c: math.exp(sum(math.log(t[c]) for t in times) / len(times)) for c in common}
        best = min(score, key=score.get)
        out.append({"entry": entry, "current": group[0]["current"], "suggested": list(best),
                    "geomean_time_ratio": score[best], "over": [r["name"] for r in group], "note": None})
    return out


def summary_lines(payload):
    """The sweep's table and suggestions, as printed (benchmarks.gpu_check_summary prints them too)."""
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)
    columns = [("problem", lambda r: r["name"]), ("table entry", lambda r: r["table_entry"]),
               ("current", lambda r: str(tuple(r["current"]))), ("ms", lambda r: fmt(r["current_ms"], ".3f")),
               ("best", lambda r: str(tuple(r["best"])) if r["best"] else "-"),
               ("best ms", lambda r: fmt(r["best_ms"], ".3f")),
               ("TFLOP/s", lambda r: fmt(r["best_tflops"], ".0f")),
               ("gain", lambda r: fmt(r["speedup"], ".2f") + ("x" if r["speedup"] else "")),
               ("timed", lambda r: r["timed"])]
    title = (f"autotune sweep on {payload['device']} (sm_{payload['arch']}): {payload['elapsed_s']:.0f} s of a "
             f"{payload['budget_s']:.0f} s budget; best of the configs timed, output checked against the current")
    lines = [format_table(title, payload["problems"], columns)]
    for s in payload["suggestions"]:
        if s["suggested"] is None:
            lines.append(f"  {s['entry']}: keep {tuple(s['current'])} ({s['note']})")
        elif s["suggested"] == s["current"]:
            lines.append(f"  {s['entry']}: keep {tuple(s['current'])} (best over {', '.join(s['over'])})")
        else:
            lines.append(f"  {s['entry']}: {tuple(s['current'])} -> {tuple(s['suggested'])}, "
                         f"{s['geomean_time_ratio']:.2f}x the time (geomean over {', '.join(s['over'])})")
    return lines


# ----------------------------------------------------------------------------------------------------------------
# The dry run: the plan, then one tiny config per kernel under the interpreter
# ----------------------------------------------------------------------------------------------------------------

def plan(probs, limit=None):
    """What a GPU run would time, with the H100/H200 table's current configs (kernels.targets.compile_for)."""
    from hybridrag.kernels.targets import H100, compile_for

    with compile_for(H100):
        return [{**asdict(p), "name": p.name, "shape": shape_text(p), "table_entry": table_entry(p, H100.arch),
                 "configs": [list(c) for c in candidates(p, current_config(p), limit)]} for p in probs]


def plan_lines(entries):
    return [f"{e['name']:22s} {e['shape']:36s} current {tuple(e['configs'][0])} [{e['table_entry']}]; "
            f"{len(e['configs']) - 1} candidates: " + " ".join(str(tuple(c)).replace(" ", "") for c in e["configs"][1:])
            for e in entries]


def tiny_runs(kernels):
    """Per kernel: the default config and TINY_CANDIDATE patched in, on CPU tensors under the interpreter; the
    patched run must reach the launcher and match the default's output."""
    device = torch.device("cpu")
    out = []
    for kernel in kernels:
        problem = Problem(kernel, 0 if kernel == "int8_tiled" else 32, "float16")
        run, _ = build(problem, device, TINY_SHAPES)
        reference = run()
        result, _ = try_config(problem, run, TINY_CANDIDATE[kernel], reference, device)
        result.update(kernel=kernel, default=list(current_config(problem, TINY_SHAPES)),
                      reached_launcher=result["calls"] > 0, matches=result["status"] == "ok")
        out.append(result)
        rel_err = "-" if result["rel_err"] is None else f"{result['rel_err']:.1e}"
        print(f"  {kernel:11s} patched {tuple(TINY_CANDIDATE[kernel])} (default {tuple(result['default'])}): "
              f"{result['calls']} launcher calls took it, rel err {rel_err} -> "
              + ("ok" if result["matches"] and result["reached_launcher"] else result["status"]), flush=True)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.autotune_sweep", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="list the problems and configs, then run one tiny config per kernel under "
                             "TRITON_INTERPRET=1 on the CPU (no GPU needed)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="seconds for the whole sweep, compiles included (default %(default)s)")
    parser.add_argument("--kernels", default=",".join(KERNELS),
                        help="comma-separated, among " + ", ".join(KERNELS) + " (default: all)")
    parser.add_argument("--max-candidates", type=int, default=None, metavar="N",
                        help="at most N configs per problem, the current one included (default: all)")
    parser.add_argument("--jobs", type=int, default=min(12, max(1, (os.cpu_count() or 2) - 2)),
                        help="processes that compile the candidates first; 0 compiles in line (default %(default)s)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file (default benchmarks/runs/<device>/autotune_sweep[-dry].json)")
    args = parser.parse_args(argv)
    args.kernels = [k for k in args.kernels.split(",") if k]
    unknown = [k for k in args.kernels if k not in KERNELS]
    if unknown or not args.kernels:
        parser.error(f"--kernels must be among {', '.join(KERNELS)}; got {', '.join(unknown) or 'none'}")
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    return args


def dry_run(args, out):
    """The plan, then the tiny patched runs; returns the exit status."""
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        print("triton was imported before the dry run could set TRITON_INTERPRET=1: run it in a fresh process",
              file=sys.stderr)
        return 2
    os.environ["TRITON_INTERPRET"] = "1"
    start = time.perf_counter()
    entries = plan(problems(args.kernels), args.max_candidates)
    print(f"autotune sweep, dry run: a GPU run would time {len(entries)} problems in {args.budget_s:.0f} s "
          f"(configs patched at {', '.join(sorted(set(PATCH_TARGETS[k] for k in args.kernels)))}):")
    print("\n".join("  " + line for line in plan_lines(entries)))
    print("tiny runs under TRITON_INTERPRET=1 (the patching path):")
    tiny = tiny_runs(args.kernels)
    write_json(out, {"dry_run": True, "env": environment(torch.device("cpu")), "budget_s": args.budget_s,
                     "problems": entries, "tiny": tiny, "elapsed_s": time.perf_counter() - start})
    failed = [t["kernel"] for t in tiny if not (t["matches"] and t["reached_launcher"])]
    print("tiny runs: " + ("all patched configs reached their launcher and matched the default's output"
                           if not failed else f"FAILED for {', '.join(failed)}"))
    return 1 if failed else 0


def gpu_run(args, out):
    """The sweep on the current CUDA device; the JSON is rewritten after every candidate."""
    from hybridrag.kernels.targets import gpu_target

    start = time.perf_counter()
    device = torch.device("cuda")
    env = environment(device)

    def payload_of(records):
        return {"dry_run": False, "device": torch.cuda.get_device_name(device), "arch": gpu_target(device).arch,
                "env": env, "budget_s": args.budget_s, "elapsed_s": time.perf_counter() - start,
                "problems": records, "suggestions": suggestions(records)}
    records = sweep(problems(args.kernels), device, args.budget_s, args.jobs, args.max_candidates,
                    progress=lambda records: write_json(out, payload_of(records)))
    payload = payload_of(records)
    write_json(out, payload)
    print("\n".join(summary_lines(payload)))
    return 0


def main(argv=None):
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device here: run with --dry-run, or on a GPU machine (benchmarks/gpu_check.sh)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    out = args.out or RUNS_ROOT / device_slug(device) / f"autotune_sweep{'-dry' if args.dry_run else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    status = dry_run(args, out) if args.dry_run else gpu_run(args, out)
    if status != 2:
        print(f"wrote {out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
