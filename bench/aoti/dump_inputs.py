"""Real cascade inputs for aoti_run (C++): inputs/<stage>_b<B>_h<hist>.pt, TorchScript modules holding the tensors as attributes."""
import os
import torch
from aot_models import *
os.makedirs("inputs", exist_ok=True)
ts = {s: load_ts(s) for s in ("lightgcn", "din")}

class Holder(torch.nn.Module):
    def __init__(self, names, ts_):
        super().__init__()
        for n, t in zip(names, ts_):
            setattr(self, n, t.clone())
    def forward(self):
        return 0

for hist in (10, 50):
    for b in (1, 8, 16):
        hs = histories(b, hist, seed=100 + b)  # the same histories as bench_py.py
        din_in, rn_in = cascade_inputs(hs, ts["lightgcn"], ts["din"])
        torch.jit.script(Holder(["history", "mask", "cands", "s1"], din_in)).save(f"inputs/din_b{b}_h{hist}.pt")
        torch.jit.script(Holder(["history", "mask", "cands", "s1", "s2"], rn_in)).save(f"inputs/ranknet_b{b}_h{hist}.pt")
print(sorted(os.listdir("inputs")))
