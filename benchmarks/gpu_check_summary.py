"""The last screen of benchmarks/gpu_check.sh: per suite, ours against each peer (rates against the measured
ceilings), every target met or missed, the tests and the autotune sweep.

    python -m benchmarks.gpu_check_summary --bench DIR [--bench DIR] [--tests XML ...] [--autotune JSON] [--out FILE]

It reads what the steps wrote: the JSON files of `python -m benchmarks.report --out DIR`, pytest's junit XML and the
JSON of `python -m benchmarks.autotune_sweep`. The per-suite table is report.py's own summary; anything missing is
said, not guessed. (The script prints which steps passed after this screen.)
"""
import argparse
import importlib
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from .common import target_checks, verdict_text
from .report import SUITE_MODULES

LINES_PER_SUITE = 12  # the rest of a suite's rows are in its JSON
WIDTH = 150           # the screen must fit the device tool's 12,000-character output tail


def clip(text, width=WIDTH):
    return text if len(text) <= width else text[:width - 3] + "..."


def num(value):
    """A rate or a time, with as many digits as it deserves: 1234, 12.3, 0.123."""
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"


def pct(value):
    return "" if value is None else f" ({value:.0f}%)"


# ----------------------------------------------------------------------------------------------------------------
# Benchmark runs
# ----------------------------------------------------------------------------------------------------------------

def load_runs(folders):
    """{suite: payload} from report's JSON files in `folders`; a quick run wins over a full one of the same suite
    (the screen shows the quick sizes; the full run is what --record keeps)."""
    runs = {}
    for folder in folders:
        for path in sorted(Path(folder).glob("*.json")):
            payload = json.loads(path.read_text())
            if not isinstance(payload, dict) or payload.get("suite") not in SUITE_MODULES or "rows" not in payload:
                continue  # the autotune sweep, the standalone benchmarks' records (multihop, ...), anything else
            payload["path"] = str(path)
            payload.setdefault("correctness", [])  # older recorded runs lack these
            for row in payload["rows"]:
                row.setdefault("flagged", None)
            quick = payload.get("size") == "quick" or payload.get("quick") is True
            known = runs.get(payload["suite"])
            if known is None or (quick and known.get("size") != "quick"):
                runs[payload["suite"]] = payload
    return runs


def rate_text(row):
    """ours' rate against the ceiling it is held to: TFLOP/s (% of dense matmul), TOPS, GB/s (% of copy), tok/s."""
    if row.get("tflops") is not None:
        return f"{num(row['tflops'])} TFLOP/s{pct(row.get('pct_matmul_peak'))}"
    parts = []
    if row.get("rate") is not None:
        parts.append(f"{num(row['rate'])} {row.get('rate_unit', '')}{pct(row.get('pct_compute_peak'))}")
    if row.get("gbps") is not None:
        parts.append(f"{num(row['gbps'])} GB/s{pct(row.get('pct_bandwidth', row.get('pct_copy')))}")
    if row.get("tokens_per_s") is not None:
        parts.append(f"{num(row['tokens_per_s'])} tok/s")
    return ", ".join(parts) or "-"


def _groups(rows):
    """Rows that name a peer, by (case, mode or part)."""
    groups = {}
    for row in rows:
        if row.get("peer") is None:
            continue  # quality metrics and the like
        groups.setdefault((row.get("label"), row.get("mode") or row.get("part")), []).append(row)
    return groups


def _primaries(group):
    """The rows of ours that the peers are compared with: "ours", the ones named by a row's "vs", else every ours_*."""
    named = {row.get("vs") for row in group if row.get("vs")}
    if any(row["peer"] == "ours" for row in group):
        named.add("ours")
    return [row for row in group if row["peer"] in named or (not named and row["peer"].startswith("ours"))]


def peer_lines(payload):
    """One line per (case, mode) and ours: ms, rate, and each peer's "ours speedup" (peer ms / ours ms)."""
    lines, missing = [], {}
    for (label, mode), group in _groups(payload["rows"]).items():
        for row in group:
            if row.get("status", "ok") != "ok":
                missing.setdefault(row["peer"], f"{row['status']}: {str(row.get('reason'))[:40]}")
        for ours in _primaries(group):
            if ours.get("ms") is None:
                continue
            peers = [f"{row['peer']} {row['speedup_vs_peer']:.2f}x" for row in group
                     if row.get("speedup_vs_peer") is not None and (row.get("vs") or "ours") == ours["peer"]]
            name = "" if ours["peer"] == "ours" else f" {ours['peer']}"
            lines.append(clip(f"  {label} {mode or ''}{name}: {num(ours['ms'])} ms, {rate_text(ours)}"
                              + (f" | {', '.join(peers)}" if peers else "")))
    if len(lines) > LINES_PER_SUITE:
        lines = lines[:LINES_PER_SUITE] + [f"  ... {len(lines) - LINES_PER_SUITE} more in {payload['path']}"]
    if missing:
        lines.append(clip("  not measured: " + "; ".join(f"{peer} ({why})" for peer, why in missing.items())))
    return lines


def target_lines(runs):
    """Per suite and target: how many rows met it and which missed it."""
    lines = []
    for suite, payload in runs.items():
        by_name = {}
        for row in payload["rows"]:
            for check in target_checks(row.get("target")):
                if check.get("limit") is None:
                    continue
                name = f"{check.get('target') or check.get('ratio')} (limit {check['limit']})"
                where = " ".join(str(x) for x in (row.get("label"), row.get("mode"), row.get("peer")) if x)
                by_name.setdefault(name, []).append((verdict_text(check), where, check.get("value")))
        for name, checks in by_name.items():
            met = sum(v == "met" for v, _, _ in checks)
            missed = [(where, value) for v, where, value in checks if v == "MISSED"]
            other = len(checks) - met - len(missed)
            text = f"  {suite:15s} {name}: met {met}, MISSED {len(missed)}" + (f", other {other}" if other else "")
            if missed:
                text += " -- " + "; ".join(f"{where} {num(value)}" for where, value in missed[:2]) + \
                        (" ..." if len(missed) > 2 else "")
            lines.append(clip(text))
    return lines or ["  no targets with a limit in these runs"]


def suite_table(runs):
    """report.py's summary table over the runs (time, correctness, rows, flagged, targets), or why not."""
    try:
        import torch

        from . import report
    except ImportError as error:  # report imports every suite: the retrieval ones need bm25s and faiss
        return [f"(report's summary unavailable: {error})"]
    results = []
    for suite, payload in runs.items():
        module = importlib.import_module(f".{suite}", __package__)
        results.append(report.SuiteResult(module, payload.get("size") == "quick" or payload.get("quick") is True,
                                          payload["correctness"], payload["rows"], payload.get("duration_s") or 0.0))
    first = next(iter(runs.values()))
    env = first["env"]
    text = report.summary(results, torch.device(env.get("device_type", "cpu")), env, Path(first["path"]).parent,
                          first.get("load_limit") or report.DEFAULT_LOAD_LIMIT_PCT / 100,
                          sum(r.duration_s for r in results), False)
    return [clip(line) for line in text.splitlines() if not line.startswith("files:")] + ceiling_lines(runs)


def ceiling_lines(runs):
    """Each suite's measured ceilings on one line (report.ceilings_text, in each suite's log, says how)."""
    measured = [f"{suite} {num(c['matmul_tflops'])} / {num(c['copy_gbps'])} / {num(c.get('int8_tops'))}"
                for suite, c in ((s, p.get("ceilings")) for s, p in runs.items()) if c]
    return [clip("ceilings measured per suite (dense matmul TFLOP/s / copy GB/s / int8 TOPS): " + "; ".join(measured),
                 2 * WIDTH)] if measured else []


def bench_lines(folders):
    runs = load_runs(folders)
    if not runs:
        return ["benchmarks: no report JSON in " + ", ".join(str(f) for f in folders)]
    lines = ["benchmarks (ours speedup = peer ms / ours ms; % = of the suite's measured ceiling):"]
    for suite, payload in runs.items():
        rows = peer_lines(payload)
        if rows:
            lines.append(f"{suite} ({payload.get('size', 'quick' if payload.get('quick') else 'full')}):")
            lines += rows
    lines.append("targets:")
    lines += target_lines(runs)
    lines += suite_table(runs)
    return lines


# ----------------------------------------------------------------------------------------------------------------
# Tests, autotune, steps
# ----------------------------------------------------------------------------------------------------------------

TEST_STATUS = re.compile(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
TEST_NODE = re.compile(r"(tests/\S+::\S+)")


def log_counts(path):
    """{node id: status} from pytest -v output (with or without xdist): what ran before a time box stopped it."""
    status = {}
    for line in Path(path).read_text(errors="replace").splitlines():
        found, node = TEST_STATUS.search(line), TEST_NODE.search(line)
        if found and node:
            status[node[1]] = found[1]
    return status


def test_lines(paths):
    """Per junit XML: passed, failed, errors, skipped and the failing tests; without the XML (the step was stopped),
    the same from the pytest -v log beside it."""
    lines = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            log = path.with_suffix(".log")
            if not log.is_file():
                lines.append(f"  {path.stem}: no junit XML and no log")
                continue
            status = log_counts(log)
            counts = {s: sum(v == s for v in status.values()) for s in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
            lines.append(f"  {path.stem}: stopped before the end (no junit XML); from its log: {counts['PASSED']} "
                         f"passed, {counts['FAILED']} failed, {counts['ERROR']} errors, {counts['SKIPPED']} skipped")
            bad = [node for node, s in status.items() if s in ("FAILED", "ERROR")]
            lines += [f"    FAILED {name}" for name in bad[:8]]
            lines += [f"    ... {len(bad) - 8} more"] if len(bad) > 8 else []
            continue
        root = ET.parse(path).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        lines.append(f"  {Path(path).stem}: {passed} passed, {counts['failures']} failed, {counts['errors']} errors, "
                     f"{counts['skipped']} skipped in {float(suite.get('time', 0)):.0f} s")
        bad = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
               if case.find("failure") is not None or case.find("error") is not None]
        lines += [f"    FAILED {name}" for name in bad[:8]] + ([f"    ... {len(bad) - 8} more"] if len(bad) > 8 else [])
    return ["tests:"] + (lines or ["  none run"])


def autotune_lines(path):
    if path is None or not Path(path).is_file():
        return [f"autotune: no sweep JSON ({path})"]
    payload = json.loads(Path(path).read_text())
    if payload.get("dry_run"):
        tiny = payload.get("tiny", [])
        ok = sum(t["matches"] and t["reached_launcher"] for t in tiny)
        return [f"autotune (dry run): {len(payload['problems'])} problems planned; tiny patched runs {ok}/{len(tiny)} "
                "reached their launcher and matched the default config"]
    from .autotune_sweep import summary_lines
    return summary_lines(payload)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check_summary",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench", type=Path, action="append", default=[],
                        help="a folder of report JSON files (repeatable)")
    parser.add_argument("--tests", type=Path, nargs="*", default=[], help="pytest junit XML files")
    parser.add_argument("--autotune", type=Path, default=None, help="the autotune sweep's JSON")
    parser.add_argument("--out", type=Path, default=None, help="also write the screen to this file")
    return parser.parse_args(argv)


def section(title, make, *args):
    """The lines of one section; a section that breaks says so and leaves the others standing (this screen is the
    one chance to read a lease's results)."""
    try:
        return make(*args)
    except Exception as error:  # noqa: BLE001 (reported in place)
        return [f"{title}: could not be summarised ({type(error).__name__}: {error}); see the files it came from"]


def main(argv=None):
    args = parse_args(argv)
    lines = []
    if args.bench:
        lines += section("benchmarks", bench_lines, args.bench)
    if args.tests:
        lines += section("tests", test_lines, args.tests)
    if args.autotune:
        lines += section("autotune", autotune_lines, args.autotune)
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
