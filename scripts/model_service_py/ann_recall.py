"""The approximate candidate search (CANDIDATE_SEARCH=ivf) against the exact one, through the
release server: LightGCN's top 200 (LAST_STAGE=lightgcn, k=200) for every profile, once with the
exact search and once per IVF_PROBES value, on the same redis-server.

Printed per setting: recall@200 of the approximate list against the exact list (the share of the
exact top 200 it holds), and where held-out items exist (Amazon-Book's test.txt), Recall@200 of
each list against them and the ratio of the two; requests per second of each server.

usage: python -m model_service_py.ann_recall --data DIR [--models model_output] [--users N] [--probes 8,16,32]
       python -m model_service_py.ann_recall --synthetic DIR [--users N] [--probes ...]   (make_synthetic.py output)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from . import REPO as ROOT
from . import data as ds
from .evaluate import free_port, http_get_status, redis_with_profiles, request_all, wait_for

K = 200


def lists_per_setting(binary, model_dir, ids, histories, settings, concurrency):
    """{setting name: ({user: [item, ...]}, requests per second)} for each (name, env) setting."""
    out = {}
    with redis_with_profiles(ids, histories) as (rport, _):
        for name, extra in settings:
            hport = free_port()
            env = dict(os.environ, REDIS_HOST="127.0.0.1", REDIS_PORT=str(rport), MODEL_DIR=model_dir, HOST="127.0.0.1",
                       PORT=str(hport), LAST_STAGE="lightgcn", MAX_K=str(K), DIN_CANDIDATES=str(K), DEVICE="cpu",
                       REQUEST_TIMEOUT_MS="60000", **extra)
            server = subprocess.Popen([binary, "serve"], env=env, stderr=subprocess.DEVNULL)
            try:
                wait_for(lambda: http_get_status(hport, "/health") == 200, 600, "model-service")
                t = time.time()
                lists = request_all(hport, ids, concurrency, k=K)
                rate = len(ids) / (time.time() - t)
                out[name] = (lists, rate)
                print(f"  {name}: {len(ids)} requests, {rate:.0f}/s", file=sys.stderr, flush=True)
            finally:
                server.terminate()
                server.wait()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="Amazon-Book directory: its test users, with held-out items")
    p.add_argument("--models", default=os.path.join(ROOT, "model_output"))
    p.add_argument("--synthetic", help="make_synthetic.py output: its models and profiles.jsonl (no held-out items)")
    p.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "model-service"))
    p.add_argument("--users", type=int, default=0, help="only the first N profiles (0: all)")
    p.add_argument("--probes", default="8,16,32,64", help="IVF_PROBES values, comma-separated")
    p.add_argument("--lists", type=int, default=0, help="IVF_LISTS (0: the server's default)")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    if bool(args.data) == bool(args.synthetic):
        raise SystemExit("give --data or --synthetic")
    truth = None
    if args.data:
        d = ds.load(args.data)
        users = [u for u in range(d.num_users) if len(d.test[u]) > 0 and len(d.train[u]) > 0]
        if args.users:
            users = users[: args.users]
        ids = [d.users[u] for u in users]
        histories = [[d.asins[i] for i in d.train[u]] for u in users]
        truth = {d.users[u]: {d.asins[i] for i in d.test[u]} for u in users}
        model_dir, catalog = args.models, "Amazon-Book"
    else:
        with open(os.path.join(args.synthetic, "profiles.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        if args.users:
            rows = rows[: args.users]
        ids = [r["user_id"] for r in rows]
        histories = [r["items"] for r in rows]
        model_dir, catalog = args.synthetic, f"synthetic ({os.path.basename(os.path.normpath(args.synthetic))})"
    probes = [int(x) for x in args.probes.split(",") if x]
    lists_env = {"IVF_LISTS": str(args.lists)} if args.lists else {}
    settings = [("exact", {"CANDIDATE_SEARCH": "exact"})] + [
        (f"ivf probes={n}", {"CANDIDATE_SEARCH": "ivf", "IVF_PROBES": str(n), **lists_env}) for n in probes
    ]
    got = lists_per_setting(args.binary, model_dir, ids, histories, settings, args.concurrency)
    exact, _ = got["exact"]

    def recall_vs_truth(lists):
        return float(np.mean([len(truth[u] & set(lists[u])) / len(truth[u]) for u in ids]))

    result = {"catalog": catalog, "users": len(ids), "k": K, "rows": {}}
    print(f"\n{catalog}, {len(ids)} profiles, LightGCN's top {K} (LAST_STAGE=lightgcn)\n")
    print("| search | recall@200 vs exact | Recall@200 (held-out) | of exact's | req/s |")
    print("|---|---|---|---|---|")
    exact_truth = recall_vs_truth(exact) if truth else None
    for name, _ in settings:
        lists, rate = got[name]
        overlap = float(np.mean([len(set(lists[u]) & set(exact[u])) / max(1, len(exact[u])) for u in ids]))
        row = {"recall_vs_exact": overlap, "req_per_s": rate}
        held = "-"
        ratio = "-"
        if truth:
            row["recall@200"] = recall_vs_truth(lists)
            row["of_exact"] = row["recall@200"] / exact_truth if exact_truth else None
            held, ratio = f"{row['recall@200']:.4f}", f"{row['of_exact']:.1%}" if exact_truth else "-"
        result["rows"][name] = row
        print(f"| {name} | {overlap:.4f} | {held} | {ratio} | {rate:.0f} |")
    result["command"] = ds.portable("python -m model_service_py.ann_recall " + " ".join(sys.argv[1:]), data_dir=args.data)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
