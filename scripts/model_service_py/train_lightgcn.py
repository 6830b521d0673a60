#!/usr/bin/env python3
"""Train LightGCN (He et al., SIGIR 2020) on Amazon-Book and export the serving module.

Architecture as in the paper: free layer-0 embeddings for users and items, K=3 propagation layers
over the symmetrically normalised user-item graph, final embedding = mean of the K+1 layers.
Recipe (ours, for a 2-core CPU): instead of BPR with one sampled negative, a full-softmax
multinomial likelihood over the whole catalog for a batch of users (every positive of a user is a
target), on cosine scores with temperature TAU; Adam. Checkpoints every epoch; --resume continues.

Serving fold-in: a profile H is a new user node with no trained embedding. Its layer-k+1
embedding is the paper's propagation rule e_u^(k+1) = sum_{i in H} e_i^(k) / sqrt(|H| d_i) over the
item layers 0..K-1, and its representation is the sum of those K layers (the paper's free layer-0
term is the one part that needs a trained id, so it is left out). The export stores
fold_in = E^(0) + E^(1) + E^(2), item_norm = d^-1/2 and item_emb = the L2-normalised final item
embeddings. Evaluation reports both fold-in and the trained user vectors.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from . import data as ds
from . import msmodels


def build_graph(kept, num_users, num_items):
    rows, cols = [], []
    for u, items in enumerate(kept):
        rows.append(np.full(len(items), u, dtype=np.int64))
        cols.append(items)
    u_idx = torch.from_numpy(np.concatenate(rows))
    i_idx = torch.from_numpy(np.concatenate(cols))
    deg_u = torch.bincount(u_idx, minlength=num_users).float()
    deg_i = torch.bincount(i_idx, minlength=num_items).float()
    w = 1.0 / torch.sqrt(deg_u[u_idx].clamp(min=1) * deg_i[i_idx].clamp(min=1))
    n = num_users + num_items
    r = torch.cat([u_idx, i_idx + num_users])
    c = torch.cat([i_idx + num_users, u_idx])
    adj = torch.sparse_coo_tensor(torch.stack([r, c]), torch.cat([w, w]), (n, n)).coalesce()
    return adj.to_sparse_csr(), deg_i


def propagate(adj, e0, layers):
    out = [e0]
    e = e0
    for _ in range(layers):
        e = adj @ e
        out.append(e)
    return out


def fold_in_tables(layers_out, num_users, deg_i, layers):
    items = [x[num_users:] for x in layers_out]
    fold_in = sum(items[:layers])  # E^(0) + ... + E^(K-1)
    final = torch.stack(items).mean(0)
    norm = deg_i.clamp(min=1).pow(-0.5)
    norm[deg_i == 0] = 0.0
    return fold_in, F.normalize(final, dim=1), norm


def evaluate(serve: msmodels.LightGCNServe, history, test, users, k=20, user_vecs=None):
    """Full-ranking Recall/NDCG@k over `users`, ranking everything except the history."""
    rec, ndcg = [], []
    with torch.inference_mode():
        for s in range(0, len(users), 512):
            batch = users[s : s + 512]
            L = max(1, max(len(history[u]) for u in batch))
            h = torch.zeros(len(batch), L, dtype=torch.long)
            m = torch.zeros(len(batch), L, dtype=torch.bool)
            for j, u in enumerate(batch):
                h[j, : len(history[u])] = torch.from_numpy(history[u])
                m[j, : len(history[u])] = True
            if user_vecs is None:
                scores = serve(h, m)
            else:
                scores = user_vecs[batch] @ serve.item_emb_t
            scores[m.nonzero()[:, 0], h[m]] = float("-inf")
            top = scores.topk(k, dim=1).indices.numpy()
            for j, u in enumerate(batch):
                r, n = ds.recall_ndcg(top[j], test[u], k)
                rec.append(r)
                ndcg.append(n)
    return float(np.mean(rec)), float(np.mean(ndcg))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="Amazon-Book directory (train.txt, test.txt, ...)")
    p.add_argument("--work", required=True, help="directory for checkpoints and logs")
    p.add_argument("--out", help="export the serving module to OUT/ (model.pt, meta.json)")
    p.add_argument("--holdout", type=float, default=0.0, help="train without this held-out fraction")
    p.add_argument("--holdout-seed", type=int, default=2026)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--batch-users", type=int, default=1024)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--tau", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--eval-users", type=int, default=5000, help="test users sampled for per-epoch eval")
    p.add_argument("--eval-every", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.work, exist_ok=True)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    d = ds.load(args.data)
    kept, _ = ds.holdout_split(d.train, args.holdout, args.holdout_seed) if args.holdout > 0 else (d.train, None)
    U, N = d.num_users, d.num_items
    adj, deg_i = build_graph(kept, U, N)
    emb = torch.nn.Parameter(torch.randn(U + N, args.dim) * 0.1)
    opt = torch.optim.Adam([emb], lr=args.lr, weight_decay=args.weight_decay)
    ckpt = os.path.join(args.work, "lightgcn.ckpt")
    start = 0
    log = []
    if args.resume and os.path.exists(ckpt):
        st = torch.load(ckpt)
        emb.data.copy_(st["emb"])
        opt.load_state_dict(st["opt"])
        start, log = st["epoch"], st["log"]
        print(f"resumed at epoch {start}", flush=True)

    # user batches: multi-hot targets built per batch from CSR arrays
    indptr = np.zeros(U + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(x) for x in kept])
    flat = np.concatenate(kept)
    train_users = np.array([u for u in range(U) if len(kept[u]) > 0])
    test_users = [u for u in range(U) if len(d.test[u]) > 0]
    eval_users = sorted(np.random.default_rng(0).choice(test_users, size=min(args.eval_users, len(test_users)), replace=False).tolist())

    def export_module():
        with torch.no_grad():
            outs = propagate(adj, emb.detach(), args.layers)
            fold_in, item_unit, norm = fold_in_tables(outs, U, deg_i, args.layers)
            final_users = torch.stack([x[:U] for x in outs]).mean(0)
        return msmodels.LightGCNServe(fold_in, item_unit, norm), final_users

    for epoch in range(start, args.epochs):
        t0 = time.time()
        perm = rng.permutation(train_users)
        total = 0.0
        for s in range(0, len(perm), args.batch_users):
            bu = perm[s : s + args.batch_users]
            outs = propagate(adj, emb, args.layers)
            final = torch.stack(outs).mean(0)
            ue = F.normalize(final[torch.from_numpy(bu)], dim=1)
            ie = F.normalize(final[U:], dim=1)
            logits = ue @ ie.t() / args.tau
            logp = torch.log_softmax(logits, dim=1)
            rows = np.concatenate([np.full(indptr[u + 1] - indptr[u], j) for j, u in enumerate(bu)])
            cols = np.concatenate([flat[indptr[u] : indptr[u + 1]] for u in bu])
            counts = torch.from_numpy(indptr[bu + 1] - indptr[bu]).float()
            pos = logp[torch.from_numpy(rows), torch.from_numpy(cols)]
            loss = -(pos / counts[torch.from_numpy(rows)]).sum() / len(bu)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(bu)
        entry = {"epoch": epoch + 1, "loss": total / len(perm), "seconds": round(time.time() - t0, 1)}
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            serve, users_final = export_module()
            entry["recall20_foldin"], entry["ndcg20_foldin"] = evaluate(serve, d.train, d.test, eval_users)
            entry["recall20_uservec"], _ = evaluate(serve, d.train, d.test, eval_users, user_vecs=users_final)
        log.append(entry)
        print(json.dumps(entry), flush=True)
        torch.save({"emb": emb.detach(), "opt": opt.state_dict(), "epoch": epoch + 1, "log": log}, ckpt + ".tmp")
        os.replace(ckpt + ".tmp", ckpt)

    if args.out:
        serve, _ = export_module()
        hp = {k: v for k, v in vars(args).items() if k not in ("data", "work", "out", "resume", "threads")}
        msmodels.export(
            serve,
            "lightgcn",
            args.out,
            N,
            {
                "model": "LightGCN",
                "dim": args.dim,
                "hyperparameters": hp,
                "data_sha256": d.data_hash,
                "training_log": log,
            },
        )
        print(f"exported {args.out}", flush=True)


if __name__ == "__main__":
    main()
