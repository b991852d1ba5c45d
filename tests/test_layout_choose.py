"""Zigzag layout and the block kernels the schedules share (the chooser: tests/test_choose.py)."""

import pytest
import torch
from longctx.kernels.attention import (
    block_attn,
    block_attn_bwd,
    merge,
    reference_block_attn,
    reference_block_attn_bwd,
)
from longctx.parallel import layout


@pytest.mark.parametrize("S,sp", [(16, 2), (37, 2), (83, 4), (8, 4), (64, 3), (128, 6), (21, 5)])
def test_split_unsplit_round_trip_and_balance(S, sp):
    x = torch.arange(S)[None].expand(2, S)
    shards = [layout.split(x, r, sp) for r in range(sp)]
    assert len({s.shape[1] for s in shards}) == 1
    assert torch.equal(layout.unsplit(shards, S), x)
    # causal work per rank: sum of (position + 1) over its queries, equal with zigzag
    padded = layout.padded_length(S, sp)
    work = [int((layout.split(torch.arange(padded)[None], r, sp) + 1).sum()) for r in range(sp)]
    assert len(set(work)) == 1


def test_split_batch_positions_and_padding_labels():
    inputs = torch.arange(10)[None] + 100
    labels = torch.arange(10)[None] + 200
    ids, pos, lab = layout.split_batch(inputs, labels, rank=1, sp=2, pad_id=7)
    # padded to 12: chunks of 3; rank 1 holds chunks 1 and 2 -> positions 3..8
    assert pos.tolist() == [[3, 4, 5, 6, 7, 8]] and ids.tolist() == [[103, 104, 105, 106, 107, 108]]
    ids0, pos0, lab0 = layout.split_batch(inputs, labels, rank=0, sp=2, pad_id=7)
    assert pos0.tolist() == [[0, 1, 2, 9, 10, 11]]
    assert ids0.tolist() == [[100, 101, 102, 109, 7, 7]] and lab0.tolist() == [[200, 201, 202, 209, -100, -100]]


@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2)])
def test_block_kernels_and_merge_match_reference(hq, hkv):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 24, hq, 32, generator=g)
    k, v = torch.randn(2, 40, hkv, 32, generator=g), torch.randn(2, 40, hkv, 32, generator=g)
    for causal in (True, False):
        out, lse = block_attn(q, k, v, causal)
        ref_out, ref_lse = reference_block_attn(q, k, v, causal)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
        dout = torch.randn(out.shape, generator=g)
        for a, b in zip(block_attn_bwd(dout, q, k, v, out, lse, causal),
                        reference_block_attn_bwd(dout, q, k, v, ref_out, ref_lse, causal)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # merging two key halves equals attention over all keys
    o1, l1 = block_attn(q, k[:, :20], v[:, :20], False)
    o2, l2 = block_attn(q, k[:, 20:], v[:, 20:], False)
    o, lse_merged = merge(*merge(None, None, o1, l1), o2, l2)
    full_o, full_l = block_attn(q, k, v, False)
    torch.testing.assert_close(o, full_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_merged, full_l, atol=1e-5, rtol=1e-5)


def test_merge_ignores_rows_without_keys():
    out = torch.ones(1, 3, 1, 2)
    out[:, 1] = 0  # the row that saw no key
    lse = torch.tensor([[[0.0, float("-inf"), 1.0]]])
    empty = torch.zeros(1, 3, 1, 2)
    for blank in (float("-inf"), float("inf")):  # kernels mark empty rows either way
        o, merged = merge(out, lse, empty, torch.full((1, 1, 3), blank))
        assert torch.equal(o, out) and torch.equal(merged, lse)

