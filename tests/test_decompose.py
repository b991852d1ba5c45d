"""Dataset decomposition and the curriculum sampler (arXiv 2405.13226)."""

import numpy as np
import pytest
from longctx.data.decompose import attention_flops, decompose, gather_rows
from longctx.data.sampler import (
    CurriculumSampler,
    SamplerError,
    row_group,
    sp_for_length,
)
from longctx.data.tokenize import TokenStore


def _store(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return TokenStore.from_arrays([rng.integers(0, 1000, n).astype(np.int32) for n in lengths])


LENGTHS = [1, 2, 17, 64, 65, 300, 1000, 4097, 9000, 12345]


@pytest.mark.parametrize("short", ["drop", "pad"])
@pytest.mark.parametrize("random_split", [False, True])
def test_every_kept_transition_exactly_once_within_one_document(short, random_split):
    store = _store(LENGTHS)
    b = decompose(store.offsets[:-1], store.offsets[1:], 16, 1024, short, random_split, seed=1)
    seen = np.zeros(len(store.tokens), dtype=int)  # counts of each position used as an input
    for L, starts in b.starts.items():
        assert L & (L - 1) == 0 and 16 <= L <= 1024
        for s, n in zip(starts, b.lengths[L]):
            doc = np.searchsorted(store.offsets, s, side="right") - 1
            assert s + n + 1 <= store.offsets[doc + 1], "a piece crosses a document boundary"
            assert n == L or (short == "pad" and L == 16 and n < 16)
            seen[s : s + n] += 1
    assert seen.max() == 1
    assert b.transitions_kept + b.transitions_dropped == b.transitions_total == sum(n - 1 for n in LENGTHS)
    assert b.transitions_kept == seen.sum()
    if short == "pad":
        assert b.transitions_dropped == 0 and b.pad_tokens > 0


def test_binary_decomposition_and_cut_at_max_len():
    store = _store([1 + 1024 + 512 + 32 + 5, 1 + 3 * 1024 + 16])
    b = decompose(store.offsets[:-1], store.offsets[1:], 16, 1024)
    assert b.sizes == {16: 1, 32: 1, 512: 1, 1024: 4}
    assert b.transitions_dropped == 5


def test_gather_rows_shifts_and_masks_padding():
    store = _store([40])
    b = decompose(store.offsets[:-1], store.offsets[1:], 16, 32, short="pad")
    inputs, labels = gather_rows(store.tokens, b.starts[16], b.lengths[16], 16, pad_id=999)
    n = b.lengths[16][0]
    tokens = store.tokens[b.starts[16][0] :]
    assert np.array_equal(inputs[0, :n], tokens[:n]) and np.array_equal(labels[0, :n], tokens[1 : n + 1])
    assert (labels[0, n:] == -100).all() and (inputs[0, n:] == 999).all()


def _sampler(**kw):
    sizes = {64: 400, 128: 150, 256: 60, 512: 20}
    args = dict(tokens_per_step=1024, schedule="grow_p2", seed=3, cycles=2)
    args.update(kw)
    return CurriculumSampler(sizes, **args)


@pytest.mark.parametrize("schedule", ["natural", "grow_p2", "weights", "fixed"])
def test_tokens_per_step_hold_and_epoch_uses_each_piece_once(schedule):
    extra = {"weights": {64: 1, 128: 1, 256: 5, 512: 5}} if schedule == "weights" else {}
    if schedule == "fixed":
        extra = {"fixed_len": 128}
    s = _sampler(schedule=schedule, **extra)
    used = {}
    for step in range(s.steps_per_epoch):
        L, pieces, _ = s.batch_at(step)
        assert len(pieces) * L == 1024
        used.setdefault(L, []).extend(pieces.tolist())
    for L, pieces in used.items():
        assert len(pieces) == len(set(pieces)), f"bucket {L} repeated a piece within an epoch"


def test_grow_p2_is_short_first_within_each_cycle():
    s = _sampler(cycles=1)
    plan = [s.batch_at(i)[0] for i in range(s.steps_per_epoch)]
    first, last = plan[: len(plan) // 3], plan[-len(plan) // 3 :]
    assert np.mean(first) < np.mean(last)


def test_same_seed_same_stream_and_disjoint_rank_shards():
    a, b = _sampler(), _sampler()
    assert all(a.batch_at(i)[0] == b.batch_at(i)[0] and np.array_equal(a.batch_at(i)[1], b.batch_at(i)[1])
               for i in range(40))
    assert any(_sampler(seed=4).batch_at(i)[0] != a.batch_at(i)[0] for i in range(40))
    for step in (0, 7, s := a.steps_per_epoch + 3):
        whole = _sampler().batch_at(step)[1]
        shards = [_sampler(rank=r, world=2).batch_at(step)[1] for r in range(2)]
        assert not set(shards[0]) & set(shards[1])
        assert sorted(np.concatenate(shards).tolist()) == sorted(whole.tolist())
    del s


def test_state_dict_resumes_with_the_exact_next_batch():
    a = _sampler()
    for _ in range(13):
        next(a)
    b = _sampler()
    b.load_state_dict(a.state_dict())
    for _ in range(20):
        (la, pa, _), (lb, pb, _) = next(a), next(b)
        assert la == lb and np.array_equal(pa, pb)
    with pytest.raises(SamplerError, match="seed=3 but this run has 4"):
        _sampler(seed=4).load_state_dict(a.state_dict())


def test_bad_settings_are_named():
    with pytest.raises(SamplerError, match="fixed_len=100"):
        _sampler(schedule="fixed", fixed_len=100)
    with pytest.raises(SamplerError, match="cannot share evenly"):
        _sampler(world=4)  # a 512 step has 2 rows for 4 ranks
    with pytest.raises(SamplerError, match="no weight for bucket"):
        _sampler(schedule="weights", weights={64: 1})


def test_per_bucket_sp_degree_and_row_groups():
    assert sp_for_length(1024, 4, 64) == 4
    assert sp_for_length(128, 4, 64) == 2  # 128 tokens cannot give 4 ranks 64 each
    assert sp_for_length(64, 4, 64) == 1
    # dp=2 x sp=4; a 128-token bucket runs at sp=2, so 4 row groups share the rows without overlap
    s = CurriculumSampler({128: 64, 1024: 16}, tokens_per_step=2048, schedule="natural", world=2,
                          sp=4, min_tokens_per_sp_rank=64, seed=0)
    for step in range(s.steps_per_epoch):
        L, _, sp_eff = s.batch_at(step, dp_rank=0, sp_rank=0)
        shards = {}
        for dp in range(2):
            for sp_rank in range(4):
                shards[row_group(dp, sp_rank, 4, sp_eff)] = tuple(s.batch_at(step, dp, sp_rank)[1])
        rows = [r for shard in shards.values() for r in shard]
        assert len(shards) == 2 * 4 // sp_eff and len(rows) == len(set(rows)) == 2048 // L


@pytest.mark.parametrize("sp", [3, 6])
def test_any_sp_degree_runs_buckets_at_divisors(sp):
    """sp need not be a power of two: a bucket runs at the largest divisor of sp that leaves each
    rank min_tokens_per_sp_rank tokens (6 -> 3 or 2, never 4 or 5), and the row groups of every
    rank together take each row of the step exactly once."""
    assert sp_for_length(1024, 6, 64) == 6
    assert sp_for_length(128, 6, 32) == 3  # 128 // 6 = 21 < 32; 128 // 3 = 42
    assert sp_for_length(100, 6, 40) == 2  # 100 // 3 = 33 < 40; 100 // 2 = 50
    assert sp_for_length(64, 3, 32) == 1 and sp_for_length(96, 3, 32) == 3
    s = CurriculumSampler({32: 96, 64: 48, 128: 24}, tokens_per_step=128 * 2 * sp, schedule="natural", world=2,
                          sp=sp, min_tokens_per_sp_rank=32, seed=0)
    seen = set()
    for step in range(s.steps_per_epoch):
        L, _, sp_eff = s.batch_at(step, dp_rank=0, sp_rank=0)
        assert sp % sp_eff == 0 and sp_eff == sp_for_length(L, sp, 32)
        seen.add(sp_eff)
        shards = {}
        for dp in range(2):
            for sp_rank in range(sp):
                group = row_group(dp, sp_rank, sp, sp_eff)
                rows = tuple(s.batch_at(step, dp, sp_rank)[1])
                assert shards.setdefault(group, rows) == rows  # one sub-group, the same rows
        rows = [r for shard in shards.values() for r in shard]
        assert len(shards) == 2 * sp // sp_eff and len(rows) == len(set(rows)) == s.tokens_per_step // L
    assert len(seen) > 1  # short buckets did run at a smaller degree


def test_attention_flops_of_decomposition_vs_concat():
    store = _store([1000] * 8)
    b = decompose(store.offsets[:-1], store.offsets[1:], 16, 1024)
    dd = attention_flops(b.sizes)
    cc = attention_flops({1024: b.transitions_kept // 1024})
    assert cc > dd
