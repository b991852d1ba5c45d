"""Packed documents on CUDA (issue 18): document-masked block attention through every fused kernel
the GPU has (aten_flash, aten_efficient, flash_attn when installed), per tile, against the
per-document fp32 reference, values and gradients in bf16 (the trainer's dtype), within twice the
error of the same kernel run on each document alone; rows with 1, 2 and 50
documents at 8K tokens; the balanced layout's (ids, positions) blocks; and a model at sp 1 whose
packed row's loss equals its documents' losses alone. The CPU contract of the same branches is
tests/test_doc_attention.py through the strict stand-ins."""

import pytest
import torch
from longctx.kernels import capability
from longctx.kernels.attention import BlockAttention, block_attn, reference_block_attn

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

KERNELS = ["aten_flash", "aten_efficient"] + (["flash_attn"] if capability.has_flash_attn() else [])


def _docs(S: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randperm(S - 1, generator=g)[: n - 1].add(1).tolist())
    lengths = [b - a for a, b in zip([0, *cuts], [*cuts, S])]
    return torch.cat([torch.full((m,), i) for i, m in enumerate(lengths)])[None]


def _per_document(q, k, v, docs):
    """fp32 causal attention of each document alone, stitched (the reference)."""
    out = torch.zeros_like(q, dtype=torch.float32)
    for d in docs[0].unique().tolist():
        idx = (docs[0] == d).nonzero().flatten()
        a, z = idx[0].item(), idx[-1].item() + 1
        out[:, a:z] = reference_block_attn(q[:, a:z].float(), k[:, a:z].float(), v[:, a:z].float(), True)[0]
    return out


@pytest.mark.parametrize("n_docs", [1, 2, 50])
@pytest.mark.parametrize("kernel", KERNELS)
def test_masked_blocks_on_cuda_match_each_document_alone(kernel, n_docs):
    S, Hq, Hkv, D = 8192, 8, 2, 64
    docs = _docs(S, n_docs, n_docs)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(1, S, H, D, device="cuda", generator=g, dtype=torch.bfloat16) for H in (Hq, Hkv, Hkv, Hq))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = BlockAttention.apply(*leaves, True, kernel, docs, docs)
    out.backward(dout)
    ref = [t.float().clone().requires_grad_() for t in (q, k, v)]
    want = _per_document(*ref, docs)
    want.backward(dout.float())
    # the same-dtype reference: each document alone through the same fused kernel (no masks)
    same = [t.clone().requires_grad_() for t in (q, k, v)]
    pieces = []
    for d in docs[0].unique().tolist():
        idx = (docs[0] == d).nonzero().flatten()
        a, z = idx[0].item(), idx[-1].item() + 1
        pieces.append(BlockAttention.apply(same[0][:, a:z], same[1][:, a:z], same[2][:, a:z], True, kernel))
    torch.cat(pieces, 1).backward(dout)
    same_out = torch.cat(pieces, 1).detach()
    got_all = (out, *(t.grad for t in leaves))
    for got, s_, w, what in zip(got_all, (same_out, *(t.grad for t in same)), (want, *(t.grad for t in ref)),
                                ("out", "dq", "dk", "dv")):
        err, base = (got.float() - w).abs().max().item(), (s_.float() - w).abs().max().item()
        assert err <= 2 * base + 1e-6, f"{kernel} {what}: {err} vs the kernel on each document alone {base}"


@pytest.mark.parametrize("kernel", KERNELS)
def test_rows_in_a_balanced_layout_mask_by_position(kernel):
    """A row whose document pieces are out of sequence order (parallel/layout.balanced_layout):
    the (ids, positions) mask gives the same attention as the row in order."""
    from longctx.parallel import layout

    S, sp = 4096, 4
    ids = _docs(S, 9, 3)
    pos = torch.cat([torch.arange(n) for n in torch.unique_consecutive(ids[0], return_counts=True)[1].tolist()])[None]
    perm, _ = layout.balanced_layout(ids, sp)
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(1, S, H, 64, device="cuda", generator=g, dtype=torch.bfloat16) for H in (8, 2, 2))
    in_order, _ = block_attn(q, k, v, True, kernel, ids, ids)
    idx = perm.cuda()
    qp, kp, vp = (t[:, idx] for t in (q, k, v))
    keyed = (ids.gather(1, perm), pos.gather(1, perm))
    out, _ = block_attn(qp, kp, vp, False, kernel, keyed, keyed)
    back = torch.empty_like(out)
    back[:, idx] = out
    torch.testing.assert_close(back.float(), in_order.float(), atol=2e-2, rtol=2e-2)


def test_a_packed_row_on_cuda_trains_like_its_documents_alone():
    from longctx.data.pack_docs import pack_documents
    from longctx.kernels.attention import LocalAttention
    from longctx.kernels.loss import linear_cross_entropy
    from longctx.models.config import ModelConfig
    from longctx.models.llama import CausalLM

    cfg = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=64, max_position_embeddings=4096)
    rng = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 512, (n,), generator=rng).numpy() for n in (700, 5, 1200, 1, 90, 2000)]
    packed = pack_documents(docs, 4096, seed=0)
    attention = LocalAttention("auto")
    model = CausalLM(cfg, attention=attention, loss=lambda h, w, y: linear_cross_entropy(h, w, y, reduction="sum"))
    model.init_weights(0)
    model = model.cuda()
    attention.documents = torch.as_tensor(packed.doc_ids[:1], dtype=torch.long)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        total = model(torch.as_tensor(packed.tokens[:1], dtype=torch.long).cuda(),
                      position_ids=torch.as_tensor(packed.positions(0))[None].cuda(),
                      labels=torch.as_tensor(packed.labels(0))[None].cuda()).item()
        attention.documents = None
        alone = 0.0
        for d, _ in packed.pieces[0]:
            x = torch.as_tensor(docs[d], dtype=torch.long)[None].cuda()
            y = torch.cat([x[:, 1:], torch.full((1, 1), -100, device="cuda")], 1)
            alone += model(x, labels=y).item()
    assert total == pytest.approx(alone, rel=2e-3)
