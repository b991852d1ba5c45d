"""bench/gpu_suite.sh --dry-run: the GPU suite's whole code path on CPU with tiny shapes, so the
one command a lent GPU runs cannot rot between loans (issue 15)."""

import json
import os
import subprocess
import sys

import pytest

BENCH_KEYS = {
    "cce": {"impls", "memory_ratio", "targets", "machine"},
    "attention": {"matmul_tflops", "fwd_bwd_tflops", "fraction_of_matmul", "auto_kernel", "targets", "machine"},
    "memo_swap": {"d2h_gb_per_s", "h2d_gb_per_s", "alpha", "swapped_bytes", "hidden_fraction", "grads_match",
                  "targets", "machine"},
    "step": {"lengths_measured", "prediction_error", "max_abs_prediction_error", "plan_longest_seq_len", "targets",
             "machine"},
}
TARGETS = {"cce": {"cce_time_le_liger", "cce_peak_le_naive_over_20"},
           "attention": {"attention_fwd_bwd_ge_half_matmul"},
           "memo_swap": {"memo_swap_hidden_ge_90pct"},
           "step": {"step_peak_within_10pct"}}


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_gpu_suite_dry_run_runs_every_step_and_reports_every_target(repo, tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    out = subprocess.run(["bash", "bench/gpu_suite.sh", "--dry-run"], cwd=repo, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    suite = json.loads(out.stdout.strip().splitlines()[-1])["summary"]
    assert suite["mode"] == "dry" and suite["failed_steps"] == []
    assert set(suite["steps"]) >= {"cce", "attention", "memo_swap", "step"}
    assert all(step["ok"] for step in suite["steps"].values())
    assert set(suite["targets"]) == set().union(*TARGETS.values())
    assert json.loads((tmp_path / "dryrun-suite.json").read_text())["summary"]["targets"] == suite["targets"]

    for bench, keys in BENCH_KEYS.items():
        rows = _lines(tmp_path / f"dryrun-{bench}.jsonl")
        summary = rows[-1]["summary"]
        assert summary["dry_run"] is True
        assert keys <= set(summary), f"{bench}: missing {keys - set(summary)}"
        assert set(summary["targets"]) == TARGETS[bench]
        for target in summary["targets"].values():
            assert {"target", "value", "limit", "pass"} <= set(target) and isinstance(target["pass"], bool)
        assert not [r for r in rows[:-1] if "error" in r], f"{bench}: a case failed: {rows}"

    cce = _lines(tmp_path / "dryrun-cce.jsonl")
    assert {r["impl"] for r in cce if "skipped" in r} == {"liger", "apple"}  # CUDA-only, said so
    assert set(cce[-1]["summary"]["impls"]) == {"reference", "cce"}

    attention = _lines(tmp_path / "dryrun-attention.jsonl")
    timed = {r["kernel"]: r for r in attention if "fwd_bwd_tflops" in r}
    assert set(timed) == {"aten_cpu", "reference", "sdpa"}
    assert all(d < 1e-4 for r in timed.values() for d in r.get("out_max_abs_diff_vs", {}).values())
    assert {r["kernel"] for r in attention if r.get("available") is False} == {"aten_flash", "aten_efficient", "flash_attn"}

    # the host tier computes what the device tier does: same input gradient, and it swapped bytes
    memo = _lines(tmp_path / "dryrun-memo_swap.jsonl")[-1]["summary"]
    assert memo["grads_match"] is True and memo["swapped_bytes"] > 0

    # the trainer's planner and `longctx plan` chose the same alpha at every length
    step = _lines(tmp_path / "dryrun-step.jsonl")
    measured = [r for r in step if "measured_peak_bytes" in r]
    assert [r["seq_len"] for r in measured] == [256, 512]
    assert all(r["alpha_run"] == r["alpha_plan"] for r in measured)


def test_gpu_tests_corpus_reader_feeds_the_trainer_without_datasets(tmp_path, monkeypatch):
    """tests/gpu reads its .jsonl corpus without `datasets` (the GPU machine may lack it) by patching
    the reader train/build.py calls. On CPU, with `datasets` unimportable: the patch target exists
    (a rename there once left every CUDA training test erroring at its fixture) and the run's
    documents are the file's."""
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "gpu"))
    try:
        import _gpu
    finally:
        sys.path.pop(0)
    import torch
    from longctx.data.tokenize import ByteTokenizer
    from longctx.parallel.mesh import Mesh
    from longctx.recipes import schema
    from longctx.train.build import token_store

    docs = [f"document {i} " + "word " * (200 + 40 * i) for i in range(8)]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    _gpu.read_jsonl_without_datasets(monkeypatch)
    recipe = schema.load(os.path.join(os.path.dirname(__file__), "..", "recipes", "tiny.yaml"),
                         [f"data.source={path}", "data.max_documents=null", "data.cache=false",
                          "model.tokenizer=bytes"])
    tok = ByteTokenizer()
    store = token_store(recipe, tok, Mesh(0, 1, 0, 1, None, torch.device("cpu")))
    assert store.num_documents == len(docs)
    for i, d in enumerate(docs):
        ids = tok.encode(d)
        assert list(store.document(i)[:len(ids)]) == ids
