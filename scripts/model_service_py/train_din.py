#!/usr/bin/env python3
"""Train stage 2 (msmodels.DIN2, a narrow DIN with LightGCN's score and the sparse-EASE score as
inputs) to re-rank LightGCN's wide candidate list, and export it.

Data: the held-out split of train.txt (data.holdout_split, same seed as the LightGCN run). Users
with held-out items are split in two halves: half A trains DIN, half B is kept for RankNet
(train_ranknet.py), so RankNet sees DIN scores on users DIN never trained on.
Lists are produced the way serving produces them: for each half-A user the exported LightGCN
scores the catalog from the kept history, history rows excluded, top C1 candidates with their s1;
the held-out items in the list are the positives. Loss: listwise softmax cross-entropy over the
whole list, averaged over its positives. The sparse-EASE table used in training is fitted on the
kept interactions (--ease-train); the export carries the serving table (--ease-serve, fitted on
all of train.txt) when given. Checkpoints every epoch; --resume continues.
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


def split_users(held, seed):
    users = np.array([u for u in range(len(held)) if len(held[u]) > 0])
    perm = np.random.default_rng(seed).permutation(users)
    half = len(perm) // 2
    return np.sort(perm[:half]), np.sort(perm[half:])


@torch.inference_mode()
def candidates_for(lightgcn, kept, users, c1, batch=512):
    out = torch.zeros((len(users), c1), dtype=torch.int32)
    scores = torch.zeros((len(users), c1))
    for s in range(0, len(users), batch):
        bu = users[s : s + batch]
        h, m = cascade.pad([kept[u] for u in bu])
        s1, cand = cascade.lightgcn_candidates(lightgcn, h, m, c1)
        out[s : s + len(bu)] = cand.to(torch.int32)
        scores[s : s + len(bu)] = s1
    return out, scores


@torch.inference_mode()
def ease_for(kept, users, cands, nbr_idx, nbr_val, batch=512):
    out = torch.zeros(cands.shape)
    for s in range(0, len(users), batch):
        h, m = cascade.pad([kept[u] for u in users[s : s + batch]])
        out[s : s + batch] = msmodels.ease_scores(h, m, cands[s : s + batch].long(), nbr_idx, nbr_val)
    return out


def recall_at(ranked_rows, held, users, k=20):
    return float(np.mean([np.isin(ranked_rows[i, :k], held[u]).sum() / len(held[u]) for i, u in enumerate(users)]))


def lists_cached(path, lightgcn, kept, users, c1, nbr_idx, nbr_val):
    if os.path.exists(path):
        return torch.load(path)
    t = time.time()
    cand, s1 = candidates_for(lightgcn, kept, users, c1)
    ease = ease_for(kept, users, cand, nbr_idx, nbr_val)
    torch.save((cand, s1, ease), path + ".tmp")
    os.replace(path + ".tmp", path)
    print(f"lists for {len(users)} users in {time.time() - t:.0f}s", flush=True)
    return cand, s1, ease


@torch.inference_mode()
def score_lists(din, kept, users, cand, s1, ease, batch=256):
    out = torch.zeros(cand.shape)
    for s in range(0, len(users), batch):
        h, m = cascade.pad([kept[u] for u in users[s : s + batch]])
        sl = slice(s, s + batch)
        out[sl] = din.mlp(din.features(h, m, cand[sl].long(), s1[sl], ease[sl])).squeeze(-1)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--lightgcn", required=True, help="exported LightGCN directory (model.pt) trained without the held-out items")
    p.add_argument("--ease-train", required=True, help="EASE neighbour table fitted on the kept interactions (ease.py --holdout)")
    p.add_argument("--ease-serve", help="EASE neighbour table fitted on all of train.txt, exported with the model")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True, help="export directory for DIN")
    p.add_argument("--holdout", type=float, default=0.1)
    p.add_argument("--holdout-seed", type=int, default=2026)
    p.add_argument("--c1", type=int, default=cascade.LIGHTGCN_CANDIDATES)
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--max-att", type=int, default=50)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-users", type=int, default=3000)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--limit-users", type=int, default=0, help="train on the first N half-A users only (smoke tests)")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    os.makedirs(args.work, exist_ok=True)

    d = ds.load(args.data)
    kept, held = ds.holdout_split(d.train, args.holdout, args.holdout_seed)
    users_a, users_b = split_users(held, args.holdout_seed)
    if args.limit_users:
        users_a = users_a[: args.limit_users]
    lightgcn = torch.jit.load(os.path.join(args.lightgcn, "model.pt")).eval()
    nbr_idx, nbr_val, ease_info = torch.load(args.ease_train)
    pop = np.bincount(np.concatenate(kept), minlength=d.num_items)
    eval_users = np.sort(users_b[np.random.default_rng(1).permutation(len(users_b))[: args.eval_users]])

    cand_a, s1_a, ease_a = lists_cached(os.path.join(args.work, f"lists_a_{args.c1}.pt"), lightgcn, kept, users_a, args.c1, nbr_idx, nbr_val)
    cand_e, s1_e, ease_e = lists_cached(os.path.join(args.work, f"lists_eval_{args.c1}.pt"), lightgcn, kept, eval_users, args.c1, nbr_idx, nbr_val)
    labels_a = torch.from_numpy(np.stack([np.isin(cand_a[i].numpy(), held[u]) for i, u in enumerate(users_a)]))
    base = {
        "lightgcn_recall20_heldout": recall_at(cand_e.numpy(), held, eval_users),
        "lightgcn_recall_c1_heldout": recall_at(cand_e.numpy(), held, eval_users, args.c1),
        "ease_recall20_heldout": recall_at(cand_e.gather(1, ease_e.argsort(1, descending=True)).numpy(), held, eval_users),
        "positives_per_list": float(labels_a.sum(1).float().mean()),
    }
    print(json.dumps({"eval_users": len(eval_users), **base}), flush=True)

    din = msmodels.DIN2(d.num_items, nbr_idx, nbr_val, torch.log1p(torch.from_numpy(pop).float()),
                        dim=args.dim, hidden=args.hidden, max_att=args.max_att)
    with torch.no_grad():
        # start the item embeddings from the top principal directions of LightGCN's item vectors
        x = msmodels.item_vectors(lightgcn).clone()
        _, _, v = torch.pca_lowrank(x, q=args.dim, center=True)
        e = x @ v
        din.emb.weight.copy_(e / e.norm(dim=1).mean())
        # standardise the features on a sample of training lists
        samp = np.sort(rng.choice(len(users_a), min(2000, len(users_a)), replace=False))
        h, m = cascade.pad([kept[users_a[i]] for i in samp])
        f = din.features(h, m, cand_a[samp].long(), s1_a[samp], ease_a[samp]).reshape(-1, din.feat_mean.shape[0])
        din.feat_mean.copy_(f.mean(0))
        din.feat_std.copy_(f.std(0).clamp(min=1e-6))
    opt = torch.optim.Adam(din.parameters(), lr=args.lr)
    ckpt = os.path.join(args.work, "din2.ckpt")
    start, log, best = 0, [], None
    if args.resume and os.path.exists(ckpt):
        st = torch.load(ckpt)
        din.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        start, log, best = st["epoch"], st["log"], st.get("best")
        print(f"resumed at epoch {start}", flush=True)

    train_rows = np.nonzero(labels_a.sum(1).numpy() > 0)[0]
    for epoch in range(start, args.epochs):
        din.train()
        t0 = time.time()
        total, steps = 0.0, 0
        order = rng.permutation(train_rows)
        for s in range(0, len(order), args.batch):
            rows = np.sort(order[s : s + args.batch])
            h, m = cascade.pad([kept[users_a[i]] for i in rows])
            t = torch.from_numpy(rows)
            logits = din.mlp(din.features(h, m, cand_a[t].long(), s1_a[t], ease_a[t])).squeeze(-1)
            y = labels_a[t].float()
            logp = torch.log_softmax(logits, dim=1)
            loss = -((logp * y).sum(1) / y.sum(1)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
            steps += 1
            if steps % 100 == 0:
                print(json.dumps({"epoch": epoch + 1, "step": steps, "loss": total / steps, "seconds": round(time.time() - t0)}), flush=True)
        din.eval()
        sc = score_lists(din, kept, eval_users, cand_e, s1_e, ease_e)
        ranked = cand_e.gather(1, sc.argsort(1, descending=True)).numpy()
        rec = recall_at(ranked, held, eval_users)
        entry = {"epoch": epoch + 1, "loss": total / max(steps, 1), "seconds": round(time.time() - t0, 1),
                 "din_recall20_heldout": rec, "din_recall100_heldout": recall_at(ranked, held, eval_users, 100),
                 "din_recall200_heldout": recall_at(ranked, held, eval_users, 200)}
        log.append(entry)
        print(json.dumps(entry), flush=True)
        if best is None or rec > best[0]:
            best = (rec, epoch + 1, {k: v.clone() for k, v in din.state_dict().items()})
        state = {"model": din.state_dict(), "opt": opt.state_dict(), "epoch": epoch + 1, "log": log, "best": best}
        torch.save(state, ckpt + ".tmp")
        os.replace(ckpt + ".tmp", ckpt)

    if best is not None:
        din.load_state_dict(best[2])
        print(f"exporting epoch {best[1]} (held-out recall@20 {best[0]:.4f})", flush=True)
    hp = {k: v for k, v in vars(args).items() if k not in ("data", "work", "out", "lightgcn", "resume", "ease_train", "ease_serve")}
    hp["ease"] = serving_table(din, args.ease_serve, ease_info)
    msmodels.export(
        din.eval(),
        "din",
        args.out,
        d.num_items,
        {"model": "DIN2", "dim": din.dim, "inputs": ["history", "mask", "cands", "s1"], "hyperparameters": hp,
         "data_sha256": d.data_hash, "training_log": log, "validation_baselines": base,
         "exported_epoch": best[1] if best else None},
    )
    print(f"exported {args.out}", flush=True)


if __name__ == "__main__":
    main()
