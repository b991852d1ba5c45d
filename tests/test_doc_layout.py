"""Balancing packed documents over sequence-parallel ranks (parallel/layout.py, issue 18): the
visible (query, key) pairs each rank computes under the zigzag split, counted independently
(per token: j + 1 at the query's rank, n - j at the key's), before and after reordering a row's
documents and in the balanced layout; every layout a permutation giving each rank S/sp tokens."""

import numpy as np
import pytest
import torch
from longctx.parallel import layout


def _row(lengths):
    return torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]


def _brute_work(ids_in_order: np.ndarray, perm: np.ndarray, sp: int, side: str) -> np.ndarray:
    """Per rank, the sum over the tokens it holds (zigzag split of the laid-out row) of the pairs
    its rank computes for that token."""
    pos, n_of = np.zeros(len(ids_in_order), int), np.zeros(len(ids_in_order), int)
    for a, b in layout._runs(ids_in_order):
        pos[a:b], n_of[a:b] = np.arange(b - a), b - a
    per_token = pos + 1 if side == "query" else n_of - pos
    laid = torch.as_tensor(per_token[perm], dtype=torch.float64)[None]
    return np.array([layout.split(laid, r, sp).sum().item() for r in range(sp)])


MIXES = {  # a long document beside short ones, a padded tail, and one-token documents
    "long+short": [1200, *[20] * 40, 300, 100],
    "tiny docs": [1, 1, 700, *[1] * 30, 2, 500, 9],
    "one document": [2048],
}


@pytest.mark.parametrize("sp", [2, 3, 4, 6])
@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("side", layout.SIDES)
def test_layouts_are_permutations_and_their_work_is_counted_right(sp, mix, side):
    ids = layout.pad(_row(MIXES[mix]), sp, pad_value=layout.PAD_DOCUMENT)
    S = ids.shape[1]
    plain = _brute_work(ids[0].numpy(), np.arange(S), sp, side)
    assert np.allclose(layout.rank_work(ids, sp, side), plain)
    perm, before, after = layout.balance_documents(ids, sp, side=side)
    assert before == pytest.approx(layout.imbalance(plain))
    if perm is not None:
        assert sorted(perm[0].tolist()) == list(range(S))
        assert layout.imbalance(_brute_work(ids[0].numpy(), perm[0].numpy(), sp, side)) == pytest.approx(after)
        assert after <= before
    whole, work = layout.balanced_layout(ids, sp, side=side)
    assert sorted(whole[0].tolist()) == list(range(S))
    assert np.allclose(_brute_work(ids[0].numpy(), whole[0].numpy(), sp, side), work)
    if mix != "one document":
        assert layout.imbalance(work) <= layout.BALANCE_THRESHOLD


def test_reordering_alone_can_balance_and_the_balanced_layout_does_what_it_cannot():
    ids = layout.pad(_row(MIXES["long+short"]), 2, pad_value=layout.PAD_DOCUMENT)
    perm, before, after = layout.balance_documents(ids, 2)
    assert before > 0.3 and after <= layout.BALANCE_THRESHOLD and perm is not None  # sp 2: reordering is enough
    ids = layout.pad(_row(MIXES["long+short"]), 6, pad_value=layout.PAD_DOCUMENT)
    _, before, after = layout.balance_documents(ids, 6)
    _, work = layout.balanced_layout(ids, 6)
    assert after > layout.BALANCE_THRESHOLD >= layout.imbalance(work)  # sp 6: only the balanced layout is


def test_token_ring_counts_work_at_the_keys():
    """Queries travel under TokenRing: the key's rank computes a pair. A row can look balanced by
    the queries' count and not by the keys'."""
    ids = layout.pad(_row([*[2] * 10, 100, 30, 30]), 2, pad_value=layout.PAD_DOCUMENT)
    q, k = (layout.imbalance(layout.rank_work(ids, 2, side)) for side in layout.SIDES)
    assert q > 0.5 and k < 0.1  # by the queries' count it needs balancing, by the keys' it does not
