"""LoRA (model.adapter) in training, end to end through `longctx train` processes on the tiny
recipe with dataset decomposition and the CCE loss: sequence parallelism (token_ring, ulysses), MEMO,
FSDP2 over frozen base weights, vocabulary parallelism with a frozen embedding and DeepSpeed each
give one process's per-step losses and gradient norms (1e-5); a resumed LoRA run continues with
the uninterrupted run's losses, also from an FSDP2 checkpoint resumed in one process."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from _train import train as _train_run
from longctx.recipes import schema
from longctx.train.build import build
from longctx.train.trainer import train

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
COMMON = ["train.max_steps=3", "data.source=default:chapters", "data.max_documents=80", "data.min_len=32",
          "data.curriculum=weights", "data.curriculum_weights={32: 20, 64: 20, 128: 1}",
          "parallel.min_tokens_per_sp_rank=32", "train.weight_decay=0.1", "model.adapter.rank=4"]
MEMO = ["memory.policy=memo", "memory.alpha=0.5", "memory.resident_layers=0", "memory.recompute_chunk_tokens=8"]


def _train(tmp_path, name, nproc, *overrides, expect_ok=True):
    return _train_run(tmp_path / name, nproc, TINY, [*COMMON, *overrides], expect_ok)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, the reference of the sequence-parallel and sharded runs."""
    return _train(tmp_path_factory.mktemp("lora"), "single", 1)


def _same(single, other, what):
    assert len(other) == len(single), what
    assert [r["loss"] for r in other] == pytest.approx([r["loss"] for r in single], abs=1e-5), what
    # the gradients too (their global norm before clipping): AdamW's sign-like first steps would
    # hide a gradient error from the losses alone
    assert [r["grad_norm"] for r in other] == pytest.approx([r["grad_norm"] for r in single], rel=1e-5), what


@pytest.mark.slow  # ~40-60 s on two shared cores
def test_sp2_memo_and_fsdp2_dp2_equal_one_process(tmp_path, single):
    assert single[-1]["loss"] < single[0]["loss"]  # the adapters (and embed, norms) learn
    sp2 = _train(tmp_path, "sp2-memo", 2, "parallel.sp_degree=2", *MEMO)
    _same(single, sp2, "sp2 memo")
    assert {r["sp_degree"] for r in sp2} == {1, 2}  # decomposition: short buckets at sp 1 on each rank
    _same(single, _train(tmp_path, "dp2-fsdp2-memo", 2, "parallel.sharding=fsdp2", *MEMO), "dp2 fsdp2 memo")


@pytest.mark.slow  # ~40-60 s on two shared cores
def test_vocab_parallel_with_a_frozen_embedding_equals_one_process(tmp_path):
    """The embedding and untied head sharded by vocabulary rows stay frozen (trainable: [norm])."""
    frozen = ["model.adapter.trainable=[norm]"]
    single = _train(tmp_path, "single", 1, *frozen)
    vp = _train(tmp_path, "vp", 2, *frozen, "parallel.sp_degree=2", "parallel.vocab_parallel=stream")
    _same(single, vp, "vocab parallel")
    trained = _train(tmp_path, "trained", 1)  # the embedding trained: other steps after the first
    assert trained[1]["loss"] != pytest.approx(single[1]["loss"], abs=1e-6)


@pytest.mark.slow
# LoRA lives in the projections, outside attention: one ring-family schedule and one all-to-all one
# cover it (each schedule's own exactness is tests/test_sp_attention.py's); CI time is kept for those
@pytest.mark.parametrize("schedule", ["token_ring", "ulysses"])
def test_every_sp_schedule_equals_one_process(tmp_path, single, schedule):
    _same(single, _train(tmp_path, schedule, 2, "parallel.sp_degree=2", f"parallel.attention={schedule}"), schedule)


@pytest.mark.slow
@pytest.mark.skipif(not __import__("importlib").util.find_spec("deepspeed"), reason="DeepSpeed not installed")
def test_deepspeed_zero2_equals_one_process(tmp_path, single):
    _same(single, _train(tmp_path, "zero2", 2, "parallel.sharding=deepspeed", "parallel.zero_stage=2"), "zero2")


def _run(tmp_path, name, *overrides):
    run = build(schema.load(TINY, [f"run.dir={tmp_path / name}", "log.wandb=false", *COMMON, *overrides]))
    return train(run)["history"]


def test_resume_continues_with_the_uninterrupted_losses(tmp_path):
    full = _run(tmp_path, "full", "train.max_steps=4")
    _run(tmp_path, "cut", "train.max_steps=4", "train.checkpoint_every=2")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-4")
    rest = _run(tmp_path, "cut", "train.max_steps=4", "train.resume=auto")
    assert [h["step"] for h in rest] == [3, 4]
    assert [h["loss"] for h in rest] == [h["loss"] for h in full[2:]]  # bitwise: adapters, moments, RNG
    assert [h["grad_norm"] for h in rest] == [h["grad_norm"] for h in full[2:]]


@pytest.mark.slow  # ~40-60 s on two shared cores
def test_fsdp2_checkpoint_resumes_in_one_process(tmp_path):
    """A 2-rank FSDP2 LoRA checkpoint (frozen base weights sharded beside the adapters) resumed
    in one process continues with the uninterrupted run's losses."""
    steps = ["train.max_steps=4", "train.checkpoint_every=2"]
    sharded = _train(tmp_path, "fsdp2", 2, *steps, "parallel.sharding=fsdp2")
    resumed = _train(tmp_path, "resumed", 1, *steps, f"train.resume={tmp_path / 'fsdp2' / 'checkpoints' / 'step-2'}")
    assert [r["step"] for r in resumed] == [3, 4]
    _same(sharded[2:], resumed, "resumed in one process")
