#!/usr/bin/env python3
"""How fast could this machine serve one recommendation? Counts the floating-point operations and
the memory bytes one recommendation needs, stage by stage, at the sizes of a model directory and
a workload's history lengths; measures libtorch's GEMM FLOP/s and the memory bandwidth on this
machine; prints the roofline ceiling in recommendations/s.

A stage's time at the ceiling is max(FLOPs / GEMM FLOP/s, bytes / bandwidth): every operation at
the speed of a large matrix multiply on all cores, every byte that must come from memory at the
measured bandwidth. Bytes count what must be read or written at least once (embedding rows,
weights, the catalog-wide score row), not intermediates a fused kernel could keep in
cache; the catalog-wide tables LightGCN reads are shared by a batch, so they are divided by the
batch size. Nothing real reaches the ceiling; the fraction says how much is left.

usage: roofline.py --model-dir model_output --lengths FILE [--batch 16] [--threads N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch


def measure_gemm(threads: int, size: int = 2048, seconds: float = 2.0) -> float:
    """Best FLOP/s of a float32 [size x size] @ [size x size] over repeated runs."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    c = torch.empty(size, size)
    for _ in range(3):
        torch.mm(a, b, out=c)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        torch.mm(a, b, out=c)
        best = max(best, 2.0 * size**3 / (time.perf_counter() - t))
    return best


def measure_bandwidth(threads: int, mib: int = 512, seconds: float = 2.0) -> float:
    """Best bytes/s of copying a float32 buffer far larger than the caches (read + write)."""
    torch.set_num_threads(threads)
    n = mib * (1 << 20) // 4
    src, dst = torch.ones(n), torch.empty(n)
    dst.copy_(src)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        dst.copy_(src)
        best = max(best, 2.0 * n * 4 / (time.perf_counter() - t))
    return best


def candidates(model_dir: str) -> tuple[int, int]:
    """The candidate counts a model directory is served with: manifest.json `candidates` (cascade
    v2), else those of its recorded evaluation, else the v1 defaults 200 / 100."""
    with open(os.path.join(model_dir, "manifest.json")) as f:
        m = json.load(f)
    c = m.get("candidates") or m.get("evaluation", {}).get("candidates") or {}
    return int(c.get("lightgcn", 200)), int(c.get("din", 100))


def model_sizes(model_dir: str) -> dict:
    def sd(stage):
        return torch.jit.load(os.path.join(model_dir, stage, "model.pt")).state_dict()

    lg, din, rn = sd("lightgcn"), sd("din"), sd("ranknet")
    # LightGCN's item table: [D, N] item_emb_t in current exports, [N, D] item_emb before
    dim, n_items = lg["item_emb_t"].shape if "item_emb_t" in lg else lg["item_emb"].shape[::-1]
    if "att_w" in din:  # cascade v2's DIN2: bilinear attention over the last max_att items, sparse EASE, MLP
        return {
            "din2": True,
            "N": n_items,
            "D": dim,
            "D2": din["emb.weight"].shape[1],
            "max_att": int(torch.jit.load(os.path.join(model_dir, "din", "model.pt")).max_att),
            "F2": din["mlp.0.weight"].shape[1],
            "H2": din["mlp.0.weight"].shape[0],
            "ease_k": din["nbr_idx"].shape[1],
            "rank_hidden": [rn["net.0.weight"].shape[0], rn["net.2.weight"].shape[0]],
            "rank_features": rn["net.0.weight"].shape[1],
            "knn": rn["nbr_idx"].shape[1],  # 0: no neighbour-table feature
        }
    return {
        "N": n_items,
        "D": dim,
        "A": din["att1.weight"].shape[0],
        "mlp": [din["mlp.0.weight"].shape[0], din["mlp.2.weight"].shape[0]],
        "rank_hidden": [rn["net.0.weight"].shape[0], rn["net.2.weight"].shape[0]],
        "knn": rn["nbr_idx"].shape[1],
        "din_weight_bytes": sum(v.numel() * 4 for k, v in din.items() if k != "emb.weight"),
    }


def per_request(s: dict, L: float, c1: int, c2: int, batch: int) -> dict:
    """FLOPs and bytes of one recommendation with history length L, by stage."""
    if s.get("din2"):
        return per_request_v2(s, L, c1, c2, batch)
    N, D, A, (H1, H2), (R1, R2), K = s["N"], s["D"], s["A"], s["mlp"], s["rank_hidden"], s["knn"]
    f4 = 4.0
    lightgcn = {
        # user vector from the history, a score for every item, top-c1 over the row
        "flops": 2 * L * D + 2 * N * D,
        "bytes": N * D * f4 / batch + L * (D + 1) * f4 + 2 * N * f4,
    }
    din = {
        # h and c projections, the pair tensor (product, GEMM, two adds, relu, dot), pooling, MLP
        "flops": 2 * L * D * A + 2 * c1 * D * A + c1 * L * D + 2 * c1 * L * D * A + 5 * c1 * L * A
        + 2 * c1 * L * D + 2 * c1 * (3 * D * H1 + H1 * H2 + H2),
        "bytes": (L + c1) * D * f4 + s["din_weight_bytes"] / batch + c1 * 8,
    }
    ranknet = {
        # cosine features, ItemKNN (the history's neighbour lists summed at the candidates), the MLP
        "flops": 2 * c2 * L * D + 2 * L * K + 2 * c2 * (8 * R1 + R1 * R2 + R2),
        "bytes": (L + c2) * D * f4 + L * K * 8 + c2 * 8,
    }
    return {"lightgcn": lightgcn, "din": din, "ranknet": ranknet}


def per_request_v2(s: dict, L: float, c1: int, c2: int, batch: int) -> dict:
    """Cascade v2: LightGCN as in v1; DIN2 (bilinear attention over La = min(L, max_att) items of a
    D2-wide table, softmax, pooling, sparse-EASE sum over the whole history, row z-scores, MLP
    F2 -> H2 -> 1); RankNet as in v1, with the sparse-EASE table as feature 7 where it has one, the
    max cosine over the history's items and the mean cosine as one product with their sum."""
    N, D, D2, K2, (R1, R2), K = s["N"], s["D"], s["D2"], s["ease_k"], s["rank_hidden"], s["knn"]
    La = min(L, s["max_att"])
    F2, H2 = s["F2"], s["H2"]
    f4 = 4.0
    lightgcn = {"flops": 2 * L * D + 2 * N * D, "bytes": N * D * f4 / batch + L * (D + 1) * f4 + 2 * N * f4}
    din = {
        # W e_h, the C x La logits, softmax, pooling, pooled * c and its sum, EASE, z-scores, standardise, MLP
        "flops": 2 * La * D2 * D2 + 2 * c1 * La * D2 + 5 * c1 * La + 2 * c1 * La * D2 + 2 * c1 * D2
        + 2 * L * K2 + 12 * c1 + 2 * c1 * F2 + 2 * c1 * (F2 * H2 + H2) + c1 * H2,
        "bytes": (La + c1) * D2 * f4 + L * K2 * 8 + c1 * 16,
    }
    ranknet = {
        "flops": 2 * c2 * L * D + L * D + 2 * c2 * D + 2 * L * K + 2 * c2 * (s["rank_features"] * R1 + R1 * R2 + R2),
        "bytes": (L + c2) * D * f4 + L * K * 8 + c2 * 8,
    }
    return {"lightgcn": lightgcn, "din": din, "ranknet": ranknet}


def ceiling(model_dir: str, lengths: np.ndarray, gemm: float, bandwidth: float, batch: int,
            c1: int = 0, c2: int = 0) -> dict:
    """Recommendations/s at the roofline, averaged over the workload's history lengths (candidate
    counts: as given, else those of the model directory, see candidates())."""
    s = model_sizes(model_dir)
    d1, d2 = candidates(model_dir)
    c1, c2 = c1 or d1, c2 or d2
    c1 = min(c1, s["N"])
    c2 = min(c2, c1)
    out = {"sizes": {k: v for k, v in s.items() if k != "din_weight_bytes"}, "batch": batch, "stages": {},
           "candidates": {"lightgcn": c1, "din": c2}}
    total = 0.0
    L = float(np.mean(lengths))
    work = per_request(s, L, c1, c2, batch)  # linear in L: the mean length gives the mean work
    for stage, w in work.items():
        t = max(w["flops"] / gemm, w["bytes"] / bandwidth)
        bound = "compute" if w["flops"] / gemm >= w["bytes"] / bandwidth else "memory"
        out["stages"][stage] = {"mflops": w["flops"] / 1e6, "mbytes": w["bytes"] / 1e6, "us": t * 1e6,
                                "bound": bound}
        total += t
    out["mean_history"] = L
    out["mflops"] = sum(v["mflops"] for v in out["stages"].values())
    out["ceiling_rps"] = 1.0 / total
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--lengths", required=True, help="file with one history length per line")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--json")
    args = p.parse_args()
    lengths = np.loadtxt(args.lengths)
    gemm, bw = measure_gemm(args.threads), measure_bandwidth(args.threads)
    print(f"GEMM {gemm / 1e9:.1f} GFLOP/s, bandwidth {bw / 1e9:.1f} GB/s ({args.threads} threads)")
    for b in sorted({1, args.batch}):
        r = ceiling(args.model_dir, lengths, gemm, bw, b)
        total = sum(v["mflops"] for v in r["stages"].values())
        print(f"batch {b}: ceiling {r['ceiling_rps']:.0f} rec/s; candidates {r['candidates']}; "
              f"mean history {r['mean_history']:.1f}; {total:.2f} MFLOP per recommendation")
        for stage, v in r["stages"].items():
            print(f"  {stage:9s} {v['mflops']:8.2f} MFLOP {v['mbytes']:8.3f} MB {v['us']:8.1f} us ({v['bound']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gemm_flops": gemm, "bandwidth": bw, "ceiling": r}, f, indent=2)


if __name__ == "__main__":
    main()
