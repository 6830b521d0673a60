"""Compiled stages: DIN and RankNet of a model directory as AOTInductor packages
(`<stage>/model.pt2`, torch.export + aoti_compile_and_package), from the weights of the
TorchScript files beside them, which stay the interchange format and the fallback.

    scripts/py -m model_service_py.compile_stages --model-dir model_output [--threads 1]

The shipped forwards loop over the batch's rows with sizes read from the mask (data-dependent
shapes, which torch.export cannot trace with a dynamic batch); the forms below compute the same
functions without the loop. DIN takes a padded batch (its attention over the last min(L, max_att)
positions with the padding masked, the EASE sum with zero weight on the padding); the server calls
it on groups of profiles of about the same history length, because a padded batch's cost follows
batch x longest history (measured: docs/measurement-history.md). RankNet takes the batch's real history
items packed (INPUTS), so its cost follows the real items at any batch size. Each is checked
against its TorchScript file before it is written.

A package is compiled for this machine's CPU (inductor's -march=native) and for `--threads`
libtorch threads (inductor writes the count into its kernels): `<stage>/model.pt2.json` records
both, with the SHA-256 of the model.pt it was made from and the inputs it takes, and the server
uses a package only when all four match (STAGE_RUNTIME, README). Packages are build outputs: made
once per machine (scripts/setup.sh), never committed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import time

import torch
from torch.nn import functional as F

from . import msmodels
from .reexport import rebuild

STAGES = ("din", "ranknet")
# What each package takes (model_output/README.md, "Compiled stages"): DIN one profile's padded
# history at a time (the server calls it row by row), RankNet the batch's real items packed.
INPUTS = {"din": ["history", "mask", "cands", "s1"], "ranknet": ["hist", "rows", "cands", "s1", "s2"]}
# Raised whenever the compiled forms below change, so that packages made before are made again.
FORM = 3
# Batch, history and candidate sizes the packages accept.
MAX_BATCH, MAX_HISTORY, MAX_CANDIDATES = 1024, 4096, 1 << 20


class DINCompiled(torch.nn.Module):
    """msmodels.DIN2.forward on the padded batch (no per-row loop), the standardisation folded into
    the first layer."""

    def __init__(self, din: msmodels.DIN2):
        super().__init__()
        self.emb = din.emb
        self.att_w = din.att_w
        self.register_buffer("nbr_idx", din.nbr_idx)
        self.register_buffer("nbr_val", din.nbr_val)
        self.register_buffer("log_pop", din.log_pop)
        w_inter_t, w_x_t, bias = din.folded_layers()
        self.register_buffer("w_inter_t", w_inter_t.detach().clone())
        self.register_buffer("w_x_t", w_x_t.detach().clone())
        self.register_buffer("b0", bias.detach().clone())
        self.register_buffer("w2", din.mlp[2].weight.detach()[0].clone())
        self.register_buffer("b2", din.mlp[2].bias.detach().clone())
        self.dim = din.dim
        self.max_att = din.max_att

    def ease(self, history, mask, cands):
        # msmodels.ease_scores_packed on the padded history: the padding adds 0.0 after the real
        # terms, so the sums are the same; the buffer is set only at the candidates' cells
        b, c = cands.shape
        n = self.nbr_idx.shape[0]
        length = history.shape[1]
        flat = history.reshape(-1)
        rows = torch.arange(b, device=cands.device).unsqueeze(1).expand(b, length).reshape(-1)
        keys = self.nbr_idx.index_select(0, flat).long() + (rows * n).unsqueeze(1)
        vals = self.nbr_val.index_select(0, flat) * mask.reshape(-1, 1).to(torch.float32)
        cand_keys = (cands + (torch.arange(b, device=cands.device) * n).unsqueeze(1)).reshape(-1)
        dense = torch.empty(b * n, dtype=torch.float32, device=cands.device).index_fill(0, cand_keys, 0.0)
        dense = dense.index_add(0, keys.reshape(-1), vals.reshape(-1))
        return dense.index_select(0, cand_keys).view(b, c)

    def forward(self, history, mask, cands, s1):
        b, c = cands.shape
        length = history.shape[1]
        lens = mask.sum(dim=1)
        ease = self.ease(history, mask, cands)
        la = torch.sym_min(self.max_att, length)
        ar = torch.arange(la, device=history.device).unsqueeze(0)
        pos = ((lens - la).clamp(min=0).unsqueeze(1) + ar).clamp(max=length - 1)
        valid = (ar < lens.unsqueeze(1)).unsqueeze(2)  # [B, La, 1]
        eh = self.emb(history.gather(1, pos))  # [B, La, D]
        ec = self.emb(cands)  # [B, C, D]
        logits = torch.bmm(eh @ self.att_w, ec.transpose(1, 2))  # [B, La, C]
        logits = logits.masked_fill(~valid, -1e9)
        att = torch.softmax(logits, dim=1) * valid.to(torch.float32)  # an empty history pools to 0
        pooled = torch.bmm(att.transpose(1, 2), eh)  # [B, C, D]
        hlen = torch.log1p(lens.to(torch.float32)).unsqueeze(1).expand(b, c)
        scores = torch.stack([s1, ease])
        pop = self.log_pop.index_select(0, cands.reshape(-1)).view(b, c)
        x = torch.cat([scores, msmodels.row_zscore(scores), torch.stack([pop, hlen])]).view(6, b * c)
        y = F.linear((pooled * ec).view(b * c, self.dim), self.w_inter_t.t(), self.b0)
        y = torch.relu(y + x.t() @ self.w_x_t)
        return (y @ self.w2 + self.b2).view(b, c)


class RankNetCompiled(torch.nn.Module):
    """msmodels.RankNet.forward (7 features, no neighbour table) on the batch's real history items
    packed (`hist` [T] the items, `rows` [T] the profile each belongs to): the history sums by
    index_add, the max cosine as a scatter_reduce amax over the [T, C] products, so that the cost
    follows the real items, not batch x longest history."""

    def __init__(self, rn: msmodels.RankNet):
        super().__init__()
        if rn.use_nbr:
            raise ValueError("a RankNet with the neighbour feature (8 features) has no compiled form")
        self.register_buffer("item_unit", rn.item_unit)
        self.register_buffer("log_pop", rn.log_pop)
        w = rn.net[0].weight.detach() / rn.feat_std
        self.register_buffer("w0_t", w.t().contiguous())
        self.register_buffer("b0", (rn.net[0].bias.detach() - w @ rn.feat_mean).clone())
        self.register_buffer("w1", rn.net[2].weight.detach().clone())
        self.register_buffer("b1", rn.net[2].bias.detach().clone())
        self.register_buffer("w2", rn.net[4].weight.detach()[0].clone())
        self.register_buffer("b2", rn.net[4].bias.detach().clone())

    def forward(self, hist, rows, cands, s1, s2):
        b, c = cands.shape
        lens = torch.zeros(b, dtype=torch.float32, device=cands.device).index_add(0, rows, torch.ones_like(hist, dtype=torch.float32))
        hlen = lens.unsqueeze(1)
        order = torch.argsort(s1, dim=1, descending=True)
        steps = torch.arange(c, device=s1.device, dtype=s1.dtype).expand(b, c)
        rank = torch.empty_like(s1).scatter_(1, order, steps) / c
        cu = self.item_unit.index_select(0, cands.reshape(-1)).view(b, c, -1)  # [B, C, D]
        hu = self.item_unit.index_select(0, hist)  # [T, D]
        hsum = torch.zeros(b, hu.shape[1], dtype=hu.dtype, device=hu.device).index_add(0, rows, hu)
        mean_sim = torch.bmm(cu, hsum.unsqueeze(2)).squeeze(2) / hlen.clamp(min=1.0)
        sims = (cu.index_select(0, rows) * hu.unsqueeze(1)).sum(dim=2)  # [T, C], fused: never materialised
        at = rows.unsqueeze(1).expand(-1, c)
        max_sim = torch.full((b, c), float("-inf"), device=cu.device).scatter_reduce(0, at, sims, "amax")
        max_sim = torch.where(hlen > 0, max_sim, torch.zeros_like(max_sim))
        pop = self.log_pop.index_select(0, cands.reshape(-1)).view(b, c)
        x = torch.stack([s1, s2, rank, pop, torch.log1p(hlen).expand(b, c), max_sim, mean_sim]).view(7, b * c)
        y = torch.relu(x.t() @ self.w0_t + self.b0)
        y = torch.relu(F.linear(y, self.w1, self.b1))
        return (y @ self.w2 + self.b2).view(b, c)


def cpu_signature() -> str:
    """What a package's kernels depend on: the CPU model and its flags (SHA-256, 16 hex digits).
    The server computes the same from /proc/cpuinfo (src/inference/compiled.rs)."""
    model, flags = "", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = " ".join(sorted(value.split()))
    except OSError:
        model = platform.processor()
    return hashlib.sha256(f"{model}\n{flags}".encode()).hexdigest()[:16]


def sample_inputs(stage: str, n: int, batch: int = 3, length: int = 7, cands: int = 40, seed: int = 0):
    """A padded batch of the server's layout: right-padded histories (one of full length, one
    empty), a mask, distinct candidates and sorted stage-1 scores (and DIN's for RankNet)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor([length, 2, 0][:batch] + [length] * max(0, batch - 3))
    mask = torch.arange(length).unsqueeze(0) < lens.unsqueeze(1)
    history = torch.randint(0, n, (batch, length), generator=g) * mask
    cand = torch.stack([torch.randperm(n, generator=g)[:cands] for _ in range(batch)])
    s1 = torch.sort(torch.rand(batch, cands, generator=g), dim=1, descending=True).values
    args = [history, mask, cand, s1]
    if stage == "ranknet":
        args.append(torch.randn(batch, cands, generator=g))
    return tuple(args)


def packed(history, mask):
    """The real items of a padded batch packed row after row, and the row each belongs to."""
    rows = torch.arange(history.shape[0]).repeat_interleave(mask.sum(dim=1))
    return history.masked_select(mask), rows


def package_args(stage: str, args: tuple) -> tuple:
    """A stage's package inputs from its TorchScript inputs (INPUTS)."""
    if stage == "ranknet":
        return (*packed(args[0], args[1]), *args[2:])
    return args


def package_key(source_sha: str, stage: str, threads: int) -> str:
    """What a package depends on: its model.pt, its inputs, the CPU, the thread count, torch's version."""
    what = f"{source_sha} {INPUTS[stage]} {FORM} {cpu_signature()} {threads} {torch.__version__}"
    return hashlib.sha256(what.encode()).hexdigest()[:16]


def current(model_dir: str, stage: str, source_sha: str, threads: int) -> bool:
    """The package beside model.pt was made from it, for this CPU and thread count."""
    try:
        with open(os.path.join(model_dir, stage, "model.pt2.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return (meta.get("source_sha256"), meta.get("cpu"), meta.get("threads"), meta.get("inputs"), meta.get("form")) \
        == (source_sha, cpu_signature(), threads, INPUTS[stage], FORM) \
        and os.path.exists(os.path.join(model_dir, stage, "model.pt2"))


def compile_stage(model_dir: str, stage: str, threads: int, cache: str | None = None) -> dict | None:
    """Writes `<stage>/model.pt2` and its `.json` (or copies them from `cache`, where a package of
    the same key was made before); None when the stage has no compiled form."""
    src = os.path.join(model_dir, stage, "model.pt")
    with open(src, "rb") as f:
        source_sha = hashlib.sha256(f.read()).hexdigest()
    out = os.path.join(model_dir, stage, "model.pt2")
    if current(model_dir, stage, source_sha, threads):
        with open(out + ".json") as f:
            return json.load(f)
    cached = os.path.join(cache, package_key(source_sha, stage, threads)) if cache else None
    if cached and os.path.exists(os.path.join(cached, "model.pt2.json")):
        shutil.copyfile(os.path.join(cached, "model.pt2"), out + ".copy")
        os.replace(out + ".copy", out)
        shutil.copyfile(os.path.join(cached, "model.pt2.json"), out + ".json")
        with open(out + ".json") as f:
            return json.load(f)
    scripted = torch.jit.load(src).eval()
    eager = rebuild(stage, scripted)
    if stage == "din" and not isinstance(eager, msmodels.DIN2):
        print(f"{src}: DIN of interface v1 has no compiled form; TorchScript runs it", file=sys.stderr)
        return None
    if stage == "ranknet" and eager.use_nbr:
        print(f"{src}: RankNet with the neighbour feature has no compiled form; TorchScript runs it", file=sys.stderr)
        return None
    module = (DINCompiled if stage == "din" else RankNetCompiled)(eager).eval()
    n = module.emb.num_embeddings if stage == "din" else module.item_unit.shape[0]
    with torch.inference_mode():
        for seed, shape in enumerate([(3, 7, 40), (1, 1, 5), (4, 60, 30)]):
            args = sample_inputs(stage, n, *shape, seed=seed)
            diff = (module(*package_args(stage, args)) - scripted(*args)).abs().max().item()
            if not diff <= 1e-4:
                raise SystemExit(f"{stage}: the compiled form differs from {src} by {diff}")
    b = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    length = torch.export.Dim("history", min=1, max=MAX_HISTORY)
    c = torch.export.Dim("candidates", min=1, max=MAX_CANDIDATES)
    t = torch.export.Dim("items", min=1, max=MAX_BATCH * MAX_HISTORY)
    axes = {"history": {0: b, 1: length}, "mask": {0: b, 1: length}, "hist": {0: t}, "rows": {0: t},
            "cands": {0: b, 1: c}, "s1": {0: b, 1: c}, "s2": {0: b, 1: c}}
    shapes = {name: axes[name] for name in INPUTS[stage]}
    args = package_args(stage, sample_inputs(stage, n, 4, 9, min(50, n), seed=7))
    t0 = time.time()
    exported = torch.export.export(module, args, dynamic_shapes=shapes)
    tmp = os.path.join(model_dir, stage, "model.tmp.pt2")
    torch._inductor.aoti_compile_and_package(exported, package_path=tmp, inductor_configs={"cpp.threads": threads})
    loaded = torch._inductor.aoti_load_package(tmp)
    with torch.inference_mode():
        args = sample_inputs(stage, n, 3, 12, min(60, n), seed=11)
        diff = (loaded(*package_args(stage, args)) - scripted(*args)).abs().max().item()
    if not diff <= 1e-4:
        raise SystemExit(f"{stage}: the package differs from {src} by {diff}")
    meta = {
        "stage": stage,
        "inputs": INPUTS[stage],
        "form": FORM,
        "source_sha256": source_sha,
        "threads": threads,
        "cpu": cpu_signature(),
        "torch": torch.__version__,
        "max_abs_diff": diff,
        "compile_seconds": round(time.time() - t0, 1),
    }
    os.replace(tmp, out)
    with open(out + ".json", "w") as f:
        json.dump(meta, f, indent=2)
    if cached:
        os.makedirs(cached, exist_ok=True)
        shutil.copyfile(out, os.path.join(cached, "model.pt2"))
        shutil.copyfile(out + ".json", os.path.join(cached, "model.pt2.json"))
    return meta


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--threads", type=int, default=1, help="libtorch threads per inference worker (TORCH_THREADS)")
    p.add_argument("--stage", action="append", choices=STAGES, help="default: both")
    p.add_argument("--cache", help="directory of packages made before, by what they depend on (reused, and added to)")
    args = p.parse_args()
    for stage in args.stage or STAGES:
        meta = compile_stage(args.model_dir, stage, args.threads, args.cache)
        if meta:
            print(json.dumps(meta), file=sys.stderr)


if __name__ == "__main__":
    main()
