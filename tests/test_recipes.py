"""Recipe validation: every problem names its key path, value and what is allowed."""

from pathlib import Path

import pytest
from longctx.cli import main
from longctx.recipes import schema
from longctx.recipes.schema import RecipeError

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    recipe = schema.load(path)
    assert recipe.train.max_steps > 0


def test_user_recipes_are_shipped():
    names = {p.name for p in RECIPES}
    assert {"quickstart.yaml", "tiny.yaml", "llama3-8b-128k.yaml", "qwen2.5-7b-256k.yaml"} <= names


def _load(tmp_path, text, overrides=()):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return schema.load(path, list(overrides))


def test_misspelled_key_suggests_nearest(tmp_path):
    with pytest.raises(RecipeError, match=r"train\.max_step: unknown key; did you mean train\.max_steps\?"):
        _load(tmp_path, "train:\n  max_step: 3\n")
    with pytest.raises(RecipeError, match=r"trian: unknown key; did you mean train\?"):
        _load(tmp_path, "trian: {}\n")


def test_wrong_type_names_key_value_and_type(tmp_path):
    with pytest.raises(RecipeError, match=r"train\.lr='fast': expected float"):
        _load(tmp_path, "train:\n  lr: fast\n")
    with pytest.raises(RecipeError, match=r"run\.dtype='fp16': expected one of 'fp32', 'bf16'"):
        _load(tmp_path, "run:\n  dtype: fp16\n")
    with pytest.raises(RecipeError, match=r"log\.wandb=1: expected bool"):
        _load(tmp_path, "log:\n  wandb: 1\n")


def test_out_of_range_values(tmp_path):
    with pytest.raises(RecipeError, match=r"train\.max_steps=0: must be > 0"):
        _load(tmp_path, "train:\n  max_steps: 0\n")
    with pytest.raises(RecipeError, match=r"train\.min_lr_ratio=1\.5: must be <= 1\.0"):
        _load(tmp_path, "", ["train.min_lr_ratio=1.5"])


def test_impossible_combinations(tmp_path):
    with pytest.raises(RecipeError, match=r"train\.warmup_steps=10: must be <= train\.max_steps=5"):
        _load(tmp_path, "train:\n  max_steps: 5\n  warmup_steps: 10\n")
    with pytest.raises(RecipeError, match=r"train\.batch_size=5: must be a multiple of train\.grad_accum=2"):
        _load(tmp_path, "data:\n  batching: pack\ntrain:\n  batch_size: 5\n  grad_accum: 2\n")
    with pytest.raises(RecipeError, match=r"model\.rope\.factor=1\.0: rope type 'yarn' needs a factor > 1"):
        _load(tmp_path, "model:\n  rope:\n    type: yarn\n")
    with pytest.raises(RecipeError, match=r"eval\.every=5: needs data\.eval_fraction > 0"):
        _load(tmp_path, "eval:\n  every: 5\n")
    with pytest.raises(RecipeError, match=r"memory\.recompute_num_layers=4: segments are recomputed .*parallel\.sharding none only"):
        _load(tmp_path, "memory:\n  policy: full\n  recompute_num_layers: 4\nparallel:\n  sharding: fsdp2\n")


def test_decomposition_settings(tmp_path):
    with pytest.raises(RecipeError, match=r"data\.min_len=100: must be a power of two"):
        _load(tmp_path, "data:\n  min_len: 100\n")
    with pytest.raises(RecipeError, match=r"data\.tokens_per_step=3000: must be a multiple of data\.max_len=2048"):
        _load(tmp_path, "data:\n  tokens_per_step: 3000\n")
    with pytest.raises(RecipeError, match=r"data\.fixed_len: curriculum 'fixed' needs"):
        _load(tmp_path, "data:\n  curriculum: fixed\n")
    with pytest.raises(RecipeError, match=r"train\.grad_accum: only for rows of data\.seq_len"):
        _load(tmp_path, "train:\n  grad_accum: 2\n")
    with pytest.raises(RecipeError, match=r"data\.curriculum_weights\.300=1"):
        _load(tmp_path, "data:\n  curriculum: weights\n  curriculum_weights: {300: 1}\n")


def test_all_problems_reported_at_once(tmp_path):
    with pytest.raises(RecipeError) as info:
        _load(tmp_path, "train:\n  max_steps: -1\n  lrr: 1\n")
    assert "train.max_steps=-1" in str(info.value) and "train.lrr" in str(info.value)


def test_overrides_apply_and_are_typed(tmp_path):
    recipe = _load(tmp_path, "train:\n  max_steps: 5\n", ["train.max_steps=7", "model.rope.type=yarn",
                                                          "model.rope.factor=4", "run.name=x"])
    assert recipe.train.max_steps == 7 and recipe.model.rope.factor == 4.0 and recipe.run_dir == Path("runs/x")
    with pytest.raises(RecipeError, match="expected key.path=value"):
        _load(tmp_path, "", ["train.max_steps"])


def test_missing_recipe_file_is_named(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml not found" in capsys.readouterr().err


def test_readme_recipe_reference_is_in_sync(repo):
    readme = (repo / "README.md").read_text()
    start, end = "<!-- recipe-reference:start -->", "<!-- recipe-reference:end -->"
    block = readme.split(start)[1].split(end)[0].strip()
    assert block == schema.reference_markdown(), "regenerate with: longctx recipe reference"


def test_resolved_recipe_round_trips(tmp_path):
    recipe = schema.load(RECIPES[0])
    schema.save(recipe, tmp_path / "resolved.yaml")
    assert schema.load(tmp_path / "resolved.yaml") == recipe


@pytest.mark.parametrize("name", ["llama3-8b-128k", "qwen2.5-7b-256k"])
def test_shipped_recipes_train_at_the_length_in_their_name(repo, name, capsys):
    """`longctx plan --json` on each shipped hub recipe (offline: known shapes) plans the length its
    name promises, and it fits 8 x 80 GiB (exit 0); qwen2.5-7b-256k planned 2,048 tokens before."""
    import json
    import re

    from longctx.cli import main

    promised = int(re.search(r"(\d+)k$", name).group(1)) * 1024
    code = main(["plan", str(repo / "recipes" / f"{name}.yaml"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["seq_len"] == promised and report["fits"] and code == 0, report
    assert {"sp_degree", "peak_bytes_per_gpu", "longest_tokens"} <= report.keys()
    assert main(["plan", str(repo / "recipes" / f"{name}.yaml"), "--json", "--gpu-mem", "8GiB"]) == 1


def test_readme_export_example_names_the_checkpoint_the_quickstart_writes(repo):
    """The quickstart writes its final checkpoint at train.max_steps; the README's export line must
    name it (it named step-4 of a 3-step run)."""
    import re

    steps = schema.load(repo / "recipes" / "quickstart.yaml").train.max_steps
    named = re.findall(r"runs/quickstart/checkpoints/step-(\d+)", (repo / "README.md").read_text())
    assert named and all(int(n) == steps for n in named), (named, steps)


def test_sequence_parallel_keys_any_degree_and_hybrid(tmp_path):
    """Any sp degree; hybrid's sp_inner divides it; the machine keys replace the old link names."""
    r = _load(tmp_path, "parallel:\n  sp_degree: 6\n  attention: hybrid\n  sp_inner: 3\n  hybrid_outer: token_ring\n"
              "  link: nvswitch\n  inter_node_gbps: 200\n  attention_tflops: 400\n")
    p = r.parallel
    assert (p.sp_degree, p.sp_inner, p.hybrid_outer, p.link, p.inter_node_gbps, p.attention_tflops) == (
        6, 3, "token_ring", "nvswitch", 200.0, 400.0)
    d = schema.load(None).parallel
    assert (d.attention, d.sp_inner, d.hybrid_outer, d.link, d.inter_node_gbps, d.attention_tflops) == (
        "auto", "auto", "auto", "auto", 400.0, "auto")
    assert _load(tmp_path, "parallel:\n  sp_degree: 3\n  attention: allgather_kv\n").parallel.sp_degree == 3
    with pytest.raises(RecipeError, match=r"^parallel\.sp_inner=4: must divide parallel\.sp_degree=6 \(one of \[1, 2, 3, 6\]\)"):
        _load(tmp_path, "parallel:\n  sp_degree: 6\n  attention: hybrid\n  sp_inner: 4\n")
    with pytest.raises(RecipeError, match=r"^parallel\.sp_inner=2: has no effect with parallel\.attention='ulysses'"):
        _load(tmp_path, "parallel:\n  sp_degree: 4\n  attention: ulysses\n  sp_inner: 2\n")
    with pytest.raises(RecipeError, match=r"^parallel\.hybrid_outer='ring': has no effect with parallel\.attention='auto'"):
        _load(tmp_path, "parallel:\n  sp_degree: 4\n  hybrid_outer: ring\n")
    with pytest.raises(RecipeError, match=r"^parallel\.attention='hybrid': needs parallel\.sp_degree >= 2"):
        _load(tmp_path, "parallel:\n  attention: hybrid\n")
    with pytest.raises(RecipeError, match=r"^parallel\.link='infiniband': expected one of 'auto', 'cpu_gloo', 'nvswitch', "
                                          r"'nvlink_mesh', 'pcie' \(links between nodes are parallel\.inter_node_gbps now"):
        _load(tmp_path, "parallel:\n  link: infiniband\n")


def test_head_counts_are_checked_once_the_model_is_known(tmp_path):
    """hybrid's sp_inner and Ulysses' sp degrees must divide the query heads, known only once the
    model is: an error naming the key and what would do, before any step runs."""
    import torch
    from longctx.models.config import ModelConfig
    from longctx.parallel.mesh import Mesh
    from longctx.train.build import sequence_parallel_attention

    r = _load(tmp_path, "parallel:\n  sp_degree: 4\n  attention: hybrid\n  sp_inner: 4\n  attention_tflops: 1\n")
    mesh = Mesh(0, 4, 0, 1, None, torch.device("cpu"), sp_rank=0, sp_world=4)
    cfg = ModelConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_layers=1, num_heads=6, num_kv_heads=2)
    with pytest.raises(RecipeError, match=r"parallel\.sp_inner=4: must divide the model's query heads \(6\).*\[1, 2\]"):
        sequence_parallel_attention(r, mesh, cfg)
    ulysses = _load(tmp_path, "parallel:\n  sp_degree: 4\n  attention: ulysses\n")
    with pytest.raises(RecipeError, match=r"parallel\.attention='ulysses': shards the 6 query heads .*\[2, 4\]"):
        sequence_parallel_attention(ulysses, mesh, cfg)
