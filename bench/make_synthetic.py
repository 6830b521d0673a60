#!/usr/bin/env python3
"""Synthetic models for the scale benchmark: TorchScript files of the three served architectures
(model_service_py.msmodels, the shipped dimensions and layer weights) for a catalog of --items items with random weights,
plus catalog.tsv, manifest.json and a profiles file of --users synthetic shoppers.

History lengths are drawn from the Amazon-Book training histories (--data) so the per-request
work matches the real workload; items are drawn with a Zipf-like popularity. LightGCN's item
vectors are the shipped model's, each repeated with noise, so the catalog has the geometry of real
item embeddings (what an approximate candidate search depends on); the other tables are random.
The cost is real: it is a throughput test of the same computation at 1M items.

usage: make_synthetic.py --data DIR --out DIR [--items 1000000] [--users 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from model_service_py import data as ds
from model_service_py import msmodels

# The noise added to a real item's unit vector (relative to its length) to make a synthetic item.
NOISE = 0.5
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "model_output")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="Amazon-Book directory (history lengths)")
    p.add_argument("--out", required=True)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    done = os.path.join(args.out, ".complete")
    with open(os.path.join(SHIPPED, "manifest.json")) as f:
        shipped_manifest = json.load(f)
    shipped_version, shipped_candidates = shipped_manifest["version"], shipped_manifest.get("candidates")
    stamp = (f"{args.items} {args.users} {args.seed} {msmodels.sha256_file(msmodels.__file__)} "
             f"{msmodels.sha256_file(os.path.abspath(__file__))} {shipped_version}")
    if os.path.exists(done) and open(done).read() == stamp:
        print(f"{args.out}: already generated")
        return
    t0 = time.time()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    n = args.items
    shipped = {s: torch.jit.load(os.path.join(SHIPPED, s, "model.pt")) for s in ("lightgcn", "din", "ranknet")}
    din_sd, rank_sd = shipped["din"].state_dict(), shipped["ranknet"].state_dict()
    dim = msmodels.item_vectors(shipped["lightgcn"]).shape[1]
    din_dim = din_sd["emb.weight"].shape[1]
    ease_k = din_sd["nbr_idx"].shape[1]
    knn = rank_sd["nbr_idx"].shape[1] if rank_sd["nbr_idx"].numel() else 0  # RankNet's own table, if it has one

    # popularity ~ Zipf: item r has weight 1/(r+10)^0.9
    weights = 1.0 / np.power(np.arange(n) + 10.0, 0.9)
    weights /= weights.sum()
    popularity = np.maximum(1, np.round(weights * 50 * n)).astype(np.int64)
    asins = [f"S{i:09d}" for i in range(n)]
    log_pop = torch.log1p(torch.from_numpy(popularity).float())

    # LightGCN's tables grown from the shipped (Amazon-Book) ones: every synthetic item is a real
    # item's vectors plus noise, so the catalog has the geometry of real item embeddings (clusters
    # of similar items), which the approximate candidate search (IVF) depends on; pure random
    # vectors have none. The first rows copy each real item once, the rest draw real items evenly.
    real_sd = shipped["lightgcn"].state_dict()
    real_unit, real_fold = msmodels.item_vectors(real_sd), real_sd["fold_in"]
    source = torch.randint(0, real_unit.shape[0], (n,))
    source[: min(n, real_unit.shape[0])] = torch.arange(min(n, real_unit.shape[0]))
    unit = torch.nn.functional.normalize(real_unit[source] + NOISE * torch.randn(n, dim) / dim**0.5, dim=1)
    emb = real_fold[source] + NOISE * real_fold.std() * torch.randn(n, dim)
    norm = torch.from_numpy(1.0 / np.sqrt(popularity.astype(np.float32)))
    lightgcn = msmodels.LightGCNServe(emb, unit, norm)
    # the shipped DIN2 and RankNet with every per-item table (embeddings, EASE / ItemKNN neighbours)
    # replaced by random ones of the same width for n items
    din = msmodels.DIN2(n, torch.randint(0, n, (n, ease_k), dtype=torch.int32), torch.rand(n, ease_k) * 0.1, log_pop,
                        dim=din_dim, hidden=din_sd["mlp.0.weight"].shape[0], max_att=int(shipped["din"].max_att))
    din.load_state_dict({k: v for k, v in din_sd.items() if k not in ("emb.weight", "nbr_idx", "nbr_val", "log_pop")},
                        strict=False)
    ranknet = msmodels.RankNet(
        unit,
        log_pop,
        rank_sd["feat_mean"],
        rank_sd["feat_std"],
        hidden=rank_sd["net.0.weight"].shape[0],
        neighbours=(torch.randint(0, n, (n, knn), dtype=torch.int32), torch.rand(n, knn) * 0.1) if knn else None,
    )
    ranknet.net.load_state_dict({k[4:]: v for k, v in rank_sd.items() if k.startswith("net.")})
    models = {}
    for stage, module in (("lightgcn", lightgcn), ("din", din), ("ranknet", ranknet)):
        meta = msmodels.export(module, stage, os.path.join(args.out, stage), n, {"dim": dim, "synthetic": True})
        models[stage] = {"version": f"{stage}-{meta['sha256'][:12]}", "dim": dim, "sha256": meta["sha256"],
                         "file": f"{stage}/model.pt", "inputs": msmodels.STAGE_INPUTS[stage]}
        print(f"{stage}: exported ({time.time() - t0:.0f}s)", flush=True)
    msmodels.write_catalog(args.out, asins, popularity.tolist())
    msmodels.write_manifest(args.out, {
        "version": f"synthetic-{n}-" + "-".join(models[s]["sha256"][:6] for s in ("lightgcn", "din", "ranknet")),
        "models": models,
        "catalog": {"file": "catalog.tsv", "num_items": n, "popularity": "synthetic Zipf"},
        "candidates": shipped_candidates,
    })

    lengths = np.array([len(h) for h in ds.load(args.data).train])
    cdf = np.cumsum(weights)
    with open(os.path.join(args.out, "profiles.jsonl"), "w") as f:
        for u in range(args.users):
            length = int(rng.choice(lengths))
            items = np.minimum(np.searchsorted(cdf, rng.random(length)), n - 1)
            f.write(json.dumps({"user_id": f"synthetic-{u:07d}", "items": [asins[i] for i in items]}) + "\n")
    with open(done, "w") as f:
        f.write(stamp)
    print(f"{args.out}: {n} items, {args.users} profiles in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
