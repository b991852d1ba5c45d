"""Sequence-parallel attention schedules against single-process causal attention on the full
sequence: outputs and dq/dk/dv, 2 and 4 gloo processes, MHA and GQA, head dims 64 and 128,
lengths that are and are not multiples of 2P."""

import _dist
import pytest
import torch
from longctx.kernels.attention import reference_block_attn
from longctx.parallel import layout

SCHEDULES = ["ring", "token_ring", "bidir_kv", "ulysses"]


def _inputs(B, S, Hq, Hkv, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, Hq, D, generator=g).to(dtype)
    k = torch.randn(B, S, Hkv, D, generator=g).to(dtype)
    v = torch.randn(B, S, Hkv, D, generator=g).to(dtype)
    dout = torch.randn(B, S, Hq, D, generator=g).to(dtype)
    return q, k, v, dout


def _schedule(name):
    from longctx.parallel.attention import SCHEDULE_FUNCTIONS

    return SCHEDULE_FUNCTIONS[name]


def _worker(rank, world, name, shape, dtype):
    import torch.distributed as dist

    q, k, v, dout = _inputs(*shape, dtype)
    def shard(x):
        return layout.split(x, rank, world).clone().requires_grad_()
    ql, kl, vl = shard(q), shard(k), shard(v)
    out = _schedule(name)(ql, kl, vl, dist.group.WORLD)
    out.backward(layout.split(dout, rank, world))
    return out.detach(), ql.grad, kl.grad, vl.grad


def _reference(shape, dtype):
    q, k, v, dout = _inputs(*shape, dtype)
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out = reference_block_attn(q, k, v, causal=True)[0]
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _check(name, world, shape, dtype=torch.float32):
    results = _dist.run(_worker, world, name, shape, dtype)
    S = shape[1]
    got = [layout.unsplit([r[i] for r in results], S) for i in range(4)]
    want = _reference(shape, torch.float32)
    if dtype == torch.float32:
        for g, w, what in zip(got, want, ("out", "dq", "dk", "dv")):
            scale = w.abs().max().item()
            assert (g - w).abs().max().item() <= 1e-5 * max(1.0, scale), what
    else:  # within twice the single-process bf16 error
        ref_bf16 = _reference(shape, dtype)
        for g, w, b, what in zip(got, want, ref_bf16, ("out", "dq", "dk", "dv")):
            ours = (g.float() - w).abs().max().item()
            theirs = (b.float() - w).abs().max().item()
            assert ours <= 2 * theirs + 1e-3, f"{what}: {ours} vs reference bf16 {theirs}"


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("shape", [(1, 64, 4, 4, 64), (2, 37, 4, 2, 64)], ids=["mha-64", "gqa-odd-len"])
def test_two_ranks_match_single_process(name, shape):
    _check(name, 2, shape)


@pytest.mark.slow
@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("shape", [(1, 96, 8, 8, 128), (1, 83, 8, 2, 64)], ids=["mha-128", "gqa-odd-len"])
def test_four_ranks_match_single_process(name, shape):
    _check(name, 4, shape)


@pytest.mark.slow
@pytest.mark.parametrize("name", SCHEDULES)
def test_bf16_within_twice_reference_error(name):
    _check(name, 2, (1, 64, 4, 2, 64), torch.bfloat16)
