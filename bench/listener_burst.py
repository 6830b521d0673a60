#!/usr/bin/env python3
"""Listener burst: how long `model-service listen` takes to recompute a burst of profile writes.

Starts a redis-server of its own and `model-service listen` on the given model directory, writes
N real Amazon-Book histories as user_profile:<id> (pipelined, the way a busy frontend would), waits
until every recommendations:<id> exists, and prints the elapsed time and the listener's lag
percentiles (upper bounds of the listener_lag_seconds histogram buckets).

usage: listener_burst.py --data DIR [--users 1000] [--bin target/release/model-service] [--model-dir model_output]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import time
import urllib.request

import bench  # bench/bench.py (run as a script, this file's directory is on the path)
import redis
from model_service_py import data as ds
from model_service_py import load_profiles

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def lag_percentile(metrics: str, q: float) -> str:
    buckets = []
    for line in metrics.splitlines():
        le = re.search(r'le="([^"]+)"', line)
        if re.match(r"(\w+_)?listener_lag_seconds_bucket\{", line) and 'source="keyspace"' in line and le:
            buckets.append((float(le.group(1)), float(line.rsplit(" ", 1)[1])))
    total = buckets[-1][1] if buckets else 0
    for le, count in buckets:
        if total and count >= q * total:
            return f"<= {le:g} s"
    return "n/a"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "model-service"))
    p.add_argument("--model-dir", default=os.path.join(ROOT, "model_output"))
    args = p.parse_args()
    d = ds.load(args.data)
    rport, port = bench.free_port(), bench.free_port()
    redis_proc = subprocess.Popen(["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no"], stdout=subprocess.DEVNULL)
    env = {"REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(rport), "MODEL_DIR": args.model_dir, "PORT": str(port),
           "HOST": "127.0.0.1", "RUST_LOG": "warn"}
    svc = bench.Service("listen", [args.bin, "listen"], env, port, "/tmp/listener_burst.log")
    try:
        bench.wait_healthy(f"http://127.0.0.1:{port}/health", svc.proc)
        r = redis.Redis(port=rport)
        users = list(range(min(args.users, d.num_users)))
        t0 = time.time()
        load_profiles.write_profiles(r, d, users)
        written = time.time() - t0
        keys = [f"recommendations:{d.users[u]}" for u in users]
        while sum(r.exists(*keys[i:i + 500]) for i in range(0, len(keys), 500)) < len(keys):
            if time.time() - t0 > 600:
                raise SystemExit("not every list was written within 600 s")
            time.sleep(0.05)
        elapsed = time.time() - t0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as resp:
            metrics = resp.read().decode()
        result = {"users": len(users), "written_s": round(written, 2), "all_recomputed_s": round(elapsed, 2),
                  "per_s": round(len(users) / elapsed, 1), "lag_p50": lag_percentile(metrics, 0.5),
                  "lag_p99": lag_percentile(metrics, 0.99)}
        print(json.dumps(result))
    finally:
        svc.stop()
        redis_proc.terminate()
        redis_proc.wait()


if __name__ == "__main__":
    main()
