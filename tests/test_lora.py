"""LoRA through peft on our own CausalLM (train/adapter.py): what trains, that the adapted model
equals the base model with peft's merged delta weights (values and gradients), that the merged
export loads in transformers and the adapter-only folder in peft's PeftModel with our logits, and
the recipe's model.adapter checks."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from longctx.cli import main
from longctx.kernels.attention import local_attention
from longctx.kernels.loss import linear_cross_entropy
from longctx.models.config import ModelConfig
from longctx.models.hf import save_folder
from longctx.models.llama import CausalLM
from longctx.parallel import vocab
from longctx.recipes import schema
from longctx.train import adapter
from longctx.train.adapter import LoraSpec

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _config(tied: bool, family: str = "llama", **extra) -> ModelConfig:
    return ModelConfig(family=family, vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                       num_kv_heads=2, max_position_embeddings=256, tie_word_embeddings=tied, **extra)


def _model(cfg: ModelConfig, seed: int = 0) -> CausalLM:
    model = CausalLM(cfg, local_attention, partial(linear_cross_entropy, reduction="sum", impl="reference"))
    model.init_weights(seed)
    return model


def _lora(cfg: ModelConfig, spec: LoraSpec, seed: int = 0) -> CausalLM:
    """A LoRA'd model whose B is not zero and whose trainable base weights moved (as after training)."""
    model = _model(cfg, seed)
    adapter.apply_lora(model, spec, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def _ids(cfg: ModelConfig, n: int = 24, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("trainable", [("embed", "norm"), ("norm",), ()])
@pytest.mark.parametrize("tied", [True, False])
def test_only_adapters_and_the_named_base_weights_train(tied, trainable):
    cfg = _config(tied)
    model = _lora(cfg, LoraSpec(rank=4, alpha=8.0, trainable=trainable))
    ids = _ids(cfg)
    model(ids, labels=ids.roll(-1, 1)).backward()
    graded = {n for n, p in model.named_parameters() if p.grad is not None}
    wanted = {n for n, p in model.named_parameters() if ".lora_" in n}
    assert len(wanted) == 2 * len(TARGETS) * cfg.num_layers  # A and B on every target of every block
    if "embed" in trainable:
        wanted.add("model.embed_tokens.weight")
    if "norm" in trainable:
        wanted |= {n for n in dict(model.named_parameters()) if n.endswith("norm.weight")}
    assert graded == wanted
    assert {n for n, p in model.named_parameters() if p.requires_grad} == wanted
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in wanted)  # every one reached
    assert "lm_head.weight" not in graded  # an untied head stays frozen (LongLoRA)


def test_values_and_gradients_equal_the_merged_delta_weights():
    """Our LoRA'd model's loss and gradients (of the input and of B) equal a plain model whose
    projections are W + delta, delta from peft's get_delta_weight (the merge export uses)."""
    cfg = _config(tied=False)
    spec = LoraSpec(rank=4, alpha=8.0, trainable=())
    lora = _lora(cfg, spec)
    ref = _model(cfg)
    with torch.no_grad():
        for name, module in lora.named_modules():
            if hasattr(module, "get_delta_weight"):
                base = ref.get_submodule(name)
                base.weight.copy_(module.base_layer.weight + module.get_delta_weight(adapter.ADAPTER_NAME))
    ids = _ids(cfg)
    labels = ids.roll(-1, 1)
    x_lora = lora.model.embed_tokens(ids).detach().requires_grad_()
    x_ref = x_lora.detach().clone().requires_grad_()
    cos, sin = lora.rope_cos_sin(torch.arange(ids.shape[1]).expand_as(ids), x_lora.dtype)
    out_lora, out_ref = lora.run_layers(x_lora, cos, sin), ref.run_layers(x_ref, cos, sin)
    torch.testing.assert_close(out_lora, out_ref, atol=2e-6, rtol=1e-5)
    loss = lora(ids, labels=labels)
    torch.testing.assert_close(loss, ref(ids, labels=labels), atol=1e-4, rtol=1e-6)
    grad_out = torch.randn(out_lora.shape, generator=torch.Generator().manual_seed(4))
    out_lora.backward(grad_out)
    out_ref.backward(grad_out)
    # W x + s B (A x) and (W + s B A) x round differently in fp32: a few ulps of gradients near 0.03
    torch.testing.assert_close(x_lora.grad, x_ref.grad, atol=5e-6, rtol=1e-5)
    # dL/dB = scale * dL/dW @ A^T: B's gradient is the merged weight's, through A
    for name, module in lora.named_modules():
        if hasattr(module, "get_delta_weight"):
            A = module.lora_A[adapter.ADAPTER_NAME].weight
            expected = ref.get_submodule(name).weight.grad @ A.T * module.scaling[adapter.ADAPTER_NAME]
            torch.testing.assert_close(module.lora_B[adapter.ADAPTER_NAME].weight.grad, expected, atol=1e-6, rtol=1e-4)


def test_lora_init_is_the_base_model_and_depends_on_the_seed_only():
    cfg = _config(tied=True)
    base = _model(cfg)
    ids = _ids(cfg)
    a = _model(cfg)
    torch.manual_seed(123)  # what the process drew before must not matter (every rank the same A)
    adapter.apply_lora(a, LoraSpec(rank=4, alpha=8.0), seed=5)
    b = _model(cfg)
    adapter.apply_lora(b, LoraSpec(rank=4, alpha=8.0), seed=5)
    with torch.no_grad():
        torch.testing.assert_close(a.logits(ids), base.logits(ids), atol=0, rtol=0)  # B = 0
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    c = _model(cfg)
    adapter.apply_lora(c, LoraSpec(rank=4, alpha=8.0), seed=6)
    assert not torch.equal(c.model.layers[0].self_attn.q_proj.lora_A["default"].weight,
                           a.model.layers[0].self_attn.q_proj.lora_A["default"].weight)


def test_merged_state_dict_has_plain_names_and_our_logits():
    cfg = _config(tied=True, family="qwen3")
    spec = LoraSpec(rank=4, alpha=16.0)
    lora = _lora(cfg, spec)
    state = {k: v.clone() for k, v in lora.state_dict().items()}
    merged_state = adapter.merged_state_dict(cfg, state, spec)
    plain = _model(cfg)
    assert set(merged_state) == set(plain.state_dict())
    plain.load_state_dict(merged_state)
    ids = _ids(cfg)
    with torch.no_grad():
        torch.testing.assert_close(plain.logits(ids), lora.logits(ids), atol=2e-5, rtol=1e-5)


def test_vocab_shards_keep_a_frozen_embedding_frozen():
    """vocab.shard_model makes new Parameters for the shards: a LoRA run that does not train the
    embedding must not start training it there."""
    cfg = _config(tied=False)
    model = _model(cfg)
    adapter.apply_lora(model, LoraSpec(rank=4, alpha=8.0, trainable=("norm",)), seed=0)
    vp = vocab.VocabParallel(vocab.VocabShard.of(cfg.vocab_size, None), "gather", cfg.hidden_size)
    params = vocab.shard_model(model, vp, vocab.loss_fn(vp))
    assert [p.requires_grad for p in params] == [False, False]
    model = _model(cfg)
    adapter.apply_lora(model, LoraSpec(rank=4, alpha=8.0, trainable=("embed",)), seed=0)
    params = vocab.shard_model(model, vp, vocab.loss_fn(vp))
    assert [p.requires_grad for p in params] == [True, False]  # the embedding trains, the untied head not


def _transformers_model(folder_or_cfg, state=None):
    from transformers import AutoConfig, AutoModelForCausalLM

    if state is None:
        return AutoModelForCausalLM.from_pretrained(folder_or_cfg, dtype=torch.float32).eval()
    hf = folder_or_cfg.to_hf()
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(hf.pop("model_type"), **hf), dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model.eval()


@pytest.mark.parametrize("tied", [True, False])
def test_merged_folder_and_adapter_folder_load_in_transformers_with_our_logits(tmp_path, tied):
    from peft import PeftModel
    from safetensors.torch import load_file

    cfg = _config(tied)
    spec = LoraSpec(rank=4, alpha=8.0, base_model="base/folder")
    base_state = {k: v.clone() for k, v in _model(cfg).state_dict().items()}
    lora = _lora(cfg, spec)
    ids = _ids(cfg, 40)
    with torch.no_grad():
        ours = lora.logits(ids)
        base_logits = _model(cfg).logits(ids)
    state = {k: v.clone() for k, v in lora.state_dict().items()}
    # merged: an HF folder transformers loads
    plain = _model(cfg)
    save_folder(plain, tmp_path / "merged", state=adapter.merged_state_dict(cfg, dict(state), spec))
    with torch.no_grad():
        merged_logits = _transformers_model(tmp_path / "merged")(ids).logits
    assert (merged_logits - ours).abs().max().item() <= 2e-5
    assert (base_logits - ours).abs().max().item() > 1e-2  # the adapter changed something
    # adapter only: PeftModel on transformers' base model
    out = adapter.save_adapter_folder(cfg, state, spec, tmp_path / "adapter")
    assert {p.name for p in out.iterdir()} >= set(adapter.ADAPTER_FILES)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and set(config["target_modules"]) == set(TARGETS)
    assert config["base_model_name_or_path"] == "base/folder"
    keys = set(load_file(out / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.weight" in keys and "base_model.model.model.norm.weight" in keys
    assert not any("base_layer" in k for k in keys)  # the frozen base is not in it
    peft_model = PeftModel.from_pretrained(_transformers_model(cfg, base_state), out).eval()
    with torch.no_grad():
        theirs = peft_model(ids).logits
    assert (theirs - ours).abs().max().item() <= 2e-5


# --- end to end through `longctx train` / `longctx export` in this process ---------------------------
def test_recipe_lora_run_checkpoint_exports_merged_by_default_and_adapter_only(tmp_path, capsys):
    from longctx.train.build import build
    from longctx.train.trainer import train

    run = build(schema.load(TINY, [f"run.dir={tmp_path / 'run'}", "train.max_steps=2", "model.adapter.rank=4",
                                   "train.export=true"]))
    assert run.describe["trainable_params"] < run.describe["params"] / 2
    history = train(run)["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    step = tmp_path / "run" / "checkpoints" / "step-2"
    assert json.loads((step / "trainer_state.json").read_text())["adapter"]["rank"] == 4
    ids = torch.randint(0, 256, (1, 50), generator=torch.Generator().manual_seed(0))
    run.model.eval()
    with torch.no_grad():
        ours = run.model.logits(ids)
    assert main(["export", str(step), str(tmp_path / "merged")]) == 0
    with torch.no_grad():
        for folder in (tmp_path / "merged", tmp_path / "run" / "export"):  # the CLI's and train.export's
            assert (_transformers_model(folder)(ids).logits - ours).abs().max().item() <= 1e-5, folder
    assert main(["export", str(step), str(tmp_path / "adapter"), "--adapter-only"]) == 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    # a LoRA checkpoint as model.path (evaluation, further training): its adapters merged
    again = build(schema.load(TINY, [f"run.dir={tmp_path / 'again'}", f"model.path={step}", "model.tokenizer=bytes",
                                     "~model.config"]))
    with torch.no_grad():
        assert (again.model.logits(ids) - ours).abs().max().item() <= 1e-5
    # --adapter-only of a full fine-tuning run: one line, exit 2
    full = build(schema.load(TINY, [f"run.dir={tmp_path / 'full'}", "train.max_steps=1", "train.warmup_steps=0"]))
    train(full)
    capsys.readouterr()
    assert main(["export", str(tmp_path / "full" / "checkpoints" / "step-1"), str(tmp_path / "x"),
                 "--adapter-only"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--adapter-only needs a LoRA run's checkpoint" in err[0], err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("overrides, expected", [
    (["model.adapter.rank=0"], "model.adapter.rank=0: must be > 0"),
    (["model.adapter.targets=[q_proj,lm_head]"], "lm_head cannot take an adapter: the loss head"),
    (["model.adapter.targets=[q_prj]"], "'q_prj' is not a projection of the model (did you mean q_proj?)"),
    (["model.adapter.targets=[]"], "model.adapter.targets=[]: names no projection"),
    (["model.adapter.trainable=[head]"], "model.adapter.trainable=['head']: expected a list of one of 'embed', 'norm'"),
    (["model.adapter.type=dora"], "model.adapter.type='dora': expected one of 'lora'"),
    (["model.adapter=5"], "model.adapter=5: expected null or a mapping"),
    (["model.adapter.rnk=3"], "model.adapter.rnk: unknown key; did you mean model.adapter.rank?"),
    (["model.adapter.dropout=0.1", "memory.policy=memo"], "model.adapter.dropout=0.1: memory.policy 'memo' recomputes"),
])
def test_bad_adapter_keys_exit_2_with_one_line(tmp_path, capsys, overrides, expected):
    code = main(["train", str(TINY), f"run.dir={tmp_path / 'run'}", "log.wandb=false", *overrides])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("longctx: error:")]
    assert code == 2 and len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "run").exists()


def test_recipe_adapter_defaults_and_resolved_recipe_round_trip(tmp_path):
    r = schema.load(TINY, ["model.adapter.type=lora"])
    a = r.model.adapter
    assert (a.rank, a.alpha, a.dropout, tuple(a.targets), tuple(a.trainable)) == (16, None, 0.0, TARGETS,
                                                                                 ("embed", "norm"))
    assert schema.load(TINY).model.adapter is None
    assert schema.load(TINY, ["model.adapter.rank=4", "model.adapter=null"]).model.adapter is None
    from longctx.train.build import lora_spec

    assert lora_spec(r, None).alpha == 32.0  # null alpha = 2 x rank
    schema.save(r, tmp_path / "recipe.yaml")  # what a run writes: every key, the adapter's included
    assert schema.load(tmp_path / "recipe.yaml").model.adapter == a


def test_resume_with_another_adapter_exits_2_naming_both(tmp_path, capsys):
    base = ["train", str(TINY), f"run.dir={tmp_path / 'run'}", "log.wandb=false", "train.max_steps=1",
            "train.warmup_steps=0"]
    assert main([*base, "model.adapter.rank=4"]) == 0
    capsys.readouterr()
    for changed, says in ((["model.adapter.rank=8"], "this recipe trains lora rank 8"),
                          ([], "this recipe trains full fine-tuning (model.adapter null)")):
        assert main([*base, "train.max_steps=2", "train.resume=auto", *changed]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("longctx: error:")]
        assert len(err) == 1 and "written by a run with lora rank 4 alpha 8" in err[0] and says in err[0], err


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("trainable", [("embed", "norm"), ("norm",), ()])
@pytest.mark.parametrize("tied", [True, False])
def test_plan_counts_what_a_lora_run_holds(tied, trainable, family):
    """`longctx plan` with model.adapter: the memory model's parameter, gradient and AdamW terms are
    the bytes a LoRA model holds after a step with the trainer's optimizer (all weights and the
    adapters; gradients and m, v of the trained ones only), where it used to count full fine-tuning's."""
    from longctx.memory.estimate import Setting, estimate, offloaded_host_bytes, param_tensors, trained_elements
    from longctx.train.build import model_shape
    from longctx.train.optim import build_optimizer

    cfg = _config(tied, family)
    targets = ("q_proj", "v_proj", "down_proj")
    model = _model(cfg)
    adapter.apply_lora(model, LoraSpec(rank=4, alpha=8.0, targets=targets, trainable=trainable), 0)
    opt = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 1e-8)
    model(_ids(cfg), labels=_ids(cfg, seed=4)).backward()
    opt.step()
    shape = model_shape(cfg)
    e = estimate(shape, Setting(seq_len=64, autocast=False, policy="full", gpus_per_node=1, runtime_bytes=0.0,
                                adapter=(4, targets, trainable)))
    params = [p for p in model.parameters()]
    trained = [p for p in params if p.requires_grad]
    assert all(p.grad is not None for p in trained) and all(p.grad is None for p in params if not p.requires_grad)
    assert e.terms["params"] == 4 * sum(p.numel() for p in params)
    assert e.terms["grads"] == 4 * sum(p.grad.numel() for p in trained)
    states = [t for st in opt.state.values() for k, t in st.items() if k in ("exp_avg", "exp_avg_sq")]
    assert e.terms["optimizer"] == sum(t.numel() * t.element_size() for t in states)
    assert trained_elements(shape, (4, targets, trainable)) == (sum(p.numel() for p in trained),
                                                                 sum(p.numel() for p in params))
    # tensor by tensor (what FSDP2's CPU offload pins): the same sizes, trained or not, as the model's
    tensors = param_tensors(shape, (4, targets, trainable))
    assert sorted(tensors) == sorted((p.numel(), p.requires_grad) for p in params)
    assert offloaded_host_bytes(shape, 1, 1, adapter=(4, targets, trainable)) < offloaded_host_bytes(shape, 1, 1)
    full = estimate(shape, Setting(seq_len=64, autocast=False, policy="full", gpus_per_node=1, runtime_bytes=0.0))
    assert full.terms["optimizer"] == 8 * shape.params() > e.terms["optimizer"]


def test_plan_command_reports_a_lora_recipe(tmp_path, capsys):
    """The plan of a recipe with model.adapter names what trains, and its optimizer term is LoRA's."""
    overrides = ["model.adapter.rank=8"]
    assert main(["plan", str(TINY), *overrides, "--gpus", "1", "--gpu-mem", "80GiB", "--json"]) == 0
    lora = json.loads(capsys.readouterr().out)
    assert main(["plan", str(TINY), "--gpus", "1", "--gpu-mem", "80GiB", "--json"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert lora["adapter"] and full["adapter"] is None
    assert lora["trained_params"] < full["trained_params"] == full["model_params"]
    assert lora["terms_bytes"]["optimizer"] < full["terms_bytes"]["optimizer"]
    assert lora["terms_bytes"]["params"] > full["terms_bytes"]["params"]  # the adapters' A and B
    assert main(["plan", str(TINY), *overrides, "--gpus", "1", "--gpu-mem", "80GiB"]) == 0
    assert "LoRA rank 8 on" in capsys.readouterr().out


@pytest.mark.parametrize("memory", [[], ["memory.policy=memo", "memory.alpha=0.5", "memory.resident_layers=0",
                                         "memory.recompute_chunk_tokens=16"]], ids=["alone", "memo"])
def test_lora_composes_with_token_elimination(memory):
    """memory.elimination (LeMo) with model.adapter: at the start (B = 0) the adapted model keeps
    the base model's blocks and gives its loss; each B's gradient is scale x dL/dW @ A^T of the
    eliminated base model (the adapters see the kept tokens only), fp32 1e-5; frozen weights get none."""
    from longctx.parallel import mesh as mesh_lib
    from longctx.train.build import build_model

    elim = ["memory.elimination.keep_ratio=0.5", "memory.elimination.dense_layers=[]",
            "memory.elimination.block_tokens=8", *memory]
    mesh = mesh_lib.init(torch.device("cpu"))
    base = build_model(schema.load(TINY, elim), mesh)[0]
    lora = build_model(schema.load(TINY, [*elim, "model.adapter.rank=4", "model.adapter.trainable=[]"]), mesh)[0]
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (2, 100), generator=g)
    labels = torch.randint(0, 256, (2, 100), generator=g)
    losses = [m(ids, labels=labels) for m in (base, lora)]
    for loss in losses:
        loss.backward()
    assert losses[0].item() == losses[1].item()
    kept = [[layer.last_kept for layer in m.elimination] for m in (base, lora)]
    assert all(torch.equal(a, b) for a, b in zip(*kept)) and kept[0][0].shape[1] < 100  # tokens were eliminated
    checked = 0
    for name, module in lora.named_modules():
        if hasattr(module, "get_delta_weight"):
            A = module.lora_A[adapter.ADAPTER_NAME].weight
            expected = base.get_submodule(name.replace(".base_layer", "")).weight.grad @ A.T
            got = module.lora_B[adapter.ADAPTER_NAME].weight.grad
            torch.testing.assert_close(got, expected * module.scaling[adapter.ADAPTER_NAME], atol=1e-5, rtol=1e-5)
            checked += 1
    assert checked == 7 * lora.config.num_layers
    assert all(p.grad is None for n, p in lora.named_parameters() if ".lora_" not in n)
