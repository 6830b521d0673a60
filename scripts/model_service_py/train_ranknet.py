#!/usr/bin/env python3
"""Train RankNet (Burges et al., ICML 2005) to order DIN's candidates, and export it.

Data: half B of the held-out split (see train_din.py), users DIN did not train on. For each user
the exported LightGCN and DIN run exactly as when serving (cascade.py); the DIN_CANDIDATES best
are the list, held-out items in it are relevant. Features (msmodels.RankNet): the two upstream
scores, LightGCN rank, popularity, history length, max/mean embedding cosine to the history; with
--ease-feature also the sparse-EASE score (feature 7; the table fitted on the kept interactions,
--ease-train; the export then carries the serving table fitted on all of train.txt, --ease-serve).
DIN weighs that score already; RankNet given it again validated lower (model_output/NOTES-v2.md).
(Until cascade v2 feature 7 was an ItemKNN cosine score.)
Loss: the pairwise logistic loss over every (relevant, irrelevant) pair of a list.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from . import cascade
from . import data as ds
from .ease import serving_table
from . import msmodels
from .train_din import split_users


@torch.inference_mode()
def lists_for(lightgcn, din, kept, users, c1, c2):
    """The serving lists: candidates after DIN with their stage-1 and stage-2 scores."""
    cands = torch.zeros(len(users), c2, dtype=torch.long)
    s1s, s2s = torch.zeros(len(users), c2), torch.zeros(len(users), c2)
    for idx in cascade.length_batches([len(kept[u]) for u in users], max_cells=2048):
        h, m = cascade.pad([kept[users[i]] for i in idx])
        s1, cand = cascade.lightgcn_candidates(lightgcn, h, m, c1)
        s2 = cascade.din_scores(din, h, m, cand, s1)
        s2_top, pos2 = s2.topk(c2, dim=1)
        t = torch.from_numpy(idx)
        cands[t], s1s[t], s2s[t] = cand.gather(1, pos2), s1.gather(1, pos2), s2_top
    return cands, s1s, s2s


@torch.inference_mode()
def features_for(model, kept, users, cands, s1, s2, batch=256):
    out = []
    for s in range(0, len(users), batch):
        h, m = cascade.pad([kept[u] for u in users[s : s + batch]])
        out.append(model.features(h, m, cands[s : s + batch], s1[s : s + batch], s2[s : s + batch]))
    return torch.cat(out)


def recall(order_rows, held, users, k=20):
    return float(np.mean([np.isin(order_rows[i, :k], held[u]).sum() / len(held[u]) for i, u in enumerate(users)]))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--lightgcn", required=True, help="exported LightGCN directory")
    p.add_argument("--din", required=True, help="exported DIN directory")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--ease-train", required=True, help="EASE neighbour table fitted on the kept interactions")
    p.add_argument("--ease-serve", help="with --ease-feature: the EASE neighbour table fitted on all of train.txt, exported with the model")
    p.add_argument("--holdout", type=float, default=0.1)
    p.add_argument("--holdout-seed", type=int, default=2026)
    p.add_argument("--c1", type=int, default=cascade.LIGHTGCN_CANDIDATES)
    p.add_argument("--c2", type=int, default=cascade.DIN_CANDIDATES)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--ease-feature", action="store_true", help="add the sparse-EASE score as feature 7")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--valid-frac", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--limit-users", type=int, default=0, help="use the first N half-B users only (smoke tests)")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    os.makedirs(args.work, exist_ok=True)

    d = ds.load(args.data)
    kept, held = ds.holdout_split(d.train, args.holdout, args.holdout_seed)
    _, users_b = split_users(held, args.holdout_seed)
    if args.limit_users:
        users_b = users_b[: args.limit_users]
    lightgcn = torch.jit.load(os.path.join(args.lightgcn, "model.pt")).eval()
    din = torch.jit.load(os.path.join(args.din, "model.pt")).eval()
    nbr_idx, nbr_val, ease_info = torch.load(args.ease_train)
    if hasattr(din, "nbr_idx"):
        # the exported DIN carries the serving EASE table, fitted on all of train.txt and so on the
        # held-out items too: the training lists use the kept-interaction table, as DIN's training did
        with torch.no_grad():
            din.nbr_idx.copy_(nbr_idx)
            din.nbr_val.copy_(nbr_val)

    pop = np.bincount(np.concatenate(kept), minlength=d.num_items)
    item_unit = torch.nn.functional.normalize(msmodels.item_vectors(lightgcn).clone(), dim=1)
    f = 8 if args.ease_feature else 7
    model = msmodels.RankNet(
        item_unit, torch.log1p(torch.from_numpy(pop).float()), torch.zeros(f), torch.ones(f), hidden=args.hidden,
        neighbours=(nbr_idx, nbr_val) if args.ease_feature else None,
    )

    t = time.time()
    lists_cache = os.path.join(args.work, f"lists_b_{args.c1}_{args.c2}.pt")
    if os.path.exists(lists_cache):
        cands, s1, s2 = torch.load(lists_cache)
    else:
        cands, s1, s2 = lists_for(lightgcn, din, kept, users_b, args.c1, args.c2)
        torch.save((cands, s1, s2), lists_cache)
    feats = features_for(model, kept, users_b, cands, s1, s2)
    labels = torch.from_numpy(np.stack([np.isin(cands[i].numpy(), held[u]) for i, u in enumerate(users_b)])).float()
    print(f"lists for {len(users_b)} users in {time.time() - t:.0f}s; relevant per list {labels.sum(1).mean():.3f}", flush=True)
    flat = feats.reshape(-1, feats.shape[-1])
    mean, std = flat.mean(0), flat.std(0).clamp(min=1e-6)
    model.feat_mean.copy_(mean)
    model.feat_std.copy_(std)
    x = (feats - mean) / std

    perm = np.random.default_rng(args.seed).permutation(len(users_b))
    n_valid = int(len(perm) * args.valid_frac)
    valid, train = np.sort(perm[:n_valid]), perm[n_valid:]
    train = train[labels[train].sum(1).numpy() > 0]  # lists without a relevant item have no pairs
    opt = torch.optim.Adam(model.net.parameters(), lr=args.lr)
    base = {
        "lightgcn_recall20": recall(cands[valid].gather(1, s1[valid].argsort(1, descending=True)).numpy(), held, users_b[valid]),
        "din_recall20": recall(cands[valid].numpy(), held, users_b[valid]),
    }
    print(json.dumps({"valid_users": len(valid), **base}), flush=True)
    log = []
    best = None
    rng = np.random.default_rng(args.seed)
    for epoch in range(args.epochs):
        model.train()
        order = rng.permutation(train)
        total = 0.0
        for s in range(0, len(order), args.batch):
            b = torch.from_numpy(order[s : s + args.batch])
            sc = model.net(x[b]).squeeze(-1)  # [B, C]
            y = labels[b]
            diff = sc.unsqueeze(2) - sc.unsqueeze(1)  # s_i - s_j
            pair = (y.unsqueeze(2) > y.unsqueeze(1)).float()  # i relevant, j not
            loss = (torch.nn.functional.softplus(-diff) * pair).sum() / pair.sum().clamp(min=1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(b)
        model.eval()
        with torch.no_grad():
            sv = model.net(x[valid]).squeeze(-1)
        rec = recall(cands[valid].gather(1, sv.argsort(1, descending=True)).numpy(), held, users_b[valid])
        entry = {"epoch": epoch + 1, "loss": total / len(order), "ranknet_recall20": rec}
        log.append(entry)
        print(json.dumps(entry), flush=True)
        if best is None or rec > best[0]:
            best = (rec, epoch + 1, {k: v.clone() for k, v in model.net.state_dict().items()})
    if best is not None:
        model.net.load_state_dict(best[2])
        print(f"exporting epoch {best[1]} (validation recall@20 {best[0]:.4f})", flush=True)

    hp = {k: v for k, v in vars(args).items() if k not in ("data", "work", "out", "lightgcn", "din", "ease_train", "ease_serve")}
    if args.ease_feature:
        hp["ease"] = serving_table(model, args.ease_serve, ease_info)
    msmodels.export(
        model.eval(),
        "ranknet",
        args.out,
        d.num_items,
        {"model": "RankNet", "dim": int(item_unit.shape[1]), "features": f, **({"feature_7": "sparse EASE"} if args.ease_feature else {}), "hyperparameters": hp,
         "data_sha256": d.data_hash, "training_log": log, "validation_baselines": base},
    )
    print(f"exported {args.out}", flush=True)


if __name__ == "__main__":
    main()
