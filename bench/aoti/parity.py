"""Step 1: eager (shipped class + shipped weights) and export-friendly rewrites vs the TorchScript files."""
import torch
from aot_models import *

torch.manual_seed(0)
ts = {s: load_ts(s) for s in ("lightgcn", "din", "ranknet")}
eager = {s: load_eager(s) for s in ("lightgcn", "din", "ranknet")}
exp = {"din": DINExport(eager["din"]).eval(), "ranknet": RankNetExport(eager["ranknet"]).eval(),
       "lightgcn": LightGCNExport(eager["lightgcn"]).eval()}
with torch.inference_mode():
    for b, around in [(1, 10), (8, 10), (16, 50), (8, 50), (4, 150)]:
        hs = histories(b, around, seed=b + around)
        din_in, rn_in = cascade_inputs(hs, ts["lightgcn"], ts["din"])
        if b >= 4:  # one empty history row too
            din_in = (din_in[0].clone(), din_in[1].clone()) + din_in[2:]
            din_in[1][0] = False; din_in[0][0] = 0
            rn_in = (din_in[0], din_in[1]) + rn_in[2:]
        for s, inp in (("din", din_in), ("ranknet", rn_in), ("lightgcn", din_in[:2])):
            a = ts[s](*inp); e = eager[s](*inp); x = exp[s](*inp)
            print(f"B={b:2d} L~{around:3d} Lmax={inp[0].shape[1]:3d} {s:8s} eager-vs-TS {(a-e).abs().max().item():.2e}  "
                  f"rewrite-vs-TS {(a-x).abs().max().item():.2e}  |TS|max {a.abs().max().item():.3f}")
