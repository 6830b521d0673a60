"""Step 2: torch.export (dynamic B, L, C) + aoti_compile_and_package for CPU -> pkgs/<stage>.pt2"""
import os, sys, time
import torch
from torch.export import Dim
from aot_models import *

stages = sys.argv[1:] or ["din", "ranknet", "lightgcn"]
# Inductor bakes "#pragma omp parallel num_threads(<cores at compile time>)" into the kernels; the
# server runs 1 intra-op thread per worker, so compile for 1 (AOTI_THREADS to override)
CONFIGS = {"cpp.threads": int(os.environ.get("AOTI_THREADS", "1"))}
os.makedirs("pkgs", exist_ok=True)
ts = {s: load_ts(s) for s in ("lightgcn", "din")}
hs = histories(8, 10, seed=3)
din_in, rn_in = cascade_inputs(hs, ts["lightgcn"], ts["din"])
B, L, C = Dim("B", min=1, max=1024), Dim("L", min=1, max=4096), Dim("C", min=1, max=100000)
for s in stages:
    eager = load_eager(s.rstrip("2"))
    mod = {"din": DINExport, "din2": DINExport2, "ranknet": RankNetExport, "lightgcn": LightGCNExport}[s](eager).eval()
    args = tuple(a.clone() for a in {"din": din_in, "din2": din_in, "ranknet": rn_in, "lightgcn": din_in[:2]}[s])
    names = {"din": ["history", "mask", "cands", "s1"], "din2": ["history", "mask", "cands", "s1"], "ranknet": ["history", "mask", "cands", "s1", "s2"],
             "lightgcn": ["history", "mask"]}[s]
    dims = {"history": {0: B, 1: L}, "mask": {0: B, 1: L}, "cands": {0: B, 1: C}, "s1": {0: B, 1: C}, "s2": {0: B, 1: C}}
    t = time.time()
    ep = torch.export.export(mod, args, dynamic_shapes={n: dims[n] for n in names})
    t_export = time.time() - t
    print(f"[{s}] exported in {t_export:.1f}s; range constraints: {ep.range_constraints}", flush=True)
    t = time.time()
    path = torch._inductor.aoti_compile_and_package(ep, package_path=f"pkgs/{s}.pt2", inductor_configs=CONFIGS)
    t_comp = time.time() - t
    print(f"[{s}] aoti_compile_and_package {t_comp:.1f}s -> {path} {os.path.getsize(path)/1e6:.2f} MB", flush=True)
    with open(f"pkgs/{s}.graph.txt", "w") as f:
        f.write(str(ep.graph_module.code))
