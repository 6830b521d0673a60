"""DIN: shipped TorchScript vs AOTI of DINExport (pkgs/din.pt2) vs DINExport2 (pkgs/din2.pt2), 1 thread, alternating rounds."""
import sys, time, statistics
import numpy as np
import torch
from aot_models import *
torch.set_num_threads(1)
R, N = 15, 10
ts = {s: load_ts(s) for s in ("lightgcn", "din")}
fs = {"ts": ts["din"], "aoti_v1": torch._inductor.aoti_load_package("pkgs/din.pt2"),
      "aoti_v2": torch._inductor.aoti_load_package("pkgs/din2.pt2")}
us = users()
print(f"{'B':>3s} {'hist':>5s} {'Lmax':>4s}  " + "  ".join(f"{k:>9s}" for k in fs) + "  v1/ts  v2/ts  maxabs(v2)", flush=True)
for hist in (10, 50, "mix"):
    for b in (1, 8, 16):
        if hist == "mix" and b == 1: continue
        if hist == "mix":
            rng = np.random.default_rng(b); hs = [us[i][-200:] for i in rng.choice(len(us), size=b, replace=False)]
        else:
            hs = histories(b, hist, seed=100 + b)
        args, _ = cascade_inputs(hs, ts["lightgcn"], ts["din"])
        t = {k: [] for k in fs}
        with torch.inference_mode():
            ref = fs["ts"](*args)
            diff = max((fs[k](*args) - ref).abs().max().item() for k in ("aoti_v1", "aoti_v2"))
            for _ in range(5):
                for f in fs.values(): f(*args)
            keys = list(fs)
            for r in range(R):
                for k in (keys if r % 2 == 0 else keys[::-1]):
                    for _ in range(N):
                        s = time.perf_counter(); fs[k](*args); t[k].append(time.perf_counter() - s)
        m = {k: statistics.median(v) * 1e3 for k, v in t.items()}
        print(f"{b:3d} {str(hist):>5s} {args[0].shape[1]:4d}  " + "  ".join(f"{m[k]:9.3f}" for k in fs)
              + f"  {m['aoti_v1']/m['ts']:5.2f}  {m['aoti_v2']/m['ts']:5.2f}  {diff:.2e}", flush=True)
