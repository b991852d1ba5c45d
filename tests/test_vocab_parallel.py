"""Vocabulary parallelism (parallel/vocab.py): the sharded embedding and loss head against one
process with the whole weight, values and gradients, at 2, 3 and 4 gloo ranks, both variants,
tied and untied, V not divisible by P, ignored labels, softcap and z-loss; the byte model."""

from __future__ import annotations

import _dist
import pytest
import torch
import torch.nn.functional as F
from longctx.kernels.loss import reference_linear_cross_entropy
from longctx.parallel import p2p, vocab

V, D, N = 203, 24, 37  # 203 = 7 x 29: not divisible by 2, 3 or 4


def _inputs(world: int, seed: int = 0, tied: bool = False):
    """Every rank's ids [N], hidden [N, D] and labels [N] (a fifth ignored), the weights, and the
    upstream gradient of the embedding output (what the layers above would send back)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (world, N), generator=g)
    hidden = torch.randn(world, N, D, generator=g)
    labels = torch.randint(0, V, (world, N), generator=g)
    labels[torch.rand(world, N, generator=g) < 0.2] = -100
    emb = torch.randn(V, D, generator=g) * 0.5
    head = emb if tied else torch.randn(V, D, generator=g) * 0.5
    up = torch.randn(world, N, D, generator=g)
    return ids, hidden, labels, emb, head, up


def _reference(world, tied, softcap, z_loss):
    """One process, whole weights: sum over ranks of each rank's summed loss + <embedding, up>."""
    ids, hidden, labels, emb, head, up = _inputs(world, tied=tied)
    emb = emb.clone().requires_grad_()
    head = emb if tied else head.clone().requires_grad_()
    hidden = hidden.clone().requires_grad_()
    total = sum(reference_linear_cross_entropy(hidden[r], head, labels[r], reduction="sum", softcap=softcap,
                                               z_loss=z_loss) for r in range(world))
    total = total + (F.embedding(ids, emb) * up).sum()
    total.backward()
    return total.item(), hidden.grad, emb.grad, None if tied else head.grad


def _worker(rank, world, variant, tied, softcap, z_loss):
    ranks = list(range(world))
    group = p2p.new_group(ranks)
    shard = vocab.VocabShard.of(V, group)
    ids, hidden, labels, emb, head, up = _inputs(world, tied=tied)
    w_emb = vocab.shard_rows(emb, shard).requires_grad_()
    w_head = w_emb if tied else vocab.shard_rows(head, shard).requires_grad_()
    h = hidden[rank].clone().requires_grad_()
    x = vocab.embedding(ids[rank], w_emb, shard, variant)
    loss = vocab.linear_cross_entropy(h, w_head, labels[rank], shard, variant, softcap=softcap, z_loss=z_loss)
    (loss + (x * up[rank]).sum()).backward()
    total = loss.detach() + (x.detach() * up[rank]).sum()
    torch.distributed.all_reduce(total, group=group)
    return {"total": total.item(), "dh": h.grad, "demb": w_emb.grad, "dhead": None if tied else w_head.grad,
            "start": shard.start, "stop": shard.stop, "x": x.detach(), "stats": p2p.communicator(group).stats()}


# every world x variant x tied; softcap and z-loss by world (V = 203 divides by none of them)
EXTRAS = {2: (None, 0.0), 3: (5.0, 1e-3), 4: (None, 1e-4)}
CASES = [(world, variant, tied, *EXTRAS[world]) for world in (2, 3, 4) for variant in ("stream", "gather")
         for tied in (False, True)]


@pytest.mark.parametrize("world,variant,tied,softcap,z_loss", CASES)
def test_sharded_equals_one_process(world, variant, tied, softcap, z_loss):
    ref_total, ref_dh, ref_demb, ref_dhead = _reference(world, tied, softcap, z_loss)
    ids, *_ , emb, _, _ = _inputs(world, tied=tied)
    out = _dist.run(_worker, world, variant, tied, softcap, z_loss)
    covered = []
    for rank, o in enumerate(out):
        assert abs(o["total"] - ref_total) <= 1e-5 * max(1.0, abs(ref_total))
        torch.testing.assert_close(o["x"], F.embedding(ids[rank], emb), rtol=0, atol=0)  # a lookup: exact
        torch.testing.assert_close(o["dh"], ref_dh[rank], rtol=1e-5, atol=1e-6)
        s = slice(o["start"], o["stop"])
        torch.testing.assert_close(o["demb"], ref_demb[s], rtol=1e-5, atol=1e-6)
        if not tied:
            torch.testing.assert_close(o["dhead"], ref_dhead[s], rtol=1e-5, atol=1e-6)
        covered.append((o["start"], o["stop"]))
        assert o["stats"]["bytes_sent"] > 0
    assert covered[0][0] == 0 and covered[-1][1] == V and all(a[1] == b[0] for a, b in zip(covered, covered[1:]))


def test_shards_follow_torch_chunk_and_may_be_empty():
    # DTensor's Shard(0) splits as torch.chunk does: ceil(V/P) rows, the last ones short or empty
    assert [vocab.bounds(9, 4, r) for r in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 9)]
    assert [vocab.bounds(10, 4, r) for r in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert [vocab.bounds(8, 4, r) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]


def _empty_shard_worker(rank, world):
    group = p2p.new_group(list(range(world)))
    shard = vocab.VocabShard.of(9, group)  # rank 3 holds no row
    g = torch.Generator().manual_seed(1)
    w = torch.randn(9, 8, generator=g)
    h = torch.randn(world, 5, 8, generator=g)
    y = torch.randint(0, 9, (world, 5), generator=g)
    out = {}
    for variant in vocab.VARIANTS:
        ws = vocab.shard_rows(w, shard).requires_grad_()
        hs = h[rank].clone().requires_grad_()
        loss = vocab.linear_cross_entropy(hs, ws, y[rank], shard, variant)
        loss.backward()
        out[variant] = (loss.item(), hs.grad, ws.grad)
    return out


def test_an_empty_shard_is_exact():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(9, 8, generator=g)
    h = torch.randn(4, 5, 8, generator=g)
    y = torch.randint(0, 9, (4, 5), generator=g)
    out = _dist.run(_empty_shard_worker, 4)
    for rank, o in enumerate(out):
        hs, ws = h[rank].clone().requires_grad_(), w.clone().requires_grad_()
        ref = reference_linear_cross_entropy(hs, ws, y[rank], reduction="sum")
        ref.backward()
        for variant in vocab.VARIANTS:
            loss, dh, dw = o[variant]
            assert abs(loss - ref.item()) <= 1e-5
            torch.testing.assert_close(dh, hs.grad, rtol=1e-5, atol=1e-6)
            assert dw.shape[0] == vocab.bounds(9, 4, rank)[1] - vocab.bounds(9, 4, rank)[0]


def test_byte_model_crossover():
    # gather moves O(tokens x D), stream O(V x D): gather for few tokens, stream for many
    V_, D_, P = 128256, 4096, 8
    few = vocab.bytes_per_rank("gather", "head", 1024, V_, D_, P, 2, 2)
    assert few < vocab.bytes_per_rank("stream", "head", 1024, V_, D_, P, 2, 2)
    many = 131072
    assert vocab.bytes_per_rank("stream", "head", many, V_, D_, P, 2, 2) < vocab.bytes_per_rank(
        "gather", "head", many, V_, D_, P, 2, 2)
    kw = dict(vocab_size=V_, hidden=D_, world=P, flops_per_s=4e14, link_bytes_per_s=4e11)
    assert vocab.choose(1024, **kw) == "gather" and vocab.choose(many, **kw) == "stream"
    assert vocab.bytes_per_rank("stream", "head", 10, V_, D_, 1) == 0


def _triton_worker(rank, world, variant):
    import os

    assert os.environ.get("TRITON_INTERPRET") == "1"
    group = p2p.new_group(list(range(world)))
    shard = vocab.VocabShard.of(V, group)
    _, hidden, labels, _, head, _ = _inputs(world)
    out = {}
    for impl in vocab.SHARD_IMPLS:
        w = vocab.shard_rows(head, shard).requires_grad_()
        h = hidden[rank].clone().requires_grad_()
        loss = vocab.linear_cross_entropy(h, w, labels[rank], shard, variant, softcap=5.0, z_loss=1e-3, impl=impl)
        loss.backward()
        out[impl] = (loss.item(), h.grad, w.grad)
    return out


@pytest.mark.parametrize("variant", vocab.VARIANTS)
def test_triton_shard_kernels_equal_the_torch_path(variant, monkeypatch):
    """The CUDA branch's per-shard kernels (kernels/cce.py forward and backward on a shard, the
    global LSE given) under TRITON_INTERPRET=1 on 2 gloo ranks: loss and gradients of the torch path."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # inherited by the spawned ranks before they import triton
    for o in _dist.run(_triton_worker, 2, variant):
        loss_t, dh_t, dw_t = o["torch"]
        loss_k, dh_k, dw_k = o["triton"]
        assert abs(loss_t - loss_k) <= 1e-5 * abs(loss_t)
        torch.testing.assert_close(dh_k, dh_t, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dw_k, dw_t, rtol=1e-5, atol=1e-6)


def test_triton_shard_dw_must_be_a_contiguous_fp32_buffer(monkeypatch):
    pytest.importorskip("triton")
    from longctx.kernels import cce

    h, w = torch.randn(4, 16), torch.randn(8, 16)
    with pytest.raises(ValueError, match="dw: expected a contiguous fp32"):
        cce.shard_grads(h, w, torch.zeros(4, dtype=torch.long), torch.zeros(4), torch.ones(4), 0.0, None,
                        torch.zeros(8, 16, dtype=torch.bfloat16))


def _autocast_worker(rank, world, variant):
    group = p2p.new_group(list(range(world)))
    shard = vocab.VocabShard.of(V, group)
    _, hidden, labels, _, head, _ = _inputs(world)
    w = vocab.shard_rows(head, shard).requires_grad_()
    h = hidden[rank].clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = vocab.linear_cross_entropy(h, w, labels[rank], shard, variant, z_loss=1e-3)
    loss.backward()
    return loss.item(), h.grad, w.grad, shard.start, shard.stop


@pytest.mark.parametrize("variant", vocab.VARIANTS)
def test_bf16_autocast_within_twice_the_naive_heads_error(variant):
    """The trainer's regime (run.dtype bf16: autocast, fp32 weights): the backward recomputes the
    logits under the forward's autocast, so loss and gradients stay within twice the error of the
    naive bf16 head (logits in bf16, then fp32 cross-entropy) against fp32."""
    world = 2
    _, hidden, labels, _, head, _ = _inputs(world)
    out = _dist.run(_autocast_worker, world, variant)
    results = {}  # one process: every rank's tokens, the whole weight
    for name, ctx in (("fp32", torch.autocast("cpu", enabled=False)),
                      ("naive", torch.autocast("cpu", dtype=torch.bfloat16))):
        h, w = hidden.clone().requires_grad_(), head.clone().requires_grad_()
        with ctx:
            losses = [reference_linear_cross_entropy(h[r], w, labels[r], reduction="sum", z_loss=1e-3)
                      for r in range(world)]
        sum(losses).backward()
        results[name] = ([x.item() for x in losses], h.grad, w.grad)
    exact, naive = results["fp32"], results["naive"]
    for rank, (loss, dh, dw, a, b) in enumerate(out):
        assert abs(loss - exact[0][rank]) <= 2 * abs(naive[0][rank] - exact[0][rank]) + 1e-4
        for ours, want, base in ((dh, exact[1][rank], naive[1][rank]), (dw, exact[2][a:b], naive[2][a:b])):
            assert (ours - want).abs().max() <= 2 * (base - want).abs().max() + 1e-6


def test_off_reads_as_yaml_writes_it_and_a_group_of_one_is_refused():
    from pathlib import Path

    from longctx.parallel import mesh as mesh_lib
    from longctx.recipes import schema
    from longctx.recipes.schema import RecipeError
    from longctx.train.build import build_model

    tiny = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
    assert schema.load(tiny, ["parallel.vocab_parallel=off"]).parallel.vocab_parallel == "off"  # YAML: off -> false
    recipe = schema.load(tiny, ["parallel.vocab_parallel=stream"])
    # commands that build a model without the run's world check (longctx eval at --sp 1)
    with pytest.raises(RecipeError, match="parallel.vocab_parallel='stream': .* one rank there"):
        build_model(recipe, mesh_lib.init(torch.device("cpu")))
