"""Vocabulary parallelism in training: the tiny recipe under torchrun with parallel.vocab_parallel
gives one process's per-step losses and gradient norms (1e-5), with sequence parallelism,
decomposed data (buckets at a smaller sp degree), MEMO with tiles, FSDP2 and dp x sp; its
checkpoints hold the whole weights (resumed in one process) and its export equals one process's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _train import train as _train_run
from safetensors.torch import load_file

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
COMMON = ["train.max_steps=3", "data.source=default:chapters", "data.max_documents=80", "data.min_len=32",
          "data.curriculum=weights", "data.curriculum_weights={32: 20, 64: 20, 128: 1}",
          "parallel.min_tokens_per_sp_rank=32", "train.weight_decay=0.1"]  # decay: the shards' own AdamW group


def _train(tmp_path, name, nproc, *overrides, expect_ok=True):
    return _train_run(tmp_path / name, nproc, TINY, [*COMMON, *overrides], expect_ok)


def _same(single, vp, what):
    assert [r["loss"] for r in vp] == pytest.approx([r["loss"] for r in single], abs=1e-5), what
    # the gradients too (their global norm before clipping, over the whole vocabulary's rows):
    # AdamW's sign-like first steps would hide a gradient error from the losses alone
    assert [r["grad_norm"] for r in vp] == pytest.approx([r["grad_norm"] for r in single], rel=1e-5), what


def test_sp2_both_variants_memo_and_fsdp2_equal_one_process(tmp_path):
    single = _train(tmp_path, "single", 1)
    runs = {
        "stream": ["parallel.sp_degree=2", "parallel.vocab_parallel=stream"],
        "gather-memo": ["parallel.sp_degree=2", "parallel.vocab_parallel=gather", "memory.policy=memo",
                        "memory.alpha=0.5", "memory.resident_layers=0", "memory.recompute_chunk_tokens=8"],
        "auto-fsdp2": ["parallel.sp_degree=2", "parallel.vocab_parallel=auto", "parallel.sharding=fsdp2"],
    }
    for name, overrides in runs.items():
        vp = _train(tmp_path, name, 2, *overrides)
        _same(single, vp, name)
        assert any(r["sp_degree"] == 2 for r in vp) and any(r["sp_degree"] == 1 for r in vp), name  # DD: short buckets
        assert all(r["vocab_bytes_sent"] > 0 for r in vp), name
        if name != "auto-fsdp2":
            assert {r["vocab_parallel"] for r in vp} == {name.split("-")[0]}
    # FSDP2's bf16 parameters hand the head bf16 hidden states while the shards stay fp32
    bf16 = _train(tmp_path, "fsdp2-bf16", 2, "parallel.sp_degree=2", "parallel.vocab_parallel=stream",
                  "parallel.sharding=fsdp2", "parallel.fsdp_param_dtype=bf16")
    assert [r["loss"] for r in bf16] == pytest.approx([r["loss"] for r in single], abs=2e-2)


def test_tied_embeddings_at_three_ranks_equal_one_process(tmp_path):
    tied = "model.config.tie_word_embeddings=true"
    single = _train(tmp_path, "single", 1, tied, "data.tokens_per_step=768")
    for variant in ("stream", "gather"):
        # 259 rows over 3 ranks: 87, 87, 85 (not divisible)
        _same(single, _train(tmp_path, variant, 3, tied, "parallel.sp_degree=3", f"parallel.vocab_parallel={variant}",
                             "data.tokens_per_step=768"), variant)


@pytest.mark.slow
def test_four_ranks_dp_by_sp_and_fsdp2_equal_one_process(tmp_path):
    """dp 2 x sp 2: the shards over each sp group (their gradients summed over dp), and under FSDP2
    over all four ranks (each rank its own rows, none replicated)."""
    single = _train(tmp_path, "single", 1, "data.tokens_per_step=1024")
    for name, overrides in {"dp2sp2": ["parallel.vocab_parallel=stream"],
                            "dp2sp2-fsdp2": ["parallel.vocab_parallel=gather", "parallel.sharding=fsdp2"]}.items():
        _same(single, _train(tmp_path, name, 4, "data.tokens_per_step=1024", "parallel.sp_degree=2", *overrides), name)


def test_checkpoint_holds_whole_weights_resume_elsewhere_and_export(tmp_path):
    """A vocabulary-parallel run's checkpoint resumes in one process (resharded: whole weights and
    optimizer states) to the same losses, and its export equals one process's export."""
    steps = ["train.max_steps=4", "train.checkpoint_every=2", "train.export=true"]
    single = _train(tmp_path, "single", 1, *steps)
    vp = _train(tmp_path, "vp", 2, *steps, "parallel.sp_degree=2", "parallel.vocab_parallel=stream")
    _same(single, vp, "4 steps")
    resumed = _train(tmp_path, "resumed", 1, *steps, f"train.resume={tmp_path / 'vp' / 'checkpoints' / 'step-2'}")
    assert [r["step"] for r in resumed] == [3, 4]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in vp[2:]], abs=1e-5)
    ours, theirs = load_file(tmp_path / "vp" / "export" / "model.safetensors"), load_file(
        tmp_path / "single" / "export" / "model.safetensors")
    assert ours.keys() == theirs.keys() and ours["model.embed_tokens.weight"].shape == (259, 64)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-4)


def test_bad_settings_exit_2_with_one_line(tmp_path):
    one = _train(tmp_path, "one", 1, "parallel.vocab_parallel=stream", expect_ok=False)
    assert one.returncode == 2 and "parallel.vocab_parallel='stream'" in one.stderr and "Traceback" not in one.stderr
    assert not (tmp_path / "one").exists()
    bad = _train(tmp_path, "bad", 1, "parallel.vocab_parallel=sideways", expect_ok=False)
    assert bad.returncode == 2 and "parallel.vocab_parallel" in bad.stderr and "Traceback" not in bad.stderr


def test_fsdp2_vocab_parallel_checkpoint_resumes_in_one_process(tmp_path):
    """Under FSDP2 the checkpoint holds FSDP2's shards (its world mesh) and the vocabulary rows (the
    vocabulary mesh) side by side; one process resumes it to the same losses."""
    steps = ["train.max_steps=4", "train.checkpoint_every=2"]
    vp = _train(tmp_path, "vp", 2, *steps, "parallel.sp_degree=2", "parallel.vocab_parallel=stream",
                "parallel.sharding=fsdp2")
    resumed = _train(tmp_path, "resumed", 1, *steps, f"train.resume={tmp_path / 'vp' / 'checkpoints' / 'step-2'}")
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in vp[2:]], abs=1e-5)
