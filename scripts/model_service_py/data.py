"""Reading the Amazon-Book split (KGAT format) and the held-out split used to train stages 2 and 3."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from typing import List

import numpy as np

from . import REPO as _REPO


def portable(text: str, data_dir: str | None = None) -> str:
    """`text` (a recorded command or result) without this machine's absolute paths: the data
    directory becomes `DATA`, a path inside the repository becomes relative to it, any other keeps
    only its last component, in angle brackets (`<eval.json>`), so committed manifests and reports
    name no machine."""
    data = os.path.abspath(data_dir).rstrip("/") if data_dir else None

    def local(m: re.Match) -> str:
        path = m.group(0)
        if data and path.rstrip("/") == data:
            return "DATA"
        if path == _REPO or path.startswith(_REPO + os.sep):
            return os.path.relpath(path, _REPO)
        return f"<{os.path.basename(path.rstrip('/')) or path}>"

    if data_dir:
        text = text.replace(data_dir, "DATA")
    return re.sub(r"(?<![\w.~<:/])/(?:[\w.+@-]+/)*[\w.+@-]+/?", local, text)


def _read_lists(path: str) -> List[np.ndarray]:
    rows = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            u = int(parts[0])
            while len(rows) <= u:
                rows.append(np.zeros(0, dtype=np.int64))
            rows[u] = np.asarray(parts[1:], dtype=np.int64)
    return rows


def _read_ids(path: str) -> List[str]:
    with open(path) as f:
        next(f)  # header
        return [line.split()[0] for line in f if line.strip()]


@dataclass
class Dataset:
    train: List[np.ndarray]  # per user, item rows
    test: List[np.ndarray]
    asins: List[str]  # item row -> ASIN
    users: List[str]  # user row -> reviewer id
    data_hash: str

    @property
    def num_items(self) -> int:
        return len(self.asins)

    @property
    def num_users(self) -> int:
        return len(self.users)

    def popularity(self) -> np.ndarray:
        pop = np.zeros(self.num_items, dtype=np.int64)
        for items in self.train:
            np.add.at(pop, items, 1)
        return pop


def load(data_dir: str) -> Dataset:
    h = hashlib.sha256()
    for name in ("train.txt", "test.txt", "item_list.txt", "user_list.txt"):
        with open(os.path.join(data_dir, name), "rb") as f:
            h.update(name.encode())
            h.update(f.read())
    users = _read_ids(os.path.join(data_dir, "user_list.txt"))
    train = _read_lists(os.path.join(data_dir, "train.txt"))
    test = _read_lists(os.path.join(data_dir, "test.txt"))
    while len(train) < len(users):
        train.append(np.zeros(0, dtype=np.int64))
    while len(test) < len(users):
        test.append(np.zeros(0, dtype=np.int64))
    return Dataset(train, test, _read_ids(os.path.join(data_dir, "item_list.txt")), users, h.hexdigest())


def holdout_split(train: List[np.ndarray], frac: float, seed: int, min_items: int = 3):
    """Hold out round(frac * n) (at least 1) random items of each user with >= min_items train items.
    Returns (kept, held) lists. The split is deterministic for a given seed."""
    rng = np.random.default_rng(seed)
    kept, held = [], []
    for items in train:
        n = len(items)
        if n < min_items:
            kept.append(items)
            held.append(np.zeros(0, dtype=np.int64))
            continue
        k = max(1, int(round(frac * n)))
        perm = rng.permutation(n)
        held.append(np.sort(items[perm[:k]]))
        kept.append(np.sort(items[perm[k:]]))
    return kept, held


def recall_ndcg(ranked: np.ndarray, truth: np.ndarray, k: int = 20):
    """Binary-relevance Recall@k and NDCG@k (ideal DCG over min(|truth|, k)) for one user."""
    hits = np.isin(ranked[:k], truth)
    recall = hits.sum() / len(truth)
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (hits * disc[: len(hits)]).sum()
    idcg = disc[: min(len(truth), k)].sum()
    return float(recall), float(dcg / idcg)
