"""Every user-fixable mistake exits 2 with one line naming the key, file or value and what is
allowed, never a traceback, and leaves what was in the run folder as it was (issue 16, item 6)."""

import shutil
from pathlib import Path

import pytest
from longctx.cli import main

TINY = str(Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bad")
    (root / "bad.yaml").write_text("run: [1, 2\n")
    (root / "list.yaml").write_text("- run\n- model\n")
    (root / "empty.jsonl").write_text("")
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("mine")
    (root / "model.bin").write_bytes(b"x")
    (root / "fake.gguf").write_bytes(b"NOTG" + b"\0" * 32)
    (root / "not_a_checkpoint").mkdir()
    # a finished run with a checkpoint, to export from and to collide with
    assert main(["train", TINY, f"run.dir={root / 'done'}", "train.max_steps=1", "train.warmup_steps=0",
                 "log.wandb=false"]) == 0
    ckpt = root / "done" / "checkpoints" / "step-1"
    for name, change in {"index": "index", "config": "config", "noweights": "noweights"}.items():
        folder = root / f"model_{name}"
        shutil.copytree(ckpt, folder, ignore=shutil.ignore_patterns("dcp", "rng", "*.json"))
        (folder / "config.json").write_text((ckpt / "config.json").read_text())
    (root / "model_index" / "model.safetensors.index.json").write_text("{not json")
    import yaml

    recipe = yaml.safe_load(Path(TINY).read_text())
    del recipe["model"]["config"]  # a model folder instead of a config
    (root / "folder.yaml").write_text(yaml.safe_dump(recipe))
    resolved = yaml.safe_load((root / "done" / "recipe.yaml").read_text())  # every key set, as the run saved it
    resolved["train"]["batch_size"] = 16
    (root / "resolved_edit.yaml").write_text(yaml.safe_dump(resolved))
    (root / "model_config" / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    return {"root": root, "ckpt": ckpt}


def _cases():
    run = ["run.dir={root}/run", "log.wandb=false"]
    train = ["train", TINY, *run]
    folder = ["train", "{root}/folder.yaml", *run]
    return [
        # recipe files and overrides
        (["train", "{root}/missing.yaml"], "missing.yaml not found"),
        (["train", "{root}/bad.yaml"], "not valid YAML"),
        (["train", "{root}/list.yaml"], "expected a mapping of sections"),
        ([*train, "train.lr"], "expected key.path=value"),
        ([*train, "train.lrr=1e-3"], "train.lrr"),
        ([*train, "train.lr=fast"], "train.lr"),
        ([*train, "train.lr=-1"], "train.lr"),
        ([*train, "train.warmup_steps=100"], "train.warmup_steps=100"),
        ([*train, "memory.alpha=2"], "memory.alpha"),
        ([*train, "memory.policy=sometimes"], "memory.policy"),
        ([*train, "data.batching=stream"], "data.batching"),
        ([*train, "parallel.attention=star"], "parallel.attention"),
        ([*train, "parallel.attention_kernel=bogus"], "parallel.attention_kernel"),
        ([*train, "parallel.sp_degree=4", "parallel.attention=hybrid", "parallel.sp_inner=3"],
         "parallel.sp_inner=3: must divide parallel.sp_degree=4"),
        ([*train, "parallel.sp_inner=0"], "parallel.sp_inner=0: must be >= 1"),
        ([*train, "parallel.attention=ring", "parallel.sp_inner=2"],
         "parallel.sp_inner=2: has no effect with parallel.attention='ring'"),
        ([*train, "parallel.hybrid_outer=ring"], "parallel.hybrid_outer='ring': has no effect with parallel.attention='auto'"),
        ([*train, "parallel.attention=hybrid"], "parallel.attention='hybrid': needs parallel.sp_degree >= 2"),
        ([*train, "parallel.sp_degree=2", "parallel.attention=hybrid", "parallel.hybrid_outer=ulysses"],
         "parallel.hybrid_outer='ulysses': expected one of 'auto', 'token_ring'"),
        ([*train, "parallel.link=nvlink"], "parallel.link='nvlink': expected one of 'auto', 'cpu_gloo', 'nvswitch'"),
        ([*train, "parallel.attention_tflops=0"], "parallel.attention_tflops=0: must be > 0"),
        ([*train, "parallel.inter_node_gbps=fast"], "parallel.inter_node_gbps='fast': expected float"),
        ([*train, "loss.impl=liger"], "loss.impl"),
        ([*train, "loss.filter_eps=-1"], "loss.filter_eps"),
        ([*train, "loss.filter_eps=sometimes"], "loss.filter_eps"),
        ([*train, "data.tokens_per_step=100"], "data.tokens_per_step=100"),
        # keys that would be silently ignored in the chosen mode
        ([*train, "data.seq_len=4096"], "data.seq_len=4096: has no effect with data.batching=decompose"),
        ([*train, "train.batch_size=8"], "train.batch_size=8: has no effect with data.batching=decompose"),
        ([*train, "data.seq_len=2048"], "data.seq_len=2048: has no effect with data.batching=decompose"),
        (["train", "{root}/resolved_edit.yaml", *run], "train.batch_size=16: has no effect"),
        ([*train, "data.batching=pack", "~data.min_len", "~data.max_len"],
         "data.tokens_per_step=512: has no effect with data.batching=pack"),
        ([*train, "model.rope.factor=4"], "model.rope.factor=4.0: has no effect with model.rope.type='keep'"),
        ([*train, "~train.nothing"], "the recipe file sets no train.nothing"),
        # the launch: world size, device, kernels
        ([*train, "parallel.sp_degree=2"], "parallel.sp_degree=2"),
        ([*train, "run.device=cuda"], "run.device='cuda'"),
        ([*train, "parallel.attention_kernel=aten_flash"], "runs on CUDA only"),
        # model folders
        ([*folder, "model.path={root}/nowhere"], "nowhere: model folder not found"),
        ([*folder, "model.path={root}/model_index"], "not a safetensors index"),
        ([*folder, "model.path={root}/model_config"], "config.json"),
        ([*folder, "model.path={root}/model_noweights"], "no model.safetensors"),
        # data
        ([*train, "data.source={root}/absent.jsonl"], "absent.jsonl"),
        ([*train, "data.source={root}/empty.jsonl"], "empty.jsonl"),
        # checkpoints and run folders
        ([*train, "train.resume={root}/absent_ckpt"], "train.resume"),
        ([*train, "train.resume={root}/not_a_checkpoint"], "not_a_checkpoint"),
        ([*train, "train.resume={ckpt}", "model.config.hidden_size=128"], "do not match this checkpoint"),
        (["train", TINY, "run.dir={root}/done", "log.wandb=false"], "holds an earlier run"),
        # export and convert targets
        (["export", "{root}/absent_ckpt", "{root}/out"], "checkpoint folder not found"),
        (["export", "{ckpt}", "{root}/model.bin"], "is not a folder"),
        (["export", "{ckpt}", "{root}/notes"], "exists and is not empty"),
        (["export", "{ckpt}", "{root}/done", "--force"], "would change or delete"),
        (["convert", "gguf", "{root}/fake.gguf", "{root}/out"], "not a GGUF file"),
        (["convert", "gguf", "{root}/absent.gguf", "{root}/out"], "GGUF file not found"),
        # plan
        (["plan", TINY, "--gpus", "0"], "--gpus=0"),
        (["plan", TINY, "--gpu-mem", "lots"], "--gpu-mem"),
    ]


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


CASES = _cases()


@pytest.mark.parametrize("argv, expected", CASES, ids=[f"{i:02d}" for i in range(len(CASES))])
def test_bad_input_exits_2_with_one_line(files, capsys, argv, expected):
    root = files["root"]
    argv = [a.format(root=root, ckpt=files["ckpt"]) for a in argv]
    expected = expected.format(root=root)
    before = _snapshot(root)
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("longctx: error:")]
    assert code == 2 and len(lines) == 1, err[-2000:]
    assert "Traceback" not in err and expected in lines[0], err[-2000:]
    after = _snapshot(root)
    assert {k: v for k, v in after.items() if k in before} == before, "a file that was there changed"
    added = sorted(set(after) - set(before))
    assert not added, f"a failed command wrote {added}"


def test_the_table_is_at_least_thirty_mistakes():
    assert len(CASES) >= 30
