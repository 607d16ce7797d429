"""Run every registered kernel suite: correctness check, then benchmark; write JSON + PNG, print the tables.

    python -m benchmarks.report            # full run, results in benchmarks/results/<device>/<suite>.json/.png
    python -m benchmarks.report --quick    # smaller, fast run, results in <suite>-quick.json/.png

Exit status 1 when a correctness check failed.

A suite is a module with SUITE, bench_dtype(device), check(device), CHECK_COLUMNS, benchmark(device, quick,
ceilings=, log=), BENCH_COLUMNS and plot(rows, ceilings, env, path). Register one by adding its name to SUITE_MODULES.
"""
import argparse
import importlib
import sys

from .common import (default_device, device_slug, environment, format_table, measure_ceilings, results_dir,
                     write_json)

# register a suite by adding its module name under benchmarks/
SUITE_MODULES = ("sliding_window", "hybrid", "int8_matmul", "streaming", "retrieval_quality", "retrieval_speed")
SUITES = [importlib.import_module(f".{name}", __package__) for name in SUITE_MODULES]
OTHER_LOAD_WARNING = 0.10


def log(message):
    print(message, file=sys.stderr, flush=True)


def run_suite(suite, device, env, ceilings, quick):
    """Check, benchmark, write files. Returns (tables, passed)."""
    log(f"[{suite.SUITE}] correctness check")
    checks = suite.check(device)
    passed = all(row["passed"] for row in checks)
    log(f"[{suite.SUITE}] benchmark")
    rows = suite.benchmark(device, quick=quick, ceilings=ceilings, log=log)
    folder = results_dir(device_slug(device))
    name = suite.SUITE + ("-quick" if quick else "")
    payload = {"suite": suite.SUITE, "quick": quick, "env": env, "ceilings": ceilings,
               "correctness": checks, "rows": rows}
    json_path = write_json(folder / f"{name}.json", payload)
    png_path = suite.plot(rows, ceilings, env, folder / f"{name}.png")
    busiest = max((row.get("other_load") or 0.0 for row in rows), default=0.0)
    tables = [
        format_table(f"{suite.SUITE}: correctness ({'pass' if passed else 'FAIL'})", checks, suite.CHECK_COLUMNS),
        format_table(f"{suite.SUITE}: benchmark on {env['device']} (ours speedup = peer ms / ours ms)",
                     rows, suite.BENCH_COLUMNS),
        f"wrote {json_path}\nwrote {png_path}",
    ]
    if busiest > OTHER_LOAD_WARNING:
        tables.insert(2, f"WARNING: other processes used up to {busiest:.0%} of the CPU while {suite.SUITE} was "
                         "timed (rows' other_load); those timings are skewed, rerun on an idle machine")
    return tables, passed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, smaller cases")
    parser.add_argument("--suite", choices=[s.SUITE for s in SUITES], action="append",
                        help="run only this suite (repeatable); default all")
    args = parser.parse_args(argv)

    device = default_device()
    env = environment(device)
    log(f"device: {env['device']}, torch {env['torch']}, triton {env['triton']}, commit {env['git_commit']}")
    ceilings_by_dtype = {}
    tables, all_passed = [], True
    for suite in SUITES:
        if args.suite and suite.SUITE not in args.suite:
            continue
        dtype = suite.bench_dtype(device)
        if dtype not in ceilings_by_dtype:
            log(f"measuring ceilings in {dtype}")
            ceilings_by_dtype[dtype] = measure_ceilings(device, dtype)
        suite_tables, passed = run_suite(suite, device, env, ceilings_by_dtype[dtype], args.quick)
        tables += suite_tables
        all_passed &= passed

    for dtype, ceilings in ceilings_by_dtype.items():
        int8 = "" if ceilings.get("int8_tops") is None else \
            f"; int8 matmul {ceilings['int8_tops']:.1f} TOPS [{ceilings['int8']}]"
        print(f"ceilings ({env['device']}): dense matmul {ceilings['matmul_tflops']:.2f} TFLOP/s "
              f"[{ceilings['matmul']}]; copy {ceilings['copy_gbps']:.1f} GB/s [{ceilings['copy']}]{int8}")
    print(f"env: torch {env['torch']}, triton {env['triton']}, flash-attn {env['flash_attn']}, "
          f"python {env['python']}, threads {env['cpu_threads']}, commit {env['git_commit']}, {env['date']}")
    print("\n\n".join(tables))
    return 0 if all_passed else 1


if __name__ == "__main__":
    sys.exit(main())
