#!/usr/bin/env python3
"""What the request-time filters cost: one binary, side by side in one run, serving the Amazon-Book
profiles with no filter ("none") and with 1,000 unavailable items in `items:unavailable` plus 50
excluded ids on every request ("filtered"), in alternating rounds (the machine's speed drifts;
compare the means of the same run). The unavailable items are the catalog's 1,000 most popular
(the ones most often among the candidates), the excluded ids the next 50.

usage: scripts/py bench/filters_ab.py --data DIR [--binary target/release/model-service]
           [--rounds 4] [--concurrency 1,8,32] [--seconds 10]
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


def by_popularity(model_dir: str) -> list[str]:
    rows = []
    with open(os.path.join(model_dir, "catalog.tsv")) as f:
        for n, line in enumerate(f):
            item, pop = line.rstrip("\n").split("\t")
            rows.append((-int(pop), n, item))
    return [item for _, _, item in sorted(rows)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="Amazon-Book directory")
    p.add_argument("--binary", default=os.path.join(ROOT, "target/release/model-service"))
    p.add_argument("--model-dir", default=os.path.join(ROOT, "model_output"))
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--seconds", type=int, default=10, help="per concurrency level and round")
    p.add_argument("--unavailable", type=int, default=1000)
    p.add_argument("--exclude", type=int, default=50)
    p.add_argument("--env", default="", help="extra server environment, ENV=VALUE,ENV=VALUE")
    args = p.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    extra = dict(e.split("=", 1) for e in args.env.split(",") if e)
    popular = by_popularity(args.model_dir)
    unavailable = popular[: args.unavailable]
    excluded = popular[args.unavailable: args.unavailable + args.exclude]
    work = tempfile.mkdtemp(prefix="ms-filters-")
    rproc, r, rport = start_redis(work)
    variants = ["none", "filtered"]
    rows: dict[str, list[dict]] = {name: [] for name in variants}
    try:
        users_file, _ = load_amazon(r, args.data, work)
        for rnd in range(args.rounds):
            for name in variants[rnd % 2:] + variants[: rnd % 2]:
                r.delete("items:unavailable")
                os.environ.pop("QUERY_SUFFIX", None)
                if name == "filtered":
                    r.sadd("items:unavailable", *unavailable)
                    os.environ["QUERY_SUFFIX"] = "&exclude=" + ",".join(excluded)
                port = free_port()
                env = {**server_env(rport, port, args.model_dir), **extra}
                rows[name] += measure_round(name, rnd, args.binary, env, work, users_file, concurrencies, args.seconds)
    finally:
        os.environ.pop("QUERY_SUFFIX", None)
        rproc.terminate()
        rproc.wait()
    print(f"\nmeans over {args.rounds} alternating rounds ({len(unavailable)} unavailable items, "
          f"{len(excluded)} excluded ids per request in 'filtered')")
    for c in concurrencies:
        mean = {name: np.mean([row["rps"] for row in rs if row["concurrency"] == c]) for name, rs in rows.items()}
        for name, rs in rows.items():
            at = [row for row in rs if row["concurrency"] == c]
            print(f"  c={c:<4d} {name:10s} {mean[name]:8.1f} req/s (x{mean[name] / mean['none']:.3f} none)  "
                  f"p50 {np.mean([row['p50_ms'] for row in at]):6.2f} ms  p99 {np.mean([row['p99_ms'] for row in at]):7.2f} ms  "
                  f"server CPU {np.mean([row['cpu_ms_per_request'] for row in at]):5.3f} ms/req  "
                  f"not 200: {sum(bad_answers(row) for row in at)}")


if __name__ == "__main__":
    main()
