#!/usr/bin/env python3
"""Re-export served stages with the current module code in msmodels.py, keeping their
trained weights: for a change of the forward computation that leaves the function the same (for
example a faster, algebraically identical form; for LightGCN, the fp16 item table on the CPU).
Each stage is loaded from its model.pt, rebuilt from the weights, exported with the usual parity
check (msmodels.export), checked against the old file on random batches (to 1e-4; LightGCN to 1e-3
of its largest score, the fp16 table's rounding), and the manifest's versions are updated.

usage: python -m model_service_py.reexport --model-dir model_output [--stage din ...]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

from . import msmodels


def rebuild(stage: str, old: torch.jit.ScriptModule) -> torch.nn.Module:
    sd = old.state_dict()
    if stage == "lightgcn":
        # built from its tables alone: the item table's layout may differ from the file's
        return msmodels.LightGCNServe(sd["fold_in"], msmodels.item_vectors(sd), sd["item_norm"]).eval()
    elif stage == "din" and "att_w" in sd:
        n, dim = sd["emb.weight"].shape
        module = msmodels.DIN2(n, sd["nbr_idx"], sd["nbr_val"], sd["log_pop"], dim=dim, hidden=sd["mlp.0.weight"].shape[0],
                               max_att=int(old.max_att))
    elif stage == "din":
        n, dim = sd["emb.weight"].shape
        module = msmodels.DIN(n, dim=dim, att_hidden=sd["att1.weight"].shape[0], mlp_hidden=sd["mlp.0.weight"].shape[0])
    else:
        table = sd["nbr_idx"].numel() > 0  # feature 7, in exports before the table was dropped
        module = msmodels.RankNet(
            sd["item_unit"], sd["log_pop"], sd["feat_mean"], sd["feat_std"], hidden=sd["net.0.weight"].shape[0],
            neighbours=(sd["nbr_idx"], sd["nbr_val"]) if table else None,
        )
    module.load_state_dict(sd)
    return module.eval()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--stage", action="append", choices=list(("lightgcn", "din", "ranknet")))
    args = p.parse_args()
    manifest_path = os.path.join(args.model_dir, "manifest.json")
    with open(manifest_path) as f:
        manifest = json.load(f)
    n_items = manifest["catalog"]["num_items"]
    for stage in args.stage or ["lightgcn", "din", "ranknet"]:
        path = os.path.join(args.model_dir, stage, "model.pt")
        old = torch.jit.load(path).eval()
        module = rebuild(stage, old)
        with open(os.path.join(args.model_dir, stage, "meta.json")) as f:
            meta = json.load(f)
        for key in ("stage", "schema_version", "num_items", "sha256", "parity_max_abs_diff"):
            meta.pop(key, None)
        with tempfile.TemporaryDirectory() as tmp:
            new_meta = msmodels.export(module, stage, tmp, n_items, meta)
            new = torch.jit.load(os.path.join(tmp, "model.pt")).eval()
            worst, scale = 0.0, 0.0
            with torch.inference_mode():
                for seed in range(5):
                    batch = msmodels.random_batch(n_items, batch=8, max_len=40, cands=200, seed=100 + seed)
                    kind = "din2" if isinstance(module, msmodels.DIN2) else stage
                    a, b = old(*msmodels._inputs(kind, batch)), new(*msmodels._inputs(kind, batch))
                    worst = max(worst, (a - b).abs().max().item())
                    scale = max(scale, a.abs().max().item())
            if worst > (1e-3 * scale if stage == "lightgcn" else 1e-4):
                raise SystemExit(f"{stage}: the re-export differs from the served file by {worst}")
            os.replace(os.path.join(tmp, "model.pt"), path)
            os.replace(os.path.join(tmp, "meta.json"), os.path.join(args.model_dir, stage, "meta.json"))
        entry = manifest["models"][stage]
        entry["sha256"] = new_meta["sha256"]
        entry["version"] = f"{stage}-{new_meta['sha256'][:12]}"
        print(f"{stage}: re-exported, max difference to the previous file {worst:.2e}")
    combined = "-".join(manifest["models"][s]["sha256"][:6] for s in ("lightgcn", "din", "ranknet"))
    manifest["version"] = manifest["version"].rsplit("-", 3)[0] + "-" + combined
    msmodels.write_manifest(args.model_dir, manifest)
    print(f"manifest version {manifest['version']}")


if __name__ == "__main__":
    main()
