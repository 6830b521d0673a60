"""Step 3/5: per-call latency, 1 thread, TorchScript vs AOTI package (torch._inductor.aoti_load_package),
alternating rounds in one process. usage: bench_py.py [rounds] [calls_per_round]"""
import sys, time, statistics, json
import numpy as np
import torch
from aot_models import *

torch.set_num_threads(1)
R = int(sys.argv[1]) if len(sys.argv) > 1 else 15
N = int(sys.argv[2]) if len(sys.argv) > 2 else 10
ts = {s: load_ts(s) for s in ("lightgcn", "din", "ranknet")}
aoti = {s: torch._inductor.aoti_load_package(f"pkgs/{s}.pt2") for s in ("lightgcn", "din", "ranknet")}


def mixed(b, seed):
    rng = np.random.default_rng(seed)
    us = users()
    return [us[i][-200:] for i in rng.choice(len(us), size=b, replace=False)]


def bench(fa, fb, args):
    ta, tb = [], []
    with torch.inference_mode():
        for _ in range(5):
            fa(*args); fb(*args)
        for r in range(R):
            order = [(fa, ta), (fb, tb)] if r % 2 == 0 else [(fb, tb), (fa, ta)]
            for f, acc in order:
                for _ in range(N):
                    t = time.perf_counter(); f(*args); acc.append(time.perf_counter() - t)
    return statistics.median(ta) * 1e3, statistics.median(tb) * 1e3


results = []
print(f"{'stage':8s} {'B':>3s} {'hist':>5s} {'Lmax':>4s} {'C':>4s}  {'TS ms':>8s} {'AOTI ms':>8s} {'AOTI/TS':>7s}  maxabs", flush=True)
for hist in (10, 50, "mix"):
    for b in (1, 8, 16):
        if hist == "mix" and b == 1:
            continue
        hs = mixed(b, seed=b) if hist == "mix" else histories(b, hist, seed=100 + b)
        with torch.inference_mode():
            din_in, rn_in = cascade_inputs(hs, ts["lightgcn"], ts["din"])
        for s, args in (("lightgcn", din_in[:2]), ("din", din_in), ("ranknet", rn_in)):
            with torch.inference_mode():
                diff = (ts[s](*args) - aoti[s](*args)).abs().max().item()
            a, c = bench(ts[s], aoti[s], args)
            row = dict(stage=s, B=b, hist=hist, Lmax=args[0].shape[1], C=(args[2].shape[1] if len(args) > 2 else 24915),
                       ts_ms=a, aoti_ms=c, ratio=c / a, maxabs=diff)
            results.append(row)
            print(f"{s:8s} {b:3d} {str(hist):>5s} {row['Lmax']:4d} {row['C']:5d}  {a:8.3f} {c:8.3f} {c/a:7.2f}  {diff:.2e}", flush=True)
json.dump(results, open("bench_py.json", "w"), indent=1)
