"""Compiled forms of DIN and RankNet per call against TorchScript, one thread, real Amazon-Book
histories drawn at random (mixed lengths) at batch 1, 4, 8, 16: DIN padded (the shipped package's
form) and with the EASE sum over the packed history; RankNet padded (the first package's form) and
packed (the shipped one). The measurement behind "Compiled stages at every batch size" in
docs/measurement-history.md. Packages are compiled into /tmp/pk/ once (about 80 s).

    cd bench/aoti && PYTHONPATH=../../scripts $PY packed_forms.py
"""
import os, sys, time, statistics
import numpy as np
import torch
from torch.nn import functional as F
from aot_models import load_ts, load_eager, users, pad, cascade_inputs  # noqa
from model_service_py import msmodels
from model_service_py.compile_stages import DINCompiled, RankNetCompiled

torch.set_num_threads(1)


class DINPacked(DINCompiled):
    """hist [T], rows [T] (the real items of all rows, packed), att [B, La], att_mask [B, La]
    (each row's last min(n, max_att) items, right-padded), cands, s1."""

    def forward(self, hist, rows, att, att_mask, cands, s1):
        b, c = cands.shape
        n = self.nbr_idx.shape[0]
        lens = torch.zeros(b, dtype=torch.float32, device=cands.device).index_add(0, rows, torch.ones_like(hist, dtype=torch.float32))
        keys = self.nbr_idx.index_select(0, hist).long() + (rows * n).unsqueeze(1)
        vals = self.nbr_val.index_select(0, hist)
        cand_keys = (cands + (torch.arange(b, device=cands.device) * n).unsqueeze(1)).reshape(-1)
        dense = torch.empty(b * n, dtype=torch.float32, device=cands.device).index_fill(0, cand_keys, 0.0)
        dense = dense.index_add(0, keys.reshape(-1), vals.reshape(-1))
        ease = dense.index_select(0, cand_keys).view(b, c)
        valid = att_mask.unsqueeze(2)
        eh = self.emb(att)
        ec = self.emb(cands)
        logits = torch.bmm(eh @ self.att_w, ec.transpose(1, 2))
        logits = logits.masked_fill(~valid, -1e9)
        a = torch.softmax(logits, dim=1) * valid.to(torch.float32)
        pooled = torch.bmm(a.transpose(1, 2), eh)
        hlen = torch.log1p(lens).unsqueeze(1).expand(b, c)
        scores = torch.stack([s1, ease])
        pop = self.log_pop.index_select(0, cands.reshape(-1)).view(b, c)
        x = torch.cat([scores, msmodels.row_zscore(scores), torch.stack([pop, hlen])]).view(6, b * c)
        y = F.linear((pooled * ec).view(b * c, self.dim), self.w_inter_t.t(), self.b0)
        y = torch.relu(y + x.t() @ self.w_x_t)
        return (y @ self.w2 + self.b2).view(b, c)


class RankNetPadded(RankNetCompiled):
    """The first package's form: the padded batch, the max cosine as a masked amax over [B, C, L]."""

    def forward(self, history, mask, cands, s1, s2):
        b, c = cands.shape
        length = history.shape[1]
        lens = mask.sum(dim=1)
        hlen = lens.to(torch.float32).unsqueeze(1)
        order = torch.argsort(s1, dim=1, descending=True)
        steps = torch.arange(c, device=s1.device, dtype=s1.dtype).expand(b, c)
        rank = torch.empty_like(s1).scatter_(1, order, steps) / c
        cu = self.item_unit.index_select(0, cands.reshape(-1)).view(b, c, -1)
        hu = self.item_unit.index_select(0, history.reshape(-1)).view(b, length, -1)
        hu = hu * mask.unsqueeze(2).to(torch.float32)
        mean_sim = torch.bmm(cu, hu.sum(dim=1).unsqueeze(2)).squeeze(2) / hlen.clamp(min=1.0)
        sims = torch.bmm(cu, hu.transpose(1, 2)).masked_fill(~mask.unsqueeze(1), float("-inf"))
        max_sim = torch.amax(sims, dim=2)
        max_sim = torch.where(lens.unsqueeze(1) > 0, max_sim, torch.zeros_like(max_sim))
        pop = self.log_pop.index_select(0, cands.reshape(-1)).view(b, c)
        x = torch.stack([s1, s2, rank, pop, torch.log1p(hlen).expand(b, c), max_sim, mean_sim]).view(7, b * c)
        y = torch.relu(x.t() @ self.w0_t + self.b0)
        y = torch.relu(F.linear(y, self.w1, self.b1))
        return (y @ self.w2 + self.b2).view(b, c)


# the shipped form (measured with index_reduce for the amax; it now uses scatter_reduce, the same sums)
RankNetPacked = RankNetCompiled


def packed_inputs(h, m, max_att):
    lens = m.sum(1)
    hist = h.masked_select(m)
    rows = torch.arange(h.shape[0]).repeat_interleave(lens)
    la = max(1, min(max_att, int(lens.max())))
    ar = torch.arange(la).unsqueeze(0)
    L = h.shape[1]
    pos = ((lens - la).clamp(min=0).unsqueeze(1) + ar).clamp(max=L - 1)
    att_mask = ar < lens.unsqueeze(1)
    att = h.gather(1, pos) * att_mask
    return hist, rows, att, att_mask


def compile_pkg(module, args, dyn, path):
    if os.path.exists(path):
        return torch._inductor.aoti_load_package(path)
    args = tuple(a.clone() for a in args)
    with torch.no_grad():
        ep = torch.export.export(module, args, dynamic_shapes=dyn)
    torch._inductor.aoti_compile_and_package(ep, package_path=path, inductor_configs={"cpp.threads": 1})
    return torch._inductor.aoti_load_package(path)


def main():
    ts = {s: load_ts(s) for s in ("lightgcn", "din", "ranknet")}
    din_e, rn_e = load_eager("din"), load_eager("ranknet")
    dp, rp = DINPacked(din_e).eval(), RankNetPacked(rn_e).eval()
    dc, rc = DINCompiled(din_e).eval(), RankNetPadded(rn_e).eval()
    us = users()
    def batch(bs, seed):
        r = np.random.default_rng(seed)
        return [us[i][-200:] for i in r.choice(len(us), size=bs, replace=False)]
    hs = batch(16, 0)
    din_in, rn_in = cascade_inputs(hs, ts["lightgcn"], ts["din"])
    h, m, cand, s1 = din_in
    hist, rows, att, att_mask = packed_inputs(h, m, dp.max_att)
    with torch.inference_mode():
        ref = ts["din"](*din_in)
        print("din packed eager diff", (dp(hist, rows, att, att_mask, cand, s1) - ref).abs().max().item())
        ref3 = ts["ranknet"](*rn_in)
        print("rn packed eager diff", (rp(hist, rows, *rn_in[2:]) - ref3).abs().max().item())
    T = torch.export.Dim("T", min=1, max=1 << 20)
    B = torch.export.Dim("B", min=1, max=1024)
    La = torch.export.Dim("La", min=1, max=4096)
    C = torch.export.Dim("C", min=1, max=1 << 20)
    L = torch.export.Dim("L", min=1, max=4096)
    # sample with T > B etc
    hs_s = batch(4, 7)
    di, ri = cascade_inputs(hs_s, ts["lightgcn"], ts["din"], c1=50, c2=20)
    ph = packed_inputs(di[0], di[1], dp.max_att)
    t0 = time.time()
    dpk = compile_pkg(dp, (*ph, di[2], di[3]), {"hist": {0: T}, "rows": {0: T}, "att": {0: B, 1: La}, "att_mask": {0: B, 1: La}, "cands": {0: B, 1: C}, "s1": {0: B, 1: C}}, "/tmp/pk/din_packed.pt2")
    rpk = compile_pkg(rp, (ph[0], ph[1], *ri[2:]), {"hist": {0: T}, "rows": {0: T}, "cands": {0: B, 1: C}, "s1": {0: B, 1: C}, "s2": {0: B, 1: C}}, "/tmp/pk/rn_packed.pt2")
    dpad = compile_pkg(dc, di, {"history": {0: B, 1: L}, "mask": {0: B, 1: L}, "cands": {0: B, 1: C}, "s1": {0: B, 1: C}}, "/tmp/pk/din_pad.pt2")
    rpad = compile_pkg(rc, ri, {"history": {0: B, 1: L}, "mask": {0: B, 1: L}, "cands": {0: B, 1: C}, "s1": {0: B, 1: C}, "s2": {0: B, 1: C}}, "/tmp/pk/rn_pad.pt2")
    print(f"compiled in {time.time() - t0:.0f}s")
    with torch.inference_mode():
        for bs in (1, 4, 8, 16):
            res = {}
            for seed in range(3):
                hs = batch(bs, 100 + seed)
                din_in, rn_in = cascade_inputs(hs, ts["lightgcn"], ts["din"])
                h, m, cand, s1 = din_in
                pk = packed_inputs(h, m, dp.max_att)
                fs = {
                    "din ts": (ts["din"], din_in), "din pad": (dpad, din_in), "din packed": (dpk, (*pk, cand, s1)),
                    "rn ts": (ts["ranknet"], rn_in), "rn pad": (rpad, rn_in), "rn packed": (rpk, (pk[0], pk[1], *rn_in[2:])),
                }
                d1 = (dpk(*pk, cand, s1) - ts["din"](*din_in)).abs().max().item()
                d2 = (rpk(pk[0], pk[1], *rn_in[2:]) - ts["ranknet"](*rn_in)).abs().max().item()
                for rnd in range(5):
                    for k, (f, a) in fs.items():
                        t = time.perf_counter()
                        for _ in range(5):
                            f(*a)
                        res.setdefault(k, []).append((time.perf_counter() - t) / 5)
            print(f"B={bs:2d} maxdiff din {d1:.1e} rn {d2:.1e} lens {m.sum(1).tolist()[:8]}")
            for k, v in res.items():
                print(f"   {k:12s} {statistics.median(v) * 1e3:7.3f} ms  per rec {statistics.median(v) * 1e3 / bs:6.3f}")


main()
