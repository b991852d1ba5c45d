"""Weighted source mixtures with long-document upsampling (issue 23): the drawn token share per
source follows the weights, under every batching, and a resumed run continues exactly."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from longctx.data.mixture import MixedStore, mixture_documents, source_shares
from longctx.data.tokenize import TokenStore
from longctx.parallel.mesh import Mesh
from longctx.recipes import schema
from longctx.recipes.schema import RecipeError
from longctx.train.build import build, build_data
from longctx.train.trainer import train

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"


def test_mixture_documents_share_by_weight_and_upsample_inside_a_source():
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(20, 400, 3000), rng.integers(20, 4000, 500), rng.integers(20, 100, 2000)])
    source = np.repeat([0, 1, 2], [3000, 500, 2000])
    weights = [0.5, 0.3, 0.2]
    docs = mixture_documents(lengths, source, weights, [(0, 1.0), (1000, 4.0), (0, 1.0)], seed=0)
    shares = source_shares(source, lengths, docs, 3)
    assert np.abs(shares - weights).max() < 0.01, shares
    # inside source 1, documents of >= 1000 tokens count 4x as much as before
    mine = source[docs] == 1
    long_after = lengths[docs][mine & (lengths[docs] >= 1000)].sum() / lengths[docs][mine].sum()
    m1 = source == 1
    long_before = lengths[m1 & (lengths >= 1000)].sum() / lengths[m1].sum()
    boosted = 4 * long_before / (4 * long_before + (1 - long_before))
    assert abs(long_after - boosted) < 0.03, (long_before, long_after, boosted)
    # the epoch keeps the corpus's size, and a whole expected copy is never left out
    assert abs(lengths[docs].sum() / lengths.sum() - 1) < 0.01
    assert mixture_documents(lengths, source, weights, [(0, 1.0)] * 3, seed=0).tolist() == \
        mixture_documents(lengths, source, weights, [(0, 1.0)] * 3, seed=0).tolist()


def test_mixed_store_reads_every_source_as_one():
    a = TokenStore.from_arrays([np.arange(5), np.arange(3)], dtype=np.uint16)
    b = TokenStore.from_arrays([np.arange(100, 107)], [np.array([0, 0, 1, 1, 1, 1, 1], np.uint8)], dtype=np.uint16)
    m = MixedStore.of([a, b], ["a", "b"])
    assert m.num_documents == 3 and m.doc_source.tolist() == [0, 0, 1]
    assert m.document(2).tolist() == list(range(100, 107))
    assert m.document_mask(0).tolist() == [1] * 5 and m.document_mask(2).tolist() == [0, 0, 1, 1, 1, 1, 1]
    assert m.source_of_position(np.array([0, 7, 8, 14])).tolist() == [0, 0, 1, 1]
    with pytest.raises(IndexError, match="crosses"):
        m.tokens[6:10]


# Each source writes its own letters (byte ids), so a batch's tokens say which source they came from.
LETTERS = {"short": "abcdefgh", "long": "qrstuvwx"}


def _sources(tmp_path) -> list[str]:
    """Two jsonl sources of different lengths: short notes and long texts, each in its own letters."""
    rng = np.random.default_rng(1)
    short = [{"text": "".join(rng.choice(list(LETTERS["short"]), int(rng.integers(30, 180))))} for _ in range(400)]
    long = [{"text": "".join(rng.choice(list(LETTERS["long"]), int(rng.integers(100, 1800))))} for _ in range(150)]
    out = []
    for name, rows in (("short", short), ("long", long)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows))
        out.append(str(path))
    return out


def _mixture(tmp_path, weights=(0.7, 0.3), upsample="{min_len: 0, factor: 1.0}"):
    short, long = _sources(tmp_path)
    return (f"data.sources=[{{path: {short}, name: short, weight: {weights[0]}}}, "
            f"{{path: {long}, name: long, weight: {weights[1]}, upsample_long: {upsample}}}]")


BATCHINGS = {
    "pack": ["data.batching=pack", "data.seq_len=64", "train.batch_size=4", "~data.min_len", "~data.max_len",
             "~data.tokens_per_step"],
    "packed_docs": ["data.batching=packed_docs", "data.seq_len=256", "train.batch_size=2", "~data.min_len",
                    "~data.max_len", "~data.tokens_per_step"],
    "decompose_natural": ["data.curriculum=natural", "data.min_len=16", "data.max_len=128", "data.tokens_per_step=512"],
}


@pytest.mark.parametrize("batching", list(BATCHINGS))
def test_drawn_token_share_follows_the_weights_over_1000_steps(tmp_path, batching):
    recipe = schema.load(TINY, [_mixture(tmp_path), "data.max_documents=null", "data.cache=false",
                                f"run.dir={tmp_path / 'r'}", *BATCHINGS[batching]])
    data = build_data(recipe, None, Mesh(0, 1, 0, 1, None, torch.device("cpu")), 259)[0]
    assert data.source_names == ["short", "long"]
    # counted in the batches the trainer gets (each source's letters; end-of-document and padding
    # ids left out, ~1% of the short source's tokens)
    drawn = _drawn_from_batches(data, 1000)
    share = drawn / drawn.sum()
    assert abs(share[0] - 0.7) <= 0.02 and abs(share[1] - 0.3) <= 0.02, share
    logged = sum(data.source_tokens(step) for step in range(1000))  # what metrics.jsonl reports
    assert np.abs(logged / logged.sum() - share).max() <= 0.01, (logged, drawn)
    # natural shares are far from the weights, so this is the mixture's doing
    recipe1 = schema.load(TINY, [_mixture(tmp_path, (1.0, 1.0)), "data.max_documents=null", "data.cache=false",
                                 f"run.dir={tmp_path / 'r'}", *BATCHINGS[batching]])
    one = build_data(recipe1, None, Mesh(0, 1, 0, 1, None, torch.device("cpu")), 259)[0]
    even = sum(one.source_tokens(step) for step in range(300))
    assert abs(even[0] / even.sum() - 0.5) <= 0.05 and abs(even[0] / even.sum() - 0.7) > 0.1


def _drawn_from_batches(data, steps: int) -> np.ndarray:
    ids = [np.frombuffer(LETTERS[name].encode(), np.uint8) for name in ("short", "long")]
    counts = np.zeros(2)
    for step in range(steps):
        rows = np.asarray(data.step_batch(step)[0])
        counts += [np.isin(rows, i).sum() for i in ids]
    return counts


def test_grow_p2_curriculum_gives_the_weights_over_whole_epochs(tmp_path):
    """The short-first curriculum draws short pieces early, so a source of short documents is
    over-represented early in an epoch: the shares hold over whole epochs, not every window."""
    recipe = schema.load(TINY, [_mixture(tmp_path), "data.max_documents=null", "data.cache=false",
                                f"run.dir={tmp_path / 'r'}", "data.min_len=16", "data.max_len=128",
                                "data.tokens_per_step=512", "data.short_pieces=pad"])
    data = build_data(recipe, None, Mesh(0, 1, 0, 1, None, torch.device("cpu")), 259)[0]
    steps = data.sampler.steps_per_epoch
    drawn = _drawn_from_batches(data, steps)
    share = drawn / drawn.sum()
    assert abs(share[0] - 0.7) <= 0.02 and abs(share[1] - 0.3) <= 0.02, share


def test_mixture_resume_continues_exactly_and_logs_the_shares(tmp_path):
    mix = [_mixture(tmp_path, upsample="{min_len: 200, factor: 3.0}"), "data.max_documents=null"]
    full = train(build(schema.load(TINY, [f"run.dir={tmp_path / 'full'}", "train.max_steps=4", *mix])))["history"]
    train(build(schema.load(TINY, [f"run.dir={tmp_path / 'cut'}", "train.max_steps=4", "train.checkpoint_every=2",
                                   *mix])))
    import shutil

    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-4")
    rest = train(build(schema.load(TINY, [f"run.dir={tmp_path / 'cut'}", "train.max_steps=4", "train.resume=auto",
                                          *mix])))["history"]
    assert [h["loss"] for h in rest] == [h["loss"] for h in full[2:]]
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert all(set(r["source_tokens"]) == {"short", "long"} and sum(r["source_tokens"].values()) > 0 for r in records)


def test_bad_mixture_keys_name_the_key(tmp_path):
    with pytest.raises(RecipeError, match=r"data.sources\[0\].wieght: unknown key; did you mean data.sources\[0\].weight"):
        schema.load(TINY, ["data.sources=[{path: a.jsonl, wieght: 2}]"])
    with pytest.raises(RecipeError, match=r"data.sources\[1\].weight=0: must be > 0"):
        schema.load(TINY, ["data.sources=[{path: a.jsonl}, {path: b.jsonl, weight: 0}]"])
    with pytest.raises(RecipeError, match=r"data.source='x.jsonl': has no effect with data.sources"):
        schema.load(TINY, ["data.source=x.jsonl", "data.sources=[{path: a.jsonl}]"])
    with pytest.raises(RecipeError, match=r"upsample_long.factor=3.0: has no effect with min_len 0"):
        schema.load(TINY, ["data.sources=[{path: a.jsonl, upsample_long: {factor: 3}}]"])


def test_data_inspect_reports_each_source(tmp_path):
    from longctx.train.data_report import inspect

    report = inspect(schema.load(TINY, [_mixture(tmp_path, upsample="{min_len: 200, factor: 3.0}"),
                                        "data.max_documents=null", "data.cache=false"]))
    short, long = report["sources"]["short"], report["sources"]["long"]
    assert short["documents"] == 400 and long["documents"] == 150
    assert abs(short["epoch_share"] - 0.7) < 0.01 and abs(long["epoch_share"] - 0.3) < 0.01
    assert short["natural_share"] < 0.5 < long["natural_share"]
    assert long["long_documents"] > 0 and long["epoch_long_token_share"] > 0


def test_kept_transitions_are_what_decompose_keeps():
    from longctx.data.decompose import decompose, kept_transitions

    rng = np.random.default_rng(4)
    lengths = np.concatenate([rng.integers(0, 40, 300), rng.integers(40, 3000, 300), [1, 2, 16, 17, 129, 257]])
    ends = np.cumsum(lengths)
    for min_len, max_len in ((16, 128), (64, 64), (1, 256)):
        want = kept_transitions(lengths, min_len, max_len)
        for i in range(len(lengths)):
            b = decompose(ends[i:i + 1] - lengths[i], ends[i:i + 1], min_len, max_len)
            assert b.transitions_kept == want[i], (lengths[i], min_len, max_len)


def test_weights_hold_for_what_decomposition_keeps(tmp_path):
    """Decomposition drops each document's remainder below data.min_len, which costs a source of
    short documents more: the mixture weighs what each document trains, so the drawn shares hold."""
    rng = np.random.default_rng(2)
    rows = {"notes": [{"text": "x" * int(n)} for n in rng.integers(40, 140, 1500)],
            "books": [{"text": "y" * int(n)} for n in rng.integers(500, 3000, 60)]}
    paths = {}
    for name, items in rows.items():
        paths[name] = tmp_path / f"{name}.jsonl"
        paths[name].write_text("\n".join(json.dumps(r) for r in items))
    mix = (f"data.sources=[{{path: {paths['notes']}, name: notes, weight: 1}}, "
           f"{{path: {paths['books']}, name: books, weight: 1}}]")
    recipe = schema.load(TINY, [mix, "data.max_documents=null", "data.cache=false", "data.min_len=64",
                                "data.max_len=128", "data.tokens_per_step=512", "data.curriculum=natural"])
    data = build_data(recipe, None, Mesh(0, 1, 0, 1, None, torch.device("cpu")), 259)[0]
    drawn = sum(data.source_tokens(step) for step in range(data.sampler.steps_per_epoch))
    share = drawn / drawn.sum()
    assert abs(share[0] - 0.5) <= 0.02, share


def test_a_missing_source_file_is_named_by_its_key(tmp_path, capsys):
    from longctx.cli import main

    present, absent = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    present.write_text(json.dumps({"text": "hello world"}))
    code = main(["train", str(TINY), f"run.dir={tmp_path / 'r'}", "data.cache=false",
                 f"data.sources=[{{path: {present}}}, {{path: {absent}}}]"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    # (source 0's tokenizing progress line comes first)
    assert err[-1] == f"longctx: error: data.sources[1].path={str(absent)!r}: file not found", err
