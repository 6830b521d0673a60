"""The three serving modules of model-service, their TorchScript export, and the catalog files.

Every module takes batched tensors with a leading batch dimension B:
  history  int64 [B, L]  item rows of the profile, right-padded (padding value 0)
  mask     bool  [B, L]  True where history holds a real item
  cands    int64 [B, C]  candidate item rows (DIN and RankNet)
and returns float32 scores (higher is better). model_output/README.md documents the contract;
the Rust server (src/inference/models.rs) is the other side of it.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

SCHEMA_VERSION = 2

# The forward arguments of each stage (interface v2), recorded as models.<stage>.inputs in
# manifest.json and checked by the server at load (src/inference/models.rs); v1's DIN took no s1.
STAGE_INPUTS = {
    "lightgcn": ["history", "mask"],
    "din": ["history", "mask", "cands", "s1"],
    "ranknet": ["history", "mask", "cands", "s1", "s2"],
}


class LightGCNServe(nn.Module):
    """Stage 1: score the whole catalog for a history (LightGCN propagation folded in at serving).

    user = sum_{i in H} norm_i * fold_in[i] / sqrt(|H|), with norm_i = deg(i)^-1/2 from the training
    graph; scores = user @ item_emb^T. The training script decides what fold_in and item_emb hold.
    item_emb is kept transposed ([D, N] contiguous, buffer item_emb_t): the GEMM of a batch of user
    vectors then reads it in place, where the [N, D] layout made MKL copy the whole table per batch
    (half of the stage's time at batch 16, on Intel CPUs).

    On the CPU (with fp16_table, the default) the scores come from fbgemm's GEMM over a copy of the
    table with fp16 weights, packed once on the first call (fp32 user vectors and accumulation): the
    stage reads half the bytes, and no BLAS repacks the table per batch, as MKL does on AMD CPUs
    whatever its layout. The scores differ from the fp32 product by about 3e-4 of the largest one
    (model_output/NOTES-v2.md). On other devices, and with fp16_table=False, the fp32 product.
    """

    # a real type, not the string `from __future__ import annotations` would make of it: TorchScript
    # reads the attribute's type from here
    __annotations__ = {"packed": Optional[torch.classes.quantized.LinearPackedParamsBase]}

    def __init__(self, fold_in: torch.Tensor, item_emb: torch.Tensor, item_norm: torch.Tensor, fp16_table: bool = True):
        super().__init__()
        self.register_buffer("fold_in", fold_in.float().contiguous())
        self.register_buffer("item_emb_t", item_emb.float().t().contiguous())
        self.register_buffer("item_norm", item_norm.float().contiguous())
        self.fp16_table = fp16_table
        # made by the first CPU call, not exported: packing is specific to the machine's fbgemm
        self.packed = None

    @torch.jit.export
    def user_vectors(self, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, D] user vectors: the scores are user_vectors @ item_table()."""
        b, l = history.shape
        m = mask.to(self.fold_in.dtype)
        flat = history.reshape(-1)
        # index_select and one bmm: the same sums as indexing and einsum, in fewer, cheaper calls
        w = self.item_norm.index_select(0, flat).view(b, 1, l) * m.unsqueeze(1)  # [B, 1, L]
        n = m.sum(dim=1, keepdim=True).clamp(min=1.0)
        return torch.bmm(w, self.fold_in.index_select(0, flat).view(b, l, -1)).squeeze(1) / n.sqrt()

    @torch.jit.export
    def item_table(self) -> torch.Tensor:
        """[D, N] item vectors: the server builds its approximate candidate index (IVF) from them."""
        return self.item_emb_t

    def forward(self, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        users = self.user_vectors(history, mask)
        if not self.fp16_table or users.device.type != "cpu":
            return users @ self.item_emb_t
        packed = self.packed
        if packed is None:
            packed = torch.ops.quantized.linear_prepack_fp16(self.item_emb_t.t().contiguous(), None)
            self.packed = packed
        return torch.ops.quantized.linear_dynamic_fp16(users, packed)


def item_vectors(lightgcn) -> torch.Tensor:
    """LightGCN's [N, D] item vectors from a loaded stage or its state dict, in either layout
    (exports before the transposed table hold item_emb [N, D])."""
    state = lightgcn if isinstance(lightgcn, dict) else dict(lightgcn.named_buffers())
    return state["item_emb_t"].t() if "item_emb_t" in state else state["item_emb"]


class LastDimPReLU(nn.Module):
    """PReLU with one slope per feature of the last dimension (nn.PReLU uses dimension 1)."""

    def __init__(self, features: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((features,), 0.25))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch.prelu puts the channels on dimension 1: flatten to [rows, features] (one kernel)
        return torch.prelu(x.reshape(-1, x.shape[-1]), self.alpha).reshape(x.shape)


class DIN(nn.Module):
    """Stage 2: Deep Interest Network (Zhou et al. 2018).

    The local activation unit scores every (history item, candidate) pair from
    [h, c, h - c, h * c] through an MLP (PReLU here, Dice in the paper); the history is pooled with
    those weights (no softmax, as in the paper) and an MLP scores [pooled, c, pooled * c].

    The computation is rearranged, algebraically identical, so that its cost follows the real
    history items and not the padded batch (see forward):
    - the first attention layer in its split form
      W [h, c, h-c, h*c] = (W1 + W3) h + (W2 - W3) c + W4 (h*c);
    - the PReLU + second layer as relu(x) . v(1 - alpha) + x . v alpha + b2, whose linear part
      splits into small products;
    - the pairs of one profile as a single GEMM c @ [W4^T diag(h_1) | ... | W4^T diag(h_L)], so
      the [C, L, A] pair tensor of a row is written once, updated in place and read once, and only
      the profile's real items take part (a batch padded to its longest history costs no more);
    - the first MLP layer over [pooled, c, pooled * c] as three products, without the concatenation.
    """

    def __init__(self, num_items: int, dim: int = 64, att_hidden: int = 64, mlp_hidden: int = 128):
        super().__init__()
        self.emb = nn.Embedding(num_items, dim)
        self.att1 = nn.Linear(4 * dim, att_hidden)
        self.att_act = LastDimPReLU(att_hidden)
        self.att2 = nn.Linear(att_hidden, 1)
        self.mlp = nn.Sequential(
            nn.Linear(3 * dim, mlp_hidden),
            LastDimPReLU(mlp_hidden),
            nn.Linear(mlp_hidden, mlp_hidden // 2),
            LastDimPReLU(mlp_hidden // 2),
            nn.Linear(mlp_hidden // 2, 1),
        )
        self.dim = dim
        nn.init.normal_(self.emb.weight, std=0.05)

    def forward(self, history: torch.Tensor, mask: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
        d = self.dim
        b, n_c = cands.shape
        w = self.att1.weight  # [A, 4D]
        w1, w2, w3, w4 = w[:, :d], w[:, d : 2 * d], w[:, 2 * d : 3 * d], w[:, 3 * d :]
        alpha = self.att_act.alpha  # [A]
        v = self.att2.weight[0]  # [A]
        va = v * alpha
        vr = v * (1.0 - alpha)
        w4t = w4.t()  # [D, A]
        c = self.emb(cands)  # [B, C, D]
        cp = torch.addmm(self.att1.bias, c.reshape(-1, d), (w2 - w3).t()).view(b, n_c, -1)  # [B, C, A]
        cpa = cp @ va + self.att2.bias  # [B, C]
        # the real history items only, row after row: [T, ...] with T = mask.sum()
        lens: List[int] = mask.sum(dim=1).tolist()
        h_all = self.emb(history[mask])  # [T, D]
        hp_all = h_all @ (w1 + w3).t()  # [T, A]
        hpa_all = hp_all @ va  # [T]
        hu_all = h_all * (w4t @ va)  # [T, D]
        pooled = torch.zeros_like(c)
        start = 0
        for i, n in enumerate(lens):
            if n == 0:
                continue
            h = h_all[start : start + n]  # [L, D]
            ci = c[i]  # [C, D]
            # x[c, l] = (h_l * c) W4^T + hp_l + cp_c for the row's C x L pairs, [C, L, A]
            x = (ci @ (w4t.unsqueeze(1) * h.t().unsqueeze(2)).reshape(d, -1)).view(n_c, n, -1)
            x += hp_all[start : start + n]
            x += cp[i].unsqueeze(1)
            # x . v alpha + b2 = c . (h * W4^T v alpha) + hp . v alpha + cp . v alpha + b2, [C, L]
            lin = torch.addmm(hpa_all[start : start + n].unsqueeze(0) + cpa[i].unsqueeze(1), ci, hu_all[start : start + n].t())
            att = torch.relu_(x) @ vr + lin  # [C, L]
            pooled[i] = att @ h
            start += n
        l1 = self.mlp[0].weight  # [H, 3D]: the blocks for pooled, c and pooled * c
        y = torch.addmm(self.mlp[0].bias, pooled.view(-1, d), l1[:, :d].t())
        y.addmm_(c.view(-1, d), l1[:, d : 2 * d].t())
        y.addmm_((pooled * c).view(-1, d), l1[:, 2 * d :].t())
        y = self.mlp[4](self.mlp[3](self.mlp[2](self.mlp[1](y))))
        return y.view(b, n_c)


# Above this many [B, N] buffer elements ease_scores matches neighbours to candidates by binary
# search instead: a 1M-item catalog would allocate a 4 MB buffer and touch its pages even for a
# lone profile (when it was zeroed whole, a third of a lone request's CPU there), where
# Amazon-Book's batches of up to 20 stay dense.
DENSE_EASE_MAX = 500_000


def ease_scores(history: torch.Tensor, mask: torch.Tensor, cands: torch.Tensor, nbr_idx: torch.Tensor,
                nbr_val: torch.Tensor, dense_max: int = DENSE_EASE_MAX) -> torch.Tensor:
    """Sparse-EASE score [B, C]: sum over the profile's real history items h of nbr_val[h, k] where
    nbr_idx[h, k] is the candidate. The whole batch at once: each real item's K neighbours are
    added into its row of a dense [B, N] buffer and the candidates read back, measured faster than
    a binary search of the neighbours among the sorted candidates at Amazon-Book's size; above
    `dense_max` buffer elements (large catalogs) the binary search, whose cost does not grow
    with N. Both add a candidate's terms in the same order, so the sums are the same to the bit."""
    rows = torch.arange(cands.shape[0], device=cands.device).repeat_interleave(mask.sum(dim=1))  # [T]
    return ease_scores_packed(history.masked_select(mask), rows, cands, nbr_idx, nbr_val, dense_max)


def ease_scores_packed(hist: torch.Tensor, rows: torch.Tensor, cands: torch.Tensor, nbr_idx: torch.Tensor,
                       nbr_val: torch.Tensor, dense_max: int = DENSE_EASE_MAX) -> torch.Tensor:
    """ease_scores over the real history items already packed: `hist` [T] the items, `rows` [T]
    the profile (row of `cands`) each belongs to."""
    b, c = cands.shape
    n = nbr_idx.shape[0]
    keys = nbr_idx.index_select(0, hist).long() + (rows * n).unsqueeze(1)  # [T, K] in the [B * N] space
    vals = nbr_val.index_select(0, hist).reshape(-1)
    offsets = (torch.arange(b, device=cands.device) * n).unsqueeze(1)
    cand_keys = (cands + offsets).reshape(-1)  # [B * C]
    if b * n <= dense_max:
        # only the candidates' cells are read back, so only they need to start at 0 (zeroing the
        # whole buffer cost more than the sums themselves)
        dense = torch.empty(b * n, dtype=torch.float32, device=cands.device)
        dense.index_fill_(0, cand_keys, 0.0)
        dense.index_add_(0, keys.reshape(-1), vals)
        return dense.index_select(0, cand_keys).view(b, c)
    sorted_keys, order = cand_keys.sort()
    flat = keys.reshape(-1)
    pos = torch.searchsorted(sorted_keys, flat).clamp(max=b * c - 1)
    hit = sorted_keys.index_select(0, pos) == flat
    out = torch.zeros(b * c, dtype=torch.float32, device=cands.device)
    out.index_add_(0, order.index_select(0, pos[hit]), vals[hit])
    return out.view(b, c)


def row_zscore(x: torch.Tensor) -> torch.Tensor:
    """Standardise each row (the last dimension: a profile's candidates; rows of one column come
    out 0)."""
    mu = x.mean(dim=-1, keepdim=True)
    sd = (x - mu).pow(2).mean(dim=-1, keepdim=True).sqrt().clamp(min=1e-6)
    return (x - mu) / sd


class DIN2(nn.Module):
    """Stage 2, interface v2: a narrow Deep Interest Network that re-ranks LightGCN's wide
    candidate list and takes LightGCN's score as an input: forward(history, mask, cands, s1).

    - local activation unit in bilinear form over the profile's most recent MAX_ATT items:
      a[c, l] = e_c^T W e_{h_l} (own DIM-wide item embeddings), softmax over the real items,
      pooled[c] = sum_l a[c, l] e_{h_l};
    - sparse-EASE score of the candidate over the whole history (ease_scores, buffers
      nbr_idx [N, K] / nbr_val [N, K]);
    - an MLP (F -> HIDDEN -> 1) over [pooled * e_c, pooled . e_c, s1, row-z(s1), ease,
      row-z(ease), log(1 + popularity), log(1 + |H|)].
    The cost per profile is ~C * (4 * min(L, MAX_ATT) * DIM + 2 * F * HIDDEN) + 2 * L * K.
    """

    # the first MLP layer with the standardisation folded in, made by the first forward (see
    # folded_layers); a real type, not the string `from __future__ import annotations` would make
    # of it: TorchScript reads the attribute's type from here
    __annotations__ = {"folded": Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]}

    def __init__(self, num_items: int, nbr_idx: torch.Tensor, nbr_val: torch.Tensor, log_pop: torch.Tensor,
                 dim: int = 16, hidden: int = 32, max_att: int = 50):
        super().__init__()
        self.folded = None
        self.emb = nn.Embedding(num_items, dim)
        self.att_w = nn.Parameter(torch.eye(dim))
        self.register_buffer("nbr_idx", nbr_idx.to(torch.int32).contiguous())
        self.register_buffer("nbr_val", nbr_val.float().contiguous())
        self.register_buffer("log_pop", log_pop.float().contiguous())
        self.register_buffer("feat_mean", torch.zeros(dim + 7))
        self.register_buffer("feat_std", torch.ones(dim + 7))
        self.mlp = nn.Sequential(nn.Linear(dim + 7, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.dim = dim
        self.max_att = max_att

    def popularity(self, cands: torch.Tensor) -> torch.Tensor:
        """log(1 + popularity) of each candidate, [B, C] (index_select: far cheaper than indexing)."""
        return self.log_pop.index_select(0, cands.reshape(-1)).view(cands.shape)

    def features(self, history: torch.Tensor, mask: torch.Tensor, cands: torch.Tensor, s1: torch.Tensor,
                 ease: torch.Tensor) -> torch.Tensor:
        b, c = cands.shape
        L = history.shape[1]
        la = min(self.max_att, L)
        lens = mask.sum(dim=1)
        ar = torch.arange(la, device=history.device).unsqueeze(0)
        pos = ((lens - la).clamp(min=0).unsqueeze(1) + ar).clamp(max=L - 1)
        valid = ar < lens.unsqueeze(1)  # [B, La]: the last min(n, La) real items
        eh = self.emb(history.gather(1, pos)) * valid.unsqueeze(2).to(torch.float32)  # [B, La, D]
        ec = self.emb(cands)  # [B, C, D]
        logits = ec @ (eh @ self.att_w).transpose(1, 2)  # [B, C, La]
        logits = logits.masked_fill(~valid.unsqueeze(1), -1e9)
        att = torch.softmax(logits, dim=2) * valid.unsqueeze(1).to(torch.float32)
        pooled = att @ eh  # [B, C, D]
        inter = pooled * ec
        hlen = torch.log1p(lens.to(torch.float32)).unsqueeze(1).expand(b, c)
        extra = torch.stack(
            [inter.sum(dim=2), s1, row_zscore(s1), ease, row_zscore(ease), self.popularity(cands), hlen], dim=2
        )
        return (torch.cat([inter, extra], dim=2) - self.feat_mean) / self.feat_std

    def reference(self, history: torch.Tensor, mask: torch.Tensor, cands: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        """forward in the form it is trained in (features, then the MLP)."""
        ease = ease_scores(history, mask, cands, self.nbr_idx, self.nbr_val)
        return self.mlp(self.features(history, mask, cands, s1, ease)).squeeze(-1)

    def forward(self, history: torch.Tensor, mask: torch.Tensor, cands: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        """reference() rearranged, algebraically identical, for speed:
        - the attention row by row over the profile's own real items only ([n, C] logits, softmax
          over the n items): a batch padded to its longest history costs no more, where the
          padded [B, C, La] form spent most of DIN's time on masked entries;
        - the feature standardisation folded into the first MLP layer (once, folded_layers), which
          takes the features in two blocks and needs no [B, C, F] concatenation;
        - the real history items packed once for the EASE sums and, when no profile is longer than
          max_att, for the attention."""
        b, c = cands.shape
        d = self.dim
        L = history.shape[1]
        lens = mask.sum(dim=1)
        # the real items packed row after row, for the EASE sums and (histories of at most
        # max_att items) the attention
        hist = history.masked_select(mask)
        rows = torch.arange(b, device=cands.device).repeat_interleave(lens)
        ease = ease_scores_packed(hist, rows, cands, self.nbr_idx, self.nbr_val)
        if L <= self.max_att:
            kept_t = lens
            att_items = hist
        else:
            la = self.max_att
            kept_t = lens.clamp(max=la)
            ar = torch.arange(la, device=history.device).unsqueeze(0)
            pos = ((lens - la).clamp(min=0).unsqueeze(1) + ar).clamp(max=L - 1)
            # each row's last min(n_i, La) real items (right-padded history), packed row after row
            att_items = history.gather(1, pos).masked_select(ar < kept_t.unsqueeze(1))
        eh = self.emb(att_items)  # [T_a, D]
        q = eh @ self.att_w
        ec = self.emb(cands)  # [B, C, D]
        kept: List[int] = kept_t.tolist()
        # every row is written below unless its history is empty
        if b > 0 and min(kept) > 0:
            pooled = torch.empty(b, c, d, dtype=ec.dtype, device=ec.device)
        else:
            pooled = torch.zeros(b, c, d, dtype=ec.dtype, device=ec.device)
        # per-row views made once (split, unbind) rather than sliced per row: fewer operator calls
        q_rows, eh_rows, pooled_rows = q.split(kept), eh.split(kept), pooled.unbind(0)
        ect_rows = ec.transpose(1, 2).unbind(0)  # [D, C] each
        for i in range(b):
            if kept[i] > 0:
                att = torch.softmax(torch.mm(q_rows[i], ect_rows[i]), dim=0)  # [n, C]
                torch.mm(att.t(), eh_rows[i], out=pooled_rows[i])
        # The first MLP layer without the [B, C, F] feature tensor (building it, column by column
        # interleaved, was a third of DIN's time): with w = W / feat_std (the standardisation
        # folded in) over [inter (D) | inter . 1 | s1 | z(s1) | ease | z(ease) | pop | hlen], the
        # inter block and the dot product are one [D, H] weight, and the six per-candidate scalars
        # are stacked feature-major ([6, B * C], contiguous copies; s1 and ease standardised
        # together, so in the order s1, ease, z(s1), z(ease), pop, hlen) and enter through a
        # transposed view: y = inter W_inter^T + X^T W_x^T + b.
        folded = self.folded
        if folded is None:
            folded = self.folded_layers()
            self.folded = folded
        w_inter_t, w_x_t, bias = folded
        hlen = torch.log1p(lens.to(torch.float32)).unsqueeze(1).expand(b, c)
        scores = torch.stack([s1, ease])  # [2, B, C]
        x = torch.cat([scores, row_zscore(scores), torch.stack([self.popularity(cands), hlen])]).view(6, b * c)
        # linear rather than addmm, which TorchScript splits into a product and an addition
        y = F.linear((pooled * ec).view(b * c, d), w_inter_t.t(), bias)
        y = torch.relu_(y.addmm_(x.t(), w_x_t))
        return torch.addmv(self.mlp[2].bias, y, self.mlp[2].weight[0]).view(b, c)

    def folded_layers(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The first MLP layer as forward uses it, (w_inter^T [D, H], w_x^T [6, H], bias [H]): with
        w = W / feat_std, bias = b - w @ feat_mean, w_inter = w[:, :D] + w[:, D] (the inter block
        and its dot product), w_x = w[:, D + 1:] with its columns in forward's order (s1, ease,
        z(s1), z(ease), pop, hlen). Made by the first forward and kept, as the weights of an
        exported module do not change; never exported (msmodels.export)."""
        d = self.dim
        w = self.mlp[0].weight / self.feat_std  # [H, F]
        bias = self.mlp[0].bias - w @ self.feat_mean
        w_x = w[:, d + 1 :].index_select(1, torch.tensor([0, 2, 1, 3, 4, 5], device=w.device))
        return (w[:, :d] + w[:, d : d + 1]).t().contiguous(), w_x.t().contiguous(), bias


class RankNet(nn.Module):
    """Stage 3: RankNet (Burges et al. 2005), an MLP over per-candidate features trained with the
    pairwise logistic loss. The features are computed inside the module from buffers, so the
    server passes only ids and the two upstream scores:

      0 lightgcn score            4 log(1 + |H|)
      1 din score                 5 max cosine(candidate, history) over LightGCN item vectors
      2 lightgcn rank in the list 6 mean cosine(candidate, history)
      3 log(1 + popularity)       7 (with a neighbour table only) its score summed over the history

    The shipped RankNet has no neighbour table: DIN already weighs the sparse-EASE score, and a
    RankNet given it again validated lower (model_output/NOTES-v2.md). Older exports carry one
    (feature 7, ItemKNN in v1, sparse EASE in the first v2 round).
    """

    # the first layer with the standardisation folded in, (w^T [F, H], bias [H]), made by the first
    # forward: as DIN2.folded
    __annotations__ = {"folded": Optional[Tuple[torch.Tensor, torch.Tensor]]}

    def __init__(
        self,
        item_unit: torch.Tensor,
        log_pop: torch.Tensor,
        feat_mean: torch.Tensor,
        feat_std: torch.Tensor,
        hidden: int = 32,
        neighbours: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ):
        """`neighbours`: (nbr_idx [N, K], nbr_val [N, K]) for feature 7; None for the 7-feature
        RankNet (its nbr_idx / nbr_val buffers are then empty)."""
        super().__init__()
        self.use_nbr = neighbours is not None
        nbr_idx, nbr_val = neighbours if neighbours is not None else (torch.zeros(0, 0), torch.zeros(0, 0))
        self.register_buffer("item_unit", item_unit.float().contiguous())
        self.register_buffer("log_pop", log_pop.float().contiguous())
        self.register_buffer("nbr_idx", nbr_idx.to(torch.int32).contiguous())
        self.register_buffer("nbr_val", nbr_val.float().contiguous())
        self.register_buffer("feat_mean", feat_mean.float())
        self.register_buffer("feat_std", feat_std.float())
        self.folded = None
        self.net = nn.Sequential(
            nn.Linear(8 if self.use_nbr else 7, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden // 2),
            nn.ReLU(),
            nn.Linear(hidden // 2, 1),
        )

    def columns(
        self,
        history: torch.Tensor,
        mask: torch.Tensor,
        cands: torch.Tensor,
        s1: torch.Tensor,
        s2: torch.Tensor,
    ) -> List[torch.Tensor]:
        """The features, one [B, C] tensor each, unstandardised."""
        b, c = cands.shape
        lens = mask.sum(dim=1)
        hlen = lens.to(torch.float32).unsqueeze(1)  # [B, 1]
        # rank of each candidate in s1's order (0 = best), / C
        order = torch.argsort(s1, dim=1, descending=True)
        rank = torch.empty_like(s1).scatter_(1, order, torch.arange(c, device=s1.device, dtype=s1.dtype).expand(b, c))
        rank = rank / float(max(c, 1))
        # cosines to the profile's real items only (right-padded history: row i's first n_i),
        # row by row, so that a batch padded to its longest history costs no more; the mean as
        # one product with the sum of the row's unit vectors (multiply and sum: a batched GEMV of
        # one column costs three times as much)
        cu = self.item_unit.index_select(0, cands.reshape(-1)).view(b, c, -1)  # [B, C, D]
        hu = self.item_unit.index_select(0, history.masked_select(mask))  # [T, D]
        rows = torch.arange(b, device=cands.device).repeat_interleave(lens)
        hsum = torch.zeros(b, hu.shape[1], dtype=hu.dtype, device=hu.device).index_add_(0, rows, hu)
        mean_sim = (cu * hsum.unsqueeze(1)).sum(dim=2) / hlen.clamp(min=1.0)
        max_sim = torch.zeros_like(s1)
        counts: List[int] = lens.tolist()
        # per-row views made once (unbind, split) rather than sliced per row: fewer operator calls
        cu_rows, max_rows, hu_rows = cu.unbind(0), max_sim.unbind(0), hu.t().split(counts, dim=1)
        for i in range(b):
            if counts[i] > 0:
                torch.amax(torch.mm(cu_rows[i], hu_rows[i]), dim=1, out=max_rows[i])
        cols = [
            s1,
            s2,
            rank,
            self.log_pop.index_select(0, cands.reshape(-1)).view(b, c),  # log(1 + popularity)
            torch.log1p(hlen).expand(b, c),
            max_sim,
            mean_sim,
        ]
        if self.use_nbr:
            cols.append(ease_scores(history, mask, cands, self.nbr_idx, self.nbr_val))
        return cols

    def features(
        self,
        history: torch.Tensor,
        mask: torch.Tensor,
        cands: torch.Tensor,
        s1: torch.Tensor,
        s2: torch.Tensor,
    ) -> torch.Tensor:
        """[B, C, F] standardised features, the net's input as it is trained."""
        return (torch.stack(self.columns(history, mask, cands, s1, s2), dim=-1) - self.feat_mean) / self.feat_std

    def forward(
        self,
        history: torch.Tensor,
        mask: torch.Tensor,
        cands: torch.Tensor,
        s1: torch.Tensor,
        s2: torch.Tensor,
    ) -> torch.Tensor:
        """net(features(...)) rearranged for speed, the same function (as DIN2.forward does it):
        the features stacked feature-major ([F, B * C], contiguous copies, where the [B, C, F]
        stack interleaves them) enter the first layer through a transposed view, with the
        standardisation folded into its weights (once: the weights of an exported module do not
        change; never exported, msmodels.export)."""
        b, c = cands.shape
        cols = self.columns(history, mask, cands, s1, s2)
        x = torch.stack(cols).view(len(cols), b * c)
        folded = self.folded
        if folded is None:
            w = self.net[0].weight / self.feat_std  # [H, F]
            folded = (w.t().contiguous(), self.net[0].bias - w @ self.feat_mean)
            self.folded = folded
        w_t, bias = folded
        # linear rather than addmm, which TorchScript splits into a product and an addition
        y = torch.relu_(F.linear(x.t(), w_t.t(), bias))
        y = torch.relu_(F.linear(y, self.net[2].weight, self.net[2].bias))
        return torch.addmv(self.net[4].bias, y, self.net[4].weight[0]).view(b, c)


# ---------------------------------------------------------------------------------------------
# Export with a parity check


def random_batch(num_items: int, batch: int = 4, max_len: int = 12, cands: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    history = torch.randint(0, num_items, (batch, max_len), generator=g)
    lens = torch.randint(0, max_len + 1, (batch,), generator=g)
    lens[0] = max_len
    mask = torch.arange(max_len).unsqueeze(0) < lens.unsqueeze(1)
    history = history * mask  # padding value 0
    cand = torch.randint(0, num_items, (batch, cands), generator=g)
    s1 = torch.randn(batch, cands, generator=g)
    s2 = torch.randn(batch, cands, generator=g)
    return history, mask, cand, s1, s2


def _inputs(kind: str, batch):
    history, mask, cand, s1, s2 = batch
    if kind == "lightgcn":
        return (history, mask)
    if kind == "din":
        return (history, mask, cand)
    if kind == "din2":
        return (history, mask, cand, s1)
    return (history, mask, cand, s1, s2)


def export(module: nn.Module, kind: str, out_dir: str, num_items: int, meta: Dict) -> Dict:
    """Script `module`, save it as out_dir/model.pt, load the file back and check it against the
    eager module on random batches (also a batch whose history is all padding), write meta.json."""
    os.makedirs(out_dir, exist_ok=True)
    module = module.eval()
    # what an eager call cached stays out of the file: a table packed by fbgemm (LightGCN) or a
    # folded first layer (DIN2, RankNet); each loader makes its own
    if isinstance(module, LightGCNServe):
        module.packed = None
    if isinstance(module, (DIN2, RankNet)):
        module.folded = None
    scripted = torch.jit.script(module)
    path = os.path.join(out_dir, "model.pt")
    tmp = path + ".tmp"
    scripted.save(tmp)
    loaded = torch.jit.load(tmp)
    worst = 0.0
    with torch.inference_mode():
        for seed in range(3):
            b = random_batch(num_items, seed=seed)
            if seed == 2:
                b = (b[0] * 0, b[1] & False) + b[2:]
            inputs = _inputs("din2" if isinstance(module, DIN2) else kind, b)
            want = module(*inputs)
            got = loaded(*inputs)
            if got.shape != want.shape:
                raise RuntimeError(f"{kind}: TorchScript shape {tuple(got.shape)} != {tuple(want.shape)}")
            diff = (got - want).abs().max().item()
            worst = max(worst, diff)
            if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
                raise RuntimeError(f"{kind}: TorchScript output differs from eager by {diff}")
    os.replace(tmp, path)
    meta = dict(meta)
    meta.update(
        {
            "stage": kind,
            "schema_version": SCHEMA_VERSION,
            "num_items": num_items,
            "sha256": sha256_file(path),
            "parity_max_abs_diff": worst,
        }
    )
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.write("\n")
    return meta


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_catalog(out_dir: str, asins: List[str], popularity: List[int]) -> None:
    """catalog.tsv: one line per item row, `asin<TAB>popularity` (training interactions)."""
    with open(os.path.join(out_dir, "catalog.tsv"), "w") as f:
        for a, p in zip(asins, popularity):
            f.write(f"{a}\t{int(p)}\n")


def write_manifest(out_dir: str, manifest: Dict) -> None:
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
