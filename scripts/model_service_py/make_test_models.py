#!/usr/bin/env python3
"""Generate a small model directory with the serving architectures (LightGCN fold-in, DIN, RankNet)
for tests: a clustered synthetic catalog, so a history drawn from one cluster gets recommendations
from that cluster. Deterministic for a given --seed. Not trained; never shipped.

usage: python -m model_service_py.make_test_models OUT_DIR [--items 300] [--clusters 6] [--dim 16] [--seed 1]
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from . import msmodels


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--items", type=int, default=300)
    p.add_argument("--clusters", type=int, default=6)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--version", default="synthetic-test")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    n, d = args.items, args.dim
    cluster = torch.arange(n) % args.clusters
    centers = F.normalize(torch.randn(args.clusters, d), dim=1)
    item = F.normalize(centers[cluster] + 0.35 * torch.randn(n, d), dim=1)
    pop = torch.randint(1, 1000, (n,))

    # ASIN-like ids; the two of the README walk-through come first
    asins = ["0553092626", "0393316041"] + [f"T{i:09d}" for i in range(2, n)]
    os.makedirs(args.out, exist_ok=True)
    msmodels.write_catalog(args.out, asins, pop.tolist())

    # the fp32 product on every device: the IVF tests expect probing every list to give exactly the
    # exact search's lists, and the index re-scores on the fp32 vectors (the shipped models, with
    # the fp16 table, run in tests/api.rs and tests/candidate_search.rs)
    lightgcn = msmodels.LightGCNServe(item, item, torch.ones(n), fp16_table=False)
    k = min(10, n - 1)
    sim = item @ item.t()
    sim.fill_diagonal_(-1.0)
    nbr_val, nbr_idx = sim.topk(k, dim=1)
    # stage 2, interface v2 (takes s1): a narrow DIN whose MLP adds the s1 and neighbour features
    din = msmodels.DIN2(n, nbr_idx, nbr_val.clamp(min=0), torch.log1p(pop.float()), dim=d, hidden=16)
    with torch.no_grad():
        din.emb.weight.copy_(item)
    ranknet = msmodels.RankNet(item, torch.log1p(pop.float()), torch.zeros(7), torch.ones(7), hidden=16)
    versions = {}
    for kind, module in (("lightgcn", lightgcn), ("din", din), ("ranknet", ranknet)):
        meta = msmodels.export(module, kind, os.path.join(args.out, kind), n, {"dim": d, "synthetic": True})
        versions[kind] = {"version": f"{args.version}-{kind}-{meta['sha256'][:8]}", "dim": d,
                          "inputs": msmodels.STAGE_INPUTS[kind]}
    msmodels.write_manifest(
        args.out,
        {"version": args.version, "models": versions, "catalog": {"file": "catalog.tsv", "num_items": n}, "synthetic": True},
    )
    print(f"wrote {args.out}: {n} items, dim {d}")


if __name__ == "__main__":
    main()
