"""The HTTP server under load, on loopback: N requests from C concurrent clients against a real `hybridrag serve`
process (the offline SmolLM2-135M, a few pydoc topics, short answers).

Reports p50/p95/p99 latency and throughput per status, checks that no accepted request was lost or answered twice
(unique request ids; the server's queue counters: accepted == completed, nothing failed), and that the server's
memory is stable: its resident set (VmRSS, sampled every 0.25 s) at the end against after the first quarter of the
requests (after a warm-up that asks every question with every method, so the passage caches are full; the run
recorded at 7274ee4 warmed up on one question only). The machine's load from other processes (the server's own
CPU time excluded) is measured over the run; --record refuses above 15% and writes
benchmarks/results/<device>/server_load.json and .png.

    python -m benchmarks.server_load --quick        # 24 requests, 8 clients (~1 min on 2 cores)
    python -m benchmarks.server_load                # 200 requests, 16 clients (~4-6 min)
    python -m benchmarks.server_load --record
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from .common import (RUNS_ROOT, _busy_cpu_seconds, add_output_options, check_output_options, cpu_count, device_slug,
                     environment, format_table, record_result, write_json)

SUITE = "server_load"
MODES = {"quick": {"requests": 24, "clients": 8}, "full": {"requests": 200, "clients": 16}}
TOPICS = ["assert", "for", "while", "pass", "try", "with"]
QUESTIONS = ["What does an assert statement raise when its condition is false?", "How do I leave a loop early?",
             "What does the pass statement do?", "What runs in a finally clause?", "What does a with statement call?"]
CONFIG = {"encoder": "hashing-256", "retriever": {"top_k": 2}, "generation": {"max_new_tokens": 8}}
METHODS = ("base_rag", "hybrid")
LOAD_LIMIT = 0.15


def free_port():
    """A port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_healthy(process, url, seconds, log):
    """Wait for GET url/health to answer 200; RuntimeError naming `log` when `process` exits first or `seconds`
    pass (then it is killed)."""
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}; see {log}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    process.wait(timeout=60)
    raise RuntimeError(f"the server did not come up in {seconds} s; see {log}")


def _rss_mib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _process_cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def start_server(folder, capacity):
    """`python -m hybridrag serve` on a free port over the TOPICS -> (process, url)."""
    from pydoc_data.topics import topics

    docs = folder / "docs"
    docs.mkdir(parents=True)
    for name in TOPICS:
        (docs / f"{name}.txt").write_text(topics[name], encoding="utf-8")
    (folder / "config.json").write_text(json.dumps(CONFIG))
    port = free_port()
    log = open(folder / "server.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "hybridrag", "serve", "--kb", str(folder / "state"), "--docs",
                                str(docs), "--config", str(folder / "config.json"), "--port", str(port), "--queue",
                                str(capacity), "--timeout", "600"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(process, url, 300, folder / "server.log")
    return process, url


def run(mode, out, *, requests=None, clients=None, questions=None):
    """`questions`: ask only the first N of QUESTIONS (warm-up and load)."""
    import httpx

    settings = MODES[mode]
    requests, clients = requests or settings["requests"], clients or settings["clients"]
    asked = QUESTIONS[:questions] if questions else QUESTIONS
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        process, url = start_server(Path(scratch), capacity=clients)
        try:
            for question in asked:  # warm-up: every hybrid question once encodes all the passages' caches, so
                for method in METHODS:  # the memory the load sees is the server's steady state
                    httpx.post(url + "/query", json={"question": question, "method": method}, timeout=600)
            before = httpx.get(url + "/hybrid/stats").json()["queue"]
            records, memory = _load(url, process.pid, requests, clients, asked)
            after = httpx.get(url + "/hybrid/stats").json()["queue"]
        finally:
            process.terminate()
            process.wait(timeout=120)
    return _summary(mode, requests, clients, len(asked), records, memory, before, after, out)


def _load(url, pid, requests, clients, questions):
    """Fire `requests` (cycling through `questions` and METHODS) from `clients` threads; sample the server's memory
    meanwhile."""
    import httpx

    jobs = list(range(requests))
    lock = threading.Lock()
    records, memory, done = [], [], threading.Event()
    start = time.perf_counter()
    busy0, server0 = _busy_cpu_seconds(), _process_cpu_seconds(pid)
    own0 = time.process_time()

    def client():
        with httpx.Client(timeout=600) as session:
            while True:
                with lock:
                    if not jobs:
                        return
                    number = jobs.pop(0)
                body = {"question": questions[number % len(questions)], "method": METHODS[number % len(METHODS)]}
                sent = time.perf_counter()
                reply = session.post(url + "/query", json=body)
                record = {"n": number, "method": body["method"], "status": reply.status_code,
                          "sent_s": sent - start, "latency_s": time.perf_counter() - sent}
                if reply.status_code == 200:
                    record["request_id"] = reply.json()["request_id"]
                with lock:
                    records.append(record)

    def sample():
        while not done.is_set():
            memory.append({"t_s": time.perf_counter() - start, "rss_mib": _rss_mib(pid), "finished": len(records)})
            done.wait(0.25)

    sampler = threading.Thread(target=sample)
    sampler.start()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    sampler.join()
    wall = time.perf_counter() - start
    busy = _busy_cpu_seconds() - busy0
    server = _process_cpu_seconds(pid) - server0
    other = max(busy - server - (time.process_time() - own0), 0.0) / (wall * cpu_count())
    return {"records": sorted(records, key=lambda r: r["n"]), "wall_s": wall, "other_load": min(other, 1.0)}, memory


def _percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))] if ordered else None


def _summary(mode, requests, clients, questions, load, memory, before, after, out):
    records = load["records"]
    statuses = sorted({r["status"] for r in records})
    rows = []
    for method in (*METHODS, "all"):
        picked = [r for r in records if r["status"] == 200 and method in (r["method"], "all")]
        latencies = [r["latency_s"] for r in picked]
        rows.append({"method": method, "answered": len(picked), "p50_s": _percentile(latencies, 50),
                     "p95_s": _percentile(latencies, 95), "p99_s": _percentile(latencies, 99),
                     "mean_s": statistics.fmean(latencies) if latencies else None})
    ids = [r["request_id"] for r in records if r["status"] == 200]
    delta = {name: after[name] - before[name] for name in ("accepted", "completed", "failed", "cancelled",
                                                          "timed_out", "rejected")}
    quarter = next((m["rss_mib"] for m in memory if m["finished"] >= requests // 4), memory[0]["rss_mib"])
    checks = {
        "every request answered": len(ids) == requests,
        "no request id twice": len(set(ids)) == len(ids),
        "accepted == completed == answered": delta["accepted"] == delta["completed"] == len(ids),
        "nothing failed, cancelled or timed out": delta["failed"] == delta["cancelled"] == delta["timed_out"] == 0,
        "memory stable (end <= 1.1 x after the first quarter)": memory[-1]["rss_mib"] <= 1.1 * quarter,
    }
    result = {"suite": SUITE, "size": mode, "requests": requests, "clients": clients, "questions": questions,
              "config": CONFIG,
              "statuses": {str(s): sum(r["status"] == s for r in records) for s in statuses},
              "throughput_rps": len(ids) / load["wall_s"], "wall_s": load["wall_s"], "rows": rows,
              "queue_delta": delta, "checks": checks,
              "memory": {"start_mib": memory[0]["rss_mib"], "after_quarter_mib": quarter,
                         "peak_mib": max(m["rss_mib"] for m in memory), "end_mib": memory[-1]["rss_mib"]},
              "other_load": load["other_load"], "environment": environment(torch.device("cpu")),
              "records": records, "memory_samples": memory}
    write_json(out / "results.json", result)
    result["png"] = _plot(result, out / f"{SUITE}.png")
    return result


def _plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, (latency, memory) = plt.subplots(1, 2, figsize=(11, 4))
    for method, marker in zip(METHODS, "os"):
        points = [r for r in result["records"] if r["method"] == method and r["status"] == 200]
        latency.scatter([r["sent_s"] for r in points], [r["latency_s"] for r in points], s=12, marker=marker,
                        label=method)
    latency.set(xlabel="sent at (s)", ylabel="latency (s)",
                title=f"{result['requests']} requests, {result['clients']} clients: "
                      f"{result['throughput_rps']:.2f} answers/s")
    latency.legend()
    samples = result["memory_samples"]
    memory.plot([m["t_s"] for m in samples], [m["rss_mib"] for m in samples])
    memory.set(xlabel="time (s)", ylabel="server resident set (MiB)", title="server memory")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


COLUMNS = [("method", lambda r: r["method"]), ("answered", lambda r: str(r["answered"])),
           ("p50", lambda r: f"{r['p50_s']:.2f} s" if r["p50_s"] is not None else "-"),
           ("p95", lambda r: f"{r['p95_s']:.2f} s" if r["p95_s"] is not None else "-"),
           ("p99", lambda r: f"{r['p99_s']:.2f} s" if r["p99_s"] is not None else "-")]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.server_load", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="24 requests from 8 clients (full: 200 from 16)")
    parser.add_argument("--requests", type=int, help="override the request count")
    parser.add_argument("--clients", type=int, help="override the concurrent clients")
    parser.add_argument("--questions", type=int, help=f"ask only the first N of the {len(QUESTIONS)} questions")
    add_output_options(parser, SUITE, record_needs='full size, a clean checkout, an idle machine')
    args = parser.parse_args(argv)
    for name in ("requests", "clients", "questions"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.record and (args.requests or args.clients or args.questions):
        parser.error("--record records the full size: drop --requests, --clients and --questions")
    out = args.out or RUNS_ROOT / device_slug(torch.device("cpu")) / SUITE
    check_output_options(parser, out, record=args.record, quick=args.quick)
    result = run("quick" if args.quick else "full", out, requests=args.requests, clients=args.clients,
                 questions=args.questions)
    print(format_table(f"{SUITE}: {result['requests']} requests from {result['clients']} clients, statuses "
                       f"{result['statuses']}, {result['throughput_rps']:.2f} answers/s over {result['wall_s']:.0f} s",
                       result["rows"], COLUMNS))
    memory = result["memory"]
    print(f"server memory: start {memory['start_mib']:.0f} MiB, after a quarter {memory['after_quarter_mib']:.0f}, "
          f"peak {memory['peak_mib']:.0f}, end {memory['end_mib']:.0f}; other load {result['other_load']:.0%}")
    for check, passed in result["checks"].items():
        print(f"  {'ok  ' if passed else 'FAIL'} {check}")
    failed = not all(result["checks"].values())
    if args.record:
        if result["other_load"] > LOAD_LIMIT:
            print(f"not recorded: other processes used {result['other_load']:.0%} of the CPU (limit "
                  f"{LOAD_LIMIT:.0%})")
            return 1
        record_result(SUITE, result)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
