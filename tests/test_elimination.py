"""memory/elimination.py (issue 19, LeMo token elimination): the block score against its dense
reference and a hand computation, the selection, keep_ratio 1 bitwise dense, the eliminated model
against the dense model that masks the same blocks (values and gradients, fp32), alone, with MEMO
and full recompute, and under sequence parallelism at 2 and 4 gloo ranks with every schedule, where
the kept blocks must also be the ones one process selects from the global scores."""

import json
import os
import re
from pathlib import Path

import _dist
import pytest
import torch
from longctx.memory import elimination as el
from longctx.parallel import layout
from longctx.parallel import mesh as mesh_lib
from longctx.recipes import schema
from longctx.recipes.schema import RecipeError
from longctx.train.build import build, build_model
from longctx.train.trainer import train

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
CPU = torch.device("cpu")
BT = 8  # tokens per block in these tests
ELIM = ["memory.elimination.keep_ratio=0.5", "memory.elimination.dense_layers=[]", f"memory.elimination.block_tokens={BT}"]
TOL = dict(atol=1e-5, rtol=1e-5)


# --- the score and the selection ---------------------------------------------------------------------
def test_block_score_by_hand():
    """One head, d = 1, blocks of 2: q = 1 everywhere, k = [1, -1, 2, 0.5]. Tile maxima of ReLU(q k):
    key block 0 -> 1 in each of the 2 query blocks, key block 1 -> 2: scores [2, 4]."""
    q = torch.ones(1, 4, 1, 1)
    k = torch.tensor([1.0, -1.0, 2.0, 0.5]).view(1, 4, 1, 1)
    assert el.block_scores_reference(q, k, 2).tolist() == [[2.0, 4.0]]
    assert el.block_scores(q, k, 2, 2).tolist() == [[2.0, 4.0]]


@pytest.mark.parametrize("S, bt, tile", [(200, 16, 64), (64, 64, 1024), (130, 8, 24), (77, 8, 8)])
def test_block_scores_equal_the_dense_reference(S, bt, tile):
    g = torch.Generator().manual_seed(S)
    q, k = torch.randn(2, S, 4, 8, generator=g), torch.randn(2, S, 2, 8, generator=g)  # GQA: 2 query heads per key head
    torch.testing.assert_close(el.block_scores(q, k, bt, tile), el.block_scores_reference(q, k, bt), **TOL)
    # bf16 projections (autocast) are scored in fp32
    torch.testing.assert_close(el.block_scores(q.bfloat16(), k.bfloat16(), bt, tile),
                               el.block_scores_reference(q.bfloat16(), k.bfloat16(), bt), **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_block_score_equals_the_reference(dtype):
    """kernels/block_score.py under TRITON_INTERPRET=1 (tests/gpu runs it compiled): a length that is not
    a multiple of the block, GQA, a head_dim below the 16 a dot needs (padded), fp32 and bf16 inputs."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton interpreter tests run where TRITON_INTERPRET=1 (CPU machines)")
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 77, 4, 8, generator=g).to(dtype), torch.randn(2, 77, 2, 8, generator=g).to(dtype)
    got = el.block_scores(q, k, 16, impl="triton")
    torch.testing.assert_close(got, el.block_scores_reference(q, k, 16), **TOL)
    with pytest.raises(ValueError, match="block_tokens=24: the Triton score needs a power of two >= 16"):
        el.block_scores(q, k, 24, impl="triton")


def test_score_path_contract(monkeypatch):
    """The Triton score where CUDA and Triton are (and the block suits it), the tiled torch path elsewhere."""
    monkeypatch.setattr(el, "has_triton_gpu", lambda: True)
    assert el.score_impl(torch.device("cuda"), 64) == "triton"
    assert el.score_impl(torch.device("cuda"), 24) == "torch"  # not a power of two
    assert el.score_impl(torch.device("cuda"), 8) == "torch"  # below a dot's 16
    assert el.score_impl(CPU, 64) == "torch"
    monkeypatch.setattr(el, "has_triton_gpu", lambda: False)
    assert el.score_impl(torch.device("cuda"), 64) == "torch"


def test_select_keeps_the_top_blocks_of_every_chunk_in_order():
    # 28 tokens, 2 chunks of 14 = 3 whole blocks of 4 + a partial block of 2, always kept
    scores = torch.tensor([[1.0, 5, 3, 9, 7, 2, 6, 0], [4.0, 3, 2, 0, 1, 2, 3, 0]])
    got = el.select(scores, 28, 2, 0.5, 4)  # 0.5 of 3 blocks -> 2 (round half up)
    assert got[0].tolist() == [*range(4, 12), 12, 13, *range(14, 18), *range(22, 26), 26, 27]
    assert got[1].tolist() == [*range(0, 8), 12, 13, *range(18, 26), 26, 27]
    assert el.select(scores, 28, 2, 0.9, 4) is None  # 3 of 3 blocks: nothing eliminated
    assert el.kept_blocks(0.01, 3) == 1  # never zero


def test_dense_layers_and_per_layer_ratios():
    assert el.Elimination.auto_dense_layers(32) == [*range(15), 31]  # the artifact's Llama layout
    assert el.Elimination.auto_dense_layers(30) == [*range(14), 29]
    p = el.Elimination.of(4, [0.5, 0.25, 1.0, 0.3], dense_layers=[3])
    assert p.keep == (0.5, 0.25, 1.0, 1.0) and p.active


# --- the model against the masked reference ----------------------------------------------------------
def _model(*overrides, mesh=None):
    recipe = schema.load(TINY, list(overrides))
    model, _, spa = build_model(recipe, mesh or mesh_lib.init(CPU))
    return model, spa


def _batch(rows=2, length=100, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (rows, length), generator=g)
    labels = torch.randint(0, 256, (rows, length), generator=g)
    labels[:, :5] = -100
    return ids, labels


def _loss_and_grads(model, ids, labels, positions=None, seq_len=None):
    model.zero_grad()
    loss = model(ids, position_ids=positions, labels=labels, seq_len=seq_len)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _masked_reference(kept: dict, skip_mlp=True, inputs: dict | None = None, overrides=()):
    """The dense tiny model (same seed, same weights) whose layers in `kept` run
    elimination.reference_layer with those kept indices; `inputs` collects each layer's input."""
    model, _ = _model(*overrides)
    for i, block in enumerate(model.model.layers):
        def forward(x, cos, sin, block=block, i=i):
            if inputs is not None:
                inputs[i] = x.detach()
            if i not in kept:
                return type(block).forward(block, x, cos, sin)
            return el.reference_layer(block, x, cos, sin, kept[i], skip_mlp)
        block.forward = forward
    return model


def _assert_same(got, want, what):
    torch.testing.assert_close(got[0], want[0], **TOL, msg=what)
    for name, g in want[1].items():
        torch.testing.assert_close(got[1][name], g, **TOL, msg=f"{what}: grad of {name}")


def test_keep_ratio_one_is_the_dense_model_bitwise():
    ids, labels = _batch(length=64)
    dense = _loss_and_grads(_model()[0], ids, labels)
    off, _ = _model("memory.elimination.keep_ratio=1.0")
    assert off.elimination == []
    # wrapped, but 0.97 of 8 blocks rounds to all 8: the wrapped block runs its dense forward
    wrapped, _ = _model("memory.elimination.keep_ratio=0.97", "memory.elimination.dense_layers=[]",
                        f"memory.elimination.block_tokens={BT}")
    assert len(wrapped.elimination) == 2
    for model in (off, wrapped):
        loss, grads = _loss_and_grads(model, ids, labels)
        assert torch.equal(loss, dense[0])
        assert all(torch.equal(grads[n], g) for n, g in dense[1].items())
    assert all(lay.last_kept is None for lay in wrapped.elimination)


MEMORY = {
    "alone": [],
    "memo": ["memory.policy=memo", "memory.alpha=0.5", "memory.resident_layers=0", "memory.recompute_chunk_tokens=16"],
    "full recompute": ["memory.policy=full", "memory.recompute_chunk_tokens=16"],
    # two segments of two blocks: the first is recomputed in backward (offload.segment)
    "segments": ["memory.policy=full", "memory.recompute_num_layers=2", "model.config.num_layers=4"],
}


@pytest.mark.parametrize("memory", list(MEMORY))
def test_eliminated_model_equals_the_masked_reference(memory):
    """Two rows of 100 tokens (12 whole blocks of 8 + a partial one), half the blocks kept in every
    layer: loss and every gradient equal the dense model that masks the same blocks (fp32 1e-5).
    Each layer scores once a step: a recomputed segment reuses its forward's blocks."""
    ids, labels = _batch()
    layers = [o for o in MEMORY[memory] if o.startswith("model.config")]
    model, _ = _model(*ELIM, *MEMORY[memory])
    got = _loss_and_grads(model, ids, labels)
    kept = {lay.index: lay.last_kept for lay in model.elimination}
    assert set(kept) == set(range(model.config.num_layers))
    assert [lay.scored for lay in model.elimination] == [1] * len(kept)
    assert all(not lay._queued for lay in model.elimination)
    for idx in kept.values():
        assert idx.shape == (2, 6 * BT + 4)  # 6 of 12 blocks + the partial block, per row
    assert not torch.equal(kept[0][0], kept[0][1])  # each row its own blocks
    assert not torch.equal(kept[0], kept[1])  # each layer its own
    _assert_same(got, _loss_and_grads(_masked_reference(kept, overrides=layers), ids, labels), memory)
    dense = _loss_and_grads(_model(*MEMORY[memory])[0], ids, labels)
    assert not torch.allclose(got[0], dense[0])  # elimination changed the result


def test_eval_mode_runs_dense_unless_asked():
    """The exported model is dense, so evaluation (eval mode) is too; in_eval eliminates there as well."""
    ids, labels = _batch()
    model, _ = _model(*ELIM)
    dense, _ = _model()
    model.eval()
    dense.eval()
    with torch.no_grad():
        assert torch.equal(model(ids, labels=labels), dense(ids, labels=labels))
        assert all(lay.scored == 0 and not lay._queued for lay in model.elimination)
        for lay in model.elimination:
            lay.in_eval = True
        assert not torch.allclose(model(ids, labels=labels), dense(ids, labels=labels))
        assert all(lay.scored == 1 and not lay._queued for lay in model.elimination)


def test_skip_mlp_false_runs_every_token_through_the_mlp():
    ids, labels = _batch()
    model, _ = _model(*ELIM, "memory.elimination.skip_mlp=false")
    got = _loss_and_grads(model, ids, labels)
    kept = {lay.index: lay.last_kept for lay in model.elimination}
    _assert_same(got, _loss_and_grads(_masked_reference(kept, skip_mlp=False), ids, labels), "skip_mlp false")
    other = _loss_and_grads(_masked_reference(kept, skip_mlp=True), ids, labels)
    assert not torch.allclose(got[0], other[0])


def test_selection_follows_the_exact_scores():
    """The kept blocks of each layer are the top blocks of block_scores_reference on that layer's input."""
    ids, labels = _batch()
    model, _ = _model(*ELIM)
    _loss_and_grads(model, ids, labels)
    kept = {lay.index: lay.last_kept for lay in model.elimination}
    inputs = {}
    _loss_and_grads(_masked_reference(kept, inputs=inputs), ids, labels)
    for lay in model.elimination:
        q, k = el._projections(lay.block, inputs[lay.index])
        want = el.select(el.block_scores_reference(q, k, BT), 100, 1, 0.5, BT)
        assert torch.equal(lay.last_kept, want), f"layer {lay.index}"


# --- sequence parallelism ------------------------------------------------------------------------------
SCHEDULES = ("token_ring", "ring", "bidir_kv", "allgather_kv", "ulysses")
LENGTH = 208  # 2 x sp chunks at sp 4: 26 tokens = 3 whole blocks of 8 + 2


def _sp_configs(world):
    configs = [[f"parallel.attention={s}"] for s in SCHEDULES]
    configs.append(["parallel.attention=token_ring", *MEMORY["memo"]])
    if world == 2:  # FSDP2 over the sp ranks (dp 1): gradients arrive summed, sharded
        configs.append(["parallel.attention=ring", "parallel.sharding=fsdp2"])
    if world == 4:
        configs.append(["parallel.attention=hybrid", "parallel.sp_inner=2", "parallel.hybrid_outer=token_ring"])
    return configs


def sp_step(model, spa, ids, labels, rank, world, length, loss_and_grads=None, fsdp2=False):
    """One step of `model` on this rank's zigzag shard of ids / labels [1, length]: the loss and
    gradients summed over the ranks (FSDP2's gathered), and each eliminating layer's kept tokens as
    global positions."""
    import torch.distributed as dist

    spa.set_step(world, length, rows=1)
    x, pos, y = layout.split_batch(ids, labels, rank, world)
    loss, grads = (loss_and_grads or _loss_and_grads)(model, x, y, pos, length)
    dist.all_reduce(loss)
    if fsdp2:
        grads = {n: g.full_tensor() for n, g in grads.items()}
    else:
        for g in grads.values():
            dist.all_reduce(g)
    return loss, grads, {lay.index: pos.gather(1, lay.last_kept) for lay in model.elimination}


def _sp_worker(rank, world):
    ids, labels = _batch(rows=1, length=LENGTH)
    out = []
    for overrides in _sp_configs(world):
        mesh = mesh_lib.init(CPU, "gloo", 120, world)
        model, spa = _model(f"parallel.sp_degree={world}", *ELIM, *overrides, mesh=mesh)
        out.append(sp_step(model, spa, ids, labels, rank, world, LENGTH,
                           fsdp2="parallel.sharding=fsdp2" in overrides))
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_elimination_equals_the_masked_reference(world):
    """Every schedule (and MEMO, and hybrid at 4): each rank keeps the same number of tokens, the
    kept blocks are those one process selects from the global scores of the 2 x sp zigzag chunks,
    and the summed loss and gradients equal the masked dense model's (fp32 1e-5)."""
    ids, labels = _batch(rows=1, length=LENGTH)
    per_rank = _dist.run(_sp_worker, world)
    for c, overrides in enumerate(_sp_configs(world)):
        what = f"sp {world} {overrides}"
        kept = {}
        for i in per_rank[0][c][2]:
            shards = [r[c][2][i] for r in per_rank]
            assert len({s.shape for s in shards}) == 1, what  # the same count on every rank
            kept[i] = torch.cat(shards, dim=1).sort(dim=1).values
        inputs = {}
        want = _loss_and_grads(_masked_reference(kept, inputs=inputs), ids, labels)
        for i, idx in kept.items():  # the global selection: every query of the sequence scores the keys
            q, k = el._projections(_model()[0].model.layers[i], inputs[i])
            spans = el.block_spans(LENGTH, 2 * world, BT)
            scores = el.block_scores_reference(el.spans_to_blocks(q, spans, BT), el.spans_to_blocks(k, spans, BT), BT)
            assert torch.equal(idx, el.select(scores, LENGTH, 2 * world, 0.5, BT)), f"{what}: layer {i}"
        for r in per_rank:
            _assert_same(r[c][:2], want, what)


# --- recipe, build and metrics ---------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (["memory.elimination.keep_ratio=0"], "memory.elimination.keep_ratio=0: must be > 0.0"),
    (["memory.elimination.keep_ratio=[0.5,1.5]"], "memory.elimination.keep_ratio=[0.5, 1.5]: expected fractions"),
    (["memory.elimination.block_tokens=32"], "memory.elimination.block_tokens=32: has no effect with "
                                              "memory.elimination.keep_ratio=1"),
    (["memory.elimination.keep_ratio=0.5", "memory.elimination.source=oracle"],
     "memory.elimination.source='oracle': expected one of 'exact', 'predictor'"),
    (["memory.elimination.keep_ratio=0.5", "memory.elimination.skip_mlp=false", "memory.policy=full"],
     "memory.elimination.skip_mlp=false: runs the MLP of every token outside the 'full' block"),
    (["memory.elimination.keep_ratio=0.5", "memory.elimination.dense_layers=[-1]"], "expected layer numbers >= 0"),
])
def test_recipe_keys_are_checked(overrides, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        schema.load(TINY, overrides)


@pytest.mark.parametrize("overrides, message", [
    (["memory.elimination.keep_ratio=[0.5,0.5,0.5]"], "lists 3 ratios; the model has 2 layers"),
    (["memory.elimination.keep_ratio=0.5", "memory.elimination.dense_layers=[2]"], "the model's layers are 0-1"),
    (["memory.elimination.keep_ratio=0.5", "memory.elimination.dense_layers=[0,1]"], "no layer eliminates"),
])
def test_build_checks_the_model_and_writes_nothing(overrides, message, tmp_path):
    with pytest.raises(RecipeError, match=re.escape(message)):
        build(schema.load(TINY, [f"run.dir={tmp_path / 'run'}", *overrides]))
    assert not (tmp_path / "run").exists()


def test_plan_checks_the_keys_and_scales_the_activations(tmp_path, capsys):
    from longctx.cli import main

    assert main(["plan", str(TINY), "memory.elimination.keep_ratio=0.5", "memory.elimination.dense_layers=[5]",
                 "--gpus", "1"]) == 2
    assert "memory.elimination.dense_layers=[5]: the model's layers are 0-1" in capsys.readouterr().err
    plans = {}
    for keep, extra in (("1.0", []), ("0.25", ["memory.elimination.dense_layers=[]"])):
        assert main(["plan", str(TINY), "memory.policy=full", f"memory.elimination.keep_ratio={keep}", *extra,
                     "--gpus", "1", "--json", "--seq-len", "65536"]) in (0, 1)
        plans[keep] = json.loads(capsys.readouterr().out)
    dense, sparse = plans["1.0"]["terms_bytes"], plans["0.25"]["terms_bytes"]
    assert dense["activations"] > sparse["activations"]
    assert plans["1.0"]["step_seconds"] > plans["0.25"]["step_seconds"]


def test_training_logs_the_kept_ratio_per_layer(tmp_path):
    run = build(schema.load(TINY, [f"run.dir={tmp_path / 'run'}", "train.max_steps=2",
                                   "memory.elimination.keep_ratio=[0.5,0.25]", "memory.elimination.dense_layers=[]",
                                   "memory.elimination.block_tokens=4"]))
    history = train(run)["history"]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for rec in (history[-1], records[-1]):
        assert 0.5 <= rec["elimination_kept_ratio/layers.0"] < 0.6  # whole blocks kept, partial blocks always
        assert 0.25 <= rec["elimination_kept_ratio/layers.1"] < 0.35
        assert rec["elimination_kept_ratio"] == pytest.approx(
            (rec["elimination_kept_ratio/layers.0"] + rec["elimination_kept_ratio/layers.1"]) / 2)


def test_training_logs_the_saved_activation_bytes(tmp_path):
    """metrics.jsonl: what the step's first micro-batch kept for backward; fewer bytes with half the
    blocks eliminated than with every block kept (keep 0.97 of 4 blocks rounds to all: wrapped, dense);
    under MEMO the host tier apart; nothing without elimination."""
    saved = {}
    for keep in ("0.5", "0.97"):
        run = build(schema.load(TINY, [f"run.dir={tmp_path / keep}", "train.max_steps=1", "train.warmup_steps=0",
                                       f"memory.elimination.keep_ratio={keep}", "memory.elimination.dense_layers=[]",
                                       "memory.elimination.block_tokens=4"]))
        train(run)
        rec = json.loads((tmp_path / keep / "metrics.jsonl").read_text().splitlines()[-1])
        saved[keep] = rec["saved_activation_bytes"]
        assert "saved_activation_bytes_host" not in rec
    assert 0 < saved["0.5"] < 0.8 * saved["0.97"]
    memo = build(schema.load(TINY, [f"run.dir={tmp_path / 'memo'}", "train.max_steps=1", "train.warmup_steps=0", *ELIM, *MEMORY["memo"]]))
    train(memo)
    rec = json.loads((tmp_path / "memo" / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["saved_activation_bytes_host"] > 0 and rec["saved_activation_bytes"] > 0  # MEMO's host tier apart
    off = build(schema.load(TINY, [f"run.dir={tmp_path / 'off'}", "train.max_steps=1", "train.warmup_steps=0"]))
    train(off)
    assert "saved_activation_bytes" not in json.loads((tmp_path / "off" / "metrics.jsonl").read_text().splitlines()[-1])


def test_memo_plans_an_eliminating_layer_for_the_tokens_it_keeps():
    """MEMO's policy of an eliminating block is asked for the kept tokens only (its saved bytes and
    alpha follow them); a dense block's for every token."""
    ids, labels = _batch()
    model, _ = _model("memory.elimination.keep_ratio=0.5", f"memory.elimination.block_tokens={BT}",
                      "memory.elimination.dense_layers=[1]", "memory.policy=memo", "memory.resident_layers=0")
    asked = {}
    for i, block in enumerate(model.model.layers):
        memo = (block.forward.__self__.inner if i == 0 else block.forward).memo_layer
        def spy(tokens, i=i, source=memo.policy):
            asked.setdefault(i, []).append(tokens)
            return source(tokens)
        memo.policy = spy
    _loss_and_grads(model, ids, labels)
    kept = model.elimination[0].last_kept.numel()
    assert kept == 2 * (6 * BT + 4) and set(asked[0]) == {kept} and set(asked[1]) == {2 * 100}


def test_saved_bytes_shrink_with_the_kept_tokens():
    """Under full recompute with bf16 autocast an eliminating layer keeps its kept tokens' bf16 input,
    their index and their gathered cos/sin (fp32), nothing of the whole sequence (autograd's
    index_copy would keep the block's fp32 output rows too: seen at 1.2x a dense layer's bytes on
    SmolLM2 at 8K)."""
    from longctx.memory.accounting import SavedBytes

    model, _ = _model("memory.policy=full", "memory.elimination.keep_ratio=0.5", "memory.elimination.dense_layers=[1]",
                      f"memory.elimination.block_tokens={BT}", "run.dtype=bf16")
    ids = torch.randint(0, 256, (1, 128), generator=torch.Generator().manual_seed(0))
    with SavedBytes(model, list(model.model.layers)) as saved, torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids, labels=ids).backward()
    dense, kept = saved.bytes[("layers.1", "device")], saved.bytes[("layers.0", "device")]
    assert dense == 128 * 64 * 2  # the bf16 block input
    head_dim = 16
    assert kept == 64 * 64 * 2 + 64 * 8 + 2 * 64 * head_dim * 4  # half the tokens' bf16 input, index, cos/sin


def test_eliminated_model_under_cce_equals_the_reference_head():
    """Elimination composes with the loss head: the eliminated model with CCE (the default) and with the
    reference head choose the same blocks and give the same loss and gradients (fp32 1e-5)."""
    ids, labels = _batch()
    cce, _ = _model(*ELIM)
    ref, _ = _model(*ELIM, "loss.impl=reference")
    got, want = _loss_and_grads(cce, ids, labels), _loss_and_grads(ref, ids, labels)
    assert all(torch.equal(a.last_kept, b.last_kept) for a, b in zip(cce.elimination, ref.elimination))
    _assert_same(got, want, "cce vs reference head")
