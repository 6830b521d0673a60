#!/usr/bin/env python3
"""Stage-by-stage quality of the served cascade on Amazon-Book (full-ranking protocol).

For every test user: history = the user's train.txt items, ground truth = test.txt items; the
whole catalog minus the history is ranked; Recall@20 and NDCG@20 (binary relevance, ideal DCG over
min(|truth|, 20)). Three rows: LightGCN alone, LightGCN -> DIN, the full cascade.

Computed twice on the same users:
  python: cascade.py (this package) over the TorchScript files in MODEL_DIR;
  rust:   the release binary serving MODEL_DIR; profiles (ASIN lists) written to a real
          redis-server as user_profile:<reviewer_id>, POST /recommend/<id>?k=20 over HTTP, once per
          LAST_STAGE (lightgcn, din, ranknet); the response is checked against recommendations:<id>.

usage: python -m model_service_py.evaluate --data DIR [--models model_output] [--users N] [--json OUT] [--manifest]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import redis
import torch

from . import REPO as ROOT
from . import cascade
from . import data as ds

ROWS = [("lightgcn", "LightGCN"), ("din", "LightGCN -> DIN"), ("ranknet", "LightGCN -> DIN -> RankNet")]


def metrics(lists, truth):
    rec, ndcg = zip(*(ds.recall_ndcg(np.asarray(r), t, 20) for r, t in zip(lists, truth)))
    return float(np.mean(rec)), float(np.mean(ndcg))


def python_lists(model_dir, histories, c1, c2):
    model = cascade.Cascade(model_dir, c1, c2)
    out = {stage: [None] * len(histories) for stage, _ in ROWS}
    for idx in cascade.length_batches([len(h) for h in histories]):
        lg, din, full = model.rank([histories[j] for j in idx], 20)
        for n, j in enumerate(idx):
            out["lightgcn"][j], out["din"][j], out["ranknet"][j] = lg[n], din[n], full[n]
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, seconds, what):
    end = time.time() + seconds
    while time.time() < end:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not come up within {seconds}s")


def http_get_status(port, path):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    c.request("GET", path)
    return c.getresponse().status


def start_redis(work):
    """A redis-server of the caller's own on a free loopback port, without persistence (its files
    in `work`), answering: (process, client, port)."""
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", work],
        stdout=subprocess.DEVNULL,
    )
    r = redis.Redis(port=port)
    try:
        wait_for(r.ping, 10, "redis-server")
    except RuntimeError:
        proc.terminate()
        raise
    return proc, r, port


@contextlib.contextmanager
def redis_with_profiles(user_ids, histories_asin):
    """A redis-server of its own on a free port holding user_profile:<id> = each user's ASIN list;
    yields (port, client) and stops the server afterwards."""
    tmp = tempfile.mkdtemp(prefix="ms-eval-")
    redis_proc, r, rport = start_redis(tmp)
    try:
        pipe = r.pipeline(transaction=False)
        for n, (uid, items) in enumerate(zip(user_ids, histories_asin)):
            pipe.set(f"user_profile:{uid}", json.dumps(items))
            if n % 5000 == 4999:
                pipe.execute()
        pipe.execute()
        yield rport, r
    finally:
        redis_proc.terminate()
        redis_proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def rust_lists(binary, model_dir, user_ids, histories_asin, c1, c2, concurrency):
    with redis_with_profiles(user_ids, histories_asin) as (rport, r):
        out = {}
        for stage, _ in ROWS:
            hport = free_port()
            env = dict(os.environ, REDIS_HOST="127.0.0.1", REDIS_PORT=str(rport), MODEL_DIR=model_dir, HOST="127.0.0.1",
                       PORT=str(hport), LAST_STAGE=stage, LIGHTGCN_CANDIDATES=str(c1), DIN_CANDIDATES=str(c2), DEVICE="cpu")
            server = subprocess.Popen([binary, "serve"], env=env, stderr=subprocess.DEVNULL)
            try:
                wait_for(lambda: http_get_status(hport, "/health") == 200, 120, "model-service")
                t = time.time()
                out[stage] = request_all(hport, user_ids, concurrency)
                took = time.time() - t
                print(f"  rust {stage}: {len(user_ids)} requests in {took:.0f}s ({len(user_ids) / took:.0f}/s)", file=sys.stderr)
                # the list in Redis is the list in the response
                for uid in user_ids[:: max(1, len(user_ids) // 200)]:
                    stored = json.loads(r.get(f"recommendations:{uid}"))
                    assert stored == out[stage][uid], f"recommendations:{uid} differs from the response"
            finally:
                server.terminate()
                server.wait()
        return out


def request_all(port, user_ids, concurrency, k=20):
    chunks = [user_ids[i::concurrency] for i in range(concurrency)]

    def worker(ids):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        got = {}
        for uid in ids:
            for attempt in range(5):
                conn.request("POST", f"/recommend/{uid}?k={k}")
                resp = conn.getresponse()
                body = json.loads(resp.read())
                if resp.status == 200:
                    break
                if resp.status not in (429, 503) or attempt == 4:
                    raise RuntimeError(f"POST /recommend/{uid}: {resp.status} {body}")
                time.sleep(0.05)
            if body["strategy"] != "personalized":
                raise RuntimeError(f"{uid}: strategy {body['strategy']}")
            got[uid] = [x["item_id"] for x in body["recommendations"]]
        return got

    out = {}
    with ThreadPoolExecutor(concurrency) as pool:
        for part in pool.map(worker, chunks):
            out.update(part)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--models", default=os.path.join(ROOT, "model_output"))
    p.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "model-service"))
    p.add_argument("--users", type=int, default=0, help="evaluate only the first N test users (0: all)")
    p.add_argument("--c1", type=int, default=cascade.LIGHTGCN_CANDIDATES)
    p.add_argument("--c2", type=int, default=cascade.DIN_CANDIDATES)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--skip-rust", action="store_true")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--baselines", help="baselines.py --json output on the same users: printed as rows of the same table")
    p.add_argument("--manifest", action="store_true", help="record the results in MODELS/manifest.json")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    d = ds.load(args.data)
    users = [u for u in range(d.num_users) if len(d.test[u]) > 0 and len(d.train[u]) > 0]
    if args.users:
        users = users[: args.users]
    histories = [d.train[u] for u in users]
    truth = [d.test[u] for u in users]
    t = time.time()
    py = python_lists(args.models, histories, args.c1, args.c2)
    print(f"python cascade over {len(users)} users in {time.time() - t:.0f}s", file=sys.stderr)
    result = {"users": len(users), "candidates": {"lightgcn": args.c1, "din": args.c2}, "rows": {}}
    for stage, name in ROWS:
        r, n = metrics(py[stage], truth)
        result["rows"][stage] = {"name": name, "python": {"recall@20": r, "ndcg@20": n}}

    if not args.skip_rust:
        ids = [d.users[u] for u in users]
        asins = [[d.asins[i] for i in h] for h in histories]
        rust = rust_lists(args.binary, args.models, ids, asins, args.c1, args.c2, args.concurrency)
        row_of = {a: i for i, a in enumerate(d.asins)}
        for stage, _ in ROWS:
            lists = [[row_of[a] for a in rust[stage][uid]] for uid in ids]
            r, n = metrics(lists, truth)
            same = float(np.mean([list(a) == list(b) for a, b in zip(lists, py[stage])]))
            result["rows"][stage]["rust"] = {"recall@20": r, "ndcg@20": n}
            result["rows"][stage]["identical_lists"] = same

    print(f"\nAmazon-Book, {len(users)} test users, Recall@20 / NDCG@20 (full ranking, history excluded)\n")
    print("| stage | Recall@20 (Rust) | NDCG@20 (Rust) | Recall@20 (Python) | NDCG@20 (Python) | identical lists |")
    print("|---|---|---|---|---|---|")
    for stage, name in ROWS:
        row = result["rows"][stage]
        rust = row.get("rust", {})
        fmt = lambda v: f"{v:.4f}" if v is not None else "-"  # noqa: E731
        print(f"| {name} | {fmt(rust.get('recall@20'))} | {fmt(rust.get('ndcg@20'))} | {row['python']['recall@20']:.4f} | "
              f"{row['python']['ndcg@20']:.4f} | {row.get('identical_lists', float('nan')):.1%} |")
    if args.baselines:
        with open(args.baselines) as f:
            base = json.load(f)
        if base.get("users") != len(users):
            raise SystemExit(f"{args.baselines} covers {base.get('users')} users, this run {len(users)}")
        result["baselines"] = {k: v for k, v in base.items() if isinstance(v, dict)}
        for name, v in result["baselines"].items():
            print(f"| {name} (model_service_py.baselines) | {v['recall@20']:.4f} | {v['ndcg@20']:.4f} | - | - | - |")
    result["command"] = ds.portable("python -m model_service_py.evaluate " + " ".join(sys.argv[1:]), data_dir=args.data)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.manifest:
        path = os.path.join(args.models, "manifest.json")
        with open(path) as f:
            manifest = json.load(f)
        manifest["evaluation"] = result
        with open(path, "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.write("\n")


if __name__ == "__main__":
    main()
