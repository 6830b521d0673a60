#!/usr/bin/env python3
"""Assemble a serving model directory from the three exports: copies each stage's model.pt and
meta.json, writes catalog.tsv (ASIN and train.txt popularity by row, the cold-start order) and
manifest.json (versions, dims, catalog size, training-data hash, hyperparameters).

usage: python -m model_service_py.assemble_models --data DIR --lightgcn D --din D --ranknet D --out model_output
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

from . import data as ds
from . import msmodels


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--lightgcn", required=True)
    p.add_argument("--din", required=True)
    p.add_argument("--ranknet", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--c1", type=int, default=1000, help="LightGCN candidates the stages were trained for")
    p.add_argument("--c2", type=int, default=100, help="DIN candidates the stages were trained for")
    p.add_argument("--timings", help="directory of <step> files holding each training step's seconds (train_all.sh)")
    args = p.parse_args()
    d = ds.load(args.data)
    os.makedirs(args.out, exist_ok=True)
    models = {}
    for stage in ("lightgcn", "din", "ranknet"):
        src = getattr(args, stage)
        with open(os.path.join(src, "meta.json")) as f:
            meta = json.load(f)
        if meta["num_items"] != d.num_items:
            raise SystemExit(f"{stage}: exported for {meta['num_items']} items, the catalog has {d.num_items}")
        if meta.get("data_sha256") != d.data_hash:
            raise SystemExit(f"{stage}: trained on other data ({meta.get('data_sha256')})")
        dst = os.path.join(args.out, stage)
        os.makedirs(dst, exist_ok=True)
        for name in ("model.pt", "meta.json"):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
        models[stage] = {
            "version": f"{stage}-{meta['sha256'][:12]}",
            "dim": meta.get("dim"),
            "file": f"{stage}/model.pt",
            "sha256": meta["sha256"],
            "hyperparameters": meta.get("hyperparameters", {}),
        }
        if "inputs" in meta or stage != "din":
            models[stage]["inputs"] = meta.get("inputs", msmodels.STAGE_INPUTS[stage])
    msmodels.write_catalog(args.out, d.asins, d.popularity().tolist())
    timings = {}
    if args.timings and os.path.isdir(args.timings):
        for name in sorted(os.listdir(args.timings)):
            with open(os.path.join(args.timings, name)) as f:
                timings[name] = int(f.read().strip() or 0)
    combined = "-".join(models[s]["sha256"][:6] for s in ("lightgcn", "din", "ranknet"))
    msmodels.write_manifest(
        args.out,
        {
            "version": f"amazon-book-{combined}",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "models": models,
            "catalog": {"file": "catalog.tsv", "num_items": d.num_items, "popularity": "train.txt interactions"},
            "data": {"name": "amazon-book (KGAT split)", "sha256": d.data_hash, "users": d.num_users},
            "candidates": {"lightgcn": args.c1, "din": args.c2},
            "timings_seconds": timings,
        },
    )
    print(f"assembled {args.out}: version amazon-book-{combined}")


if __name__ == "__main__":
    main()
