"""eval/ (issue 22): the task generators, the answer scorer and loss by position against full logits,
sequence-parallel evaluation against one process, `longctx eval` and eval.tasks in a run."""

import json
import re
from pathlib import Path

import _dist
import numpy as np
import pytest
import torch
from longctx.cli import main
from longctx.data.tokenize import ByteTokenizer, HFTokenizer
from longctx.eval import runner
from longctx.eval.perplexity import loss_by_position
from longctx.eval.tasks import NIAH, PASSKEY, RULER_TASKS, SNAP_TOKENS, TASKS, Generator, TaskError
from longctx.models.hf import save_folder
from longctx.parallel import mesh as mesh_lib
from longctx.recipes import schema
from longctx.recipes.schema import RecipeError
from longctx.train import evaluation
from longctx.train.build import build, build_model
from longctx.train.trainer import train

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
CPU = torch.device("cpu")


# --- generators ------------------------------------------------------------------------------------
NEEDLE = re.compile(r" One of the special magic numbers for \w+ is: \d+\.| VAR \w+ = (?:VAR )?\w+\."
                    r"| The pass key is \d+\. Remember it: \d+ is the pass key\.")

def _haystack(tok) -> np.ndarray:
    text = "In the beginning the earth was without form; and darkness was upon the face of the deep. " * 60
    return np.asarray(tok.encode(text))


@pytest.mark.parametrize("task", TASKS)
def test_generators_are_seeded_exact_length_and_place_the_needle_at_the_depth(task):
    tok = ByteTokenizer()
    gen = Generator(tok, _haystack(tok), seed=3)
    for depth in (0.0, 0.3, 0.75, 1.0):
        s = gen.sample(task, 2000, depth, index=1)
        again = Generator(tok, _haystack(tok), seed=3).sample(task, 2000, depth, index=1)
        assert (s.prompt, s.answer) == (again.prompt, again.answer)
        other = Generator(tok, _haystack(tok), seed=4).sample(task, 2000, depth, index=1)
        assert (other.prompt, other.answer) != (s.prompt, s.answer)
        assert len(s.prompt) + len(s.answer) == s.length == 2000
        text = tok.decode(s.prompt)
        # the asked needle is where the sample says, decoded from the prompt itself
        needle = tok.decode(s.prompt[s.needle_at:s.needle_at + len(s.needle)])
        assert needle == tok.decode(s.needle) and needle.strip() in text
        # the filler before the asked needle is depth x the filler, within the snap to a sentence end:
        # found by decoding (bytes: one token per byte), every needle's sentence taken out
        start, end = s.context
        before, context = tok.decode(s.prompt[start:s.needle_at]), tok.decode(s.prompt[start:end])
        n_fill = len(NEEDLE.sub("", context))
        filler_before = len(NEEDLE.sub("", before))
        assert abs(filler_before - depth * n_fill) <= SNAP_TOKENS, (filler_before, depth * n_fill)
        assert len(NEEDLE.findall(context)) == (1 if task in (PASSKEY, NIAH, "niah_single") else 4)
        assert before.rstrip()[-1:] in ".!?;:" or filler_before == 0 or abs(filler_before - depth * n_fill) <= 0.5
        # the answer is in the prompt's needles
        values = re.findall(r"\d+|[A-Z]{5}", s.answer_text)
        assert values
        for v in values:
            assert v in text
        if task == "niah_multikey":
            key = re.search(r"magic number for (\w+) is:\s*$", text).group(1)
            assert f"for {key} is: {values[0]}." in text
        if task == "variable_tracking":
            chain = re.findall(r"VAR (\w+) = (?:VAR )?(\w+)\.", text)
            assert [name for name, _ in chain] == values  # the chain in text order, its first at the depth
        if task == "niah_multivalue":  # every value, in text order
            assert [text.index(f"is: {v}.") for v in values] == sorted(text.index(f"is: {v}.") for v in values)


def test_generator_refuses_what_cannot_be_built():
    gen = Generator(ByteTokenizer(), None)
    with pytest.raises(TaskError, match="too short"):
        gen.sample("niah_multikey", 100, 0.5)
    with pytest.raises(TaskError, match="depth"):
        gen.sample(PASSKEY, 1000, 1.5)
    with pytest.raises(TaskError, match="expected one of"):
        gen.sample("needle", 1000, 0.5)


def test_chat_template_wraps_the_prompt(smollm2_dir):
    tok = HFTokenizer(smollm2_dir)
    before, after = tok.chat_wrap()
    gen = Generator(tok, _haystack(tok), seed=0)
    s = gen.sample("niah", 1024, 0.5)
    text = tok.decode(s.prompt)
    assert text.startswith(before) and "<|im_start|>assistant" in text
    key = re.search(r"for (\w+) is", text).group(1)
    assert text.rstrip().endswith(f"The special magic number for {key} is:")
    assert len(s.prompt) + len(s.answer) == 1024
    assert Generator(tok, _haystack(tok), chat=False).sample("niah", 1024, 0.5).prompt[:3] != s.prompt[:3]


# --- scoring against full logits ----------------------------------------------------------------------
def _tiny(*overrides):
    recipe = schema.load(TINY, list(overrides))
    model, _, _ = build_model(recipe, mesh_lib.init(CPU))
    return model.eval()


def test_scorer_equals_full_logits_and_greedy_decoding():
    model = _tiny()
    scorer = evaluation.scorer_for(model, mesh_lib.init(CPU), None, 258, None)
    scorer.tile_tokens = 64  # several tiles
    ids = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = torch.log_softmax(model.logits(ids[None])[0].double(), -1)
    ref_logp = ref[:-1].gather(1, ids[1:, None]).squeeze(1)
    ref_hit = ref[:-1].argmax(-1) == ids[1:]
    logp, hit = scorer.targets(ids, 0)
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=0)
    assert torch.equal(hit, ref_hit)
    logp, hit = scorer.targets(ids, 120)
    torch.testing.assert_close(logp, ref_logp[120:], atol=1e-5, rtol=0)
    # exact match by teacher forcing is greedy decoding's answer
    prompt = ids[:200]
    greedy = model.generate_greedy(prompt[None], 6)[0, 200:].tolist()
    right = scorer.answer(prompt.tolist(), greedy)
    assert right["exact"] and right["answer_tokens_right"] == 1.0
    with torch.no_grad():
        full = torch.log_softmax(model.logits(torch.tensor([prompt.tolist() + greedy]))[0].double(), -1)
    expect = sum(full[199 + i, t].item() for i, t in enumerate(greedy))
    assert right["answer_logprob"] == pytest.approx(expect, abs=1e-5)
    wrong = greedy[:3] + [(greedy[3] + 1) % 256] + greedy[4:]
    assert not scorer.answer(prompt.tolist(), wrong)["exact"]


def test_scorer_under_bf16_autocast_follows_fp32():
    """The trainer's bf16 regime (run.dtype=bf16: autocast): close to the fp32 reference."""
    model = _tiny()
    ids = torch.randint(0, 256, (256,), generator=torch.Generator().manual_seed(2))
    fp32, _ = evaluation.scorer_for(model, mesh_lib.init(CPU), None, 258, None).targets(ids, 0)
    bf16, _ = evaluation.scorer_for(model, mesh_lib.init(CPU), None, 258, torch.bfloat16).targets(ids, 0)
    assert not torch.equal(bf16, fp32)  # autocast did run in bf16
    assert (bf16 - fp32).abs().mean().item() < 0.02 and (bf16 - fp32).abs().max().item() < 0.1


def test_loss_by_position_equals_reference_buckets():
    model = _tiny()
    scorer = evaluation.scorer_for(model, mesh_lib.init(CPU), None, 258, None)
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 256, (400,), generator=g).numpy() for _ in range(2)]
    got = loss_by_position(scorer, docs, 300, bucket=128)
    nll = []
    for d in docs:
        ids = torch.as_tensor(d[:300])
        with torch.no_grad():
            ref = torch.log_softmax(model.logits(ids[None])[0].double(), -1)
        nll.append(-ref[:-1].gather(1, ids[1:, None]).squeeze(1))
    nll = torch.stack(nll)  # [docs, positions 1..299]
    positions = torch.arange(1, 300)
    expect = [nll[:, (positions >= a) & (positions < b)].mean().item() for a, b in ((0, 128), (128, 256), (256, 300))]
    assert [b["loss"] for b in got["by_position"]] == pytest.approx(expect, abs=1e-6)
    assert [b["tokens"] for b in got["by_position"]] == [2 * 127, 2 * 128, 2 * 44]
    assert got["score"] == pytest.approx(nll.mean().item(), abs=1e-6)


# --- sequence parallelism: equal to one process ----------------------------------------------------------
SCHEDULES = ("token_ring", "ring", "bidir_kv", "allgather_kv", "ulysses")


def _configs(world: int) -> list[tuple[int, list[str]]]:
    configs = [(world, [f"parallel.attention={s}"]) for s in SCHEDULES]
    configs.append((world, ["parallel.attention=token_ring", "memory.policy=memo", "memory.alpha=0.5",
                            "memory.resident_layers=0", "memory.recompute_chunk_tokens=16"]))
    configs.append((world, ["parallel.attention=ring", "memory.policy=full", "memory.recompute_chunk_tokens=16"]))
    configs.append((world // 2 if world == 4 else 2, ["parallel.attention=ring", "parallel.sharding=fsdp2"]))
    if world == 4:
        configs.append((4, ["parallel.attention=hybrid", "parallel.sp_inner=2", "parallel.hybrid_outer=token_ring"]))
        configs.append((2, ["parallel.attention=token_ring"]))  # dp 2 x sp 2
    return configs


def _documents():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 256, (n,), generator=g).numpy() for n in (300, 650, 330)]


PPL = runner.Settings(suite="ppl", lengths=[300], documents=3, bucket=64)
RULER = dict(suite="ruler", lengths=[640], depths=[0.0, 1.0], samples=3, tasks=["niah_multikey", "variable_tracking"],
             seed=1)


def _inputs():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 256, (203,), generator=g)  # 203: padded to a multiple of 2 x sp
    return ids, ids[:180].tolist(), torch.randint(0, 256, (7,), generator=g).tolist()


def _eval_worker(rank, world, out_root):
    ids, prompt, answer = _inputs()
    results = []
    for sp, overrides in _configs(world):
        recipe = schema.load(TINY, [f"parallel.sp_degree={sp}", *overrides])
        mesh = mesh_lib.init(CPU, "gloo", 120, sp)
        model, _, spa = build_model(recipe, mesh)
        scorer = evaluation.scorer_for(model, mesh, spa, 258, None)
        logp, hit = scorer.targets(ids, 0)
        ranks = evaluation.ranks_of(mesh, "parallel.sharding=fsdp2" in overrides)
        where = Path(out_root) / f"{world}-{len(results)}"
        suite = runner.run(runner.Settings(**RULER), scorer, where / "ruler", Generator(ByteTokenizer(), None, 1),
                           ranks=ranks, progress=False, draw=False)
        ppl = runner.run(PPL, scorer, where / "ppl", documents=_documents(), ranks=ranks, progress=False, draw=False)
        results.append((logp, hit, scorer.answer(prompt, answer), suite["cells"] + ppl["cells"]))
    return results


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_eval_equals_one_process(world, tmp_path):
    """Per-position log-likelihoods, an answer's log-likelihood, whole RULER cells and loss by
    position (samples and windows split over data-parallel groups at dp 2; every group runs every
    sample under FSDP2, whose forwards are collective over all ranks) under every schedule, MEMO,
    full recompute and FSDP2: one process's within 1e-5."""
    ids, prompt, answer = _inputs()
    model = _tiny()
    scorer = evaluation.scorer_for(model, mesh_lib.init(CPU), None, 258, None)
    logp, hit = scorer.targets(ids, 0)
    ans = scorer.answer(prompt, answer)
    cells = runner.run(runner.Settings(**RULER), scorer, tmp_path / "one", Generator(ByteTokenizer(), None, 1),
                       progress=False, draw=False)["cells"]
    cells += runner.run(PPL, scorer, tmp_path / "one-ppl", documents=_documents(), progress=False, draw=False)["cells"]
    per_rank = _dist.run(_eval_worker, world, str(tmp_path / "sp"))
    for rank_results in per_rank:
        for (sp, overrides), (lp, h, a, c) in zip(_configs(world), rank_results):
            what = f"sp {sp} {overrides}"
            torch.testing.assert_close(lp, logp, atol=1e-5, rtol=0, msg=what)
            assert torch.equal(h, hit), what
            assert a["answer_logprob"] == pytest.approx(ans["answer_logprob"], abs=1e-5) and a["exact"] == ans["exact"]
            assert len(c) == len(cells) == 5, what
            for got, want in zip(c[:4], cells[:4]):
                assert got["samples"] == want["samples"] == 3, what
                for key in ("score", "answer_logprob", "answer_token_logprob", "answer_tokens_right"):
                    assert got[key] == pytest.approx(want[key], abs=1e-5), (what, key)
            ppl, want = c[4], cells[4]  # three 300-token windows, one per dp group's share
            assert ppl["documents"] == want["documents"] == 3, what
            assert [b["tokens"] for b in ppl["by_position"]] == [b["tokens"] for b in want["by_position"]], what
            assert [b["loss"] for b in ppl["by_position"]] == pytest.approx([b["loss"] for b in want["by_position"]],
                                                                            abs=1e-5), what


# --- the CLI ----------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_folder(tmp_path):
    model = _tiny()
    return save_folder(model, tmp_path / "tiny-model")


def _eval(*args) -> int:
    return main(["eval", *map(str, args)])


def test_cli_ppl_and_passkey_write_results_resume_and_compare(tmp_path, tiny_folder, capsys):
    data = ["--set", "data.max_documents=4", "--held-out", "0"]
    ppl = tmp_path / "ppl"
    assert _eval("ppl", tiny_folder, "--lengths", "256,0.5k", "--documents", "2", "--bucket", "128", *data,
                 "--out", ppl) == 0
    results = json.loads((ppl / "results.json").read_text())
    assert [c["length"] for c in results["cells"]] == [256, 512] and results["complete"]
    assert all(c["score"] > 0 and c["documents"] == 2 for c in results["cells"])
    assert [b["start"] for b in results["cells"][1]["by_position"]] == [0, 128, 256, 384]
    assert (ppl / "loss_by_position.png").stat().st_size > 1000
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary["score_by_length"]) == {"256", "512"}

    keys = tmp_path / "passkey"
    args = ["passkey", tiny_folder, "--lengths", "320,384", "--depths", "0,1", "--samples", "2", *data, "--out", keys]
    assert _eval(*args) == 0
    first = json.loads((keys / "results.json").read_text())
    assert [(c["length"], c["depth"]) for c in first["cells"]] == [(320, 0.0), (320, 1.0), (384, 0.0), (384, 1.0)]
    assert all(0 <= c["score"] <= 1 and c["answer_logprob"] < 0 and c["samples"] == 2 for c in first["cells"])
    # resume: a run stopped after two cells does only the other two, the same way
    partial = dict(first, cells=first["cells"][:2], complete=False)
    (keys / "results.json").write_text(json.dumps(partial))
    assert _eval(*args) == 0
    again = json.loads((keys / "results.json").read_text())
    assert again["cells"][:2] == first["cells"][:2]
    for a, b in zip(again["cells"][2:], first["cells"][2:]):
        assert a["score"] == b["score"] and a["answer_logprob"] == pytest.approx(b["answer_logprob"], abs=1e-9)
    # other settings into the same folder: refused, nothing changed
    before = (keys / "results.json").read_text()
    capsys.readouterr()
    assert _eval("passkey", tiny_folder, "--lengths", "320", *data, "--out", keys) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "other settings (lengths" in err
    assert (keys / "results.json").read_text() == before

    second = tmp_path / "ppl2"
    assert _eval("ppl", tiny_folder, "--lengths", "256", "--documents", "1", *data, "--label", "other",
                 "--out", second) == 0
    assert _eval("ppl", "--compare", ppl, second, "--mark", "256", "--out", tmp_path / "cmp") == 0
    cmp = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [m["label"] for m in cmp["models"]] == ["tiny-model", "other"]
    assert (tmp_path / "cmp" / cmp["figure"]).stat().st_size > 1000
    assert _eval("ppl", "--compare", ppl, keys, "--out", tmp_path / "cmp2") == 2  # different suites
    assert _eval("ppl", "--compare", ppl, second, "--out", tmp_path / "ppl" / "results.json") == 2  # a file


@pytest.mark.parametrize("args, message", [
    (["passkey", "{model}", "--lengths", "4x"], "--lengths: '4x' is not a token count"),
    (["passkey", "{model}", "--depths", "0,2"], "depths [0.0, 2.0]: expected fractions"),
    (["ruler", "{model}", "--tasks", "niah_single,needle"], "tasks ['needle']: the ruler suite has"),
    (["passkey", "{tmp}/missing"], "model folder not found"),
    (["passkey", "{model}", "--lengths", "64"], "length 64: too short for task passkey"),
    (["ppl", "{model}", "--lengths", "4000000", "--held-out", "0"], "length 4000000: no document has that many tokens"),
    (["passkey", "{model}", "--set", "parallel.attention=sideways"], "parallel.attention='sideways'"),
    (["passkey", "{model}", "--sp", "2"], "--sp 2"),
    (["passkey"], "give a MODEL"),
    (["passkey", "{model}", "--lengths", "infk"], "--lengths: 'infk' is not a token count"),
    (["passkey", "{model}", "--lengths", "320", "--out", "{file}/sub"], "cannot write there"),
    (["passkey", "{model}", "--set", "parallel.sharding=deepspeed"], "evaluation runs unsharded or under fsdp2"),
])
def test_cli_bad_input_is_one_line_and_exit_2(args, message, tmp_path, tiny_folder, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    argv = [a.format(model=tiny_folder, tmp=tmp_path, file=tmp_path / "a-file") for a in args]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    assert _eval(*argv, "--set", "data.max_documents=4") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out" / "results.json").exists()


def test_cli_reads_a_training_checkpoint_as_its_export(tmp_path, capsys):
    run = build(schema.load(TINY, [f"run.dir={tmp_path / 'run'}", "train.max_steps=2"]))
    train(run)
    step = tmp_path / "run" / "checkpoints" / "step-2"
    assert main(["export", str(step), str(tmp_path / "export")]) == 0
    common = ["--lengths", "320", "--depths", "0.5", "--set", "data.max_documents=4"]
    assert _eval("passkey", step, *common, "--out", tmp_path / "a") == 0
    assert _eval("passkey", tmp_path / "export", *common, "--out", tmp_path / "b") == 0
    a, b = (json.loads((tmp_path / d / "results.json").read_text())["cells"] for d in "ab")
    assert a[0]["answer_logprob"] == pytest.approx(b[0]["answer_logprob"], abs=1e-6)


# --- eval.tasks in a training run ------------------------------------------------------------------------
EVAL_RUN = ["train.max_steps=2", "eval.tasks=[passkey,ppl,ruler]", "eval.lengths=[640]", "eval.depths=[0,1]",
            "data.eval_fraction=0.25", "data.max_documents=8"]


def test_eval_tasks_run_before_and_after_training_and_log(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = build(schema.load(TINY, [f"run.dir={tmp_path / 'run'}", *EVAL_RUN, "eval.tasks_every=1", "log.wandb=true"]))
    history = train(run)["history"]
    folder = tmp_path / "run" / "eval"
    assert sorted(p.name for p in folder.iterdir()) == ["compare", "step-0", "step-1", "step-2"]
    for step in ("step-0", "step-2"):
        for suite in ("passkey", "ppl", "ruler"):
            results = json.loads((folder / step / suite / "results.json").read_text())
            assert results["complete"] and results["figures"]
            assert all((folder / step / suite / f).is_file() for f in results["figures"])
    ruler = json.loads((folder / "step-2" / "ruler" / "results.json").read_text())["cells"]
    assert {c["task"] for c in ruler} == set(RULER_TASKS) and len(ruler) == 2 * len(RULER_TASKS)
    assert "eval_before/ppl/score" in history[0] and "eval/ppl/score@640" in history[-1]
    ppl_before, ppl_after = history[0]["eval_before/ppl/score"], history[-1]["eval/ppl/score"]
    assert ppl_after < ppl_before  # two steps at lr 3e-3 on the same text: the loss falls
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["eval/passkey/score"] == history[-1]["eval/passkey/score"]
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/files/media/images/eval/*"))  # figures in W&B


@pytest.mark.parametrize("overrides, message", [
    (["eval.tasks=[passkey]", "eval.depths=[1.5]"], "eval.depths=[1.5]"),
    (["eval.lengths=[1024]"], "eval.lengths=[1024]: has no effect without eval.tasks"),
    (["eval.tasks=[ppl]"], "set data.eval_fraction > 0"),
    (["eval.tasks=[passkey,passkey]"], "lists a task twice"),
    (["eval.tasks=[needle]"], "eval.tasks=['needle']: expected a list of one of"),
])
def test_eval_recipe_keys_are_checked(overrides, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        schema.load(TINY, overrides)


def test_eval_tasks_too_short_for_the_tokenizer_fail_before_the_run(tmp_path):
    with pytest.raises(RecipeError, match=r"eval.lengths=\[320\]: length 320: too short for task niah_multikey"):
        build(schema.load(TINY, [f"run.dir={tmp_path / 'run'}", "eval.tasks=[ruler]", "eval.lengths=[320]"]))
    assert not (tmp_path / "run").exists()


def _launch(nproc: int, *args, timeout: int = 600):
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "longctx", *args] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m", "longctx",
        *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_torchrun_eval_cli_and_training_evals_with_sp_equal_one_process(tmp_path, tiny_folder):
    """`longctx eval --sp 2` under torchrun (TokenRing), and eval.tasks in a training run at sp 2
    with MEMO: the one-process cells within 1e-5."""
    grid = ["--lengths", "512", "--depths", "0,1", "--samples", "2", "--set", "data.max_documents=4"]
    for name, nproc, extra in (("one", 1, []), ("sp2", 2, ["--sp", "2", "--set", "parallel.attention=token_ring"])):
        _launch(nproc, "eval", "passkey", str(tiny_folder), *grid, *extra, "--out", str(tmp_path / name))
    one, sp2 = (json.loads((tmp_path / n / "results.json").read_text())["cells"] for n in ("one", "sp2"))
    assert len(one) == len(sp2) == 2
    for a, b in zip(one, sp2):
        assert a["score"] == b["score"] and a["answer_logprob"] == pytest.approx(b["answer_logprob"], abs=1e-5)
    run = ["train", str(TINY), "log.wandb=false", "train.max_steps=2", "eval.tasks=[passkey,ppl]",
           "eval.lengths=[320]", "eval.depths=[0.5]", "data.eval_fraction=0.25", "data.max_documents=8"]
    _launch(1, *run, f"run.dir={tmp_path / 'run1'}")
    _launch(2, *run, f"run.dir={tmp_path / 'run2'}", "parallel.sp_degree=2", "parallel.attention=token_ring",
            "memory.policy=memo", "memory.alpha=0.5", "memory.resident_layers=0")
    for line in (0, -1):  # before training, after it
        one, two = [json.loads((tmp_path / r / "metrics.jsonl").read_text().splitlines()[line]) for r in ("run1", "run2")]
        keys = [k for k in one if k.startswith(("eval/", "eval_before/"))]
        assert len(keys) == 5 and all(k in two for k in keys)
        for k in keys:
            assert two[k] == pytest.approx(one[k], abs=1e-5), k


NATIVE_RUN = ["train.max_steps=2", "eval.tasks=[ppl]", "eval.lengths=[640]", "data.eval_fraction=0.25",
              "data.max_documents=8", "log.wandb=false"]


def test_native_rope_is_the_starting_weights_with_their_own_rope(tmp_path):
    """eval.native_rope evaluates the same weights with the model's config RoPE: what a run without
    the recipe's RoPE scaling gets at step 0, and not what the scaled one gets; all three on one
    figure; an eval folder of other settings is set aside, not mixed in; run.overwrite deletes eval/."""
    scaled = build(schema.load(TINY, [f"run.dir={tmp_path / 'a'}", *NATIVE_RUN, "model.rope.type=linear",
                                      "model.rope.factor=8", "eval.native_rope=true"]))
    history = train(scaled)["history"]
    plain = train(build(schema.load(TINY, [f"run.dir={tmp_path / 'b'}", *NATIVE_RUN])))["history"]
    native, before = history[0]["eval_native_rope/ppl/score"], history[0]["eval_before/ppl/score"]
    assert native == pytest.approx(plain[0]["eval_before/ppl/score"], abs=1e-6)
    assert abs(native - before) > 2e-5  # a random model barely uses positions: 50x the tolerance above
    cmp = json.loads((tmp_path / "a" / "eval" / "compare" / "ppl" / "compare.json").read_text())
    assert [m["label"] for m in cmp["models"]] == ["step 0, the model's own RoPE", "step 0, before training", "step 2"]
    assert scaled.model.config.rope.type == "linear"  # restored after the native pass

    # a folder of other settings at a step the run evaluates: renamed beside it
    tasks = evaluation.TrainingEvals(scaled)
    other = tmp_path / "a" / "eval" / "step-7" / "ppl"
    other.mkdir(parents=True)
    (other / "results.json").write_text(json.dumps({"settings": {"suite": "ppl", "lengths": [9]}, "cells": []}))
    numbers, _ = tasks(7)
    assert numbers["eval/ppl/score@640"] == pytest.approx(history[-1]["eval/ppl/score@640"], abs=1e-6)
    aside = list(other.parent.glob("ppl.replaced-*"))
    assert len(aside) == 1 and json.loads((aside[0] / "results.json").read_text())["settings"]["lengths"] == [9]

    train(build(schema.load(TINY, [f"run.dir={tmp_path / 'a'}", *NATIVE_RUN, "run.overwrite=true"])))
    assert sorted(p.name for p in (tmp_path / "a" / "eval").iterdir()) == ["compare", "step-0", "step-2"]
    cmp = json.loads((tmp_path / "a" / "eval" / "compare" / "ppl" / "compare.json").read_text())
    assert [m["label"] for m in cmp["models"]] == ["step 0, before training", "step 2"]  # the new run's own
