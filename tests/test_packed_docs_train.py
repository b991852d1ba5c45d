"""data.batching: packed_docs end to end (issue 18): a packed row's loss and gradients equal the
sum over its documents trained alone (attention masked per document, positions restarting); the
tiny recipe with packed documents under sp=2 gives one process's per-step losses and gradient
norms (1e-5) with every schedule, with MEMO, FSDP2 and vocabulary parallelism; sp=3 (rows not a multiple of 2P);
bad combinations exit 2."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from _train import train as _train_run

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
WORDS = "the of and to in that he shall unto for his a lord they be is him not them it with all thou".split()


def _corpus(path: Path, n: int = 300) -> Path:
    """Short documents of very uneven length (1 to ~250 bytes): many per 250-token row, some
    longer than a rank's share of one."""
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(n):
            words = rng.randint(1, rng.choice([2, 5, 10, 20, 45]))
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(words))}) + "\n")
    return path


def _common(tmp_path, fixed=True):
    rows = ["data.seq_len=250", "train.batch_size=2", "~data.min_len", "~data.max_len", "~data.tokens_per_step"]
    return [f"data.source={_corpus(tmp_path / 'docs.jsonl')}", "data.max_documents=null", "data.batching=packed_docs",
            "train.max_steps=3", "train.weight_decay=0.1", *(rows if fixed else [])]


def _train(tmp_path, name, nproc, *overrides, expect_ok=True):
    return _train_run(tmp_path / name, nproc, TINY, [*_common(tmp_path), *overrides], expect_ok)


def _same(single, other, what):
    assert [r["loss"] for r in other] == pytest.approx([r["loss"] for r in single], abs=1e-5), what
    assert [r["grad_norm"] for r in other] == pytest.approx([r["grad_norm"] for r in single], rel=1e-5), what


@pytest.mark.parametrize("kernel", ["auto", "aten_cpu"])
def test_a_packed_row_trains_like_its_documents_alone(kernel):
    """The summed loss of one packed row (documents masked, positions from 0 in each) and its
    parameter gradients equal those of each document run alone as its own row, fp32 1e-5."""
    from longctx.data.pack_docs import pack_documents
    from longctx.kernels.attention import LocalAttention
    from longctx.kernels.loss import linear_cross_entropy
    from longctx.models.config import ModelConfig
    from longctx.models.llama import CausalLM

    cfg = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=16, max_position_embeddings=512)
    rng = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 97, (n,), generator=rng).numpy() for n in (37, 5, 60, 1, 2, 80, 13)]
    packed = pack_documents(docs, 200, seed=0)
    assert len(packed.pieces) == 1, "all seven documents fit one row"

    def loss(h, w, y):
        return linear_cross_entropy(h, w, y, reduction="sum")

    attention = LocalAttention(kernel)
    model = CausalLM(cfg, attention=attention, loss=loss)
    model.init_weights(0)
    attention.documents = torch.as_tensor(packed.doc_ids[:1], dtype=torch.long)
    ids = torch.as_tensor(packed.tokens[:1], dtype=torch.long)
    labels = torch.as_tensor(packed.labels(0))[None]
    positions = torch.as_tensor(packed.positions(0))[None]
    total = model(ids, position_ids=positions, labels=labels)
    total.backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    attention.documents = None
    alone = 0.0
    for d, _ in packed.pieces[0]:
        x = torch.as_tensor(docs[d], dtype=torch.long)[None]
        y = torch.cat([x[:, 1:], torch.full((1, 1), -100)], 1)
        out = model(x, labels=y)
        out.backward()
        alone += out.item()
    assert total.item() == pytest.approx(alone, rel=1e-5)
    for g, p in zip(packed_grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-5 * max(1.0, p.grad.abs().max().item()), rtol=1e-5)
    # and attention does mask: the same row without the documents' mask is another loss
    attention.documents = None
    assert model(ids, position_ids=positions, labels=labels).item() != pytest.approx(alone, rel=1e-4)


def test_sp2_every_schedule_memo_and_fsdp2_equal_one_process(tmp_path):
    single = _train(tmp_path, "single", 1)
    assert all(r["documents_per_row"] > 2 for r in single)
    runs = {
        "ring-vocab_parallel": ["parallel.attention=ring", "parallel.vocab_parallel=stream"],
        "token_ring-memo": ["parallel.attention=token_ring", "memory.policy=memo", "memory.alpha=0.5",
                            "memory.resident_layers=0", "memory.recompute_chunk_tokens=16"],
        "bidir_kv-accum": ["parallel.attention=bidir_kv", "train.grad_accum=2"],  # a row per micro-batch
        "allgather_kv-fsdp2": ["parallel.attention=allgather_kv", "parallel.sharding=fsdp2"],
        "ulysses": ["parallel.attention=ulysses"],
    }
    for name, overrides in runs.items():
        got = _train(tmp_path, name, 2, "parallel.sp_degree=2", *overrides)
        _same(single, got, name)
        assert all(r["sp_degree"] == 2 and r["attention"] == name.split("-")[0] for r in got), name
        assert all(r["attention_imbalance"] <= max(r["attention_imbalance_zigzag"], 0.1) for r in got), name


def test_sp1_memo_and_three_ranks_equal_one_process(tmp_path):
    """MEMO's query tiles at sp 1 (documents in forward_rows/backward_rows), and sp=3: 250-token
    rows padded to 252 (a pad document), every document balanced over three ranks."""
    single = _train(tmp_path, "single", 1)
    _same(single, _train(tmp_path, "memo", 1, "memory.policy=memo", "memory.alpha=0.5", "memory.resident_layers=0",
                         "memory.recompute_chunk_tokens=16"), "memo sp1")
    sp3 = _train(tmp_path, "sp3", 3, "parallel.sp_degree=3", "parallel.attention=token_ring")
    _same(single, sp3, "sp3")
    assert [r["documents_per_row"] for r in sp3] == [r["documents_per_row"] for r in single]
    # the plain zigzag leaves the busiest rank far over the mean on these rows: a balanced layout runs
    assert any(r["document_layout"] == "balanced" and r["attention_imbalance_zigzag"] > 0.1 for r in sp3)
    assert all(r["attention_imbalance"] <= 0.1 or r["attention_imbalance"] <= r["attention_imbalance_zigzag"]
               for r in sp3)


def test_bad_combinations_exit_2(tmp_path):
    done = _train(tmp_path, "elim", 1, "memory.elimination.keep_ratio=0.5", expect_ok=False)
    assert done.returncode == 2 and "memory.elimination.keep_ratio=0.5" in done.stderr and "packed_docs" in done.stderr
    assert "Traceback" not in done.stderr
    done = _train(tmp_path, "minlen", 1, "data.min_len=32", expect_ok=False)
    assert done.returncode == 2 and "data.min_len=32: has no effect with data.batching=packed_docs" in done.stderr
    assert "Traceback" not in done.stderr


def test_data_inspect_reports_packing_and_the_zigzag_balance(tmp_path, capsys):
    from longctx.cli import main

    args = [f"data.source={_corpus(tmp_path / 'docs.jsonl', 2000)}", "data.max_documents=null", "data.batching=packed_docs",
            "data.seq_len=1024", "train.batch_size=2", "~data.min_len", "~data.max_len", "~data.tokens_per_step",
            "parallel.sp_degree=4"]
    assert main(["data", "inspect", str(TINY), *args]) == 0
    text = capsys.readouterr().out
    packed = json.loads(text[text.index("{"):text.rindex("}") + 1])["packed_documents"]
    assert packed["seq_len"] == 1024 and packed["padding_fraction"] <= 0.02 and packed["documents_per_row_mean"] > 2
    balance = packed["zigzag_balance"]
    assert balance["sp"] == 4 and balance["rows_over_10pct_zigzag"] > 0
    assert balance["trained"]["max"] <= 0.1 < balance["zigzag"]["max"]
    assert balance["trained"]["mean"] <= balance["reordered"]["mean"] <= balance["zigzag"]["mean"]
    # under the length curriculum: the buckets' rows as they train
    curriculum = [a for a in args if not a.startswith(("data.seq_len", "train.batch_size", "~"))]
    assert main(["data", "inspect", str(TINY), *curriculum, "data.packed_lengths=curriculum", "data.min_len=64",
                 "data.max_len=1024", "data.tokens_per_step=2048"]) == 0
    text = capsys.readouterr().out
    buckets = json.loads(text[text.index("{"):text.rindex("}") + 1])["packed_documents"]["curriculum_buckets"]
    assert set(buckets) <= {"64", "128", "256", "512", "1024"} and all(b["rows"] > 0 for b in buckets.values())


def test_resume_continues_with_the_exact_next_packed_batch(tmp_path):
    """The packed rows' order is a function of (seed, step): a run cut at step 2 and resumed gives
    the uncut run's losses for steps 3 and 4, under sp=2 with the balanced layout in play."""
    import shutil

    full = _train(tmp_path, "full", 2, "train.max_steps=4", "parallel.sp_degree=2")
    _train(tmp_path, "cut", 2, "train.max_steps=4", "train.checkpoint_every=2", "parallel.sp_degree=2")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-4")
    (tmp_path / "cut" / "metrics.jsonl").unlink()
    rest = _train(tmp_path, "cut", 2, "train.max_steps=4", "train.resume=auto", "parallel.sp_degree=2")
    assert [r["step"] for r in rest] == [3, 4]
    assert [r["loss"] for r in rest] == [r["loss"] for r in full[2:]]


def test_no_document_ids_outlive_the_training_step(tmp_path):
    """Evaluation tasks run the model's forward after a step (train/evaluation.training_forward):
    the step's document ids must not mask them. And ids that do not match the rows are refused."""
    from longctx.kernels.attention import LocalAttention
    from longctx.recipes import schema
    from longctx.train.build import build
    from longctx.train.trainer import train_step

    run = build(schema.load(TINY, [f"run.dir={tmp_path / 'run'}", *_common(tmp_path)]))
    train_step(run, 0)
    assert run.attention.documents is None
    attention = LocalAttention("aten_cpu")
    attention.documents = torch.zeros(1, 64, dtype=torch.long)
    q = torch.randn(1, 100, 4, 16)
    with pytest.raises(ValueError, match="document ids"):
        attention(q, q, q)


CURRICULUM = ["data.packed_lengths=curriculum", "data.min_len=32", "data.max_len=256", "data.tokens_per_step=512",
              "data.curriculum=weights", "data.curriculum_weights={32: 5, 64: 5, 128: 5, 256: 1}",
              "parallel.min_tokens_per_sp_rank=32", "train.max_steps=4"]


def _curriculum(tmp_path, name, nproc, *overrides, expect_ok=True):
    return _train_run(tmp_path / name, nproc, TINY, [*_common(tmp_path, fixed=False), *CURRICULUM, *overrides],
                      expect_ok)


def test_packed_rows_under_the_length_curriculum_sp2_equal_one_process(tmp_path):
    """data.packed_lengths: curriculum: each step a bucket length L and data.tokens_per_step / L
    packed rows of it; short buckets run at a smaller sp degree (the spare ranks take other rows),
    as decomposition's do; sp=2 equals one process."""
    single = _curriculum(tmp_path, "single", 1)
    assert len({r["seq_len"] for r in single}) > 1 and all(r["rows"] * r["seq_len"] == 512 for r in single)
    sp2 = _curriculum(tmp_path, "sp2", 2, "parallel.sp_degree=2", "parallel.attention=ring")
    _same(single, sp2, "curriculum sp2")
    assert {r["sp_degree"] for r in sp2} == {1, 2}


def test_packed_lengths_bad_combinations_exit_2(tmp_path):
    done = _train(tmp_path, "pack", 1, "data.batching=pack", "data.packed_lengths=curriculum", expect_ok=False)
    assert done.returncode == 2 and "data.packed_lengths='curriculum': has no effect with data.batching=pack" in done.stderr
    assert "Traceback" not in done.stderr
    done = _curriculum(tmp_path, "seq", 1, "data.seq_len=250", expect_ok=False)
    assert done.returncode == 2 and "data.seq_len=250: has no effect with data.batching=packed_docs" in done.stderr
    assert "Traceback" not in done.stderr
