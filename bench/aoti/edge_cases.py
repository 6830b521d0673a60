"""AOTI packages on the server's smoke-batch shapes (C=20/10), an empty-history row, and L > max_att."""
import torch
from aot_models import *
ts = {s: load_ts(s) for s in ("lightgcn", "din", "ranknet")}
ao = {"din": torch._inductor.aoti_load_package("pkgs/din2.pt2"), "ranknet": torch._inductor.aoti_load_package("pkgs/ranknet.pt2")}
with torch.inference_mode():
    for name, hs, c1, c2 in [("smoke", [np.arange(5), np.array([24914]), np.arange(40)[::-1].copy()], 20, 10),
                             ("long", histories(4, 150, seed=1), 600, 100), ("B1L1", [np.array([7])], 600, 100)]:
        din_in, rn_in = cascade_inputs(hs, ts["lightgcn"], ts["din"], c1, c2)
        for s, a in (("din", din_in), ("ranknet", rn_in)):
            print(name, s, tuple(a[0].shape), tuple(a[2].shape), f"{(ts[s](*a) - ao[s](*a)).abs().max().item():.2e}")
        h, m = din_in[0].clone(), din_in[1].clone(); m[0] = False; h[0] = 0  # empty history row
        a = (h, m) + din_in[2:]; r = (h, m) + rn_in[2:]
        print(name, "empty-row din", f"{(ts['din'](*a) - ao['din'](*a)).abs().max().item():.2e}",
              "ranknet", f"{(ts['ranknet'](*r) - ao['ranknet'](*r)).abs().max().item():.2e}")
