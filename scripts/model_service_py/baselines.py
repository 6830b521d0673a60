#!/usr/bin/env python3
"""Reference points on the same protocol as evaluate.py (all test users, full ranking minus the
history, Recall@20 / NDCG@20): most-popular, cosine ItemKNN (full item-item cosine over the
train.txt co-occurrences, score = sum of similarities to the history items), EASE (Steck 2019,
closed form, lambda 200, see ease.py) and sparse EASE (each item's 50 strongest EASE neighbours
only, the table the cascade serves).

usage: python -m model_service_py.baselines --data DIR [--json OUT] [--methods most_popular,itemknn_cosine,ease,ease_sparse50]
                    [--ease-table OUT.pt]   (also save the top-50 EASE neighbour table)
"""

import argparse
import json
import time

import numpy as np
import torch

from . import data as ds
from . import ease as ez


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--json")
    p.add_argument("--methods", default="most_popular,itemknn_cosine,ease,ease_sparse50")
    p.add_argument("--lam", type=float, default=200.0)
    p.add_argument("--ease-table", help="save the top-50 EASE neighbour table (nbr_idx, nbr_val, info) here")
    args = p.parse_args()
    methods = args.methods.split(",")
    d = ds.load(args.data)
    U, N = d.num_users, d.num_items
    users = [u for u in range(U) if len(d.test[u]) and len(d.train[u])]
    rows = np.concatenate([np.full(len(d.train[u]), u) for u in range(U)])
    cols = np.concatenate(d.train)
    x = torch.sparse_coo_tensor(torch.from_numpy(np.stack([rows, cols])), torch.ones(len(rows)), (U, N)).coalesce()
    results = {}

    def evaluate(name, scores_for, batch):
        """scores_for(users) -> [B, N] scores; history items are excluded here."""
        t = time.time()
        rec, ndcg = [], []
        for s in range(0, len(users), batch):
            b = users[s : s + batch]
            scores = scores_for(b)
            for j, u in enumerate(b):
                scores[j, d.train[u]] = -np.inf
            top = scores.topk(20, dim=1).indices.numpy()
            for j, u in enumerate(b):
                r, n = ds.recall_ndcg(top[j], d.test[u])
                rec.append(r)
                ndcg.append(n)
        results[name] = {"recall@20": float(np.mean(rec)), "ndcg@20": float(np.mean(ndcg))}
        print(json.dumps({name: results[name], "seconds": round(time.time() - t)}), flush=True)

    def user_rows(b):
        r = np.concatenate([np.full(len(d.train[u]), j) for j, u in enumerate(b)])
        c = np.concatenate([d.train[u] for u in b])
        return torch.sparse_coo_tensor(torch.from_numpy(np.stack([r, c])), torch.ones(len(r)), (len(b), N))

    if "ease" in methods or "ease_sparse50" in methods:
        t = time.time()
        bw = ez.ease_weights(d.train, N, args.lam)
        print(json.dumps({"ease_fit_seconds": round(time.time() - t)}), flush=True)
        idx, val = ez.top_neighbours(bw, 50)
        if args.ease_table:
            info = {"lam": args.lam, "neighbours": 50, "holdout": 0.0, "data_sha256": d.data_hash}
            torch.save((idx, val, info), args.ease_table)
        if "ease" in methods:
            evaluate("ease", lambda b: torch.sparse.mm(user_rows(b), bw), 1024)
        del bw
        if "ease_sparse50" in methods:
            rows_i = torch.arange(N).repeat_interleave(50)
            sparse = torch.sparse_coo_tensor(torch.stack([rows_i, idx.long().reshape(-1)]), val.reshape(-1), (N, N)).coalesce()

            def ease_sparse(b):
                return torch.sparse.mm(user_rows(b), sparse).to_dense()

            evaluate("ease_sparse50", ease_sparse, 1024)

    if "most_popular" in methods:
        pop = torch.from_numpy(d.popularity()).float()
        evaluate("most_popular", lambda b: pop.repeat(len(b), 1), 2048)
    if "itemknn_cosine" not in methods:
        results["users"] = len(users)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
        return

    deg = torch.from_numpy(np.bincount(cols, minlength=N)).float().clamp(min=1)
    xt = x.t().coalesce()
    sim = torch.zeros(N, N)
    by_item = [[] for _ in range(N)]
    for r, c in zip(rows, cols):
        by_item[c].append(r)
    for j0 in range(0, N, 1024):
        j1 = min(N, j0 + 1024)
        xb = torch.zeros(U, j1 - j0)
        for j in range(j0, j1):
            xb[by_item[j], j - j0] = 1.0
        sim[:, j0:j1] = torch.sparse.mm(xt, xb)
    sim /= deg.sqrt().unsqueeze(1)
    sim /= deg.sqrt().unsqueeze(0)
    sim.fill_diagonal_(0.0)

    def itemknn(b):
        r = np.concatenate([np.full(len(d.train[u]), j) for j, u in enumerate(b)])
        c = np.concatenate([d.train[u] for u in b])
        xb = torch.sparse_coo_tensor(torch.from_numpy(np.stack([r, c])), torch.ones(len(r)), (len(b), N))
        return torch.sparse.mm(xb, sim)

    evaluate("itemknn_cosine", itemknn, 1024)
    results["users"] = len(users)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
