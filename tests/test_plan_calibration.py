"""`longctx plan` against what a GPU measured (issue 21: a planner honest on GPUs, calibrated by the
GPU suite). bench/results/gpu-h200-step.jsonl holds one optimizer step of a Llama-3.1-8B-shaped
model cut to 4 blocks (bf16 autocast over fp32 masters, CCE, MEMO host tier with alpha auto, 2
resident blocks, foreach AdamW) measured on an H200 at 8K-131K tokens, with the inputs the plan
needs (runtime bytes, the alpha the trainer used). The plan, recomputed here for each row, must
be within 5% of the measured peak for every warm step (buffers already at this length's size),
and never below it for a step that grows its buffers first. The constants were fitted to these
rows, so this guards the fit; it does not validate it on another shape. Before this calibration the plan missed by
up to 16.4%, always low: it left out the two swapped blocks whose device copies stay alive until
backward reaches them, and foreach AdamW's temporary (4 bytes per parameter) at the optimizer step."""

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
MEASURED = REPO / "bench" / "results" / "gpu-h200-step.jsonl"
H200_BYTES = 150109880320  # torch.cuda.get_device_properties(0).total_memory there (gpu-h200-suite.json)
# The H200 run predates keeping recomputed tokens' inputs in bf16 (offload.LayerPolicy.input_dtype),
# the head in tiles and attention's backward by query tiles: its MEMO kept fp32 inputs, its head
# and attention's backward ran over the whole sequence, so the rows are predicted for that code.
AS_RUN = {"kept_inputs_in_compute_dtype": False, "loss_tile_tokens": None, "attention_by_rows": False}


def _rows():
    lines = MEASURED.read_text().splitlines()
    return [json.loads(x) for x in lines if '"measured_peak_bytes"' in x]


def _recipe():
    from longctx.bench import gpu_step
    from longctx.recipes import schema

    args = SimpleNamespace(dry_run=False, layers=4, resident=2, chunk_tokens=4096, link_gbps=25.0, device_tflops=300.0,
                           host_gib=16.0, lengths=[8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576])
    return schema.load(None, gpu_step.recipe_overrides(args, "cuda"))


def test_the_measured_rows_are_there():
    rows = _rows()
    assert [r["seq_len"] for r in rows] == [8192, 16384, 32768, 65536, 131072]
    assert sum(r["warm"] for r in rows) == 4


@pytest.mark.parametrize("row", _rows(), ids=lambda r: f"{r['seq_len']}")
def test_plan_within_5pct_of_the_h200_step_peak(row):
    from longctx.bench import gpu_step

    assert row["alpha_source"] == "auto"
    pred = gpu_step.predict(_recipe(), row["seq_len"], H200_BYTES, row["runtime_bytes"], **AS_RUN)
    assert pred["alpha"] == pytest.approx(row["alpha_plan"], abs=1e-4), "the plan's inputs differ from the run's"
    error = pred["total_bytes"] / row["measured_peak_bytes"] - 1
    detail = (f"{row['seq_len']} tokens: predicted {pred['total_bytes'] / 2**30:.2f} GiB ({pred['peak_phase']}), "
              f"measured {row['measured_peak_bytes'] / 2**30:.2f} GiB (fwd+bwd "
              f"{row['measured_peak_fwd_bwd_bytes'] / 2**30:.2f}, optimizer {row['measured_peak_optimizer_bytes'] / 2**30:.2f}); "
              f"error {error:+.1%}")
    if row["warm"]:
        assert abs(error) <= 0.05, detail
    else:  # its staging buffers grow during the step: the plan (steady state) may be high, not low
        assert error >= 0, detail


def _llama_plan(gpus, gpu_gib=80, host_gib=1024, overrides=(), **kw):
    from longctx.recipes import schema
    from longctx.train.build import plan_inputs
    from longctx.train.plan_report import plan

    shape, r = plan_inputs(schema.load(REPO / "recipes" / "llama3-8b-128k.yaml", list(overrides)))
    return plan(shape, r, gpus, gpu_gib * 2**30, host_gib * 2**30, **kw)


def test_the_longest_length_fits_device_and_host_memory_and_names_what_binds():
    """`longest_tokens` is a length the plan itself says fits, host memory included (it used to
    search on the GPU alone: at its 1.86M answer the host needed 2 TiB of the 1 TiB given), and
    `binding_term` names what stops the next length: host memory with 512 GiB of host, and with a
    large host, a GPU term."""
    p = _llama_plan(8, host_gib=512)
    at = _llama_plan(8, host_gib=512, seq_len=p["longest_tokens"])
    assert at["fits"], (p["longest_tokens"], at["host_bytes_per_node"] / 2**30)
    step = 1024 * p["sp_degree"]
    beyond = _llama_plan(8, host_gib=512, seq_len=p["longest_tokens"] + step)
    assert not beyond["fits"]
    assert p["binding_term"] == "host_memory" and beyond["host_bytes_per_node"] > 512 * 2**30
    big_host = _llama_plan(8, host_gib=1 << 20)
    assert big_host["longest_tokens"] > p["longest_tokens"]
    assert big_host["binding_term"].startswith("gpu_memory: "), big_host["binding_term"]


def test_sp_degree_is_fitted_to_the_gpus_given():
    """The recipe's sp 8 planned on 4 GPUs is sp 4 (the largest divisor of the GPU count not above
    the recipe's), said in the report; on 8 and 16 GPUs it stays 8."""
    assert _llama_plan(4)["sp_degree"] == 4 and _llama_plan(4)["sp_fitted_from"] == 8
    assert _llama_plan(6)["sp_degree"] == 6
    assert _llama_plan(8)["sp_degree"] == 8 and _llama_plan(8)["sp_fitted_from"] is None
    assert _llama_plan(16)["sp_degree"] == 8


@pytest.mark.parametrize("row", [r for r in _rows() if r["warm"]], ids=lambda r: f"{r['seq_len']}")
def test_allocator_reserve_covers_what_the_h200_reserved(row):
    """The CUDA allocator reserved 2.7-6.3% more than the live peak on warm steps: the plan's reserve
    (a share of its predicted peak) covers the measured reserved peak, so `fits` means the step fits."""
    from longctx.bench import gpu_step
    from longctx.train.plan_report import ALLOCATOR_RESERVE

    pred = gpu_step.predict(_recipe(), row["seq_len"], H200_BYTES, row["runtime_bytes"], **AS_RUN)
    assert pred["reserve_bytes"] == pytest.approx(ALLOCATOR_RESERVE * pred["total_bytes"])
    assert row["reserved_peak_bytes"] <= pred["total_bytes"] + pred["reserve_bytes"], (
        row["reserved_peak_bytes"] / pred["total_bytes"] - 1)


def test_fits_leaves_the_reserve_free():
    """A plan whose peak alone is under the GPU's memory but not with the reserve does not fit (a
    fixed alpha: with `auto` the plan would lower alpha to fit instead)."""
    from longctx.train.plan_report import ALLOCATOR_RESERVE

    fixed = ["memory.alpha=0.4"]
    p = _llama_plan(8, seq_len=131072, overrides=fixed)
    tight = p["total_bytes"] * (1 + ALLOCATOR_RESERVE / 2) / 2**30
    assert not _llama_plan(8, gpu_gib=tight, seq_len=131072, overrides=fixed)["fits"]
    assert _llama_plan(8, gpu_gib=tight * 1.05, seq_len=131072, overrides=fixed)["fits"]


def test_binding_term_at_the_search_limit():
    """A plan that fits all the way to the longest length searched says so instead of naming a
    GPU term that never bound."""
    from longctx.train.plan_report import SEARCH_LIMIT

    p = _llama_plan(8, gpu_gib=100000, host_gib=1 << 30)
    assert p["longest_tokens"] == SEARCH_LIMIT and p["binding_term"] == "search_limit"


def test_plan_says_what_its_gpu_figures_rest_on(capsys):
    """Every plan names its calibration (issue 21: GPU figures labelled by what measured them)."""
    from longctx.cli import main

    assert main(["plan", "recipes/llama3-8b-128k.yaml", "--gpus", "8", "--gpu-mem", "80GiB", "--host-mem", "1TiB"]) == 0
    out = capsys.readouterr().out
    assert "memory model: calibrated on one H200 step" in out and "not measured" in out
    assert _llama_plan(8)["calibration"].startswith("calibrated on one H200 step")


# --- parallel.vocab_parallel: what the plan holds, sends and picks ---------------------------------
LLAMA = str(REPO / "recipes" / "llama3-8b-128k.yaml")


def test_vocab_parallel_holds_one_pth_of_the_vocab_weights():
    """Over a vocabulary group of P ranks a rank holds ceil(V/P) rows of the embedding and head, with
    their gradients and AdamW states (counted here by hand); under fsdp2 (P = every rank) they are
    not sharded again and the root unit's unsharded copy is the final norm alone."""
    from longctx.memory.estimate import ModelShape, Setting, estimate

    m = ModelShape(576, 1536, 30, 9, 3, 64, 49153)  # untied, V not a multiple of P
    V, D, P = m.vocab, m.hidden, 4
    rest = m.layers * m.params_per_layer() + D  # blocks and final norm
    assert m.params() == rest + 2 * V * D
    c = 12289  # ceil(49153 / 4)
    s = Setting(seq_len=16384, sp=4, dp=4, gpus_per_node=4, sharding="none")
    off, on = estimate(m, s), estimate(m, dataclasses.replace(s, vocab_parallel="stream", vocab_group=P))
    assert off.terms["params"] == 4 * (rest + 2 * V * D) and off.terms["optimizer"] == 8 * (rest + 2 * V * D)
    assert on.terms["params"] == 4 * (rest + 2 * c * D)
    assert on.terms["grads"] == 4 * (rest + 2 * c * D)
    assert on.terms["optimizer"] == 8 * (rest + 2 * c * D)
    vocab_off, vocab_on = off.terms["optimizer"] - 8 * rest, on.terms["optimizer"] - 8 * rest
    assert vocab_off / vocab_on == pytest.approx(P, rel=1e-4)
    # the loss head's buffers per 4,096-token tile: two shards and two fp32 accumulators, one CCE chunk
    assert on.terms["loss_head"] == 5 * 4 * c * D + min(12 * 4096 * c, 12 * (1 << 22))

    world = 8
    s = Setting(seq_len=16384, sp=1, dp=world, gpus_per_node=8, sharding="fsdp2", autocast=True)
    off, on = estimate(m, s), estimate(m, dataclasses.replace(s, vocab_parallel="gather", vocab_group=world))
    c = 6145  # ceil(49153 / 8)
    assert on.terms["params"] == pytest.approx(4 * (rest / world + 2 * c * D))
    assert on.terms["optimizer"] == pytest.approx(8 * (rest / world + 2 * c * D))
    layer = m.params_per_layer()
    assert off.terms["communication"] == 4 * (3 * layer + 2 * V * D + D)
    assert on.terms["communication"] == 4 * (3 * layer + D)  # FSDP2 ignores the vocabulary rows


def _plan_cli(capsys, *argv):
    from longctx.cli import main

    code = main(["plan", LLAMA, *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_prints_what_each_vocab_variant_sends_and_what_auto_picks(capsys):
    """The vocab section has one line per bucket length; its bytes are parallel/vocab.py's byte
    model (embedding + head) at a micro-batch's tokens per rank, and auto picks gather where few tokens
    meet Llama's 128K vocabulary and stream at 128K tokens with the head in one call (memory.policy
    none); with the head in 4K-token tiles (memo) each tile is one call, so the head stays gather."""
    from longctx.parallel import vocab

    # one row per micro-batch: a call sees the row's L / 8 tokens per rank (the plan follows the run's micro-batches)
    whole = ("parallel.vocab_parallel=auto", "memory.policy=none", "train.micro_batch_tokens=128", "--sharding", "none",
             "--gpus", "8")
    code, out, _ = _plan_cli(capsys, *whole)
    assert code in (0, 1)
    assert "vocabulary parallel (parallel.vocab_parallel auto)" in out and "16,032 per rank" in out
    rows = {int(line.split()[0].replace(",", "")): line.split() for line in out.splitlines()
            if line.startswith("  ") and line.split()[0].replace(",", "").isdigit() and len(line.split()) >= 9}
    assert rows[1024][-1] == "gather" and rows[131072][-1] == "stream"
    assert set(rows) == {64 << k for k in range(12)}  # the buckets up to data.max_len

    report = json.loads(_plan_cli(capsys, *whole, "--json")[1])
    V, D = 128256, 4096
    by_len = {b["seq_len"]: b for b in report["vocab"]["buckets"]}
    for L, expected in ((1024, "gather"), (131072, "stream")):
        b = by_len[L]
        assert b["sp"] == 8 and b["tokens_per_rank"] == L // 8 and b["auto"] == {"head": expected, "embedding": expected}
        for v in ("gather", "stream"):
            sent = sum(vocab.bytes_per_rank(v, layer, L // 8, V, D, 8) for layer in ("head", "embedding"))
            assert b[v]["bytes"] == sent
            assert b[v]["seconds"] == pytest.approx(vocab.predict_seconds(v, L // 8, V, D, 8, 300e12, 25e9))
        other = "stream" if expected == "gather" else "gather"
        assert b[expected]["seconds"] < b[other]["seconds"]
    assert by_len[1024]["stream"]["bytes"] > 100 * by_len[1024]["gather"]["bytes"]  # the whole vocabulary travels

    _, out, _ = _plan_cli(capsys, "parallel.vocab_parallel=auto", "--gpus", "8")  # memo: the head in tiles
    assert "tiles of 4,096 tokens" in out
    last = [line for line in out.splitlines() if line.strip().startswith("131,072")][0]
    # the recipe's micro-batch at 128K: all its rows on the rank (131,072 tokens), 32 tiles of 4,096
    assert last.split()[2] == "131,072" and last.split()[3] == "32" and last.endswith("head gather, embedding stream")


@pytest.mark.parametrize("argv", [("--gpus", "1"), ("--gpus", "4", "--sharding", "none")])
def test_plan_vocab_parallel_over_one_rank_exits_2(capsys, argv):
    """A vocabulary group of one rank (one GPU; sp 1 without fsdp2) is a recipe error naming the key."""
    from longctx.cli import main

    tiny = str(REPO / "recipes" / "tiny.yaml")
    assert main(["plan", tiny, "parallel.vocab_parallel=auto", *argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("longctx: error:")]
    assert len(lines) == 1 and "parallel.vocab_parallel='auto'" in lines[0] and "one rank" in lines[0], err
    assert "Traceback" not in err


def test_plan_prices_a_micro_batch_not_a_row(capsys):
    """Without micro_batch_tokens a short bucket's micro-batch is all its rows on the rank: the
    embedding's call sees rows x L / sp tokens (what the run's auto sees), not one row's."""
    report = json.loads(_plan_cli(capsys, "parallel.vocab_parallel=auto", "memory.policy=none", "--sharding", "none",
                                  "--gpus", "8", "--json")[1])
    b = {b["seq_len"]: b for b in report["vocab"]["buckets"]}[1024]
    assert b["rows"] > 1 and b["tokens_per_rank"] == b["rows"] * 1024 // b["sp"]
