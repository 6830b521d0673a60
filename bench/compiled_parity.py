#!/usr/bin/env python3
"""Compiled stages against TorchScript on every Amazon-Book test user, through the release
server: the same binary and model directory served twice, STAGE_RUNTIME=torchscript and
STAGE_RUNTIME=compiled (the packages of model_service_py.compile_stages beside model.pt), each
user's list of 20 compared, and Recall@20 / NDCG@20 of both against the held-out items.

usage: scripts/py bench/compiled_parity.py --data DIR [--concurrency 1] [--users 0]
           [--env MAX_BATCH=16,...] [--json OUT]

At concurrency 1 every batch holds one request; at higher concurrencies the batches mix profiles
of different lengths (DIN's package ranks them in groups of like history lengths, RankNet's the whole batch).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from model_service_py import data as ds
from model_service_py.evaluate import (free_port, http_get_status, metrics, redis_with_profiles, request_all,
                                       wait_for)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--binary", default=os.path.join(ROOT, "target/release/model-service"))
    p.add_argument("--models", default=os.path.join(ROOT, "model_output"))
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--users", type=int, default=0, help="only the first N test users (0: all)")
    p.add_argument("--env", default="", help="extra server environment, ENV=VALUE,ENV=VALUE")
    p.add_argument("--json")
    args = p.parse_args()
    extra = dict(e.split("=", 1) for e in args.env.split(",") if e)
    d = ds.load(args.data)
    users = [u for u in range(d.num_users) if len(d.test[u]) > 0 and len(d.train[u]) > 0]
    if args.users:
        users = users[: args.users]
    ids = [d.users[u] for u in users]
    asins = [[d.asins[i] for i in d.train[u]] for u in users]
    truth = [d.test[u] for u in users]
    row_of = {a: i for i, a in enumerate(d.asins)}
    lists, result = {}, {"users": len(users), "concurrency": args.concurrency, "env": extra, "runtimes": {}}
    with redis_with_profiles(ids, asins) as (rport, _):
        for runtime in ("torchscript", "compiled"):
            hport = free_port()
            env = dict(os.environ, REDIS_HOST="127.0.0.1", REDIS_PORT=str(rport), MODEL_DIR=args.models,
                       HOST="127.0.0.1", PORT=str(hport), DEVICE="cpu", STAGE_RUNTIME=runtime, **extra)
            server = subprocess.Popen([args.binary, "serve"], env=env, stderr=open(os.path.join(ROOT, "target", f"parity-{runtime}.log"), "w"))
            try:
                wait_for(lambda: http_get_status(hport, "/health") == 200, 300, "model-service")
                t = time.time()
                got = request_all(hport, ids, args.concurrency)
                took = time.time() - t
            finally:
                server.terminate()
                server.wait()
            lists[runtime] = [[row_of[a] for a in got[uid]] for uid in ids]
            r, n = metrics(lists[runtime], truth)
            result["runtimes"][runtime] = {"recall@20": r, "ndcg@20": n, "seconds": round(took, 1)}
            print(f"  {runtime:12s} {len(ids)} users in {took:.0f}s: Recall@20 {r:.4f}  NDCG@20 {n:.4f}", file=sys.stderr)
    same = [a == b for a, b in zip(lists["torchscript"], lists["compiled"])]
    same_set = [set(a) == set(b) for a, b in zip(lists["torchscript"], lists["compiled"])]
    result["identical_lists"] = float(np.mean(same))
    result["same_items"] = float(np.mean(same_set))
    print(f"\n{len(ids)} users, concurrency {args.concurrency}: identical lists {np.mean(same):.4%}, "
          f"same 20 items {np.mean(same_set):.4%}")
    for runtime, row in result["runtimes"].items():
        print(f"  {runtime:12s} Recall@20 {row['recall@20']:.4f}  NDCG@20 {row['ndcg@20']:.4f}")
    result["command"] = ds.portable("scripts/py bench/compiled_parity.py " + " ".join(sys.argv[1:]), data_dir=args.data)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
