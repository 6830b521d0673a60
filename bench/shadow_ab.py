#!/usr/bin/env python3
"""What a shadow set costs the served answers: one binary, side by side in one run, serving the
Amazon-Book profiles with an experiment of one variant (today's models) without a shadow set
("off") and with one ("shadow": the first version's models, model_output/ at f16d5a6, on a sample
of the answers), in alternating rounds (the machine's speed drifts; compare the means of the same
run). Also prints what became of the sampled answers (shadow_total by outcome: computed on the
shadow worker's idle time, or dropped when its queue was full).

usage: scripts/py bench/shadow_ab.py --data DIR [--binary target/release/model-service]
           [--rounds 4] [--concurrency 8] [--seconds 10] [--sample 0.2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import urllib.request

import numpy as np

# bench.py beside this file: Python puts the script's own folder first on its path
from bench import Service, bad_answers, free_port, load_amazon, measure, server_env
from model_service_py.evaluate import start_redis

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def shadow_outcomes(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'^model_service_shadow_total\{outcome="(\w+)"\} (\S+)$', text, re.M)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="Amazon-Book directory")
    p.add_argument("--binary", default=os.path.join(ROOT, "target/release/model-service"))
    p.add_argument("--model-dir", default=os.path.join(ROOT, "model_output"))
    p.add_argument("--shadow-dir", required=True, help="e.g. the first version: git archive f16d5a6 model_output | tar -x -C DIR")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--concurrency", default="8")
    p.add_argument("--seconds", type=int, default=10, help="per concurrency level and round")
    p.add_argument("--sample", type=float, default=0.2)
    args = p.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    work = tempfile.mkdtemp(prefix="ms-shadow-")
    control = {"name": "control", "model_dir": os.path.abspath(args.model_dir), "share": 100}
    files = {}
    for name, shadow in [("off", None), ("shadow", {"name": "v1", "model_dir": os.path.abspath(args.shadow_dir),
                                                   "sample": args.sample, "lightgcn_candidates": 200})]:
        spec = {"name": "bench", "salt": "s", "variants": [control], **({"shadow": shadow} if shadow else {})}
        files[name] = os.path.join(work, f"{name}.json")
        with open(files[name], "w") as f:
            json.dump(spec, f)
    rproc, r, rport = start_redis(work)
    variants = ["off", "shadow"]
    rows: dict[str, list[dict]] = {name: [] for name in variants}
    outcomes: dict[str, float] = {}
    try:
        users_file, _ = load_amazon(r, args.data, work)
        for rnd in range(args.rounds):
            for name in variants[rnd % 2:] + variants[: rnd % 2]:
                port = free_port()
                env = {**server_env(rport, port, args.model_dir), "EXPERIMENT_FILE": files[name]}
                svc = Service(f"{name}, round {rnd + 1}", [args.binary, "serve"], env, port,
                              os.path.join(work, f"{name}-{rnd + 1}.log"))
                try:
                    rows[name] += measure(svc, users_file, concurrencies, args.seconds)
                    if name == "shadow":
                        for outcome, n in shadow_outcomes(port).items():
                            outcomes[outcome] = outcomes.get(outcome, 0) + n
                finally:
                    svc.stop()
    finally:
        rproc.terminate()
        rproc.wait()
    print(f"\nmeans over {args.rounds} alternating rounds (shadow sample {args.sample})")
    for c in concurrencies:
        at = {name: [row for row in rs if row["concurrency"] == c] for name, rs in rows.items()}
        p99 = {name: np.mean([row["p99_ms"] for row in a]) for name, a in at.items()}
        for name, a in at.items():
            print(f"  c={c:<4d} {name:8s} {np.mean([row['rps'] for row in a]):8.1f} req/s  "
                  f"p50 {np.mean([row['p50_ms'] for row in a]):6.2f} ms  p99 {p99[name]:7.2f} ms "
                  f"(x{p99[name] / p99['off']:.3f} off)  server CPU "
                  f"{np.mean([row['cpu_ms_per_request'] for row in a]):5.3f} ms/req  "
                  f"not 200: {sum(bad_answers(row) for row in a)}")
    total = sum(outcomes.values())
    print("  shadow computations (all shadow rounds, warm-up included): " + ", ".join(
        f"{o} {n:.0f} ({n / max(total, 1):.0%})" for o, n in sorted(outcomes.items())))


if __name__ == "__main__":
    main()
