#!/usr/bin/env python3
"""EASE (Steck, WWW 2019): the closed-form item-item model B = I - P diag(1 / diag(P)), with
P = (X^T X + lambda I)^-1 over the user-item matrix X, diag(B) = 0; score(u) = x_u B.

The serving cascade does not hold the dense [N, N] B: it keeps each item's K strongest
(largest-weight) outgoing neighbours, a table nbr_idx int32 [N, K] / nbr_val float32 [N, K], and a
profile's score for a candidate c is sum over the history items h of B[h, c] when c is among h's
K neighbours ("sparse EASE"). train_din.py / train_ranknet.py / assemble_models.py build the
table with this module: on the kept part of the held-out split for training, on all of train.txt
for serving.

usage: python -m model_service_py.ease --data DIR --out TABLE.pt [--holdout 0 | 0.1] [--lam 200] [--neighbours 50]
"""

from __future__ import annotations

import argparse
import os
import time
from typing import List

import numpy as np
import torch

from . import data as ds


def gram(lists: List[np.ndarray], num_items: int, block: int = 2048) -> torch.Tensor:
    """Dense X^T X [N, N] float32 of the binary user-item matrix, built in column blocks."""
    rows = np.concatenate([np.full(len(x), u) for u, x in enumerate(lists)])
    cols = np.concatenate(lists)
    num_users = len(lists)
    xt = torch.sparse_coo_tensor(
        torch.from_numpy(np.stack([cols, rows])), torch.ones(len(rows)), (num_items, num_users)
    ).coalesce()
    order = np.argsort(cols, kind="stable")
    cs, rs = cols[order], rows[order]
    bounds = np.searchsorted(cs, np.arange(num_items + 1))
    g = torch.empty(num_items, num_items)
    for j0 in range(0, num_items, block):
        j1 = min(num_items, j0 + block)
        xb = torch.zeros(num_users, j1 - j0)
        sl = slice(bounds[j0], bounds[j1])
        xb[torch.from_numpy(rs[sl]), torch.from_numpy(cs[sl] - j0)] = 1.0
        g[:, j0:j1] = torch.sparse.mm(xt, xb)
        del xb
    return g


def ease_weights(lists: List[np.ndarray], num_items: int, lam: float = 200.0) -> torch.Tensor:
    """The dense EASE matrix B [N, N] (float32; row = history item, column = scored item)."""
    g = gram(lists, num_items)
    g.diagonal().add_(lam)
    chol = torch.linalg.cholesky(g)
    del g
    p = torch.cholesky_inverse(chol)
    del chol
    d = p.diagonal().clone()
    p /= -d.unsqueeze(0)  # B[i, j] = -P[i, j] / P[j, j]
    p.diagonal().zero_()
    return p


def top_neighbours(b: torch.Tensor, k: int):
    """Each row's k largest weights: (nbr_idx int32 [N, k], nbr_val float32 [N, k])."""
    val, idx = b.topk(k, dim=1)
    return idx.to(torch.int32).contiguous(), val.contiguous()


def serving_table(module: torch.nn.Module, path: str | None, trained_info: dict) -> dict:
    """Puts the EASE neighbour table a stage serves with (`path`, an output of this script) into
    `module`'s nbr_idx / nbr_val buffers, in place of the one it was trained with; returns the
    settings of the table it now holds, without the data hash (for the manifest)."""
    info = trained_info
    if path:
        idx, val, info = torch.load(path)
        module.nbr_idx.copy_(idx.to(torch.int32))
        module.nbr_val.copy_(val)
    return {k: v for k, v in info.items() if k != "data_sha256"}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="torch.save((nbr_idx, nbr_val, info)) here")
    p.add_argument("--holdout", type=float, default=0.0, help="fit on the kept part of this held-out split (0: all of train.txt)")
    p.add_argument("--holdout-seed", type=int, default=2026)
    p.add_argument("--lam", type=float, default=200.0)
    p.add_argument("--neighbours", type=int, default=50)
    args = p.parse_args()
    d = ds.load(args.data)
    lists = d.train if args.holdout == 0 else ds.holdout_split(d.train, args.holdout, args.holdout_seed)[0]
    t = time.time()
    b = ease_weights(lists, d.num_items, args.lam)
    idx, val = top_neighbours(b, args.neighbours)
    info = {"lam": args.lam, "neighbours": args.neighbours, "holdout": args.holdout, "holdout_seed": args.holdout_seed,
            "data_sha256": d.data_hash, "seconds": round(time.time() - t)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.save((idx, val, info), args.out + ".tmp")
    os.replace(args.out + ".tmp", args.out)
    print(info, flush=True)


if __name__ == "__main__":
    main()
