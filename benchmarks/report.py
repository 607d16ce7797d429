"""The main job: every suite's correctness check, then its benchmark; JSON + PNG per suite, tables, a summary.

    python -m benchmarks.report                   # quick (the default): every suite at a small size, a few minutes
    python -m benchmarks.report --full            # the complete suites; the expected time is printed first
    python -m benchmarks.report --full --record   # also record the rows not flagged in benchmarks/results/<device>/
    python -m benchmarks.report --suite hybrid --out /tmp/bench

Files: every run writes <suite>-quick.json/.png (quick) or <suite>.json/.png (--full) to --out, by default
benchmarks/runs/<device>/ (ignored by git). Only --record (full runs only) writes benchmarks/results/<device>/, the
recorded runs the README quotes, and only the rows that are not flagged; a suite whose check failed or whose rows
are all flagged is not recorded (its recorded files stay as they were).

Load: on a CPU, each timed row carries other_load, the share of the machine's CPU that other processes used while
it was timed. A row above --load-limit (or whose ratio rests on such a row) is flagged: marked in the table, the JSON
("flagged") and the plot (hollow markers, hatched bars), its targets are "not counted (under load)", and --record
leaves it out.

Exit status: 0; 1 when a correctness check failed; 2 for bad arguments; 3 when --record could not record a suite.

A suite is a module with SUITE, EXPECTED_S ({"quick": s, "full": s} on a 2-core AMD EPYC, the recorded results'
machine), bench_dtype(device), check(device), CHECK_COLUMNS, benchmark(device, quick, ceilings=, log=),
BENCH_COLUMNS, plot(rows, ceilings, env, path), and optionally targets_elsewhere(device) (the targets that cannot
be measured on this device). Register one by adding its name to SUITE_MODULES.
"""
import argparse
import importlib
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import compile_report
from .common import (NOT_COUNTED, RESULTS_ROOT, RUNS_ROOT, cpu_count, default_device, device_slug, environment,
                     flag_under_load, format_seconds, format_table, is_inside, load_column, log, long_step,
                     measure_ceilings, progress, target_checks, write_json)

# register a suite by adding its module name under benchmarks/
SUITE_MODULES = ("sliding_window", "hybrid", "int8_matmul", "streaming", "retrieval_quality", "retrieval_speed",
                 "system", "model_decode")


def load_suites(names=SUITE_MODULES):
    """The suite modules of `names`, imported on demand: a run of the kernel suites needs none of the retrieval
    suites' packages (faiss, bm25s), which a GPU machine may not have."""
    return [importlib.import_module(f".{name}", __package__) for name in names]


DEFAULT_LOAD_LIMIT_PCT = 15
EXIT_CHECK_FAILED, EXIT_NOT_RECORDED = 1, 3


@dataclass
class SuiteResult:
    suite: object
    quick: bool
    checks: list
    rows: list
    duration_s: float
    files: list = field(default_factory=list)
    recorded: str = None        # what --record did, None without --record
    record_failed: bool = False  # --record was asked and this suite was not recorded

    @property
    def passed(self):
        return all(row["passed"] for row in self.checks)

    def verdicts(self):
        """Target verdicts of the rows: {"met": n, "missed": n, NOT_COUNTED: n}."""
        counts = {"met": 0, "missed": 0, NOT_COUNTED: 0}
        for row in self.rows:
            for check in target_checks(row.get("target")):
                if check.get("verdict") in counts:
                    counts[check["verdict"]] += 1
        return counts

    def elsewhere(self, device):
        return list(getattr(self.suite, "targets_elsewhere", lambda device: [])(device))


def file_stem(suite, quick):
    return suite.SUITE + ("-quick" if quick else "")


def payload_of(result, env, ceilings, load_limit):
    return {"suite": result.suite.SUITE, "size": "quick" if result.quick else "full", "env": env,
            "ceilings": ceilings, "load_limit": load_limit, "duration_s": result.duration_s,
            "correctness": result.checks, "rows": result.rows}


def write_files(suite, payload, rows, folder, stem):
    folder.mkdir(parents=True, exist_ok=True)
    json_path = write_json(folder / f"{stem}.json", {**payload, "rows": rows})
    return [json_path, suite.plot(rows, payload["ceilings"], payload["env"], folder / f"{stem}.png")]


def record(result, payload, folder):
    """Write the rows that are not flagged to the recorded folder. Returns (recorded, what happened, files)."""
    if not result.passed:
        return False, f"not recorded: the correctness check failed; {folder} unchanged", []
    clean = [row for row in result.rows if not row["flagged"]]
    measured = [row for row in result.rows if row.get("status", "ok") == "ok"]  # not the peers that cannot run here
    if measured and not any(row in clean for row in measured):
        return False, (f"not recorded: all {len(measured)} measured rows are flagged under load (rerun on an idle "
                       f"machine); {folder} unchanged"), []
    left_out = [{**{key: row[key] for key in ("label", "mode", "peer", "kind") if key in row},
                 "flagged": row["flagged"]} for row in result.rows if row["flagged"]]
    files = write_files(result.suite, {**payload, "left_out": left_out}, clean, folder, result.suite.SUITE)
    detail = f", {len(left_out)} flagged rows left out" if left_out else ""
    return True, f"recorded {len(clean)} of {len(result.rows)} rows{detail} in {folder}", files


def run_suite(suite, device, env, ceilings, *, quick, out, load_limit, record_to=None):
    """Check, benchmark, flag the rows timed under load, write the files to `out` (and the clean rows to
    `record_to`, when given). Returns a SuiteResult."""
    start = time.perf_counter()
    log(f"[{suite.SUITE}] correctness check")
    checks = suite.check(device)
    log(f"[{suite.SUITE}] benchmark ({'quick' if quick else 'full'})")
    rows = suite.benchmark(device, quick=quick, ceilings=ceilings, log=log)
    flag_under_load(rows, load_limit)
    result = SuiteResult(suite, quick, checks, rows, time.perf_counter() - start)
    payload = payload_of(result, env, ceilings, load_limit)
    result.files = write_files(suite, payload, rows, Path(out), file_stem(suite, quick))
    if record_to is not None:
        recorded, result.recorded, files = record(result, payload, Path(record_to))
        result.record_failed = not recorded
        result.files += files
    return result


def ceilings_text(ceilings, env, load_limit):
    int8 = "" if ceilings.get("int8_tops") is None else \
        f"; int8 matmul {ceilings['int8_tops']:.1f} TOPS [{ceilings['int8']}]"
    load = ceilings.get("other_load")
    busy = "" if load is None or load <= load_limit else \
        f" (* measured under other load {load:.0%}: the %peak columns are skewed too)"
    return (f"ceilings ({env['device']}): dense matmul {ceilings['matmul_tflops']:.2f} TFLOP/s [{ceilings['matmul']}]; "
            f"copy {ceilings['copy_gbps']:.1f} GB/s [{ceilings['copy']}]{int8}{busy}")


def tables(result, env):
    suite = result.suite
    rows, columns = result.rows, list(suite.BENCH_COLUMNS)
    if any(row.get("other_load") is not None for row in rows):
        columns.insert(0, ("load", load_column))
    text = [format_table(f"{suite.SUITE}: correctness ({'pass' if result.passed else 'FAIL'})", result.checks,
                         suite.CHECK_COLUMNS),
            format_table(f"{suite.SUITE}: benchmark on {env['device']} (ours speedup = peer ms / ours ms)", rows,
                         columns)]
    flagged = [row for row in rows if row["flagged"]]
    if flagged:
        text.append(f"* {len(flagged)} of {len(rows)} rows flagged ({flagged[0]['flagged']}, ...): their targets are "
                    "not counted and --record leaves them out; rerun on an idle machine")
    text.append("\n".join([f"wrote {path}" for path in result.files] + ([result.recorded] if result.recorded else [])))
    return text


def summary(results, device, env, out, load_limit, wall_s, record_asked):
    """The last table: what ran, how long, correctness, flagged rows, targets, and where the files are."""
    def targets(result):
        counts = result.verdicts()
        return f"{counts['met']} / {counts['missed']} / {counts[NOT_COUNTED]}"

    columns = [
        ("suite", lambda r: r.suite.SUITE),
        ("time", lambda r: format_seconds(r.duration_s)),
        ("correctness", lambda r: f"{'pass' if r.passed else 'FAIL'} "
                                  f"{sum(c['passed'] for c in r.checks)}/{len(r.checks)}"),
        ("rows", lambda r: str(len(r.rows))),
        ("flagged", lambda r: str(sum(1 for row in r.rows if row["flagged"]))),
        ("targets met / missed / not counted", targets),
        ("not measurable here", lambda r: str(len(r.elsewhere(device)))),
    ]
    if record_asked:
        columns.append(("record", lambda r: r.recorded))
    size = "quick" if results and results[0].quick else "full"
    lines = [format_table(f"summary: {size} run on {env['device']}, {format_seconds(wall_s)}, load limit "
                          f"{load_limit:.0%}, commit {env['git_commit']}", results, columns)]
    elsewhere = [(r.suite.SUITE, t) for r in results for t in r.elsewhere(device)]
    if elsewhere:
        lines.append("not measurable here: " + "; ".join(f"{suite}: {t}" for suite, t in elsewhere))
    lines.append(f"files: {Path(out).resolve()}/" + ("" if record_asked else
                 "  (nothing recorded: benchmarks/results/ changes only with --full --record)"))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Expected time
# ----------------------------------------------------------------------------------------------------------------

def expected_seconds(suite, quick, device, folders):
    """(seconds, where the figure comes from): the last run of this size in `folders` (its duration_s), else the
    suite's EXPECTED_S on a CPU (measured on the 2-core machine the recorded results come from), else (None, why)."""
    for folder in folders:
        path = Path(folder) / f"{file_stem(suite, quick)}.json"
        if path.is_file():
            duration = json.loads(path.read_text()).get("duration_s")
            if duration is not None:
                return duration, f"the last run in {path.parent}"
    if device.type == "cpu":
        return suite.EXPECTED_S["quick" if quick else "full"], "2-core AMD EPYC"
    return None, "no run on this device yet"


def plan_text(suites, quick, device, folders):
    estimates = [(suite, *expected_seconds(suite, quick, device, folders)) for suite in suites]
    known = [s for _, s, _ in estimates if s is not None]
    if not known:
        total = "unknown (no run of this size here yet)"
    else:
        untimed = "" if len(known) == len(estimates) else " + the suites not yet timed"
        total = f"~{format_seconds(sum(known))}{untimed}"
    lines = [f"{'quick' if quick else 'full'} run of {len(suites)} suite{'s' * (len(suites) != 1)}, expected {total}:"]
    if device.type == "cpu":
        lines.insert(0, f"machine load: {os.getloadavg()[0]:.1f} runnable processes (1-minute average) on "
                        f"{cpu_count()} CPUs; rows timed while others use more than the load limit are flagged")
    lines += [f"  {suite.SUITE:18s} ~{'?' if s is None else format_seconds(s)} ({source})"
              for suite, s, source in estimates]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

def _load_limit(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percentage such as 15, got {text!r}") from None
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError(f"expected a percentage in (0, 100], got {text}")
    return value


def parse_args(argv, device):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true",
                      help="the complete suites (about 25 minutes on 2 idle CPU cores; the plan printed first says)")
    size.add_argument("--quick", action="store_true",
                      help="every suite at a small size: the default, accepted as an alias")
    parser.add_argument("--suite", choices=SUITE_MODULES, action="append",
                        help="run only this suite (repeatable); default all")
    parser.add_argument("--out", type=Path, default=RUNS_ROOT / device_slug(device),
                        help="folder for this run's JSON and PNG files (default: %(default)s); must lie outside "
                             "benchmarks/results/")
    parser.add_argument("--record", action="store_true",
                        help="with --full: also write the rows that are not flagged to benchmarks/results/<device>/")
    parser.add_argument("--load-limit", type=_load_limit, default=DEFAULT_LOAD_LIMIT_PCT, metavar="PCT",
                        help="flag rows timed while other processes used more than PCT%% of the CPU "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    if args.record and not args.full:
        parser.error("--record records full runs only: add --full")
    if is_inside(args.out, RESULTS_ROOT):
        parser.error(f"--out {args.out} lies inside {RESULTS_ROOT}, the recorded runs: pick another folder "
                     "(--full --record writes there, rows timed under load left out)")
    return args


def compile_report_step(device, quick, args):
    """Where no GPU is present and every suite runs: what the kernels cost on sm_80 / sm_90 (benchmarks/
    compile_report.py; quick: its QUICK_CASES, --full: every case). False when a kernel failed to compile or
    overflows a target's shared memory (it would fail at its first launch there)."""
    if device.type == "cuda" or args.suite:
        return True
    if importlib.util.find_spec("triton") is None:
        log("compile report: skipped (triton is not installed)")
        return True
    out = Path(args.out) / f"{compile_report.SUITE}{'-quick' if quick else ''}.json"
    cases = f"{len(compile_report.QUICK_CASES)} cases" if quick else "every case"
    expected_s = compile_report.EXPECTED_S["quick" if quick else "full"]
    with long_step(f"compile report ({cases}, sm_80 and sm_90)", expected_s):
        status, text = compile_report.run_in_subprocess(quick, out)
    summary_at = text.find("compile report: summary")
    print(text if quick or summary_at < 0 else text[summary_at:])  # --full: the summary, not 350 rows
    return status == 0


def main(argv=None):
    device = default_device()
    args = parse_args(argv, device)
    quick, load_limit = not args.full, args.load_limit / 100
    suites = load_suites([name for name in SUITE_MODULES if not args.suite or name in args.suite])
    record_to = RESULTS_ROOT / device_slug(device) if args.record else None

    env = environment(device)
    log(f"device: {env['device']}, torch {env['torch']}, triton {env['triton']}, commit {env['git_commit']}")
    log(plan_text(suites, quick, device, [args.out] + ([record_to] if record_to else [])))
    start = time.perf_counter()
    ceilings_by_dtype, results = {}, []
    for suite in progress(suites, "suites", unit="suite", leave=True):
        dtype = suite.bench_dtype(device)
        if dtype not in ceilings_by_dtype:
            with long_step(f"measuring ceilings in {dtype}"):
                ceilings_by_dtype[dtype] = measure_ceilings(device, dtype)
        results.append(run_suite(suite, device, env, ceilings_by_dtype[dtype], quick=quick, out=args.out,
                                 load_limit=load_limit, record_to=record_to))

    for dtype, ceilings in ceilings_by_dtype.items():
        print(ceilings_text(ceilings, env, load_limit))
    print(f"env: torch {env['torch']}, triton {env['triton']}, flash-attn {env['flash_attn']}, "
          f"python {env['python']}, threads {env['cpu_threads']}, commit {env['git_commit']}, {env['date']}")
    print("\n\n".join(text for result in results for text in tables(result, env)))
    compiled = compile_report_step(device, quick, args)
    print()
    print(summary(results, device, env, args.out, load_limit, time.perf_counter() - start, args.record))
    if not all(result.passed for result in results) or not compiled:
        return EXIT_CHECK_FAILED
    if any(result.record_failed for result in results):
        return EXIT_NOT_RECORDED
    return 0


if __name__ == "__main__":
    sys.exit(main())
