#!/usr/bin/env python3
"""Train DIN (Zhou et al., KDD 2018) to re-rank LightGCN's candidates, and export it.

Data: the held-out split of train.txt (data.holdout_split, same seed as the LightGCN run). Users
with held-out items are split in two halves: half A trains DIN, half B is kept for RankNet
(train_ranknet.py), so RankNet sees DIN scores on users DIN never trained on.
For each half-A user, every epoch, up to PER_USER leave-one-out examples: positive = one of the
user's items (kept or held out), history = the others; negatives = items drawn from the exported
LightGCN's own top candidates for the user's kept history (what DIN ranks when serving).
Loss: softmax cross-entropy over 1 positive + NEG negatives. DIN's item embeddings start from the
LightGCN item vectors. Checkpoints every epoch; --resume continues.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

import cascade
import data as ds
import msmodels


def split_users(held, seed):
    users = np.array([u for u in range(len(held)) if len(held[u]) > 0])
    perm = np.random.default_rng(seed).permutation(users)
    half = len(perm) // 2
    return np.sort(perm[:half]), np.sort(perm[half:])


@torch.inference_mode()
def candidates_for(lightgcn, kept, users, c1):
    out = np.zeros((len(users), c1), dtype=np.int64)
    scores = np.zeros((len(users), c1), dtype=np.float32)
    for s in range(0, len(users), 1024):
        bu = users[s : s + 1024]
        h, m = cascade.pad([kept[u] for u in bu])
        s1, cand = cascade.lightgcn_candidates(lightgcn, h, m, c1)
        out[s : s + len(bu)] = cand.numpy()
        scores[s : s + len(bu)] = s1.numpy()
    return out, scores


def recall_at(ranked_rows, held, users, k=20):
    return float(np.mean([np.isin(ranked_rows[i, :k], held[u]).sum() / len(held[u]) for i, u in enumerate(users)]))


@torch.inference_mode()
def din_order(din, kept, users, cands):
    out = np.zeros_like(cands)
    for idx in cascade.length_batches([len(kept[u]) for u in users], max_cells=2048):
        h, m = cascade.pad([kept[users[i]] for i in idx])
        c = torch.from_numpy(cands[idx])
        order = din(h, m, c).argsort(dim=1, descending=True)
        out[idx] = c.gather(1, order).numpy()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--lightgcn", required=True, help="exported LightGCN directory (model.pt) trained without the held-out items")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True, help="export directory for DIN")
    p.add_argument("--holdout", type=float, default=0.1)
    p.add_argument("--holdout-seed", type=int, default=2026)
    p.add_argument("--candidates", type=int, default=cascade.LIGHTGCN_CANDIDATES)
    p.add_argument("--neg", type=int, default=31)
    p.add_argument("--per-user", type=int, default=4, help="leave-one-out targets per user and epoch")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=128, help="most users per batch (batches hold similar history lengths)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--train-history", type=int, default=100, help="history items used per training example")
    p.add_argument("--eval-users", type=int, default=3000)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    os.makedirs(args.work, exist_ok=True)

    d = ds.load(args.data)
    kept, held = ds.holdout_split(d.train, args.holdout, args.holdout_seed)
    users_a, users_b = split_users(held, args.holdout_seed)
    all_items = [np.union1d(k, h) for k, h in zip(kept, held)]
    lightgcn = torch.jit.load(os.path.join(args.lightgcn, "model.pt")).eval()
    cache = os.path.join(args.work, "din_candidates.npz")
    if os.path.exists(cache):
        z = np.load(cache)
        cand_a = z["cand_a"]
    else:
        t = time.time()
        cand_a, _ = candidates_for(lightgcn, kept, users_a, args.candidates)
        np.savez(cache, cand_a=cand_a)
        print(f"candidates for {len(users_a)} users in {time.time() - t:.0f}s", flush=True)
    eval_users = users_b[np.random.default_rng(1).permutation(len(users_b))[: args.eval_users]]
    eval_users = np.sort(eval_users)
    cand_eval, _ = candidates_for(lightgcn, kept, eval_users, args.candidates)
    base = recall_at(cand_eval, held, eval_users)
    print(json.dumps({"eval_users": len(eval_users), "lightgcn_recall20_heldout": base}), flush=True)

    din = msmodels.DIN(d.num_items, dim=int(lightgcn.item_emb.shape[1]))
    with torch.no_grad():
        din.emb.weight.copy_(lightgcn.item_emb * 0.5)
    opt = torch.optim.Adam(din.parameters(), lr=args.lr)
    ckpt = os.path.join(args.work, "din.ckpt")
    start, log, best = 0, [], None
    if args.resume and os.path.exists(ckpt):
        st = torch.load(ckpt)
        din.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        start, log, best = st["epoch"], st["log"], st.get("best")
        print(f"resumed at epoch {start}", flush=True)

    for epoch in range(start, args.epochs):
        din.train()
        t0 = time.time()
        # leave-one-out examples: a target from the user's items, the rest is the history
        examples = []
        for i, u in enumerate(users_a):
            items = all_items[u]
            for t in rng.choice(len(items), min(len(items), args.per_user), replace=False):
                examples.append((i, t))
        lengths = [min(len(all_items[users_a[i]]) - 1, args.train_history) for i, _ in examples]
        batches = cascade.length_batches(lengths, args.batch, args.batch * 16, args.train_history)
        total, steps = 0.0, 0
        for bi in rng.permutation(len(batches)):
            hist, cands = [], []
            for e in batches[bi]:
                i, t = examples[e]
                u = users_a[i]
                items = all_items[u]
                h = np.delete(items, t)
                if len(h) > args.train_history:
                    h = np.sort(rng.choice(h, args.train_history, replace=False))
                hist.append(h)
                pool = cand_a[i][~np.isin(cand_a[i], items)]
                negs = rng.choice(pool, args.neg, replace=len(pool) < args.neg)
                cands.append(np.concatenate([[items[t]], negs]))
            h, m = cascade.pad(hist, args.train_history)
            logits = din(h, m, torch.from_numpy(np.stack(cands)))
            loss = torch.nn.functional.cross_entropy(logits, torch.zeros(len(hist), dtype=torch.long))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
            steps += 1
        din.eval()
        rec = recall_at(din_order(din, kept, eval_users, cand_eval), held, eval_users)
        entry = {"epoch": epoch + 1, "loss": total / steps, "seconds": round(time.time() - t0, 1), "din_recall20_heldout": rec}
        log.append(entry)
        print(json.dumps(entry), flush=True)
        if best is None or rec > best[0]:
            best = (rec, epoch + 1, {k: v.clone() for k, v in din.state_dict().items()})
        state = {"model": din.state_dict(), "opt": opt.state_dict(), "epoch": epoch + 1, "log": log, "best": best}
        torch.save(state, ckpt + ".tmp")
        os.replace(ckpt + ".tmp", ckpt)

    # export the epoch with the best held-out recall (DIN overfits its embedding table otherwise)
    if best is not None:
        din.load_state_dict(best[2])
        print(f"exporting epoch {best[1]} (held-out recall@20 {best[0]:.4f})", flush=True)

    hp = {k: v for k, v in vars(args).items() if k not in ("data", "work", "out", "lightgcn", "resume")}
    msmodels.export(
        din.eval(),
        "din",
        args.out,
        d.num_items,
        {"model": "DIN", "dim": din.dim, "hyperparameters": hp, "data_sha256": d.data_hash, "training_log": log,
         "lightgcn_recall20_heldout": base, "exported_epoch": best[1] if best else None},
    )
    print(f"exported {args.out}", flush=True)


if __name__ == "__main__":
    main()
