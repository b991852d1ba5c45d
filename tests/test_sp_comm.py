"""How the sequence-parallel schedules communicate, checked on real gloo processes:

- overlap: every ring schedule posts the transfer that feeds step s+1 before it starts computing
  step s and waits for it only after (forward and backward), from the event trace of
  parallel/p2p.py; TokenRing's returns run on their own channel (process group) and are in flight
  during the next step's compute too;
- counters: the bytes each rank sent equal what the schedule must move, worked out by hand below
  from the zigzag rule (not from the code's formulas).
"""

import _dist
import pytest
import torch
from longctx.parallel import layout

RING_SCHEDULES = ["ring", "token_ring", "bidir_kv"]


def _module(name):
    from longctx.parallel.attention import SCHEDULE_MODULES

    return SCHEDULE_MODULES[name]


def _shards(rank, world, S, Hq, Hkv, D, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q, dout = torch.randn(1, S, Hq, D, generator=g), torch.randn(1, S, Hq, D, generator=g)
    k, v = torch.randn(1, S, Hkv, D, generator=g), torch.randn(1, S, Hkv, D, generator=g)
    return [layout.split(t, rank, world).contiguous().to(dtype) for t in (q, k, v, dout)]


def _trace_worker(rank, world, name):
    import torch.distributed as dist
    from longctx.parallel import p2p

    q, k, v, dout = _shards(rank, world, 48, 2, 2, 16)
    mod, group = _module(name), dist.group.WORLD
    with p2p.tracing() as fwd:
        out, lse = mod.forward(group, q, k, v)
    with p2p.tracing() as bwd:
        mod.backward(group, dout, q, k, v, out, lse)
    comm = p2p.communicator(group)
    separate = comm.channel_group("return") is not comm.channel_group("ring")
    return fwd, bwd, separate


def _index(events, kind, what):
    hits = [i for i, e in enumerate(events) if e[0] == kind and e[-1] == what]
    assert len(hits) == 1, f"{kind} {what!r}: {len(hits)} events in {events}"
    return hits[0]


def _posts(events, prefix):
    """{step it feeds: (post index, wait index, channel)} of the posts named '<prefix> <step>'."""
    out = {}
    for i, e in enumerate(events):
        if e[0] == "post" and e[3].startswith(prefix + " "):
            ident, channel, step = e[1], e[2], int(e[3].split()[1])
            waits = [j for j, w in enumerate(events) if w[0] == "wait" and w[1] == ident]
            out.setdefault(step, []).append((i, waits[0] if waits else None, channel))
    return out


def _assert_overlapped(events, block_prefix, steps, where):
    posts = _posts(events, block_prefix)
    for s in range(steps - 1):
        begin, end = _index(events, "begin", f"step {s}"), _index(events, "end", f"step {s}")
        assert s + 1 in posts, f"{where}: nothing posted for step {s + 1}"
        for post, wait, _ in posts[s + 1]:
            assert post < begin, f"{where}: the block of step {s + 1} is posted after step {s} starts computing"
            assert wait is not None and wait > end, f"{where}: the block of step {s + 1} is waited for before step {s} ends"


@pytest.mark.parametrize("world", [3, pytest.param(4, marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", RING_SCHEDULES)
def test_next_block_in_flight_during_compute(name, world):
    steps = world if name != "bidir_kv" else world // 2 + 1
    prefix = "q" if name == "token_ring" else "kv"
    for rank, (fwd, bwd, separate) in enumerate(_dist.run(_trace_worker, world, name)):
        assert separate, "the return channel must be its own process group"
        for events, phase in ((fwd, "forward"), (bwd, "backward")):
            where = f"{name} rank {rank} {phase}"
            _assert_overlapped(events, prefix, steps, where)
            if name == "token_ring":  # step s-1's partial goes home during step s's compute
                for s, posted in _posts(events, "partial").items():
                    (post, wait, channel), = posted
                    assert channel == "return", where
                    if s + 1 < steps:
                        assert post < _index(events, "begin", f"step {s + 1}") and wait > _index(
                            events, "end", f"step {s + 1}"), f"{where}: the return of step {s} does not overlap step {s + 1}"
                for post, _, channel in sum(_posts(events, "q").values(), []):
                    assert channel == "ring", where


def _count_worker(rank, world, name, S, Hq, Hkv, D, dtype=torch.float32, inner=1, outer="ring"):
    import torch.distributed as dist
    from longctx.parallel import hybrid, p2p

    q, k, v, dout = _shards(rank, world, S, Hq, Hkv, D, dtype)
    mod, group = _module(name), dist.group.WORLD
    if name == "hybrid":
        group = hybrid.make_groups(list(range(world)), inner, outer)
    comms = [p2p.communicator(g) for g in ((group.inner, group.outer) if name == "hybrid" else (group,))]

    def stats():
        out = {}
        for c in comms:
            for key, value in c.stats().items():
                out[key] = out.get(key, 0) + value
            c.reset()
        return out

    stats()
    out, lse = mod.forward(group, q, k, v)
    fwd = stats()
    mod.backward(group, dout, q, k, v, out, lse)
    return fwd, stats()


def _by_hand(name, P, S, Hq, Hkv, D, b=4):
    """(forward, backward) bytes summed over ranks, b bytes per element of q, k, v, dO (gradients
    and partial sums travel in fp32). n = S/P local tokens; zigzag."""
    n = S // P
    kv_block = 2 * n * Hkv * D * b  # K + V of one rank
    if name == "ring":  # K/V travel P-1 hops; backward again, plus the fp32 dK/dV accumulator P hops (home)
        return P * (P - 1) * kv_block, P * ((P - 1) * kv_block + P * 2 * n * Hkv * D * 4)
    if name == "bidir_kv":  # P-1 blocks reach each rank (both ways); P-1 fp32 partial dK/dV go home
        return P * (P - 1) * kv_block, P * (P - 1) * (kv_block + 2 * n * Hkv * D * 4)
    if name == "token_ring":
        # owner o's queries hop o times in full (to ranks o-1..0, which hold earlier chunks) and
        # P-1-o times as the late half: sum over o = n P(P-1)/2 + n/2 P(P-1)/2 rows; every row
        # that arrives somewhere goes home once as a partial
        rows = n * P * (P - 1) // 2 + n // 2 * P * (P - 1) // 2
        fwd = rows * (Hq * D * b) + rows * (Hq * D * b + Hq * 4)  # q there; out + fp32 lse back
        bwd = rows * (2 * Hq * D * b + 2 * Hq * 4) + rows * Hq * D * 4  # q, dO, fp32 D, lse there; fp32 dQ back
        return fwd, bwd
    if name == "allgather_kv":  # each rank's K/V shard to P-1 peers, twice; fp32 dK/dV pieces back to their owners
        return P * (P - 1) * kv_block, P * (P - 1) * (kv_block + 2 * n * Hkv * D * 4)
    if name == "ulysses":  # every all-to-all keeps 1/P of a tensor and sends the rest
        kv_heads = Hkv if Hkv % P == 0 else Hq
        share = (P - 1) * n // P * D * b
        fwd = P * share * (Hq + 2 * kv_heads + Hq)  # q, k, v to heads; out back
        bwd = P * share * (3 * Hq + 2 * kv_heads + Hq + 2 * kv_heads)  # q, k, v, out, dO; dq, dk, dv back
        return fwd, bwd
    raise AssertionError(name)


@pytest.mark.parametrize("world", [3, pytest.param(4, marks=pytest.mark.slow)])
@pytest.mark.parametrize("name,dtype", [(n, torch.float32) for n in RING_SCHEDULES + ["ulysses", "allgather_kv"]]
                         + [("allgather_kv", torch.bfloat16), ("token_ring", torch.bfloat16)])
def test_counters_match_hand_count(name, dtype, world):
    S, Hq, Hkv, D = 12 * world, 12, 3 if name != "ulysses" else 2, 8  # Hq: divisible by 3 and 4 (Ulysses)
    stats = _dist.run(_count_worker, world, name, S, Hq, Hkv, D, dtype)
    want_fwd, want_bwd = _by_hand(name, world, S, Hq, Hkv, D, b=dtype.itemsize)
    assert sum(f["bytes_sent"] for f, _ in stats) == want_fwd
    assert sum(b["bytes_sent"] for _, b in stats) == want_bwd
    assert sum(f["bytes_received"] for f, _ in stats) == want_fwd  # what leaves one rank arrives at another
    if name == "ring":  # everything goes to the next rank: the busiest pair link carries all of it
        for f, b in stats:
            assert f["max_bytes_per_pair_direction"] == f["bytes_sent"] == f["bytes_sent_next"]
    if name == "token_ring":  # queries go to the previous rank, partials home: more than one link busy
        for f, _ in stats:
            assert f["max_bytes_per_pair_direction"] < f["bytes_sent"]


@pytest.mark.parametrize("outer", ["ring", "token_ring", "allgather_kv"])
def test_hybrid_counters_match_the_model(outer):
    """Hybrid 2 x 2: what the inner and outer communicators counted, summed over ranks, equals the
    chooser's bytes_moved (whose formulas tests/test_choose.py checks by hand), on the path MEMO
    runs (the schedule's own backward: Shape.memo)."""
    from longctx.parallel.choose import Shape, bytes_moved

    S, Hq, Hkv, D = 48, 4, 2, 8
    stats = _dist.run(_count_worker, 4, "hybrid", S, Hq, Hkv, D, torch.float32, 2, outer)
    model = bytes_moved("hybrid", Shape(S, Hq, Hkv, D, 4, 4, memo=True), sp_inner=2, outer=outer)
    assert sum(f["bytes_sent"] for f, _ in stats) == pytest.approx(4 * sum(model["fwd"].values()))
    assert sum(b["bytes_sent"] for _, b in stats) == pytest.approx(4 * sum(model["bwd"].values()))


def _autograd_count_worker(rank, world, name, S, Hq, Hkv, D, inner=1, outer="ring"):
    """Bytes of the autograd path (what runs without MEMO): forward, then .backward()."""
    import torch.distributed as dist
    from longctx.parallel import hybrid, p2p
    from longctx.parallel.attention import SCHEDULE_FUNCTIONS

    q, k, v, dout = _shards(rank, world, S, Hq, Hkv, D)
    group = hybrid.make_groups(list(range(world)), inner, outer) if name == "hybrid" else dist.group.WORLD
    comms = [p2p.communicator(g) for g in ((group.inner, group.outer) if name == "hybrid" else (group,))]
    for c in comms:
        c.reset()
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = SCHEDULE_FUNCTIONS[name](q, k, v, group)
    fwd = sum(c.stats()["bytes_sent"] for c in comms)
    out.backward(dout)
    return fwd, sum(c.stats()["bytes_sent"] for c in comms) - fwd


@pytest.mark.parametrize("name,inner", [("ulysses", 1), ("hybrid", 2)])
def test_autograd_path_counters_match_the_model(name, inner):
    """Without MEMO, Ulysses (and hybrid's inner part) keep the head-layout tensors for backward
    and scatter only dO: the chooser's bytes_moved with Shape.memo False, summed over ranks."""
    from longctx.parallel.choose import Shape, bytes_moved

    S, Hq, Hkv, D = 48, 4, 2, 8
    stats = _dist.run(_autograd_count_worker, 4, name, S, Hq, Hkv, D, inner)
    model = bytes_moved(name, Shape(S, Hq, Hkv, D, 4, 4), sp_inner=inner if name == "hybrid" else None,
                        outer="ring" if name == "hybrid" else None)
    assert sum(f for f, _ in stats) == pytest.approx(4 * sum(model["fwd"].values()))
    assert sum(b for _, b in stats) == pytest.approx(4 * sum(model["bwd"].values()))


def _order_worker(rank, world):
    import torch.distributed as dist
    from longctx.parallel import allgather_kv, bidir_kv, p2p

    q, k, v, dout = _shards(rank, world, 16 * world, 2, 2, 16)
    group = dist.group.WORLD
    with p2p.tracing() as fwd:
        out, lse = allgather_kv.forward(group, q, k, v)
    with p2p.tracing() as bwd:
        allgather_kv.backward(group, dout, q, k, v, out, lse)
    b_out, b_lse = bidir_kv.forward(group, q, k, v)
    with p2p.tracing() as bidir:
        bidir_kv.backward(group, dout, q, k, v, b_out, b_lse)
    return fwd, bwd, bidir


@pytest.mark.parametrize("world", [3, pytest.param(7, marks=pytest.mark.slow)])
def test_allgather_overlaps_its_diagonal_and_bidir_posts_blocks_before_returns(world):
    """allgather_kv posts its all-gather, computes the two diagonal blocks (local keys) and only
    then waits, in forward and backward; bidir_kv's backward posts the counter-clockwise block of
    step s+1 on the return channel before the partials of step s-1 (7 ranks: step 2 has both)."""
    for rank, (fwd, bwd, bidir) in enumerate(_dist.run(_order_worker, world)):
        for events, phase in ((fwd, "forward"), (bwd, "backward")):
            post, wait, _ = _gather_post(events)
            begin, end = _index(events, "begin", "diagonal"), _index(events, "end", "diagonal")
            assert post < begin < end < wait, f"allgather_kv rank {rank} {phase}: {events}"
        returns = [(i, e[3]) for i, e in enumerate(bidir) if e[0] == "post" and e[2] == "return"]
        checked = [s for s in range(2, world // 2) if (2 * (s + 1)) % world]  # steps whose next block goes both ways
        assert checked or world < 7
        for s in checked:
            kv = next(i for i, what in returns if what == f"kv {s + 1}")
            partial = next(i for i, what in returns if what == f"partial {s - 1}")
            assert kv < partial, f"bidir_kv rank {rank}: returns of step {s - 1} posted ahead of the block of step {s + 1}"


def _gather_post(events):
    """(post index, wait index, channel) of the one all-gather."""
    posts = [(i, e[1], e[2]) for i, e in enumerate(events) if e[0] == "post" and e[3] == "all-gather"]
    assert len(posts) == 1, events
    i, ident, channel = posts[0]
    waits = [j for j, e in enumerate(events) if e[0] == "wait" and e[1] == ident]
    return i, waits[0] if waits else None, channel
