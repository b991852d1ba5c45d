"""LoRA (train/adapter.py, peft) on `cuda`: the adapted model's gradients equal the merged
weights' under bf16 autocast with the CUDA attention kernel, and a LoRA run of the tiny recipe
with MEMO trains only what it should. LoRA adds no CUDA branch of its own; this checks that
peft's modules compose with the CUDA paths (autocast, the block kernels, MEMO's swap, the
Triton CCE) as they do on CPU (tests/test_lora.py, tests/test_lora_train.py).

peft is not in the GPU machine's image: bench/gpu_wheels.sh carries it (with accelerate and
psutil); without it these tests skip and say so."""

import json
import math
import random
from functools import partial
from pathlib import Path

import _gpu
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml"
WORDS = "a long book read token by token while the adapter learns what the frozen model misses".split()


@pytest.fixture(autouse=True)
def _clean():
    pytest.importorskip("peft", reason="peft absent: bash bench/gpu_wheels.sh carries it")
    yield
    _gpu.release_cuda_memory()


def _pair(cfg, spec):
    """A LoRA'd model with moved adapters and its merged twin (W + peft's delta), both on cuda."""
    from longctx.kernels.attention import local_attention
    from longctx.kernels.loss import linear_cross_entropy
    from longctx.models.llama import CausalLM
    from longctx.train import adapter

    def make():
        model = CausalLM(cfg, local_attention, partial(linear_cross_entropy, reduction="sum", impl="cce_triton"))
        model.init_weights(0)
        return model

    lora, ref = make(), make()
    adapter.apply_lora(lora, spec, 0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        for name, module in lora.named_modules():
            if hasattr(module, "get_delta_weight"):
                ref.get_submodule(name).weight.copy_(module.base_layer.weight
                                                     + module.get_delta_weight(adapter.ADAPTER_NAME))
    return lora.cuda(), ref.cuda()


def test_lora_gradients_equal_the_merged_weights_under_bf16_autocast_on_cuda():
    """Loss and the input's gradient of the LoRA'd model equal the merged model's, and each B's
    gradient is scale x dL/dW @ A^T, in the trainer's regime (bf16 autocast, sum reduction, the
    Triton CCE, the CUDA attention kernel). Tolerances: bf16 rounding of W x + s B A x against
    (W + s B A) x, relative to the gradients' scale."""
    from longctx.models.config import ModelConfig
    from longctx.train import adapter
    from longctx.train.adapter import LoraSpec

    cfg = ModelConfig(family="llama", vocab_size=1024, hidden_size=256, intermediate_size=512, num_layers=2,
                      num_heads=4, num_kv_heads=2, max_position_embeddings=4096, tie_word_embeddings=False)
    lora, ref = _pair(cfg, LoraSpec(rank=8, alpha=16.0, trainable=()))
    ids = torch.randint(0, cfg.vocab_size, (2, 1024), generator=torch.Generator().manual_seed(3)).cuda()
    labels = ids.roll(-1, 1)
    losses = []
    for model in (lora, ref):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=labels)
        loss.backward()
        losses.append(loss.float())
    torch.testing.assert_close(losses[0], losses[1], rtol=2e-3, atol=0)
    for name, module in lora.named_modules():
        if hasattr(module, "get_delta_weight"):
            A = module.lora_A[adapter.ADAPTER_NAME].weight
            expected = ref.get_submodule(name).weight.grad @ A.T * module.scaling[adapter.ADAPTER_NAME]
            got = module.lora_B[adapter.ADAPTER_NAME].weight.grad
            err = (got - expected).norm() / expected.norm()
            assert err < 3e-2, f"{name}: B's gradient off by {err:.2e} (relative norm)"
    for p in lora.parameters():
        assert (p.grad is not None) == p.requires_grad


def test_lora_recipe_trains_on_cuda_with_memo(tmp_path, monkeypatch):
    """The tiny recipe with model.adapter on cuda, bf16, MEMO (alpha 0.5, host tier): finite losses;
    the first equals full fine-tuning's first (B starts at zero, so the model starts as the base);
    the frozen weights did not move and the adapters did."""
    from longctx.recipes import schema
    from longctx.train.build import build
    from longctx.train.trainer import train

    rng = random.Random(0)
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(800))}) + "\n"
                            for _ in range(12)))
    _gpu.read_jsonl_without_datasets(monkeypatch)

    def run(name, *extra):
        recipe = schema.load(TINY, [f"run.dir={tmp_path / name}", "run.device=cuda", "run.threads=0", "run.dtype=bf16",
                                    f"data.source={path}", "data.max_documents=null", "data.cache=false",
                                    "train.max_steps=3", "train.warmup_steps=0", "log.wandb=false",
                                    "memory.policy=memo", "memory.alpha=0.5", "memory.resident_layers=0", *extra])
        r = build(recipe)
        before = {k: v.detach().clone() for k, v in r.model.state_dict().items()}
        return r, before, train(r)["history"]

    lora_run, before, history = run("lora", "model.adapter.rank=4")
    _, _, full = run("full")
    losses = [h["loss"] for h in history]
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[0] == pytest.approx(full[0]["loss"], rel=1e-2)
    after = lora_run.model.state_dict()
    moved = {k for k, v in after.items() if not torch.equal(v, before[k])}
    assert any(".lora_B." in k for k in moved)
    frozen = [k for k in after if ".base_layer." in k]
    assert frozen and not moved.intersection(frozen)
