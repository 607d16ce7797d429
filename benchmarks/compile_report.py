"""What every Triton kernel costs on an A100 (sm_80) and an H100/H200 (sm_90), known without a GPU: each kernel is
compiled through the project's real host launchers, at realistic shapes and with every config they can choose, to
a cubin with the ptxas that the triton wheel ships, and nothing is launched.

Per kernel and case it records: compiled, or the first line of the error; registers and spill bytes (ptxas -v);
shared memory (Triton's metadata) against the target's limit per block (A100 166,912 B, H100 232,448 B: Triton
checks it at the first launch only, so an over-limit config compiles here and fails there); and which matrix
instructions the PTX uses (wgmma on sm_90, mma.sync).

Targets (issue 14): every config fits the target's shared memory; no spills in the fp16/bf16 attention forward, dq
and dk/dv kernels at D <= 128, nor in the int8 kernels; on sm_90, wgmma wherever a dot has >= 64 rows.

    python -m benchmarks.compile_report                    # both targets, every case (about 6 min each on 2 cores)
    python -m benchmarks.compile_report --arch 90 --only "hybrid|int8"
    python -m benchmarks.compile_report --record           # also benchmarks/results/compile/compile_report.json

It exits with 1 when a kernel does not compile or needs more shared memory than the target has (it would fail at
its first launch there); spills and missing wgmma are reported in the table and the summary.

How: a stand-in Triton driver reports the CUDA target, `kernels.targets.compile_for` makes every config choice the
target's, and `JITFunction.__getitem__` is replaced so that `kernel[grid](...)` inside a launcher compiles with the
launcher's real arguments (`JITFunction.run(..., warmup=True)`: constexprs, warps, stages, divisibility) and
returns. The launchers get CPU tensors of the real shapes. TRITON_INTERPRET must not be set.
"""
import argparse
import contextlib
import io
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .common import RESULTS_ROOT, RUNS_ROOT, environment, format_table, log, write_json

SUITE = "compile_report"
EXPECTED_S = {"quick": 50, "full": 720}  # QUICK_CASES / every case, both targets, on the 2-core AMD EPYC
ARCHS = (80, 90)
# One case of each launcher family, under 2 minutes on 2 cores: the window forward and backward, the hybrid forward and
# backward with every extra (landmarks, memory, global rows, kv_start), streaming decode, int8 tiled and split-K. The
# main job's quick run and the CI test compile these.
QUICK_CASES = ("window fp16 D64", "hybrid bf16 D128", "stream decode fp16 D100", "int8 W8A16 bf16 g128 M512",
               "int8 W8A8 fp16 M1")
DOT_ROWS_MIN = 64  # a dot with at least this many rows should run on wgmma on sm_90


@dataclass
class Case:
    """One call of a launcher: `name` (what the report shows), `family` (attention, streaming, int8), the dtype
    name, the head dim (attention) and the call."""

    name: str
    family: str
    dtype: str
    dim: int
    run: object


class _StandInDriver:
    """Enough of a Triton driver for JITFunction.run(warmup=True): the CUDA target and a device id per arch (each
    arch keeps its own in-memory kernel cache)."""

    def __init__(self, arch):
        self.arch = arch

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def is_active(self):
        return True


def _cuobjdump():
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _registers(cubin):
    """Registers per thread of a cubin (cuobjdump --dump-resource-usage), or None."""
    import subprocess

    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.remove(f.name)
    found = re.search(r"REG:(\d+)", text)
    return int(found[1]) if found else None


def _dot_rows(kernel_name, constexprs):
    """Rows of the kernel's largest dot operand: the key block for the key-major kernels (dk/dv, key mass), the
    row block otherwise."""
    key_major = "dkdv" in kernel_name or "mass" in kernel_name
    block = constexprs.get("BLOCK_N" if key_major else "BLOCK_M")
    return block if isinstance(block, int) else None


class Recorder:
    """Compiles instead of launching, and keeps one record per compiled kernel."""

    def __init__(self, target):
        self.target = target
        self.case = None
        self.records = []

    def compile(self, fn, grid, args, kwargs):
        constexprs = {p.name: value for p, value in zip(fn.params, list(args) + [kwargs.get(p.name)
                                                                                  for p in fn.params[len(args):]])
                      if p.is_constexpr and isinstance(value, (int, float, bool, str))}
        record = {"arch": self.target.arch, "case": self.case.name, "family": self.case.family,
                  "dtype": self.case.dtype, "dim": self.case.dim, "kernel": fn.__name__,
                  "num_warps": kwargs.get("num_warps", 4), "num_stages": kwargs.get("num_stages", 3),
                  "blocks": {k: v for k, v in constexprs.items() if k.startswith("BLOCK_") or k == "GROUP_M"}}
        ptxas_log = io.StringIO()
        start = time.perf_counter()
        try:
            with contextlib.redirect_stdout(ptxas_log):
                kernel = fn.run(*args, grid=grid, warmup=True, **kwargs)
        except Exception as error:  # noqa: BLE001 (a compile error is a result here)
            lines = [line for line in f"{type(error).__name__}: {error}".splitlines() if line.strip()]
            record.update(ok=False, error=lines[0][:300])
        else:
            ptx = kernel.asm["ptx"]
            spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log.getvalue())
            shared = kernel.metadata.shared
            record.update(ok=True, registers=_registers(kernel.asm["cubin"]),
                          spill_bytes=None if spills is None else int(spills[1]) + int(spills[2]),
                          shared=shared, fits=shared <= self.target.shared_memory_limit,
                          wgmma="wgmma" in ptx, mma_sync="mma.sync" in ptx,
                          dot_rows=_dot_rows(fn.__name__, constexprs))
        record["compile_s"] = round(time.perf_counter() - start, 2)
        self.records.append(record)
        log(_line(record))


def _line(r):
    if not r["ok"]:
        return f"[sm{r['arch']}] ERR {r['kernel']:<24} {r['case']:<34} {r['error'][:160]}"
    return (f"[sm{r['arch']}] ok  {r['kernel']:<24} {r['case']:<34} regs {r['registers']} spill {r['spill_bytes']} "
            f"B smem {r['shared']} B{'' if r['fits'] else ' OVER'} wgmma {r['wgmma']} ({r['compile_s']} s)")


@contextlib.contextmanager
def compiling(target):
    """Inside the block every `kernel[grid](...)` compiles for `target` (kernels.targets.Target) into the yielded
    Recorder and launches nothing."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, said out loud (no warning)
    from triton import knobs
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    from hybridrag.kernels.targets import compile_for

    recorder = Recorder(target)
    saved_getitem = JITFunction.__getitem__
    saved_knobs = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    saved_driver = driver._active  # reset_active() would look for a real GPU driver
    JITFunction.__getitem__ = lambda fn, grid: (lambda *a, **kw: recorder.compile(fn, grid, a, kw))
    knobs.nvidia.dump_ptxas_log = True   # ptxas -v: the spill bytes
    knobs.compilation.always_compile = True  # a fresh ptxas run (and log) for every specialisation
    driver.set_active(_StandInDriver(target.arch))
    try:
        with compile_for(target):
            yield recorder
    finally:
        JITFunction.__getitem__ = saved_getitem
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved_knobs
        driver._active = saved_driver


# ---------------------------------------------------------------- cases: the launchers' real calls


def _attention_inputs(dtype, dim, batch=1, heads=8, kv_heads=2, tq=2048, tk=2048):
    import torch

    q = torch.randn(batch, heads, tq, dim, dtype=dtype)
    k, v = (torch.randn(batch, kv_heads, tk, dim, dtype=dtype) for _ in range(2))
    return q, k, v


def _window(dtype, dim, window=256):
    import torch

    from hybridrag.kernels.sliding_window import triton_kernels as sw

    q, k, v = _attention_inputs(dtype, dim)
    out, lse = sw.sliding_window_fwd_triton(q, k, v, window - 1, 0, dim ** -0.5)
    sw.sliding_window_bwd_triton(q, k, v, out, lse, torch.randn_like(out), None, window - 1, 0, dim ** -0.5)


def _hybrid(dtype, dim, window=256):
    """Landmarks, memory tokens, global rows, per-batch kv_start and the lse gradient: every kernel of the hybrid
    forward and backward."""
    import torch

    from hybridrag.kernels.hybrid import triton_kernels as hyb

    q, k, v = _attention_inputs(dtype, dim, batch=2)
    landmarks = torch.arange(0, k.shape[2], 64)
    memory_k = torch.randn(1, k.shape[1], 4, dim, dtype=dtype)
    memory_v = torch.randn_like(memory_k)
    kv_start = torch.tensor([0, 16], dtype=torch.int32)
    args = (window - 1, 0, True, landmarks, True, dim ** -0.5, memory_k, memory_v, kv_start)
    out, lse = hyb.hybrid_fwd_triton(q, k, v, *args)
    hyb.hybrid_bwd_triton(q, k, v, out, lse, torch.randn_like(out), torch.randn_like(lse), *args)


def _mass(dtype, dim, window=256):
    import torch

    from hybridrag.kernels.hybrid import triton_kernels as hyb

    q, k, _ = _attention_inputs(dtype, dim)
    tk = k.shape[2]
    landmarks = torch.arange(0, tk, 64)
    _, lse = hyb.hybrid_fwd_triton(q, k, None, window - 1, 0, True, landmarks, True, dim ** -0.5)
    segments = (torch.arange(tk) // 256)[None].contiguous()
    hyb.attention_mass_triton(q, k, lse, segments, int(segments.max()) + 1, torch.ones(1, q.shape[2]), window - 1, 0,
                              True, landmarks, True, dim ** -0.5)


def _stream(dtype, dim, chunk, sinks=4, window=1024, length=3000):
    import torch

    from hybridrag.kernels.streaming import triton_kernels as st

    q = torch.randn(1, 8, chunk, dim, dtype=dtype)
    k, v = (torch.randn(1, 2, chunk, dim, dtype=dtype) for _ in range(2))
    sink_k, sink_v = (torch.randn(1, 2, sinks, dim, dtype=dtype) for _ in range(2))
    ring_k, ring_v = (torch.randn(1, 2, window, dim, dtype=dtype) for _ in range(2))
    st.streaming_attention_triton(q, k, v, sink_k, sink_v, ring_k, ring_v, length, sinks, window, dim ** -0.5)


def _int8(dtype, m, group, activations="fp", accumulate="fp32", grad=False, n=4096, k=4096):
    import torch

    from hybridrag.kernels.int8 import triton_kernels as i8
    from hybridrag.kernels.int8.quantize import quantize_weight

    data, scale = quantize_weight(torch.randn(n, k), group)
    x = torch.randn(m, k, dtype=dtype)
    i8.int8_matmul_triton(x, data, scale, group, torch.randn(n, dtype=dtype), activations, accumulate)
    if grad:
        i8.int8_matmul_grad_input_triton(torch.randn(m, n, dtype=dtype), data, scale, group, accumulate)


def cases():
    """Every config the launchers choose: the attention configs depend on D and the dtype (D > 128 and float32
    take the wide configs), the int8 ones on M (split-K at M <= 16, 64- or 128-row tiles), the group size (scale
    mode) and the accumulator."""
    import torch

    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    out = []
    attention = [(dt, d) for dt in ("fp16", "bf16") for d in (64, 100, 128)] + [("bf16", 256), ("fp32", 64)]
    for dt, d in attention:
        out.append(Case(f"window {dt} D{d}", "attention", dt, d, lambda dt=dt, d=d: _window(dtypes[dt], d)))
        out.append(Case(f"hybrid {dt} D{d}", "attention", dt, d, lambda dt=dt, d=d: _hybrid(dtypes[dt], d)))
    for dt, d in (("bf16", 64), ("bf16", 128), ("fp16", 100)):
        out.append(Case(f"mass {dt} D{d}", "attention", dt, d, lambda dt=dt, d=d: _mass(dtypes[dt], d)))
    for dt, d in [(dt, d) for dt in ("fp16", "bf16") for d in (64, 100, 128)] + [("fp32", 64)]:
        out.append(Case(f"stream prefill {dt} D{d}", "streaming", dt, d,
                        lambda dt=dt, d=d: _stream(dtypes[dt], d, 256)))
        out.append(Case(f"stream decode {dt} D{d}", "streaming", dt, d, lambda dt=dt, d=d: _stream(dtypes[dt], d, 1)))
    for dt in ("fp16", "bf16"):
        for group, gname in ((None, "per-channel"), (128, "g128")):
            for m, grad in ((512, True), (64, False), (1, True), (16, False)):
                out.append(Case(f"int8 W8A16 {dt} {gname} M{m}", "int8", dt, 0,
                                lambda dt=dt, group=group, m=m, grad=grad: _int8(dtypes[dt], m, group, grad=grad)))
        for m in (512, 1):
            out.append(Case(f"int8 W8A8 {dt} M{m}", "int8", dt, 0,
                            lambda dt=dt, m=m: _int8(dtypes[dt], m, None, activations="int8")))
    out.append(Case("int8 W8A16 fp16 acc16 M512", "int8", "fp16", 0,
                    lambda: _int8(torch.float16, 512, None, accumulate="fp16", grad=True)))
    out.append(Case("int8 W8A16 fp16 acc16 g128 M1", "int8", "fp16", 0,
                    lambda: _int8(torch.float16, 1, 128, accumulate="fp16")))
    out.append(Case("int8 W8A16 fp16 g20 M512", "int8", "fp16", 0, lambda: _int8(torch.float16, 512, 20, k=4080)))
    out.append(Case("int8 W8A16 fp32 per-channel M512", "int8", "fp32", 0,
                    lambda: _int8(torch.float32, 512, None, grad=True)))
    return out


# ---------------------------------------------------------------- checks


def held_to_no_spills(record):
    """The kernels the no-spill target covers: fp16/bf16 attention forward, dq and dk/dv at D <= 128 (streaming
    included), and every int8 kernel."""
    if record["family"] == "int8":
        return True
    return record["dtype"] in ("fp16", "bf16") and record["dim"] <= 128 and "delta" not in record["kernel"]


def findings(record):
    """What a record misses of the targets: a list of short strings, empty when it meets them all."""
    if not record["ok"]:
        return [f"does not compile: {record['error']}"]
    missed = []
    if not record["fits"]:
        missed.append(f"shared memory {record['shared']:,} B over the limit")
    if record["spill_bytes"] and held_to_no_spills(record):
        missed.append(f"spills {record['spill_bytes']} B")
    rows = record["dot_rows"]
    if record["arch"] >= 90 and rows is not None and rows >= DOT_ROWS_MIN and record["mma_sync"] and \
            not record["wgmma"]:
        missed.append(f"no wgmma for {rows}-row dots")
    return missed


def run(archs, only=None, selected=None):
    """Compile the cases (those whose name holds one of the `only` substrings, or the `selected` names) for each
    arch -> the records."""
    from hybridrag.kernels.targets import A100, H100

    targets = {80: A100, 90: H100}
    chosen = [c for c in cases() if (not only or any(s in c.name for s in only))
              and (selected is None or c.name in selected)]
    records = []
    for arch in archs:
        with compiling(targets[arch]) as recorder:
            for case in chosen:
                recorder.case = case
                try:
                    case.run()
                except Exception as error:  # noqa: BLE001 (a launcher that fails before compiling)
                    recorder.records.append({"arch": arch, "case": case.name, "family": case.family,
                                             "dtype": case.dtype, "dim": case.dim, "kernel": "<launcher>",
                                             "ok": False, "error": f"{type(error).__name__}: {error}"[:300]})
                    log(_line(recorder.records[-1]))
        records += recorder.records
    return records


COLUMNS = [
    ("arch", lambda r: f"sm_{r['arch']}"),
    ("case", lambda r: r["case"]),
    ("kernel", lambda r: r["kernel"]),
    ("blocks", lambda r: " ".join(f"{v}" for k, v in sorted(r.get("blocks", {}).items()) if k != "BLOCK_D")),
    ("warps/stages", lambda r: f"{r.get('num_warps')}/{r.get('num_stages')}"),
    ("regs", lambda r: str(r.get("registers", "-"))),
    ("spill B", lambda r: str(r.get("spill_bytes", "-"))),
    ("smem KiB", lambda r: f"{r['shared'] / 1024:.1f}" if r.get("ok") else "-"),
    ("mma", lambda r: ("wgmma" if r["wgmma"] else "mma.sync" if r["mma_sync"] else "none") if r.get("ok") else "-"),
    ("targets", lambda r: "; ".join(findings(r)) or "met"),
]


def summary(records):
    """Per arch: compiled, errors, over shared memory, spilling (held kernels), missing wgmma."""
    rows = []
    for arch in sorted({r["arch"] for r in records}):
        mine = [r for r in records if r["arch"] == arch]
        ok = [r for r in mine if r["ok"]]
        rows.append({"arch": arch, "kernels": len(mine), "compiled": len(ok),
                     "over shared memory": sum(not r["fits"] for r in ok),
                     "spilling (held)": sum(bool(r["spill_bytes"]) and held_to_no_spills(r) for r in ok),
                     "missing wgmma": sum(any("wgmma" in f for f in findings(r)) for r in ok),
                     "targets met": sum(not findings(r) for r in mine)})
    return rows


SUMMARY_COLUMNS = [(name, (lambda r, name=name: f"sm_{r[name]}" if name == "arch" else str(r[name])))
                   for name in ("arch", "kernels", "compiled", "over shared memory", "spilling (held)",
                                "missing wgmma", "targets met")]


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="80,90", help="comma-separated targets among 80, 90 (default %(default)s)")
    parser.add_argument("--only", default="", help="'|'-separated substrings of case names (default: all)")
    parser.add_argument("--out", type=Path, default=RUNS_ROOT / "compile" / f"{SUITE}.json",
                        help="where the run's JSON goes (default %(default)s)")
    parser.add_argument("--record", action="store_true",
                        help=f"also write {RESULTS_ROOT.name}/compile/{SUITE}.json (every case, both targets)")
    args = parser.parse_args(argv)
    try:
        args.archs = tuple(int(a) for a in args.arch.split(","))
    except ValueError:
        parser.error(f"--arch must be comma-separated ints among {ARCHS}, got {args.arch!r}")
    if not set(args.archs) <= set(ARCHS):
        parser.error(f"--arch must be among {ARCHS}, got {args.arch!r}")
    args.only = [s for s in args.only.split("|") if s]
    if args.record and (args.only or set(args.archs) != set(ARCHS)):
        parser.error("--record records every case on both targets: drop --only and --arch")
    return args


def run_in_subprocess(quick, out, timeout_s=3600):
    """The report in a fresh process (one with TRITON_INTERPRET=1 has built its kernels as interpreted functions):
    QUICK_CASES when `quick`, else every case, both targets, JSON to `out` -> (exit status, its two tables' text, or
    the end of its output when it printed no table).
    For the main job where no GPU is present."""
    import subprocess

    command = [sys.executable, "-m", "benchmarks.compile_report", "--out", str(out)]
    if quick:
        command += ["--only", "|".join(QUICK_CASES)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(command, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                          timeout=timeout_s)
    start = done.stdout.find("compile report:")
    if start < 0:  # it failed before its tables
        return done.returncode, (done.stdout + done.stderr)[-3000:]
    return done.returncode, done.stdout[start:].strip()


def main(argv=None):
    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        log("TRITON_INTERPRET=1 is set: the report compiles for real and unsets it")
    start = time.perf_counter()
    records = run(args.archs, args.only)
    import torch

    payload = {"suite": SUITE, "env": environment(torch.device("cpu")), "duration_s": time.perf_counter() - start,
               "records": records, "summary": summary(records)}
    print(format_table("compile report: kernels against the targets", records, COLUMNS))
    print(format_table("compile report: summary", payload["summary"], SUMMARY_COLUMNS))
    paths = [args.out] + ([RESULTS_ROOT / "compile" / f"{SUITE}.json"] if args.record else [])
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, payload)
    for path in paths:
        log(f"wrote {path}")
    broken = [r for r in records if not r["ok"] or not r["fits"]]  # these would fail at their first launch
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
