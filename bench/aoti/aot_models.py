"""Export-friendly (torch.export / AOTInductor) forms of the shipped DIN2 and RankNet,
and the real-shaped inputs the Rust server builds (src/inference/models.rs: right-padded history
to the batch's longest, mask, LightGCN top-600 cands + s1, DIN top-100 cands + s1 + s2).

The shipped forwards loop over the batch rows with sizes from mask.sum().tolist() (data-dependent
shapes, Python loops over a dynamic dimension): torch.export cannot trace that with a dynamic batch.
The rewrites below use the padded [B, C, L] form instead (msmodels.DIN2.reference's attention, a
masked amax for RankNet), and an EASE sum over the padded history with the padding's weights zeroed.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
from torch.nn import functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from model_service_py import msmodels  # noqa: E402
from model_service_py.compile_stages import DINCompiled, RankNetCompiled  # noqa: E402
from model_service_py.reexport import rebuild  # noqa: E402

# the forms the server runs (model_service_py.compile_stages), under the names the scripts use
DINExport2, RankNetExport = DINCompiled, RankNetCompiled

MODEL_DIR = os.environ.get("MODEL_DIR", os.path.join(ROOT, "model_output"))
TRAIN = os.path.join(os.environ.get("AMAZON_BOOK_DIR", os.path.join(ROOT, "..", "shared", "data", "amazon-book")),
                     "train.txt")


def load_ts(stage):
    return torch.jit.load(f"{MODEL_DIR}/{stage}/model.pt").eval()


def load_eager(stage):
    """The shipped nn.Module (msmodels class) with the shipped weights (reexport.rebuild)."""
    return rebuild(stage, load_ts(stage))


class DINExport(DINCompiled):
    """The first rewrite of DIN2.forward (kept for bench_din_variants.py): the attention laid out
    [B, C, La] with -inf masking and nan_to_num; 1.9-3.4x slower than TorchScript where
    DINCompiled (the second rewrite, the one the server runs) is faster."""

    def ease(self, history, mask, cands):
        # padded form of msmodels.ease_scores_packed: padding items add 0.0 (same order of the
        # real terms, so the same sums)
        b, c = cands.shape
        n = self.nbr_idx.shape[0]
        L = history.shape[1]
        k = self.nbr_idx.shape[1]
        flat = history.reshape(-1)
        rows = torch.arange(b, device=cands.device).unsqueeze(1).expand(b, L).reshape(-1)
        keys = self.nbr_idx.index_select(0, flat).long() + (rows * n).unsqueeze(1)  # [B*L, K]
        vals = self.nbr_val.index_select(0, flat) * mask.reshape(-1, 1).to(torch.float32)
        cand_keys = (cands + (torch.arange(b, device=cands.device) * n).unsqueeze(1)).reshape(-1)
        dense = torch.zeros(b * n, dtype=torch.float32, device=cands.device)
        dense = dense.index_add(0, keys.reshape(-1), vals.reshape(-1))
        return dense.index_select(0, cand_keys).view(b, c)

    def forward(self, history, mask, cands, s1):
        b, c = cands.shape
        d = self.dim
        L = history.shape[1]
        lens = mask.sum(dim=1)
        ease = self.ease(history, mask, cands)
        la = torch.sym_min(self.max_att, L)
        ar = torch.arange(la, device=history.device).unsqueeze(0)
        pos = ((lens - la).clamp(min=0).unsqueeze(1) + ar).clamp(max=L - 1)
        valid = ar < lens.unsqueeze(1)  # [B, La]
        eh = self.emb(history.gather(1, pos))  # [B, La, D]
        ec = self.emb(cands)  # [B, C, D]
        logits = torch.bmm(ec, (eh @ self.att_w).transpose(1, 2))  # [B, C, La]
        logits = logits.masked_fill(~valid.unsqueeze(1), float("-inf"))
        att = torch.softmax(logits, dim=2)
        att = torch.nan_to_num(att, nan=0.0)  # all-padding rows (empty history) pool to 0
        pooled = torch.bmm(att, eh)  # [B, C, D]
        hlen = torch.log1p(lens.to(torch.float32)).unsqueeze(1).expand(b, c)
        scores = torch.stack([s1, ease])
        pop = self.log_pop.index_select(0, cands.reshape(-1)).view(b, c)
        x = torch.cat([scores, msmodels.row_zscore(scores), torch.stack([pop, hlen])]).view(6, b * c)
        y = F.linear((pooled * ec).view(b * c, d), self.w_inter_t.t(), self.b0)
        y = torch.relu(y + x.t() @ self.w_x_t)
        return (y @ self.w2 + self.b2).view(b, c)


class LightGCNExport(torch.nn.Module):
    """LightGCN forward in fp32 (user_vectors, then users @ item_emb_t): the shipped CPU forward
    uses fbgemm's fp16 packed GEMM through a TorchBind object, which torch.export cannot take."""

    def __init__(self, lg):
        super().__init__()
        self.register_buffer("fold_in", lg.fold_in)
        self.register_buffer("item_emb_t", lg.item_emb_t)
        self.register_buffer("item_norm", lg.item_norm)

    def forward(self, history, mask):
        b, l = history.shape
        m = mask.to(torch.float32)
        flat = history.reshape(-1)
        w = self.item_norm.index_select(0, flat).view(b, 1, l) * m.unsqueeze(1)
        n = m.sum(dim=1, keepdim=True).clamp(min=1.0)
        users = torch.bmm(w, self.fold_in.index_select(0, flat).view(b, l, -1)).squeeze(1) / n.sqrt()
        return users @ self.item_emb_t


# ---------------------------------------------------------------------------------------------
# Real-shaped inputs


_USERS = None


def users():
    global _USERS
    if _USERS is None:
        out = []
        with open(TRAIN) as f:
            for line in f:
                parts = line.split()
                if len(parts) > 1:
                    out.append(np.array(parts[1:], dtype=np.int64))
        _USERS = out
    return _USERS


def histories(batch, around, seed=0):
    """`batch` real Amazon-Book histories of roughly `around` items (0.7x..1.3x), last 200 kept."""
    rng = np.random.default_rng(seed)
    pool = [h for h in users() if 0.7 * around <= len(h) <= 1.3 * around]
    idx = rng.choice(len(pool), size=batch, replace=False)
    return [pool[i][-200:] for i in idx]


def pad(hs):
    L = max(1, max(len(h) for h in hs))
    out = torch.zeros(len(hs), L, dtype=torch.long)
    mask = torch.zeros(len(hs), L, dtype=torch.bool)
    for i, h in enumerate(hs):
        out[i, : len(h)] = torch.from_numpy(h)
        mask[i, : len(h)] = True
    return out, mask


@torch.inference_mode()
def cascade_inputs(hs, lightgcn, din, c1=600, c2=100):
    """(din_inputs, ranknet_inputs) as the server builds them (history excluded, top c1, top c2)."""
    h, m = pad(hs)
    scores = lightgcn(h, m)
    rows = np.concatenate([np.full(len(x), i) for i, x in enumerate(hs)])
    cols = np.concatenate(hs)
    scores[torch.from_numpy(rows), torch.from_numpy(cols)] = float("-inf")
    s1, cand = scores.topk(c1, dim=1)
    s2 = din(h, m, cand, s1)
    s2_top, pos2 = s2.topk(c2, dim=1)
    cand2 = cand.gather(1, pos2)
    s1_top = s1.gather(1, pos2)
    return (h, m, cand, s1), (h, m, cand2, s1_top, s2_top)
