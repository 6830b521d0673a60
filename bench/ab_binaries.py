#!/usr/bin/env python3
"""Two or more builds (or settings) of model-service side by side in one run: the Amazon-Book
profiles loaded once into a redis-server of its own, then each variant started in turn, warmed up,
and driven by wrk over the same shuffled users at each concurrency, for several alternating rounds
(the machine's speed drifts; compare the means of the same run). Each round starts one variant
later than the one before (A B C, B C A, C A B, ...), so that a drift within a round falls on every
variant alike: on a shared 2-core VM the last of three identical variants once served 14% more than
the first, every round. Give a multiple of the number of variants as --rounds. Under each variant's
means it prints its ratio to the first variant round by round, lowest to highest: one binary
against itself (an A/A run, 2 rounds of 3 s) once read x0.881 to x0.962 at concurrency 32, so a
lever smaller than that needs more rounds or a measurement in isolation.

usage: scripts/py bench/ab_binaries.py --data DIR [--rounds 3] [--concurrency 1,8,32] [--seconds 10]
           NAME=BINARY[:ENV=VALUE,ENV=VALUE] NAME=BINARY[:...] ...

e.g. the committed binary against a working-tree build:
    git stash; cargo build --release; cp target/release/model-service /tmp/ms-before; git stash pop
    cargo build --release
    scripts/py bench/ab_binaries.py --data ../shared/data/amazon-book before=/tmp/ms-before \\
        after=target/release/model-service
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np

# bench.py beside this file: Python puts the script's own folder first on its path
from bench import bad_answers, free_port, load_amazon, measure_round, server_env
from model_service_py.evaluate import start_redis

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def variant(text: str) -> tuple[str, str, dict]:
    name, _, rest = text.partition("=")
    binary, _, envs = rest.partition(":")
    if not name or not binary:
        raise argparse.ArgumentTypeError(f"expected NAME=BINARY[:ENV=VALUE,...], got {text!r}")
    return name, os.path.abspath(binary), dict(e.split("=", 1) for e in envs.split(",") if e)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="Amazon-Book directory")
    p.add_argument("--model-dir", default=os.path.join(ROOT, "model_output"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--seconds", type=int, default=10, help="per concurrency level and round")
    p.add_argument("variants", nargs="+", type=variant)
    args = p.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    work = tempfile.mkdtemp(prefix="ms-ab-")
    rproc, r, rport = start_redis(work)
    rows: dict[str, list[dict]] = {name: [] for name, _, _ in args.variants}
    try:
        users_file, _ = load_amazon(r, args.data, work)
        for rnd in range(args.rounds):
            start = rnd % len(args.variants)
            for name, binary, extra in args.variants[start:] + args.variants[:start]:
                port = free_port()
                env = {**server_env(rport, port, args.model_dir), **extra}
                rows[name] += measure_round(name, rnd, binary, env, work, users_file, concurrencies, args.seconds)
    finally:
        rproc.terminate()
        rproc.wait()
    print(f"\nmeans over {args.rounds} alternating rounds")
    base = args.variants[0][0]
    for c in concurrencies:
        mean = {name: np.mean([row["rps"] for row in rs if row["concurrency"] == c]) for name, rs in rows.items()}
        base_at = [row for row in rows[base] if row["concurrency"] == c]
        for name, rs in rows.items():
            at = [row for row in rs if row["concurrency"] == c]
            print(f"  c={c:<4d} {name:12s} {mean[name]:8.1f} req/s (x{mean[name] / mean[base]:.3f} {base})  "
                  f"p50 {np.mean([row['p50_ms'] for row in at]):6.2f} ms  p99 {np.mean([row['p99_ms'] for row in at]):7.2f} ms  "
                  f"not 200: {sum(bad_answers(row) for row in at)}" + cpu_columns(at))
            if name != base and len(at) > 1:
                print(f"  {'':6s} {'':12s} {paired_spread(at, base_at)}")


def paired_spread(rows: list[dict], base_rows: list[dict]) -> str:
    """The ratio to the base variant round by round (both measured minutes apart in one round),
    lowest to highest: a difference whose rounds fall on both sides of x1 is within the machine's
    drift, whatever the means say."""
    rps = sorted(r["rps"] / b["rps"] for r, b in zip(rows, base_rows) if b["rps"])
    text = f"rounds: req/s x{rps[0]:.3f} to x{rps[-1]:.3f}" if rps else ""
    cpu = sorted(r["server_cpu_ms_per_request"] / b["server_cpu_ms_per_request"] for r, b in zip(rows, base_rows)
                 if r.get("server_cpu_ms_per_request") and b.get("server_cpu_ms_per_request"))
    return text + (f", server CPU x{cpu[0]:.3f} to x{cpu[-1]:.3f}" if cpu else "")


def cpu_columns(rows: list[dict]) -> str:
    """The server's own CPU (perf) and its inference workers' CPU per recommendation, means over
    the rounds: steadier than req/s on a machine whose speed drifts."""
    own = [row["server_cpu_ms_per_request"] for row in rows if "server_cpu_ms_per_request" in row]
    inference = [row["server"]["inference_cpu_ms_per_rec"] for row in rows if row.get("server")]
    text = f"  server CPU {np.mean(own):.3f} ms/rec" if own else ""
    return text + (f", inference {np.mean(inference):.3f}" if inference else "")


if __name__ == "__main__":
    main()
