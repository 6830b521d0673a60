"""The serving cascade in Python, over the exported TorchScript files: the same steps, candidate
counts and history handling as the Rust server (src/inference/models.rs), used to build training data for
stages 2 and 3 and to evaluate."""

from __future__ import annotations

from typing import List, Sequence

import numpy as np
import torch

MAX_HISTORY = 200  # the server's MAX_HISTORY default
LIGHTGCN_CANDIDATES = 600  # LIGHTGCN_CANDIDATES default
DIN_CANDIDATES = 100  # DIN_CANDIDATES default


def pad(histories: Sequence[np.ndarray], max_history: int = MAX_HISTORY):
    """Right-padded [B, L] history (padding 0) and its mask; keeps the last max_history items."""
    hs = [h[-max_history:] for h in histories]
    L = max(1, max(len(h) for h in hs))
    out = torch.zeros(len(hs), L, dtype=torch.long)
    mask = torch.zeros(len(hs), L, dtype=torch.bool)
    for i, h in enumerate(hs):
        out[i, : len(h)] = torch.from_numpy(np.asarray(h, dtype=np.int64))
        mask[i, : len(h)] = True
    return out, mask


def exclude_history(scores: torch.Tensor, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    rows = mask.nonzero()[:, 0]
    scores[rows, history[mask]] = float("-inf")
    return scores


def exclude_items(scores: torch.Tensor, histories: Sequence[np.ndarray]) -> torch.Tensor:
    """-inf at every item of each whole history: the server excludes all of a profile's items,
    whatever MAX_HISTORY the models see."""
    rows = np.concatenate([np.full(len(h), i, dtype=np.int64) for i, h in enumerate(histories)])
    cols = np.concatenate([np.asarray(h, dtype=np.int64) for h in histories])
    scores[torch.from_numpy(rows), torch.from_numpy(cols)] = float("-inf")
    return scores


def lightgcn_candidates(lightgcn, history, mask, c1: int = LIGHTGCN_CANDIDATES, whole=None):
    """LightGCN's top c1 with the history excluded: the padded `history`, or, when given, the
    `whole` histories (longer than MAX_HISTORY for some users), as the server does."""
    scores = lightgcn(history, mask)
    scores = exclude_items(scores, whole) if whole is not None else exclude_history(scores, history, mask)
    s1, cand = scores.topk(c1, dim=1)
    return s1, cand


def din_takes_s1(din) -> bool:
    """Interface v2: DIN's forward is (history, mask, cands, s1); v1 was (history, mask, cands)."""
    return len(din.forward.schema.arguments) == 5  # self + 4


def din_scores(din, history, mask, cand, s1):
    return din(history, mask, cand, s1) if din_takes_s1(din) else din(history, mask, cand)


class Cascade:
    def __init__(self, model_dir: str, c1: int = LIGHTGCN_CANDIDATES, c2: int = DIN_CANDIDATES):
        self.lightgcn = torch.jit.load(f"{model_dir}/lightgcn/model.pt").eval()
        self.din = torch.jit.load(f"{model_dir}/din/model.pt").eval()
        self.ranknet = torch.jit.load(f"{model_dir}/ranknet/model.pt").eval()
        self.c1, self.c2 = c1, c2

    @torch.inference_mode()
    def rank(self, histories: Sequence[np.ndarray], k: int = 20):
        """Top-k rows per history after each stage: (lightgcn, lightgcn->din, full cascade)."""
        h, m = pad(histories)
        s1, cand = lightgcn_candidates(self.lightgcn, h, m, self.c1, whole=histories)
        s2 = din_scores(self.din, h, m, cand, s1)
        s2_top, pos2 = s2.topk(self.c2, dim=1)
        cand2 = cand.gather(1, pos2)
        s1_top = s1.gather(1, pos2)
        s3 = self.ranknet(h, m, cand2, s1_top, s2_top)
        pos3 = s3.topk(k, dim=1).indices
        return cand[:, :k].numpy(), cand2[:, :k].numpy(), cand2.gather(1, pos3).numpy()


def length_batches(lengths: Sequence[int], max_batch: int = 256, max_cells: int = 4096,
                   max_history: int = MAX_HISTORY) -> List[np.ndarray]:
    """Index batches of similar history length with batch * longest <= max_cells: DIN's cost grows
    with the padded length, so mixing a 3-item and a 200-item history in one batch is expensive."""
    order = np.argsort(np.minimum(np.asarray(lengths), max_history), kind="stable")
    out, i = [], 0
    while i < len(order):
        j = i + 1
        while j < len(order) and j - i < max_batch:
            longest = min(lengths[order[j]], max_history)
            if (j - i + 1) * max(longest, 1) > max_cells:
                break
            j += 1
        out.append(order[i:j])
        i = j
    return out
