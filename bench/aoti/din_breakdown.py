"""Where DIN's AOTI time goes: shipped TS vs eager rewrite vs AOTI, and an op profile of the eager rewrite."""
import time, statistics, sys
import numpy as np
import torch
from aot_models import *
torch.set_num_threads(1)
ts = {s: load_ts(s) for s in ("lightgcn", "din")}
rw = DINExport(load_eager("din")).eval()
ao = torch._inductor.aoti_load_package("pkgs/din.pt2")
rng = np.random.default_rng(16)
us = users()
hs = [us[i][-200:] for i in rng.choice(len(us), size=16, replace=False)]
din_in, _ = cascade_inputs(hs, ts["lightgcn"], ts["din"])
print("lens", din_in[1].sum(1).tolist())
fs = {"ts": ts["din"], "eager_rewrite": rw, "aoti": ao}
times = {k: [] for k in fs}
with torch.inference_mode():
    for r in range(20):
        for k, f in fs.items():
            for _ in range(10):
                t = time.perf_counter(); f(*din_in); times[k].append(time.perf_counter() - t)
    for k in fs: print(k, f"{statistics.median(times[k])*1e3:.3f} ms")
    with torch.profiler.profile() as p:
        for _ in range(20): rw(*din_in)
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
