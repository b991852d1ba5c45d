"""Document-masked attention (issue 18): block_attn with q_docs/k_docs against a per-document
reference (each document attended alone, dense fp32), values and gradients, on every kernel
(the CUDA ones through their strict stand-ins, tests/_standins.py), for rows of 1, 2 and 50
documents; the tiles of causal and unmasked blocks against the dense masked reference."""

import _standins
import pytest
import torch
from longctx.kernels.attention import (
    BlockAttention,
    LocalAttention,
    block_attn,
    block_attn_bwd,
    document_tiles,
    reference_block_attn,
    reference_block_attn_bwd,
)

CUDA_KERNELS = ["aten_flash", "aten_efficient", "flash_attn"]
DTYPE = {"aten_flash": torch.bfloat16, "flash_attn": torch.bfloat16, "aten_efficient": torch.float32,
         "aten_cpu": torch.float32, "reference": torch.float32}


@pytest.fixture
def standins(monkeypatch):
    _standins.install(monkeypatch)
    _standins.calls.clear()
    return _standins.calls


def doc_ids(lengths: list[int]) -> torch.Tensor:
    """[S] ids 0, 0, ..., 1, 1, ... for consecutive documents of these lengths."""
    return torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(lengths)])


def split_lengths(S: int, n_docs: int, seed: int) -> list[int]:
    """n_docs positive lengths summing to S, uneven (some of 1 token)."""
    g = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randperm(S - 1, generator=g)[: n_docs - 1].add(1).tolist())
    return [b - a for a, b in zip([0, *cuts], [*cuts, S])]


def per_document(q, k, v, docs):
    """out, lse of causal attention with each document alone (the reference the issue names):
    one dense fp32 causal attention per document, stitched."""
    out, lse = torch.zeros_like(q, dtype=torch.float32), torch.zeros(q.shape[0], q.shape[2], q.shape[1])
    for b in range(q.shape[0]):
        for d in docs[b].unique().tolist():
            idx = (docs[b] == d).nonzero().flatten()
            a, z = idx[0].item(), idx[-1].item() + 1
            o, ls = reference_block_attn(q[b:b + 1, a:z].float(), k[b:b + 1, a:z].float(), v[b:b + 1, a:z].float(), True)
            out[b, a:z], lse[b, :, a:z] = o[0], ls[0]
    return out, lse


def inputs(B, S, Hq, Hkv, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, S, H, D, generator=g).to(dtype) for H in (Hq, Hkv, Hkv, Hq)]


@pytest.mark.parametrize("n_docs", [1, 2, 50])
@pytest.mark.parametrize("kernel", ["aten_cpu", "reference"] + CUDA_KERNELS)
def test_masked_block_matches_each_document_alone(standins, kernel, n_docs):
    """Values and gradients (through BlockAttention's autograd) against per-document dense
    attention; fp32 within 1e-5 relative, bf16 within twice the bf16 per-document error."""
    dtype, S = DTYPE[kernel], 96
    docs = torch.stack([doc_ids(split_lengths(S, n_docs, seed)) for seed in (1, 2)])
    q, k, v, dout = inputs(2, S, 4, 2, 32, dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = BlockAttention.apply(*leaves, True, kernel, docs, docs)
    out.backward(dout)
    # fp32 truth and its gradients: per-document dense attention through autograd
    ref = [t.float().clone().requires_grad_() for t in (q, k, v)]
    want_out, want_lse = per_document(*ref, docs)
    want_out.backward(dout.float())
    got_lse = block_attn(q, k, v, True, kernel, docs, docs)[1]
    torch.testing.assert_close(got_lse, want_lse, atol=1e-5, rtol=1e-5)
    if dtype == torch.float32:
        for g, w, n in zip((out, *(t.grad for t in leaves)), (want_out, *(t.grad for t in ref)), ("out", "dq", "dk", "dv")):
            torch.testing.assert_close(g, w, atol=1e-5 * max(1.0, w.abs().max().item()), rtol=1e-5, msg=n)
    else:  # the same-dtype reference: per-document attention computed on bf16 inputs, rounded to bf16
        same = [t.clone().requires_grad_() for t in (q, k, v)]
        same_out = per_document(*same, docs)[0].to(dtype)
        same_out.float().backward(dout.float())
        pairs = zip((out, *(t.grad for t in leaves)), (same_out, *(t.grad for t in same)), (want_out, *(t.grad for t in ref)))
        for (g, s, w), n in zip(pairs, ("out", "dq", "dk", "dv")):
            err, base = (g.float() - w).abs().max().item(), (s.float() - w).abs().max().item()
            assert err <= 2 * base + 1e-6, f"{n}: error {err} vs the bf16 reference's {base}"
    if kernel in CUDA_KERNELS:
        assert standins[f"{kernel}.fwd"] and standins[f"{kernel}.bwd"]


BLOCKS = [  # (q ids, k ids, causal): the blocks the sequence-parallel schedules hand over
    ([0] * 5 + [1] * 3 + [2] * 8, [0] * 5 + [1] * 3 + [2] * 8, True),  # a diagonal block
    ([2] * 6 + [3] * 10, [0] * 4 + [1] * 8 + [2] * 4, False),  # later queries, earlier keys
    ([0] * 8 + [5] * 8, [0] * 4 + [5] * 12, True),  # zigzag shard: runs of one document in both chunks
    ([4] * 8, [4] * 3 + [5] * 13, True),  # causal, fewer queries than keys (top-left)
    ([1] * 3 + [2] * 5 + [1] * 8, [0] * 4 + [1] * 4 + [2] * 8, False),  # a document in two runs
    ([7] * 16, [8] * 16, False),  # no visible pair: nothing runs, out 0, lse -inf
]


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("kernel", ["aten_cpu", "aten_efficient"])
def test_tiles_cover_exactly_the_visible_pairs(standins, block, kernel):
    qd, kd, causal = (torch.tensor(x)[None] if isinstance(x, list) else x for x in block)
    Sq, Sk = qd.shape[1], kd.shape[1]
    visible = torch.zeros(Sq, Sk, dtype=torch.bool)
    for qs, ks, c in document_tiles(qd, kd, causal)[0]:
        tile = torch.ones(qs.stop - qs.start, ks.stop - ks.start, dtype=torch.bool)
        assert not visible[qs, ks].any(), "tiles overlap"
        visible[qs, ks] = tile.tril() if c else tile
    want = qd[0][:, None] == kd[0][None, :]
    if causal:
        want &= torch.ones(Sq, Sk, dtype=torch.bool).tril()
    assert torch.equal(visible, want)
    q = torch.randn(1, Sq, 4, 32)
    k, v = torch.randn(1, Sk, 2, 32), torch.randn(1, Sk, 2, 32)
    out, lse = block_attn(q, k, v, causal, kernel, qd, kd)
    want_out, want_lse = reference_block_attn(q, k, v, causal, qd, kd)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    dout = torch.randn_like(q)
    got = block_attn_bwd(dout, q, k, v, want_out, want_lse, causal, kernel, qd, kd)
    ref = reference_block_attn_bwd(dout, q, k, v, want_out, want_lse, causal, qd, kd)
    for g, w in zip(got, ref):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    if not want.any():
        assert sum(standins.values()) == 0 and torch.isneginf(lse).all() and not out.any()


def test_local_attention_rows_match_the_whole_with_documents():
    """MEMO's query tiles at sp 1 (forward_rows/backward_rows) with documents set give the whole
    masked sequence's out, lse and gradients."""
    S, tile = 48, 16
    docs = doc_ids(split_lengths(S, 7, 3))[None]
    q, k, v, dout = inputs(1, S, 4, 2, 32, torch.float32)
    attn = LocalAttention("aten_cpu")
    attn.documents = docs
    out, lse = attn.forward_lse(q, k, v)
    want_out, want_lse = per_document(q, k, v, docs)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    want = attn.backward_lse(dout, q, k, v, out, lse)
    dk, dv = torch.zeros(1, S, 2, 32), torch.zeros(1, S, 2, 32)
    dq = []
    for start in range(0, S, tile):
        rows = slice(start, start + tile)
        o, ls = attn.forward_rows(q[:, rows], k, v, start)
        torch.testing.assert_close(o, out[:, rows], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ls, lse[:, :, rows], atol=1e-5, rtol=1e-5)
        dq.append(attn.backward_rows(dout[:, rows], q[:, rows], k, v, o, ls, start, dk, dv, key_block=5))
    for g, w in zip((torch.cat(dq, 1), dk, dv), want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    attn.documents = None  # off again: SDPA's causal attention over the whole row
    torch.testing.assert_close(attn(q, k, v), reference_block_attn(q, k, v, True)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["aten_cpu", "reference"] + CUDA_KERNELS)
def test_rows_out_of_order_mask_by_document_and_position(standins, kernel):
    """A balanced layout's blocks (parallel/layout.balanced_layout): rows in no causal order,
    (ids, positions) masks; a shard's queries against another shard's keys equal the same pairs
    of the in-order row, values and gradients, on every kernel (CUDA ones through the stand-ins)."""
    from longctx.parallel import layout

    dtype, S, sp = DTYPE[kernel], 96, 3
    ids = torch.stack([doc_ids(split_lengths(S, n, n)) for n in (2, 9)])
    pos = torch.stack([torch.cat([torch.arange(n) for n in torch.unique_consecutive(r, return_counts=True)[1].tolist()])
                       for r in ids])
    perm, _ = layout.balanced_layout(ids, sp)
    q, k, v, dout = inputs(2, S, 4, 2, 32, dtype, seed=4)

    def gather(x):
        return x.gather(1, perm.view(2, S, 1, 1).expand(-1, -1, *x.shape[2:]))

    qp, kp, vp, dp = (gather(t) for t in (q, k, v, dout))
    keyed = (ids.gather(1, perm), pos.gather(1, perm))
    rows, keys = slice(0, 40), slice(32, 96)  # a block of rows against another block of keys
    qd, kd = (keyed[0][:, rows], keyed[1][:, rows]), (keyed[0][:, keys], keyed[1][:, keys])
    out, lse = block_attn(qp[:, rows], kp[:, keys], vp[:, keys], False, kernel, qd, kd)
    want_out, want_lse = reference_block_attn(qp[:, rows], kp[:, keys], vp[:, keys], False, qd, kd)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), want_out.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse, want_lse, atol=1e-4, rtol=1e-4)
    got = block_attn_bwd(dp[:, rows], qp[:, rows], kp[:, keys], vp[:, keys], want_out, want_lse, False, kernel, qd, kd)
    ref = reference_block_attn_bwd(dp[:, rows], qp[:, rows], kp[:, keys], vp[:, keys], want_out, want_lse, False, qd, kd)
    for g, w in zip(got, ref):
        torch.testing.assert_close(g.float(), w.float(), atol=tol * max(1.0, w.abs().max().item()), rtol=tol)
    # the whole row in the layout's order is the in-order row's causal attention, permuted
    whole = block_attn(qp, kp, vp, False, kernel, keyed, keyed)[0]
    in_order = per_document(q, k, v, ids)[0]
    torch.testing.assert_close(whole.float(), gather(in_order).float(), atol=tol, rtol=tol)
    if kernel in CUDA_KERNELS:
        assert standins[f"{kernel}.fwd"] and standins[f"{kernel}.bwd"]


def test_tiles_whose_keys_are_out_of_position_order_still_merge_every_partial():
    """One document, queries at positions 4..11, keys laid out 8..11 then 0..7 (a block a layout
    may hand over): several tiles cover the same query rows in an order where a later tile may be
    the first to reach some rows; every partial must merge (second cold review, issue 18)."""
    ids = torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 12, dtype=torch.long)
    qpos, kpos = torch.arange(4, 12)[None], torch.cat([torch.arange(8, 12), torch.arange(0, 8)])[None]
    q, k, v = torch.randn(1, 8, 2, 16), torch.randn(1, 12, 2, 16), torch.randn(1, 12, 2, 16)
    qd, kd = (ids[0], qpos), (ids[1], kpos)
    out, lse = block_attn(q, k, v, False, "aten_cpu", qd, kd)
    want_out, want_lse = reference_block_attn(q, k, v, False, qd, kd)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
