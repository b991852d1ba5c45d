"""memory/predictors.py and `longctx elimination fit` (issue 19, LeMo's pattern predictors): the
tile matrix the predictors learn against its reference, the predicted scores against the predicted
matrix, save/load, the eliminated model on the predictors' choice against the masked reference
(values and gradients, fp32), one process and sequence parallel at 2 and 4 gloo ranks (the ranks
agree with one process on the kept blocks), the fit (loss falls, recall reported, an interrupted
fit resumes to the same predictors), the recall metric in training, and bad input."""

import json
import re

import _dist
import pytest
import torch
from longctx.cli import main
from longctx.memory import elimination as el
from longctx.memory.predictors import BlockPredictor, Predictors, PredictorShape, recall
from longctx.parallel import mesh as mesh_lib
from longctx.recipes import schema
from longctx.recipes.schema import RecipeError
from longctx.train import elimination_fit
from longctx.train.build import build
from longctx.train.trainer import train
from test_elimination import (
    BT,
    CPU,
    ELIM,
    MEMORY,
    TINY,
    _assert_same,
    _batch,
    _loss_and_grads,
    _masked_reference,
    _model,
    sp_step,
)

LENGTH = 96
SP_LENGTH = 208  # 2 x sp chunks at sp 4: 26 tokens = 3 whole blocks of 8 + a partial one
SHAPE = PredictorShape(hidden=64, block_tokens=BT, token_rank=4, width=16, heads=2, head_dim=8)


def _predictors(folder, layers=(0, 1), shape=SHAPE, seed=0) -> str:
    torch.manual_seed(seed)
    Predictors(shape, {i: BlockPredictor(shape) for i in layers}, {"made": "by a test"}).save(folder)
    return str(folder)


def _with(folder):
    return [*ELIM, "memory.elimination.source=predictor", f"memory.elimination.predictors={folder}"]


# --- the target and the predicted scores ----------------------------------------------------------------
def test_predicted_scores():
    """A key block's score is (sum of the sequence's query-block vectors) . its key vector; the fitted
    `predict` is the same over the number of blocks; a block's vector depends on its own tokens
    only, whatever their order inside it (max and mean pooling)."""
    torch.manual_seed(1)
    p = BlockPredictor(SHAPE)
    h = torch.randn(3, 5 * BT, 64)
    q, k = p.q(h), p.k(h)
    assert q.shape == (3, 5, SHAPE.heads * SHAPE.head_dim)
    want = torch.stack([sum(q[:, i] for i in range(5))[:, None].mul(k).sum(-1)[:, j] for j in range(5)], 1)
    torch.testing.assert_close(p.scores(h), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p.predict(h) * 5, p.scores(h), atol=1e-5, rtol=1e-5)
    shuffled = h.clone()
    shuffled[:, 2 * BT:3 * BT] = h[:, 2 * BT:3 * BT].flip(1)
    shuffled[:, 4 * BT:] = torch.randn(3, BT, 64)
    k2 = p.k(shuffled)
    torch.testing.assert_close(k2[:, :4], k[:, :4], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(k2[:, 4], k[:, 4])
    assert p.flops_per_token() > 0


def test_a_partial_block_pools_its_real_tokens_only():
    torch.manual_seed(2)
    p = BlockPredictor(SHAPE)
    h = torch.randn(2, 3 * BT + 3, 64)
    spans = el.block_spans(h.shape[1], 1, BT)
    hb = el.spans_to_blocks(h, spans, BT)
    k = p.k(hb, el._whole_mask(spans, BT, hb).flatten())
    t = p.k.token(h[:, 3 * BT:])  # the partial block's 3 real tokens
    torch.testing.assert_close(k[:, 3], p.k.block(torch.cat([t.amax(1), t.mean(1)], -1)), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(k[:, :3], p.k(h[:, :3 * BT]), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(p.k(hb)[:, 3], k[:, 3])  # unmasked, the padding would count


def test_save_and_load(tmp_path):
    folder = _predictors(tmp_path / "p")
    loaded = Predictors.load(folder)
    torch.manual_seed(0)
    fresh = {i: BlockPredictor(SHAPE) for i in (0, 1)}
    h = torch.randn(1, 4 * BT, 64)
    for i in (0, 1):
        assert torch.equal(loaded.layers[i].scores(h), fresh[i].scores(h))
    assert loaded.shape == SHAPE and loaded.info == {"made": "by a test"}
    assert Predictors.load(tmp_path / "p" / "predictors.safetensors").shape == SHAPE
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a longctx predictors file"):
        Predictors.load(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="does not exist"):
        Predictors.load(tmp_path / "none")


def test_recall_counts_the_exact_choice_the_predictor_kept_too():
    assert recall(torch.tensor([[0, 1, 4, 5]]), torch.tensor([[0, 1, 2, 3]])) == (2, 4)
    assert recall(None, None) == (0, 0)


# --- the eliminated model on the predictors' choice -------------------------------------------------------
def test_predictor_source_equals_the_masked_reference(tmp_path):
    """The layers keep the blocks the predictors' scores select (at the layers' own input), and the
    model equals the dense model masking those blocks, values and gradients, fp32 1e-5."""
    folder = _predictors(tmp_path / "p")
    ids, labels = _batch(length=LENGTH)
    model, _ = _model(*_with(folder))
    model.train()
    got = _loss_and_grads(model, ids, labels)
    kept = {lay.index: lay.last_kept for lay in model.elimination}
    assert all(lay.predictor is not None for lay in model.elimination) and len(kept) == 2
    inputs = {}
    want = _loss_and_grads(_masked_reference(kept, inputs=inputs), ids, labels)
    _assert_same(got, want, "predictor source")
    pred = Predictors.load(folder)
    exact_differs = False
    for i, idx in kept.items():
        block = _model()[0].model.layers[i]
        spans = el.block_spans(LENGTH, 1, BT)
        scores = pred.layers[i].scores(block.input_layernorm(inputs[i]))
        assert torch.equal(idx, el.select(scores, LENGTH, 1, 0.5, BT)), f"layer {i}"
        exact = el.select(el.global_scores(block, inputs[i], spans, BT, 1, None), LENGTH, 1, 0.5, BT)
        exact_differs |= not torch.equal(idx, exact)
    assert exact_differs  # random predictors: the choice is theirs, not the exact scores'


def _sp_worker(rank, world, folder):
    ids, labels = _batch(rows=1, length=SP_LENGTH)
    out = []
    for overrides in (["parallel.attention=token_ring"], ["parallel.attention=ulysses", *MEMORY["memo"]]):
        mesh = mesh_lib.init(CPU, "gloo", 120, world)
        model, spa = _model(f"parallel.sp_degree={world}", *_with(folder), *overrides, mesh=mesh)
        out.append(sp_step(model, spa, ids, labels, rank, world, SP_LENGTH))
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_predictors_select_globally(world, tmp_path):
    """Under sp the ranks add their predicted query sums (one all-reduce): the kept blocks are those
    one process selects from the predicted scores of the 2 x sp zigzag chunks, every rank keeps the
    same count, and the model equals the masked reference (values and gradients)."""
    folder = _predictors(tmp_path / "p")
    per_rank = _dist.run(_sp_worker, world, folder)
    ids, labels = _batch(rows=1, length=SP_LENGTH)
    pred = Predictors.load(folder)
    for c in range(2):
        kept = {}
        for i in per_rank[0][c][2]:
            shards = [r[c][2][i] for r in per_rank]
            assert len({s.shape for s in shards}) == 1
            kept[i] = torch.cat(shards, dim=1).sort(dim=1).values
        inputs = {}
        want = _loss_and_grads(_masked_reference(kept, inputs=inputs), ids, labels)
        for i, idx in kept.items():
            block = _model()[0].model.layers[i]
            spans = el.block_spans(SP_LENGTH, 2 * world, BT)
            h = el.spans_to_blocks(block.input_layernorm(inputs[i]), spans, BT)
            valid = el._whole_mask(spans, BT, h).flatten()  # the partial blocks pool their real tokens only
            scores = pred.layers[i].scores(h, valid=valid)
            assert torch.equal(idx, el.select(scores, SP_LENGTH, 2 * world, 0.5, BT)), f"layer {i}"
        for r in per_rank:
            _assert_same(r[c][:2], want, f"sp {world} config {c}")


# --- recipe and build --------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    ([*ELIM, "memory.elimination.source=predictor"], "memory.elimination.source='predictor': needs "
                                                     "memory.elimination.predictors"),
    ([*ELIM, "memory.elimination.predictors=x"], "memory.elimination.predictors='x': has no effect with "
                                                 "memory.elimination.source='exact'"),
    (["memory.elimination.recall_every=5"], "memory.elimination.recall_every=5: has no effect with "
                                            "memory.elimination.keep_ratio=1"),
])
def test_recipe_checks_the_predictor_keys(overrides, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        schema.load(TINY, overrides)


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist (longctx elimination fit RECIPE --out FOLDER writes it)"),
    ("model", "fitted for a model of 3 layers, this one has 2"),
    ("hidden", "fitted for hidden size 32, the model's is 64"),
    ("block", "fitted for block_tokens 16; memory.elimination.block_tokens is 8"),
    ("layers", "has layers [0], not the eliminating layers [1]"),
])
def test_build_refuses_predictors_that_do_not_fit_and_writes_nothing(case, message, tmp_path, capsys):
    import dataclasses

    folder = tmp_path / "p"
    if case == "hidden":
        _predictors(folder, shape=dataclasses.replace(SHAPE, hidden=32))
    elif case == "block":
        _predictors(folder, shape=dataclasses.replace(SHAPE, block_tokens=16))
    elif case == "layers":
        _predictors(folder, layers=(0,))
    elif case == "model":
        torch.manual_seed(0)
        Predictors(SHAPE, {i: BlockPredictor(SHAPE) for i in (0, 1, 2)}, {"num_layers": 3}).save(folder)
    recipe = str(tmp_path / "r.yaml")
    schema.save(schema.load(TINY, [f"run.dir={tmp_path / 'run'}", *_with(folder)]), recipe)
    assert main(["train", recipe]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_training_logs_the_predictors_recall(tmp_path):
    """recall_every 2 over 3 steps: steps 1 and 3 report each layer's recall (the exact scores computed
    once beside the predicted ones), step 2 does not; the kept ratio is reported every step."""
    folder = _predictors(tmp_path / "p")
    run = build(schema.load(TINY, [f"run.dir={tmp_path / 'run'}", "train.max_steps=3", *_with(folder),
                                   "memory.elimination.recall_every=2"]))
    train(run)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for rec, measured in zip(records, (True, False, True)):
        assert "elimination_kept_ratio/layers.1" in rec
        assert ("elimination_predictor_recall/layers.0" in rec) == measured
        if measured:
            values = [rec[f"elimination_predictor_recall/layers.{i}"] for i in (0, 1)]
            assert all(0.0 <= v <= 1.0 for v in values) and rec["elimination_predictor_recall_min"] == min(values)
    assert sum(lay.scored for lay in run.model.elimination) > 0


@pytest.mark.parametrize("ranking, low, high", [("exact", 1.0, 1.0), ("reversed", 0.0, 0.35)])
def test_recall_measures_the_exact_choice(ranking, low, high, tmp_path, monkeypatch):
    """A predictor that ranks as the exact score does has recall 1; one that ranks the other way keeps
    only what the exact choice drops (the partial tail blocks, always kept, are the only hits)."""
    exact = el.global_scores

    def predicted(block, predictor, x, spans, bt, sp, group):
        s = exact(block, x, spans, bt, sp, group)
        return s if ranking == "exact" else -s

    monkeypatch.setattr(el, "predicted_scores", predicted)
    folder = _predictors(tmp_path / "p")
    run = build(schema.load(TINY, [f"run.dir={tmp_path / 'run'}", "train.max_steps=1", "train.warmup_steps=0",
                                   *_with(folder)]))
    rec = train(run)["history"][-1]
    for i in (0, 1):
        assert low <= rec[f"elimination_predictor_recall/layers.{i}"] <= high, rec


# --- longctx elimination fit ----------------------------------------------------------------------------
FIT = ["memory.elimination.keep_ratio=0.5", "memory.elimination.dense_layers=[]",
       f"memory.elimination.block_tokens={BT}", "data.max_documents=8", "data.eval_fraction=0.25"]
FIT_ARGS = ["--seq-len", "128", "--samples", "4", "--held-out", "2", "--epochs", "4", "--batch", "2",
            "--token-rank", "4", "--width", "16", "--heads", "2", "--head-dim", "8", "--save-every", "2"]


def test_fit_writes_predictors_the_trainer_loads(tmp_path, capsys):
    """Also from a recipe that trains with FSDP2 and sp 2: the fit runs the model alone, in one process."""
    out = tmp_path / "fit"
    assert main(["elimination", "fit", str(TINY), *FIT, "parallel.sharding=fsdp2", "parallel.sp_degree=2",
                 "--out", str(out), *FIT_ARGS]) == 0
    info = json.loads((out / "fit.json").read_text())
    assert info["layers"] == [0, 1] and set(info["recall"]) == {"0", "1"}
    assert all(0.0 <= r <= 1.0 for r in info["recall"].values())
    assert info["recall_min"] == min(info["recall"].values())
    assert info["predictor_flops_per_token"] > 0 and info["exact_flops_per_token"] > 0
    assert info["predictor_seconds"] > 0 and info["exact_seconds"] > 0
    state = torch.load(out / "fit_state.pt", weights_only=False)
    losses = [h["loss"] for h in state["history"]]
    assert len(losses) == 4 and losses[-1] < losses[0]
    loaded = Predictors.load(out)
    assert sorted(loaded.layers) == [0, 1] and loaded.info["recall"] == info["recall"]
    capsys.readouterr()
    run = build(schema.load(TINY, [f"run.dir={tmp_path / 'run'}", "train.max_steps=1", "train.warmup_steps=0", *FIT,
                                   "memory.elimination.source=predictor", f"memory.elimination.predictors={out}"]))
    rec = train(run)["history"][-1]
    assert 0.0 <= rec["elimination_predictor_recall_min"] <= 1.0


def test_an_interrupted_fit_resumes_to_the_same_predictors(tmp_path, monkeypatch, capsys):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(["elimination", "fit", str(TINY), *FIT, "--out", str(whole), *FIT_ARGS]) == 0
    calls = {"n": 0}
    real = elimination_fit._loss

    def dies_in_epoch_3(*a):
        calls["n"] += 1
        if calls["n"] > 2 * 2 * 2:  # 2 layers x 2 batches per epoch: the third epoch's first batch
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(elimination_fit, "_loss", dies_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        main(["elimination", "fit", str(TINY), *FIT, "--out", str(cut), *FIT_ARGS])
    assert torch.load(cut / "fit_state.pt", weights_only=False)["epoch"] == 2
    assert not (cut / "predictors.safetensors").exists()
    monkeypatch.setattr(elimination_fit, "_loss", real)
    assert main(["elimination", "fit", str(TINY), *FIT, "--out", str(cut), *FIT_ARGS]) == 0
    a, b = Predictors.load(whole), Predictors.load(cut)
    for i in (0, 1):
        for (n, x), (_, y) in zip(a.layers[i].state_dict().items(), b.layers[i].state_dict().items()):
            assert torch.equal(x, y), f"layer {i} {n}"
    # the same folder with other settings is refused, the fit in it untouched
    before = (cut / "predictors.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["elimination", "fit", str(TINY), *FIT, "--out", str(cut), *FIT_ARGS[:-2], "--save-every", "2",
                 "--epochs", "5"]) == 2
    err = capsys.readouterr().err
    assert "holds a fit with other settings (epochs: 4 -> 5)" in err and "Traceback" not in err
    assert (cut / "predictors.safetensors").read_bytes() == before
    # the same settings again: the fit is finished, nothing is captured or written
    monkeypatch.setattr(elimination_fit, "_capture", None)
    assert main(["elimination", "fit", str(TINY), *FIT, "--out", str(cut), *FIT_ARGS]) == 0
    assert (cut / "predictors.safetensors").read_bytes() == before
    # predictors of another fit without its state, or a torn state: refused, untouched
    for damage in ("state gone", "state torn"):
        state = cut / "fit_state.pt"
        if damage == "state gone":
            saved = state.read_bytes()
            state.unlink()
            message = "holds predictors.safetensors from another fit"
        else:
            state.write_bytes(saved[:100])
            message = "fit_state.pt cannot be read"
        capsys.readouterr()
        assert main(["elimination", "fit", str(TINY), *FIT, "--out", str(cut), *FIT_ARGS]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert (cut / "predictors.safetensors").read_bytes() == before


@pytest.mark.parametrize("extra, message", [
    ([], "memory.elimination.keep_ratio=1: no layer eliminates"),
    ([*FIT, "--seq-len", "100"], "--seq-len=100: expected a multiple of memory.elimination.block_tokens=8"),
    ([*FIT, "--epochs", "0"], "--epochs=0: expected a positive integer"),
    ([*FIT, "data.eval_fraction=0"], "data.eval_fraction=0.0: the recall is measured on held-out documents"),
    ([*FIT, "--seq-len", "8000000"], "--seq-len=8000000: the training documents do not fill one row"),
    ([*FIT, "run.device=cuda"], "run.device"),
    ([*FIT, "--out", "{file}/o"], "cannot write there"),
])
def test_fit_refuses_bad_input_with_one_line(extra, message, tmp_path, capsys):
    if "run.device=cuda" in extra and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (tmp_path / "file").write_text("a file, not a folder")
    extra = [a.replace("{file}", str(tmp_path / "file")) for a in extra]
    out = [] if "--out" in extra else ["--out", str(tmp_path / "o")]
    assert main(["elimination", "fit", str(TINY), *extra, *out]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("longctx: error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_plan_counts_the_predictors_instead_of_the_exact_score(tmp_path, capsys):
    """At 64K the exact score (a non-causal QK^T per eliminating layer) costs more than the
    predictors' per-token work: the plan's step is shorter with source predictor, memory the same."""
    plans = {}
    for source in ("exact", "predictor"):
        extra = [] if source == "exact" else ["memory.elimination.source=predictor",
                                              f"memory.elimination.predictors={_predictors(tmp_path / 'p')}"]
        assert main(["plan", str(TINY), "memory.policy=full", *ELIM[:2], *extra, "--gpus", "1", "--json",
                     "--seq-len", "65536"]) in (0, 1)
        plans[source] = json.loads(capsys.readouterr().out)
    assert plans["predictor"]["step_seconds"] < plans["exact"]["step_seconds"]
    assert plans["predictor"]["terms_bytes"] == plans["exact"]["terms_bytes"]
