"""The trainer on the tiny recipe: loss falls, metrics, accumulation, non-finite stop, export, resume."""

import json
from pathlib import Path

import pytest
import torch
from longctx.cli import main
from longctx.recipes import schema
from longctx.train.build import build
from longctx.train.trainer import NonFiniteLossError, train
from transformers import AutoModelForCausalLM

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"


def _run(tmp_path, *overrides, name="run"):
    recipe = schema.load(TINY, [f"run.dir={tmp_path / name}", *overrides])
    run = build(recipe)
    return run, train(run)["history"]


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_tiny_run_loss_falls_and_logs_metrics(tmp_path, capsys):
    run, history = _run(tmp_path)
    records = _metrics(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, 9))
    for key in ("step", "loss", "tokens", "tokens_per_second", "lr", "peak_memory_bytes"):
        assert key in records[0]
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    assert records[-1]["tokens"] == 8 * 4 * 128
    assert (tmp_path / "run" / "recipe.yaml").is_file()
    out = capsys.readouterr().out
    assert "step 8/8 | loss" in out and "tok/s" in out and "ETA" in out


pytestmark = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")


def _first_step_grads(tmp_path, name, *overrides):
    run = build(schema.load(TINY, [f"run.dir={tmp_path / name}", "train.max_steps=1", "train.warmup_steps=0", *overrides]))
    captured = []
    run.optimizer.step = lambda *a, **k: captured.append([p.grad.clone() for p in run.model.parameters()])
    history = train(run)["history"]
    return history[0]["loss"], captured[0]


def test_grad_accumulation_equals_one_batch(tmp_path):
    pack = ["data.batching=pack", "data.seq_len=128", "train.batch_size=4", "~data.min_len", "~data.max_len",
            "~data.tokens_per_step"]
    loss1, grads1 = _first_step_grads(tmp_path, "a", *pack)
    loss4, grads4 = _first_step_grads(tmp_path, "b", *pack, "train.grad_accum=4")
    assert abs(loss1 - loss4) < 5e-6  # fp32 sums in another order: a few ulps of a loss near 5
    for g1, g4 in zip(grads1, grads4):
        torch.testing.assert_close(g1, g4, atol=1e-6, rtol=1e-5)


def test_non_finite_loss_stops_before_the_step(tmp_path):
    recipe = schema.load(TINY, [f"run.dir={tmp_path / 'nan'}", "train.max_steps=3"])
    run = build(recipe)
    with torch.no_grad():
        run.model.model.norm.weight.fill_(float("nan"))
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match=r"step 1: loss is nan .*the step was not applied"):
        train(run)
    for k, v in run.model.state_dict().items():
        assert torch.equal(v, before[k]) or torch.isnan(before[k]).all(), k
    assert not (tmp_path / "nan" / "metrics.jsonl").read_text().strip()


def test_export_loads_in_transformers_with_equal_logits(tmp_path):
    run, _ = _run(tmp_path, "train.max_steps=2", "train.export=true", "model.max_seq_len=1024",
                  "model.rope.type=yarn", "model.rope.factor=2.0")
    folder = tmp_path / "run" / "export"
    config = json.loads((folder / "config.json").read_text())
    assert config["max_position_embeddings"] == 1024
    assert config["rope_parameters"]["rope_type"] == "yarn" and config["rope_parameters"]["factor"] == 2.0
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(0, 256, (1, 300))
    run.model.eval()
    with torch.no_grad():
        assert (hf(ids).logits - run.model.logits(ids)).abs().max().item() <= 1e-5


def test_resume_auto_continues_exactly_and_export_cli(tmp_path, capsys):
    _, full = _run(tmp_path, "train.max_steps=6", name="full")
    _, first = _run(tmp_path, "train.max_steps=6", "train.checkpoint_every=3", "train.max_steps=3", name="cut")
    # the schedule is defined by max_steps, so resume the cut run with the full length
    _, rest = _run(tmp_path, "train.max_steps=6", "train.resume=auto", name="cut")
    assert [h["step"] for h in rest] == [4, 5, 6]
    assert [h["loss"] for h in first] == [h["loss"] for h in full[:3]]
    ckpt = tmp_path / "cut" / "checkpoints" / "step-3"
    assert main(["export", str(ckpt), str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported" / "config.json").is_file()
    assert main(["export", str(tmp_path / "nope"), str(tmp_path / "x")]) == 2
    assert "nope: checkpoint folder not found" in capsys.readouterr().err


def test_resume_same_schedule_is_bitwise(tmp_path):
    _, full = _run(tmp_path, "train.max_steps=4", name="full")
    _run(tmp_path, "train.max_steps=4", "train.checkpoint_every=2", name="cut")
    # drop the last checkpoint and the last steps, then resume from step 2
    import shutil
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-4")
    _, rest = _run(tmp_path, "train.max_steps=4", "train.resume=auto", name="cut")
    assert [h["loss"] for h in rest] == [h["loss"] for h in full[2:]]


def test_damaged_checkpoints_are_skipped_by_auto_and_refused_by_path(tmp_path, caplog):
    """step-3 truncated mid-write (shard shorter than its manifest says), step-2 corrupted in
    place (same size, other bytes), a leftover step-4.tmp from a crash: auto takes step-1."""
    from longctx.models.hf import CheckpointError

    _run(tmp_path, "train.max_steps=3", "train.checkpoint_every=1", "train.keep_last=3", name="r")
    ckpts = tmp_path / "r" / "checkpoints"
    shard = ckpts / "step-3" / "dcp" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    shard2 = ckpts / "step-2" / "dcp" / "__0_0.distcp"
    data = bytearray(shard2.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard2.write_bytes(bytes(data))
    (ckpts / "step-4.tmp" / "dcp").mkdir(parents=True)
    with caplog.at_level("WARNING", logger="longctx"):
        run = build(schema.load(TINY, [f"run.dir={tmp_path / 'r'}", "train.max_steps=4", "train.resume=auto"]))
    assert run.start_step == 1
    assert "step-3: dcp/__0_0.distcp has" in caplog.text and "step-2: dcp/__0_0.distcp does not match" in caplog.text
    with pytest.raises(CheckpointError, match="truncated"):
        build(schema.load(TINY, [f"run.dir={tmp_path / 'x'}", f"train.resume={ckpts / 'step-3'}"]))


def test_wandb_offline_writes_a_local_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    _run(tmp_path, "train.max_steps=2", "log.wandb=true")
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_bf16_run_trains(tmp_path):
    _, history = _run(tmp_path, "run.dtype=bf16", "train.max_steps=4")
    assert history[-1]["loss"] < history[0]["loss"]


def test_memory_policies_give_same_loss(tmp_path):
    _, plain = _run(tmp_path, "train.max_steps=2", name="plain")
    for i, overrides in enumerate([("memory.policy=full",), ("memory.policy=memo", "memory.alpha=0.5", "memory.resident_layers=1"),
                                   ("memory.policy=memo", "memory.resident_layers=0"),
                                   ("memory.policy=full", "memory.recompute_num_layers=2", "memory.recompute_chunk_tokens=40")]):
        _, got = _run(tmp_path, "train.max_steps=2", *overrides, name=f"m{i}")
        assert [h["loss"] for h in plain] == pytest.approx([h["loss"] for h in got], abs=1e-6)
        if "memory.policy=memo" in overrides:
            assert all(0.0 <= h["memory_alpha"] <= 1.0 for h in got)
            assert all(h["memory_host_bytes"] > 0 for h in got)


def test_missing_data_file_fails_fast(tmp_path, capsys):
    code = main(["train", str(TINY), f"run.dir={tmp_path / 'd'}", f"data.source={tmp_path / 'missing.jsonl'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "data.source=" in err and "missing.jsonl" in err and "file not found" in err


def test_quickstart_path_end_to_end_short(tmp_path, smollm2_dir):
    """The quickstart recipe, shortened: default model, corpus, rope scaling, export that loads."""
    quick = TINY.parent / "quickstart.yaml"
    code = main(["train", str(quick), f"run.dir={tmp_path / 'q'}", "data.min_len=64", "data.max_len=128",
                 "data.tokens_per_step=256", "eval.seq_len=128", "train.max_steps=2", "eval.every=2",
                 "eval.lengths=[1024]", "log.wandb=false"])  # its eval.tasks at 1K: 16K forwards take minutes here
    assert code == 0
    folder = tmp_path / "q" / "export"
    assert (folder / "tokenizer.json").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert config["max_position_embeddings"] > 8192
    hf = AutoModelForCausalLM.from_pretrained(folder)
    assert hf.config.rope_parameters["rope_type"] != "default"
    records = _metrics(tmp_path / "q")
    assert "eval_loss_before" in records[0] and "eval_loss" in records[-1]
    assert "eval/ppl/score@1024" in records[-1] and "eval/passkey/score@1024" in records[-1]


def test_cce_loss_head_matches_reference_in_training(tmp_path):
    _, ref = _run(tmp_path, "train.max_steps=3", "loss.impl=reference", name="ref")
    run, cce = _run(tmp_path, "train.max_steps=3", "loss.impl=cce", name="cce")
    assert run.describe["loss_impl"] == "cce_torch"
    first = _metrics(tmp_path / "cce")[0]
    assert first["loss_impl"] == "cce_torch" and first["attention_kernel"] == "sdpa"
    assert _metrics(tmp_path / "ref")[0]["loss_impl"] == "reference"
    assert [h["loss"] for h in cce] == pytest.approx([h["loss"] for h in ref], abs=1e-5)
    assert [h["grad_norm"] for h in cce] == pytest.approx([h["grad_norm"] for h in ref], abs=1e-5)


def test_run_log_and_first_record_name_the_kernels(tmp_path, caplog):
    caplog.set_level("INFO", logger="longctx")
    _, ref = _run(tmp_path, "train.max_steps=2", "parallel.attention_kernel=reference", name="refattn")
    _, memo = _run(tmp_path, "train.max_steps=2", "memory.policy=memo", "memory.alpha=0.5", name="memo")
    first, second = _metrics(tmp_path / "refattn")
    assert first["attention_kernel"] == "reference" and "attention_kernel" not in second
    assert _metrics(tmp_path / "memo")[0]["attention_kernel"] == "aten_cpu"  # MEMO keeps (out, lse): block kernel
    assert "'attention_kernel': 'reference'" in caplog.text and "'loss_impl': 'cce_torch'" in caplog.text
    # the naive kernel is only what was asked for; both runs train the same model
    assert [h["loss"] for h in ref] == pytest.approx([h["loss"] for h in memo], abs=1e-4)


def test_cuda_only_attention_kernel_on_cpu_is_a_recipe_error(tmp_path):
    recipe = schema.load(TINY, [f"run.dir={tmp_path / 'k'}", "parallel.attention_kernel=aten_flash"])
    with pytest.raises(schema.RecipeError, match="parallel.attention_kernel='aten_flash': aten_flash runs on CUDA only"):
        build(recipe)


def test_decomposed_micro_batches_equal_one_batch(tmp_path):
    loss1, grads1 = _first_step_grads(tmp_path, "whole")
    loss2, grads2 = _first_step_grads(tmp_path, "micro", "train.micro_batch_tokens=64")
    assert abs(loss1 - loss2) < 5e-6
    for g1, g2 in zip(grads1, grads2):
        torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)


def test_decomposition_keeps_tokens_per_step_with_varying_length(tmp_path):
    _run(tmp_path, "train.max_steps=8", "data.source=default:chapters", "data.max_documents=60",
         "data.curriculum=weights", "data.curriculum_weights={16: 50, 32: 50, 64: 50, 128: 1}")
    records = _metrics(tmp_path / "run")
    assert all(r["rows"] * r["seq_len"] == 512 for r in records)
    assert len({r["seq_len"] for r in records}) > 1


def test_data_inspect_cli(tmp_path, capsys):
    png = tmp_path / "h.png"
    args = ["data.source=default:chapters", "data.max_documents=50", "data.max_len=512", "data.tokens_per_step=1024"]
    assert main(["data", "inspect", str(TINY), *args, "--png", str(png)]) == 0
    report = json.loads(capsys.readouterr().out.rsplit("}", 1)[0] + "}")
    assert report["documents"] == 50 and report["tokens_kept"] + report["tokens_dropped"] == report["tokens"] - 50
    assert report["attention_flops_per_epoch"]["concat_over_decomposition"] > 1
    packed = report["packed_documents"]  # whole documents in rows of data.max_len (issue 18's packer)
    assert packed["tokens"] == report["tokens"] and packed["seq_len"] == 512
    assert packed["padding_fraction"] <= 0.02 and 0 < packed["attention_flops_masked_over_rows"] < 1
    assert png.stat().st_size > 1000


def test_eta_follows_the_curriculum_lengths_and_the_run_says_where_it_is(tmp_path, caplog):
    """Issue 16: the ETA averaged recent steps, yet a curriculum's later steps are longer; the
    first lines name the run folder (and the wandb sync command offline); a summary ends the run."""
    import io

    from longctx.train.metrics import Console

    lengths = {1: 64, 2: 128, 3: 256, 4: 256}
    curriculum, flat = Console(4, stream=io.StringIO(), length_of=lengths.get), Console(4, stream=io.StringIO())
    for console in (curriculum, flat):
        for step, seconds in ((1, 1.0), (2, 2.0)):
            console.log({"step": step, "loss": 1.0, "tokens_per_second": 1.0, "lr": 1.0, "peak_memory_bytes": 0,
                         "step_seconds": seconds, "seq_len": lengths[step], "rows": 1})
    assert curriculum.eta_seconds(2) == pytest.approx(8.0)  # seconds = L / 64: two more steps of 256
    assert flat.eta_seconds(2) == pytest.approx(3.0)  # no lengths known: the recent mean per step
    assert "ETA 0m08s" in curriculum.stream.getvalue().splitlines()[-1]
    caplog.set_level("INFO", logger="longctx")
    monkey = pytest.MonkeyPatch()
    monkey.setenv("WANDB_MODE", "offline")
    try:
        _run(tmp_path, "train.max_steps=2", "log.wandb=true", name="w")
    finally:
        monkey.undo()
    text = caplog.text
    assert f"run folder: {(tmp_path / 'w').resolve()}" in text
    assert f"wandb sync {tmp_path / 'w' / 'wandb' / 'latest-run'}" in text
    assert "finished: steps 1-2 of 2" in text and "checkpoint step-2" in text


def test_attention_is_priced_per_micro_batch():
    """The sp schedule is chosen for the rows one attention call sees: a micro-batch's."""
    from types import SimpleNamespace

    from longctx.parallel.attention import SequenceParallelAttention
    from longctx.train.trainer import _micro_rows

    r = SimpleNamespace(data=SimpleNamespace(batching="decompose"),
                        train=SimpleNamespace(micro_batch_tokens=None, grad_accum=1))
    assert _micro_rows(r, 8, 1024) == 8
    r.train.micro_batch_tokens = 2048
    assert _micro_rows(r, 8, 1024) == 2
    r.train.micro_batch_tokens = 100
    assert _micro_rows(r, 8, 1024) == 1
    r.data.batching, r.train.grad_accum = "pack", 3
    assert _micro_rows(r, 8, 1024) == 3
    # memory.policy keeping (out, lse) is priced as MEMO's own backward
    assert SequenceParallelAttention("ring", {}, 4, 2, 8, 2, kept=True)._shape(2, 64, 1).memo
    assert not SequenceParallelAttention("ring", {}, 4, 2, 8, 2)._shape(2, 64, 1).memo
