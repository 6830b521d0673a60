"""ease_scores: the dense-buffer path (small catalogs) and the binary-search path (large ones) give
the same sums to the bit, and a candidate that is nobody's neighbour scores 0."""

import torch

from model_service_py import msmodels


def both_paths(history, mask, cands, nbr_idx, nbr_val):
    sparse = msmodels.ease_scores(history, mask, cands, nbr_idx, nbr_val, dense_max=0)
    dense = msmodels.ease_scores(history, mask, cands, nbr_idx, nbr_val, dense_max=10**12)
    return sparse, dense


def test_dense_and_binary_search_paths_agree_to_the_bit():
    torch.manual_seed(3)
    n, b, length, c, k = 2000, 8, 30, 200, 20
    nbr_idx = torch.randint(0, n, (n, k), dtype=torch.int32)
    nbr_val = torch.rand(n, k)
    history = torch.randint(0, n, (b, length))
    mask = torch.rand(b, length) > 0.3
    rows = []
    for i in range(b):
        # distinct candidates per row (as the server sends), many of them neighbours of the history
        planted = torch.unique(nbr_idx[history[i, :5]].reshape(-1).long())[:100]
        rest = torch.randperm(n)
        rows.append(torch.cat([planted, rest[~torch.isin(rest, planted)]])[:c])
    cands = torch.stack(rows)
    sparse, dense = both_paths(history, mask, cands, nbr_idx, nbr_val)
    assert torch.equal(sparse, dense)
    assert (dense > 0).sum() > 100


def test_a_candidate_no_history_item_points_to_scores_zero():
    nbr_idx = torch.tensor([[1, 2], [0, 2], [0, 1], [0, 1]], dtype=torch.int32)
    nbr_val = torch.tensor([[0.5, 0.25], [1.0, 2.0], [4.0, 8.0], [16.0, 32.0]])
    history = torch.tensor([[0, 1]])
    mask = torch.tensor([[True, True]])
    cands = torch.tensor([[2, 3, 1]])
    for scores in both_paths(history, mask, cands, nbr_idx, nbr_val):
        # item 2: 0.25 (from 0) + 2.0 (from 1); item 3: nobody's neighbour; item 1: 0.5 (from 0)
        assert scores.tolist() == [[2.25, 0.0, 0.5]]
