#!/usr/bin/env python3
"""The benchmark: model-service against the Python peer (bench/peer/app.py) on the same models,
the same Redis and the same workload, and against this machine's roofline (bench/roofline.py).

For each scale (the shipped Amazon-Book models; the synthetic 1M-item models from
bench/make_synthetic.py) it loads the profiles into a redis-server of its own, then for each
service starts it, warms it up and drives POST /recommend/<user_id> with wrk over the distinct
users at each concurrency, recording req/s, latency percentiles, the status of every answer, and
the CPU seconds the service's processes used per request. It prints one table per scale with the
our/peer ratios and the roofline, and writes the results (JSON) and a latency-throughput plot.

Run it through scripts/bench.sh, which installs wrk and the peer's packages and builds the binary.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import re
import time
import urllib.error
import urllib.request

import numpy as np
import redis
import roofline  # bench/roofline.py (run as a script, this file's directory is on the path)
from model_service_py import data as ds
from model_service_py import load_profiles
from model_service_py.evaluate import start_redis

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(rport: int, port: int, model_dir: str) -> dict:
    """model-service's environment against the redis-server on `rport`, answering on `port`, serving
    `model_dir` with the candidate counts it was trained for (a previous model_output/ its own)."""
    c1, c2 = roofline.candidates(model_dir)
    return {"REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(rport), "MODEL_DIR": model_dir, "HOST": "127.0.0.1",
            "PORT": str(port), "RUST_LOG": "warn", "LIGHTGCN_CANDIDATES": str(c1), "DIN_CANDIDATES": str(c2)}


def tree_cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of pid and its live descendants (uvicorn's workers)."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry)] = fields
        children.setdefault(int(fields[1]), []).append(int(entry))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        if p in stats:
            total += (int(stats[p][11]) + int(stats[p][12])) / CLK_TCK
        todo.extend(children.get(p, []))
    return total


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: the service exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url}: not healthy after {timeout}s")


SERIES = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
# model-service's per-request stages (stage_duration_seconds), in the order a request meets them
REQUEST_STAGES = ("redis_read", "lightgcn", "din", "ranknet", "redis_write")


def scrape(port: int) -> list[tuple[str, dict, float]] | None:
    """model-service's /metrics as (name, labels, value) samples; None for a service without them
    (the peer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
    except (urllib.error.HTTPError, OSError):
        return None
    samples = []
    for line in text.splitlines():
        m = SERIES.match(line)
        if m and not line.startswith("#"):
            samples.append((m.group(1), dict(LABEL.findall(m.group(2) or "")), float(m.group(3))))
    return samples


def server_side(before: list | None, after: list | None) -> dict | None:
    """What the server's own metrics say about the requests between two scrapes: mean time per
    request in HTTP (the handler, end to end), in the inference queue and in each stage; the mean
    batch; the inference workers' CPU time per recommendation; jobs abandoned by their callers."""
    if before is None or after is None:
        return None

    def delta(name: str, **labels) -> float:
        def total(samples):
            return sum(v for n, l, v in samples if n == name and all(l.get(k) == w for k, w in labels.items()))
        return total(after) - total(before)

    def mean_ms(base: str, **labels) -> float:
        return delta(base + "_sum", **labels) / max(delta(base + "_count", **labels), 1) * 1e3

    recs = delta("model_service_inference_batch_size_sum")
    return {
        "http_ms": mean_ms("model_service_http_request_duration_seconds", route="/recommend/{user_id}"),
        "queue_wait_ms": mean_ms("model_service_inference_queue_wait_seconds"),
        "stages_ms": {s: mean_ms("model_service_stage_duration_seconds", stage=s) for s in REQUEST_STAGES},
        "mean_batch": recs / max(delta("model_service_inference_batch_size_count"), 1),
        "inference_cpu_ms_per_rec": delta("model_service_inference_cpu_seconds_total") / max(recs, 1) * 1e3,
        "abandoned": delta("model_service_inference_abandoned_total"),
    }


class PerfStat:
    """`perf stat -e task-clock -p PID` over a stretch of time: the CPU time of that process's
    threads only (not wrk's, nor Redis's). Without perf, /proc's count of the same process."""

    def __init__(self, pid: int):
        self.pid = pid
        self.proc = None
        if shutil.which("perf"):
            self.proc = subprocess.Popen(["perf", "stat", "-e", "task-clock", "-x", ",", "-p", str(pid)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.cpu0 = tree_cpu_seconds(pid)

    def stop(self) -> tuple[float, str]:
        """(CPU seconds, which tool counted them)."""
        procfs = tree_cpu_seconds(self.pid) - self.cpu0
        if self.proc is None:
            return procfs, "procfs"
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=30)
        for line in err.splitlines():
            fields = line.split(",")
            if len(fields) > 2 and fields[2].startswith("task-clock"):
                try:
                    return float(fields[0]) / 1e3, "perf"
                except ValueError:
                    break
        return procfs, "procfs"


def run_wrk(port: int, users_file: str, connections: int, seconds: int) -> dict:
    threads = max(1, min(2, connections))
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s",
           "-s", os.path.join(HERE, "users.lua"), f"http://127.0.0.1:{port}"]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "USERS_FILE": users_file})
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise SystemExit(f"wrk printed no result: {out.stdout}\n{out.stderr}")


class Service:
    def __init__(self, name: str, cmd: list[str], env: dict, port: int, log: str):
        self.name, self.port = name, port
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=ROOT, start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def measure_round(name: str, rnd: int, binary: str, env: dict, work: str, users_file: str,
                  concurrencies: list[int], seconds: int) -> list[dict]:
    """One round of one variant: `binary serve` with env started on a free port, measured, stopped."""
    return measure_service(name, [binary, "serve"], env, os.path.join(work, f"{name}-{rnd + 1}.log"), users_file,
                           concurrencies, seconds, label=f"{name}, round {rnd + 1}")


def measure_service(name: str, cmd: list[str], env: dict, log: str, users_file: str, concurrencies: list[int],
                    seconds: int, label: str | None = None) -> list[dict]:
    """One plan entry (model-service or the peer, which takes its port as an argument) started on a
    free port, measured and stopped; `label` names it in the printed rows (default `name`)."""
    port = free_port()
    env = {**env, "PORT": str(port)}
    if name.startswith("python-peer"):
        cmd = cmd + ["--port", str(port)]
    svc = Service(label or name, cmd, env, port, log)
    try:
        return measure(svc, users_file, concurrencies, seconds)
    finally:
        svc.stop()


def measure(svc: Service, users_file: str, concurrencies: list[int], seconds: int) -> list[dict]:
    wait_healthy(f"http://127.0.0.1:{svc.port}/health", svc.proc)
    run_wrk(svc.port, users_file, 8, 3)  # warm-up
    rows = []
    for c in concurrencies:
        cpu0 = tree_cpu_seconds(svc.proc.pid)
        before = scrape(svc.port)
        perf = PerfStat(svc.proc.pid) if before is not None else None
        r = run_wrk(svc.port, users_file, c, seconds)
        cpu = tree_cpu_seconds(svc.proc.pid) - cpu0
        own = perf.stop() if perf else None
        n = max(r["requests"], 1)
        ok = r["status"].get("200", 0)
        rows.append({
            "service": svc.name, "concurrency": c, "requests": r["requests"],
            "rps": r["requests"] / (r["duration_us"] / 1e6), "ok_rps": ok / (r["duration_us"] / 1e6),
            "p50_ms": r["p50_us"] / 1e3, "p95_ms": r["p95_us"] / 1e3, "p99_ms": r["p99_us"] / 1e3,
            "mean_ms": r["mean_us"] / 1e3,
            "cpu_ms_per_request": cpu / n * 1e3, "status": r["status"], "socket_errors": r["errors"],
        })
        if own:
            rows[-1]["server_cpu_ms_per_request"] = own[0] / n * 1e3
            rows[-1]["server_cpu_counted_by"] = own[1]
            rows[-1]["server"] = server_side(before, scrape(svc.port))
        print(f"  {svc.name:24s} c={c:<4d} {rows[-1]['rps']:8.1f} req/s  p50 {rows[-1]['p50_ms']:8.1f} ms  "
              f"p99 {rows[-1]['p99_ms']:8.1f} ms  status {r['status']}", flush=True)
    return rows


def load_amazon(r: redis.Redis, data_dir: str, work: str) -> tuple[str, np.ndarray]:
    d = ds.load(data_dir)
    load_profiles.write_profiles(r, d, range(d.num_users))
    order = np.random.default_rng(0).permutation(d.num_users)
    users_file = os.path.join(work, "users-amazon-book.txt")
    with open(users_file, "w") as f:
        f.write("\n".join(d.users[u] for u in order) + "\n")
    return users_file, np.array([len(set(h)) for h in d.train])


def load_synthetic(r: redis.Redis, model_dir: str, work: str) -> tuple[str, np.ndarray]:
    ids, lengths = [], []
    pipe = r.pipeline(transaction=False)
    with open(os.path.join(model_dir, "profiles.jsonl")) as f:
        for n, line in enumerate(f):
            p = json.loads(line)
            pipe.set(f"user_profile:{p['user_id']}", json.dumps(p["items"]))
            ids.append(p["user_id"])
            lengths.append(len(set(p["items"])))
            if n % 5000 == 4999:
                pipe.execute()
    pipe.execute()
    users_file = os.path.join(work, "users-synthetic.txt")
    with open(users_file, "w") as f:
        f.write("\n".join(ids) + "\n")
    return users_file, np.array(lengths)


def mean_rows(rows: list[dict]) -> dict:
    """One row standing for several rounds of the same service and concurrency: the mean of every
    number (nested ones too), answers and socket errors summed."""
    def mean(values: list):
        if isinstance(values[0], dict):
            return {k: mean([v[k] for v in values if k in v]) for k in values[0]}
        if isinstance(values[0], (int, float)) and not isinstance(values[0], bool):
            return float(np.mean(values))
        return values[0]
    out = mean(rows)
    for counts in ("status", "socket_errors"):
        keys = {k for r in rows for k in r[counts]}
        out[counts] = {k: sum(r[counts].get(k, 0) for r in rows) for k in keys}
    out["rounds"] = len(rows)
    return out


def goal_rounds(args, plan: list[tuple], users_file: str) -> list[dict]:
    """The services the goals compare (plan: name, command, env), at concurrency 1 and 32, in
    `--goal-rounds` rounds, each starting one service later than the one before (A B C, B C A, ...),
    so that a change in the machine's speed during the run falls on every service alike; one row
    per service and concurrency with the means of its rounds."""
    rows: dict[tuple[str, int], list[dict]] = collections.defaultdict(list)
    print(f"\n--- the goals' services, {args.goal_rounds} alternating rounds at concurrency 1 and 32", flush=True)
    for rnd in range(args.goal_rounds):
        start = rnd % len(plan)
        for name, cmd, env in plan[start:] + plan[:start]:
            log = os.path.join(args.work, f"goals-{name.replace(' ', '_')}-{rnd + 1}.log")
            for row in measure_service(name, cmd, env, log, users_file, [1, 32], args.seconds,
                                       label=f"{name}, round {rnd + 1}"):
                rows[(name, row["concurrency"])].append({**row, "service": name})
    return [mean_rows(rs) for rs in rows.values()]


def print_table(scale: str, rows: list[dict], roof: dict, n_items: int, goal_rows: list[dict] | None = None) -> dict:
    print(f"\n=== {scale} ({n_items:,} items)")
    print(f"{'service':24s} {'conc':>4s} {'req/s':>9s} {'p50 ms':>8s} {'p95 ms':>8s} {'p99 ms':>8s} "
          f"{'CPU ms/req':>10s}  non-200 answers / socket errors")
    for r in rows:
        bad = {s: n for s, n in r["status"].items() if s != "200"}
        errs = {k: v for k, v in r["socket_errors"].items() if v}
        print(f"{r['service']:24s} {r['concurrency']:4d} {r['rps']:9.1f} {r['p50_ms']:8.1f} {r['p95_ms']:8.1f} "
              f"{r['p99_ms']:8.1f} {r['cpu_ms_per_request']:10.2f}  {bad or '-'} / {errs or '-'}")
    ours = {r["concurrency"]: r for r in rows if r["service"] == "model-service"}
    peer = {r["concurrency"]: r for r in rows if r["service"] == "python-peer"}
    summary = {"ratios": {}}
    print("\nmodel-service / python-peer:")
    for c in sorted(set(ours) & set(peer)):
        o, p = ours[c], peer[c]
        ratio = o["ok_rps"] / max(p["ok_rps"], 1e-9)
        summary["ratios"][c] = {"rps": ratio, "our_p99_ms": o["p99_ms"], "peer_p50_ms": p["p50_ms"],
                                "cpu": p["cpu_ms_per_request"] / max(o["cpu_ms_per_request"], 1e-9)}
        print(f"  c={c:<4d} req/s x{ratio:5.2f}   our p99 {o['p99_ms']:7.1f} ms vs peer p50 {p['p50_ms']:7.1f} ms"
              f"   peer CPU per request x{summary['ratios'][c]['cpu']:5.2f} ours")
    best = max(ours.values(), key=lambda r: r["ok_rps"]) if ours else None
    summary["goals"] = print_goals(goal_rows or rows, roof)
    print(f"\nroofline ({roof['batch']} per batch, mean history {roof['mean_history']:.1f}):")
    for stage, v in roof["stages"].items():
        print(f"  {stage:9s} {v['mflops']:9.2f} MFLOP {v['mbytes']:9.3f} MB  {v['us']:9.1f} us at the ceiling "
              f"({v['bound']}-bound)")
    print(f"  ceiling {roof['ceiling_rps']:.0f} recommendations/s", end="")
    if best:
        frac = best["ok_rps"] / roof["ceiling_rps"]
        summary["fraction_of_ceiling"] = frac
        print(f"; model-service's best {best['ok_rps']:.0f}/s (c={best['concurrency']}) is {frac:.1%} of it")
    approximate = {r["concurrency"]: r for r in rows if r["service"] == "model-service ivf"}
    for c in sorted(set(approximate) & set(ours)):
        a, o = approximate[c], ours[c]
        summary.setdefault("ivf_vs_exact", {})[c] = {"rps": a["ok_rps"] / max(o["ok_rps"], 1e-9), "p50_ms": a["p50_ms"]}
        print(f"  CANDIDATE_SEARCH=ivf c={c:<4d} req/s x{a['ok_rps'] / max(o['ok_rps'], 1e-9):5.2f} exact's, "
              f"p50 {a['p50_ms']:.1f} vs {o['p50_ms']:.1f} ms")
    unbatched = [r for r in rows if r["service"] == "model-service MAX_BATCH=1"]
    if unbatched and best:
        u = max(unbatched, key=lambda r: r["ok_rps"])
        summary["items_scored_per_s"] = {"batched": best["ok_rps"] * n_items, "unbatched": u["ok_rps"] * n_items}
        print(f"  items scored by LightGCN: {best['ok_rps'] * n_items / 1e6:,.0f} M/s batched vs "
              f"{u['ok_rps'] * n_items / 1e6:,.0f} M/s with MAX_BATCH=1 (x{best['ok_rps'] / u['ok_rps']:.1f})")
    return summary


def print_goals(rows: list[dict], roof: dict) -> dict:
    """The performance issue's measures, from this run only: our c=1 p50 against the peer's, req/s
    at c=32 against the peer's, our p99 against the peer's p50, answers other than 200/429/503,
    the server's own CPU per recommendation at c=32 (perf) beside the references run here, the
    inference workers' CPU per recommendation against the roofline of the models' FLOPs (on one
    core, as each worker runs on one), and where a lone request's time goes."""
    at = {(r["service"], r["concurrency"]): r for r in rows}
    goals: dict = {}
    ours1, peer1 = at.get(("model-service", 1)), at.get(("python-peer", 1))
    ours32, peer32 = at.get(("model-service", 32)), at.get(("python-peer", 32))
    rounds = max((r.get("rounds", 1) for r in rows), default=1)
    print(f"\nthe performance goals, this run ({'means of ' + str(rounds) + ' alternating rounds' if rounds > 1 else 'the table'}):")
    if ours1 and peer1:
        goals["c1_p50_ratio"] = ours1["p50_ms"] / peer1["p50_ms"]
        print(f"  c=1  p50 {ours1['p50_ms']:.2f} ms vs the peer's {peer1['p50_ms']:.2f} ms: "
              f"x{goals['c1_p50_ratio']:.3f} (goal <= 0.45)")
    if ours32 and peer32:
        goals["c32_rps_ratio"] = ours32["ok_rps"] / max(peer32["ok_rps"], 1e-9)
        print(f"  c=32 {ours32['ok_rps']:.0f} req/s vs the peer's {peer32['ok_rps']:.0f}: x{goals['c32_rps_ratio']:.2f} "
              f"(goal >= 5); our p99 {ours32['p99_ms']:.1f} ms vs the peer's p50 {peer32['p50_ms']:.1f} ms")
    failed = {r["service"] + f" c={r['concurrency']}": sum(v for k, v in r["status"].items() if k not in ("200", "429", "503"))
              + sum(r["socket_errors"].values()) for r in rows if r["service"].startswith("model-service")}
    goals["failed"] = sum(failed.values())
    print(f"  answers other than 200, 429, 503 (and socket errors), model-service: {goals['failed']}")
    roof_core_us = sum(v["us"] for v in roof["stages"].values()) * roof.get("threads", 1)
    for r in rows:
        if r["concurrency"] != 32 or "server_cpu_ms_per_request" not in r:
            continue
        srv = r.get("server") or {}
        inf = srv.get("inference_cpu_ms_per_rec", 0.0)
        frac = roof_core_us / (inf * 1e3) if inf else 0.0
        goals.setdefault("c32", {})[r["service"]] = {"server_cpu_ms": r["server_cpu_ms_per_request"],
                                                     "inference_cpu_ms": inf, "roofline_fraction": frac}
        print(f"  c=32 {r['service']:38s} server CPU {r['server_cpu_ms_per_request']:.3f} ms/rec "
              f"({r['server_cpu_counted_by']}), inference {inf:.3f} ms/rec = {frac:.1%} of the roofline's "
              f"{roof_core_us:.1f} us on one core (goal >= 30%), mean batch {srv.get('mean_batch', 0):.1f}")
    if ours1 and ours1.get("server"):
        srv = ours1["server"]
        st = srv["stages_ms"]
        parts = [("Redis read", st["redis_read"]), ("queue", srv["queue_wait_ms"]), ("LightGCN", st["lightgcn"]),
                 ("DIN", st["din"]), ("RankNet", st["ranknet"]), ("Redis write", st["redis_write"])]
        rest = srv["http_ms"] - sum(v for _, v in parts)
        goals["c1_breakdown_ms"] = {**dict(parts), "rest of the handler": rest, "server": srv["http_ms"],
                                    "client mean": ours1["mean_ms"]}
        print(f"  c=1 where a request's time goes (means, ms): client {ours1['mean_ms']:.3f} = outside the server "
              f"{ours1['mean_ms'] - srv['http_ms']:.3f} (network, wrk) + server {srv['http_ms']:.3f}: "
              + ", ".join(f"{name} {v:.3f}" for name, v in parts) + f", the rest of the handler {rest:.3f}")
    return goals


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = list(results["scales"])
    fig, axes = plt.subplots(1, len(scales), figsize=(6.5 * len(scales), 4.8), squeeze=False)
    for ax, scale in zip(axes[0], scales):
        rows = results["scales"][scale]["rows"]
        for name, color in (("model-service", "tab:orange"), ("python-peer", "tab:blue"),
                            ("model-service MAX_BATCH=1", "tab:gray")):
            pts = sorted((r for r in rows if r["service"] == name), key=lambda r: r["concurrency"])
            if not pts:
                continue
            x = [r["ok_rps"] for r in pts]
            ax.plot(x, [r["p50_ms"] for r in pts], "o-", color=color, label=f"{name} p50")
            ax.plot(x, [r["p99_ms"] for r in pts], "s--", color=color, alpha=0.7, label=f"{name} p99")
            for r in pts:
                ax.annotate(f"c={r['concurrency']}", (r["ok_rps"], r["p50_ms"]), fontsize=7,
                            textcoords="offset points", xytext=(4, -10))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("throughput (successful requests/s)")
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"{scale}: {results['scales'][scale]['items']:,} items")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"POST /recommend, wrk at concurrency {results['concurrency']}, {results['cpus']} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def bad_answers(row: dict) -> int:
    return sum(v for k, v in row["status"].items() if k != "200") + sum(row["socket_errors"].values())


def side_by_side(args, rport: int, users_file: str, conc: list[int]) -> dict:
    """model-service (same binary) on the previous and the new model directory, in alternating
    rounds (previous, new, previous, new, ...), so that a change in the machine's load during the
    run falls on both; per concurrency the req/s of all rounds together and the worst round's p99."""
    rows: dict[str, list[dict]] = {"previous": [], "new": []}
    for rnd in range(args.rounds):
        for label, model_dir in (("previous", args.previous_dir), ("new", args.model_dir)):
            port = free_port()
            env = server_env(rport, port, model_dir)
            name = f"model-service {label} models, round {rnd + 1}"
            svc = Service(name, [args.bin, "serve"], env, port,
                          os.path.join(args.work, f"side-by-side-{label}-{rnd + 1}.log"))
            try:
                rows[label] += measure(svc, users_file, conc, args.seconds)
            finally:
                svc.stop()
    out = {"rounds": args.rounds, "rows": rows, "by_concurrency": {}}
    print(f"\nmodel-service, new models / previous models (same binary, {args.rounds} alternating rounds):")
    for c in conc:
        agg = {}
        for label in ("previous", "new"):
            rs = [r for r in rows[label] if r["concurrency"] == c]
            ok = sum(r["status"].get("200", 0) for r in rs)
            secs = sum(r["requests"] / max(r["rps"], 1e-9) for r in rs)
            agg[label] = {"ok_rps": ok / max(secs, 1e-9), "p99_ms": max(r["p99_ms"] for r in rs),
                          "cpu_ms_per_request": sum(r["cpu_ms_per_request"] * r["requests"] for r in rs)
                          / max(sum(r["requests"] for r in rs), 1),
                          "errors": sum(bad_answers(r) for r in rs)}
        p, n = agg["previous"], agg["new"]
        out["by_concurrency"][c] = {"rps_ratio": n["ok_rps"] / max(p["ok_rps"], 1e-9), "previous": p, "new": n}
        print(f"  c={c:<4d} req/s {p['ok_rps']:8.1f} -> {n['ok_rps']:8.1f} (x{n['ok_rps'] / max(p['ok_rps'], 1e-9):.2f})   "
              f"worst p99 {p['p99_ms']:7.1f} -> {n['p99_ms']:7.1f} ms   CPU ms/req {p['cpu_ms_per_request']:.2f} -> "
              f"{n['cpu_ms_per_request']:.2f}   errors {p['errors']} -> {n['errors']}")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="Amazon-Book directory")
    p.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "model-service"))
    p.add_argument("--model-dir", default=os.path.join(ROOT, "model_output"))
    p.add_argument("--synthetic-dir", help="output of make_synthetic.py (omit to skip the 1M-item scale)")
    p.add_argument("--previous-dir", help="a previous Amazon-Book model directory, measured side by side with --model-dir "
                   "by the same binary (each with its own candidate counts, roofline.candidates)")
    p.add_argument("--baseline-bin", help="another model-service binary (say, built from an earlier commit), measured "
                   "at concurrency 1 and 32 in the same run for the CPU-per-recommendation comparison")
    p.add_argument("--rounds", type=int, default=3,
                   help="alternating rounds of the previous and the new models with --previous-dir")
    p.add_argument("--goal-rounds", type=int, default=3,
                   help="alternating rounds of model-service, the peer (and --baseline-bin) at concurrency 1 and 32 "
                        "after the Amazon-Book table, from whose means the performance goals are computed (0: from "
                        "the table's single pass)")
    p.add_argument("--concurrency", default="1,8,32,128")
    p.add_argument("--seconds", type=int, default=15, help="per concurrency level")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--work", default="/tmp/model-service-bench")
    args = p.parse_args()
    conc = [int(c) for c in args.concurrency.split(",")]
    cpus = os.cpu_count()
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    py = sys.executable
    uvicorn = os.path.join(os.path.dirname(py), "uvicorn")

    print(f"measuring this machine ({cpus} cores) ...", flush=True)
    gemm, bw = roofline.measure_gemm(cpus), roofline.measure_bandwidth(cpus)
    print(f"libtorch GEMM {gemm / 1e9:.1f} GFLOP/s, memory bandwidth {bw / 1e9:.1f} GB/s", flush=True)

    redis_proc, r, rport = start_redis(args.work)
    results = {"cpus": cpus, "concurrency": conc, "seconds": args.seconds, "gemm_flops": gemm,
               "bandwidth_bytes": bw, "scales": {}}
    try:
        scales = [("amazon-book", args.model_dir, lambda: load_amazon(r, args.data, args.work))]
        if args.synthetic_dir:
            scales.append(("synthetic-1M", args.synthetic_dir, lambda: load_synthetic(r, args.synthetic_dir, args.work)))
        for scale, model_dir, loader in scales:
            print(f"\n--- {scale}: loading profiles", flush=True)
            users_file, lengths = loader()
            roof = roofline.ceiling(model_dir, np.minimum(lengths, 200), gemm, bw, batch=16)
            roof["threads"] = cpus
            n_items = roof["sizes"]["N"]
            c1, c2 = roofline.candidates(model_dir)
            base = {"REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(rport), "MODEL_DIR": model_dir,
                    "LIGHTGCN_CANDIDATES": str(c1), "DIN_CANDIDATES": str(c2)}
            ours = {**base, "HOST": "127.0.0.1", "RUST_LOG": "warn"}
            peer = [uvicorn, "app:app", "--app-dir", os.path.join(HERE, "peer"), "--host", "127.0.0.1", "--workers",
                    str(cpus), "--no-access-log", "--log-level", "warning"]
            plan = [
                ("model-service", [args.bin, "serve"], ours, conc),
                ("python-peer", peer, base, conc),
                ("model-service MAX_BATCH=1", [args.bin, "serve"], {**ours, "MAX_BATCH": "1"}, [32]),
                # for reference: the TorchScript files only (the form every stage had before the packages)
                ("model-service STAGE_RUNTIME=torchscript", [args.bin, "serve"],
                 {**ours, "STAGE_RUNTIME": "torchscript"}, [1, 32]),
            ]
            if args.baseline_bin:
                plan.append(("model-service baseline binary", [args.baseline_bin, "serve"], ours, [1, 32]))
            if all(os.path.exists(os.path.join(model_dir, st, "model.pt2")) for st in ("din", "ranknet")):
                # for reference: the peer on the same compiled packages (it stands for a service that loads
                # the TorchScript files, so its main rows stay on those)
                plan.append(("python-peer, compiled stages", peer, {**base, "PEER_STAGE_RUNTIME": "compiled"}, [1, 32]))
            if scale != "amazon-book":
                # the approximate candidate search (src/inference/ivf.rs) beside the exact one; its recall is
                # measured by model_service_py.ann_recall
                plan.append(("model-service ivf", [args.bin, "serve"],
                             {**base, "HOST": "127.0.0.1", "RUST_LOG": "warn", "CANDIDATE_SEARCH": "ivf"}, [1, 32]))
            rows, goal_rows = [], None
            for name, cmd, env, levels in plan:
                log = os.path.join(args.work, f"{scale}-{name.replace(' ', '_')}.log")
                rows += measure_service(name, cmd, env, log, users_file, levels, args.seconds)
            if scale == "amazon-book" and args.goal_rounds > 0:
                goal_plan = [(name, cmd, env) for name, cmd, env, _ in plan
                             if name in ("model-service", "python-peer", "model-service baseline binary")]
                goal_rows = goal_rounds(args, goal_plan, users_file)
            summary = print_table(scale, rows, roof, n_items, goal_rows)
            results["scales"][scale] = {"items": n_items, "rows": rows, "roofline": roof, **summary}
            if goal_rows:
                results["scales"][scale]["goal_rows"] = goal_rows
            if scale == "amazon-book" and args.previous_dir:
                prev_roof = roofline.ceiling(args.previous_dir, np.minimum(lengths, 200), gemm, bw, batch=16)
                print(f"\nmodel cost per recommendation: previous {prev_roof['mflops']:.2f} MFLOP, "
                      f"new {roof['mflops']:.2f} MFLOP (x{roof['mflops'] / prev_roof['mflops']:.3f})")
                results["new_vs_previous"] = {"previous_roofline": prev_roof,
                                              **side_by_side(args, rport, users_file, conc)}
    finally:
        redis_proc.terminate()
        redis_proc.wait()
    stamp = time.strftime("%Y%m%dT%H%M%S")
    with open(os.path.join(args.out, "latest.json"), "w") as f:
        json.dump(results, f, indent=2)
    shutil.copyfile(os.path.join(args.out, "latest.json"), os.path.join(args.work, f"bench-{stamp}.json"))
    plot(results, os.path.join(args.out, "latency_throughput.png"))
    print(f"\nwrote {args.out}/latest.json and {args.out}/latency_throughput.png")


if __name__ == "__main__":
    main()
