"""Evaluation on CUDA (issue 22): the scorer under bf16 autocast with the recipe's memory policies,
against full fp32 logits of the same model, and scoring a long sequence without N x V logits (its
peak device memory stays far below what the logits alone would take)."""

import pytest
import torch
from longctx.parallel import mesh as mesh_lib
from longctx.recipes import schema
from longctx.train import evaluation
from longctx.train.build import build_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CONFIG = ("model.path=null model.tokenizer=bytes model.config.family=llama model.config.vocab_size=32000 "
          "model.config.hidden_size=256 model.config.intermediate_size=512 model.config.num_layers=4 "
          "model.config.num_heads=4 model.config.num_kv_heads=2 model.config.max_position_embeddings=8192").split()


@pytest.mark.parametrize("policy", ["none", "full"])
def test_scorer_under_bf16_autocast_matches_fp32_logits(policy):
    recipe = schema.load(None, [*CONFIG, "run.device=cuda", f"memory.policy={policy}", "log.wandb=false"])
    mesh = mesh_lib.init(torch.device("cuda"))
    model, _, _ = build_model(recipe, mesh)
    model.eval()
    ids = torch.randint(0, 32000, (2048,), generator=torch.Generator().manual_seed(0))
    scorer = evaluation.scorer_for(model, mesh, None, 0, torch.bfloat16)
    logp, hit = scorer.targets(ids, 0)
    with torch.no_grad():
        ref = torch.log_softmax(model.logits(ids[None].cuda())[0].double(), -1)
    ref_logp = ref[:-1].gather(1, ids[1:, None].cuda()).squeeze(1)
    # bf16 attention and projections against fp32: per-token log p within a few hundredths
    assert (logp - ref_logp).abs().mean().item() < 0.02
    assert (logp - ref_logp).abs().max().item() < 0.2
    assert hit.double().mean().item() == pytest.approx((ref[:-1].argmax(-1) == ids[1:].cuda()).double().mean().item(),
                                                       abs=0.02)


def test_long_sequence_is_scored_without_its_logits():
    recipe = schema.load(None, [*CONFIG, "run.device=cuda", "memory.policy=full", "log.wandb=false"])
    mesh = mesh_lib.init(torch.device("cuda"))
    model, _, _ = build_model(recipe, mesh)
    ids = torch.randint(0, 32000, (32768,), generator=torch.Generator().manual_seed(1))
    scorer = evaluation.scorer_for(model, mesh, None, 0, torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    logp, _ = scorer.targets(ids, 0)
    peak = torch.cuda.max_memory_allocated() - base
    logits_bytes = 32768 * 32000 * 4
    assert torch.isfinite(logp).all()
    assert peak < logits_bytes / 4, (peak, logits_bytes)
