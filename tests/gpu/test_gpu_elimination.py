"""LeMo token elimination on CUDA (issue 19): the compiled Triton block score against the dense
reference at a trainer-sized block (64 tokens, head_dim 64, bf16 projections), and a model whose
layers eliminate under bf16 autocast with full recompute, against the dense model that masks the
same blocks (fp32 weights; values and gradients)."""

import pytest
import torch
from longctx.memory import elimination as el
from longctx.parallel import mesh as mesh_lib
from longctx.recipes import schema
from longctx.train.build import build_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CONFIG = ("model.path=null model.tokenizer=bytes model.config.family=llama model.config.vocab_size=32000 "
          "model.config.hidden_size=256 model.config.intermediate_size=512 model.config.num_layers=4 "
          "model.config.num_heads=4 model.config.num_kv_heads=2 model.config.max_position_embeddings=8192").split()
ELIM = ["memory.elimination.keep_ratio=0.4", "memory.elimination.dense_layers=[0]"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_block_score_equals_the_reference(dtype):
    assert el.score_impl(torch.device("cuda"), 64) == "triton"
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 4000, 8, 64, device="cuda", generator=g).to(dtype)
    k = torch.randn(1, 4000, 2, 64, device="cuda", generator=g).to(dtype)
    want = el.block_scores_reference(q, k, 64)
    torch.testing.assert_close(el.block_scores(q, k, 64), want, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(el.block_scores(q, k, 64, impl="torch"), want, rtol=1e-4, atol=1e-3)


def _model(*overrides):
    recipe = schema.load(None, [*CONFIG, "run.device=cuda", "log.wandb=false", *overrides])
    model, _, _ = build_model(recipe, mesh_lib.init(torch.device("cuda")))
    return model


def _reference(kept):
    ref = _model()
    for i, block in enumerate(ref.model.layers):
        if i in kept:
            block.forward = (lambda x, cos, sin, block=block, idx=kept[i]: el.reference_layer(block, x, cos, sin, idx))
    return ref


def _assert_grads_aligned(model, ref):
    """bf16 attention (flash) against the reference's bf16 einsum softmax: close, not equal."""
    for (name, p), (_, r) in zip(model.named_parameters(), ref.named_parameters()):
        cos = torch.nn.functional.cosine_similarity(p.grad.flatten().float(), r.grad.flatten().float(), dim=0)
        assert cos > 0.99, name


def test_eliminated_model_on_cuda_fp32_equals_the_masked_reference():
    """fp32, no autocast, no recompute: loss and gradients within 1e-4 of the masked dense model."""
    ids = torch.randint(0, 32000, (2, 1024), device="cuda", generator=torch.Generator(device="cuda").manual_seed(2))
    labels = ids.roll(-1, 1)
    model = _model(*ELIM, "run.dtype=fp32")
    loss = model(ids, labels=labels)
    loss.backward()
    kept = {lay.index: lay.last_kept for lay in model.elimination}
    ref = _reference(kept)
    want = ref(ids, labels=labels)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-4)
    for (name, p), (_, r) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_eliminated_model_on_cuda_equals_the_masked_reference():
    ids = torch.randint(0, 32000, (1, 2048), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    labels = ids.roll(-1, 1)
    model = _model(*ELIM, "memory.policy=full")
    model.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(ids, labels=labels)
    loss.backward()
    kept = {lay.index: lay.last_kept for lay in model.elimination}
    assert set(kept) == {1, 2, 3} and all(v.shape[1] == round(0.4 * 32) * 64 for v in kept.values())
    ref = _reference(kept)
    ref.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = ref(ids, labels=labels)
    want.backward()
    # bf16 attention (flash) against the reference's bf16 einsum softmax: close, not equal
    assert loss.item() == pytest.approx(want.item(), rel=2e-3)
    _assert_grads_aligned(model, ref)


def test_predictor_source_on_cuda_equals_the_masked_reference(tmp_path):
    """memory.elimination.source: predictor on CUDA under bf16 autocast: the predicted scores are fp32
    (autocast off) and select what the same predictors select on the CPU from the same layer input,
    and the model equals the masked dense model (fp32 weights, values and gradients)."""
    from longctx.memory.predictors import BlockPredictor, Predictors, PredictorShape

    shape = PredictorShape(hidden=256, block_tokens=64)
    torch.manual_seed(0)
    Predictors(shape, {i: BlockPredictor(shape) for i in (1, 2, 3)}).save(tmp_path)
    ids = torch.randint(0, 32000, (1, 2048), device="cuda", generator=torch.Generator(device="cuda").manual_seed(3))
    labels = ids.roll(-1, 1)
    model = _model(*ELIM, "run.dtype=fp32", "memory.elimination.source=predictor",
                   f"memory.elimination.predictors={tmp_path}")
    inputs = {}
    for i, block in enumerate(model.model.layers):
        block.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0].detach()))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(ids, labels=labels)
    loss.backward()
    kept = {lay.index: lay.last_kept for lay in model.elimination}
    cpu = Predictors.load(tmp_path)
    for i, idx in kept.items():
        block = model.model.layers[i]
        h = block.input_layernorm(inputs[i]).float().cpu()
        want = el.select(cpu.layers[i].scores(h), 2048, 1, 0.4, 64)
        assert torch.equal(idx.cpu(), want), f"layer {i}"
    ref = _reference(kept)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = ref(ids, labels=labels)
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=2e-3)
    _assert_grads_aligned(model, ref)


def test_mlp_channels_on_cuda_bf16_match_the_masked_reference():
    """memory.elimination.mlp_channels 0.2 with token elimination, LoRA on q/k/v/o, bf16 autocast on
    CUDA (the artifact's regime): the loss equals the model with exact MLPs (forward is exact), and the
    adapters' gradients point where the masked reference's do (cosine > 0.99, as the bf16 tests above)."""
    lora = ["model.adapter.type=lora", "model.adapter.rank=8", "model.adapter.targets=[q_proj,k_proj,v_proj,o_proj]"]
    ids = torch.randint(0, 32000, (1, 2048), device="cuda", generator=torch.Generator(device="cuda").manual_seed(3))
    labels = ids.roll(-1, 1)

    def run(model):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(7)) * 0.05)
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=labels)
        loss.backward()
        return loss.detach(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}

    model = _model(*ELIM, *lora, "memory.elimination.mlp_channels=0.2")
    loss, grads = run(model)
    channels = {i: m.last_channels for i, m in enumerate(model.mlp_channels)}
    assert all(c.shape == (round(0.2 * 512),) for c in channels.values())
    plain_loss, plain = run(_model(*ELIM, *lora))
    assert torch.equal(loss, plain_loss)
    kept = {lay.index: lay.last_kept for lay in model.elimination}
    ref = _model(*lora)
    for i, block in enumerate(ref.model.layers):
        block.mlp.forward = lambda h, mlp=block.mlp, i=i: el.reference_mlp_channels(mlp, h, channels[i])
        if i in kept:
            block.forward = lambda x, cos, sin, block=block, i=i: el.reference_layer(block, x, cos, sin, kept[i])
    want_loss, want = run(ref)
    assert loss.item() == pytest.approx(want_loss.item(), rel=2e-3)
    for n, g in want.items():
        cos = torch.nn.functional.cosine_similarity(grads[n].flatten(), g.flatten(), dim=0)
        assert cos > 0.99, (n, cos.item())
    # not vacuous: the exact MLP's gradients are further from the reference than the saved channels' are
    err = sum((grads[n] - g).norm() ** 2 for n, g in want.items()) ** 0.5
    err_exact = sum((plain[n] - g).norm() ** 2 for n, g in want.items()) ** 0.5
    assert err < 0.5 * err_exact, (err.item(), err_exact.item())
