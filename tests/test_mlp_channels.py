"""memory.elimination.mlp_channels (issue 19: the LeMo artifact's MLP sparsity): forward is the dense
MLP bitwise; the input gradient equals the gradient of the MLP whose unchosen channels are
multiplied by 0 (fp32 1e-5; bf16 autocast within twice the dense MLP's own bf16 error); the chosen
channels are the largest by norm; in the LoRA model alone, with token elimination, and under
sequence parallelism (2 and 3 gloo ranks: the channels and gradients one process has); the saved
bytes shrink by the channels not kept; the recipe refuses trained MLP weights, recompute and ZeRO."""

import re
from pathlib import Path

import _dist
import pytest
import torch
import torch.nn.functional as F
from longctx.memory import elimination as el
from longctx.memory.accounting import SavedBytes
from longctx.parallel import mesh as mesh_lib
from longctx.recipes import schema
from longctx.recipes.schema import RecipeError
from longctx.train.build import build_model
from test_elimination import sp_step

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
CPU = torch.device("cpu")
LORA = ["model.adapter.type=lora", "model.adapter.rank=4", "model.adapter.targets=[q_proj,k_proj,v_proj,o_proj]"]
CHANNELS = ["memory.elimination.mlp_channels=0.25", *LORA]  # 32 of the tiny model's 128 channels
LENGTH = 96


def _model(*overrides, mesh=None):
    model, _, spa = build_model(schema.load(TINY, list(overrides)), mesh or mesh_lib.init(CPU))
    with torch.no_grad():  # LoRA's B starts at zero: give the adapters a gradient path of their own
        for n, p in model.named_parameters():
            if "lora_B" in n:
                value = torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1
                if hasattr(p, "device_mesh"):  # FSDP2's sharded DTensor
                    from torch.distributed.tensor import distribute_tensor
                    value = distribute_tensor(value, p.device_mesh, p.placements)
                p.copy_(value)
    return model, spa


def _batch(rows=2, length=LENGTH, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (rows, length), generator=g), torch.randint(0, 256, (rows, length), generator=g)


def _loss_and_grads(model, ids, labels, positions=None, seq_len=None):
    model.zero_grad()
    loss = model(ids, position_ids=positions, labels=labels, seq_len=seq_len)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _close(got, want, msg=""):
    """fp32 1e-5, relative to the largest entry (the tiny model's gradients are small)."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()), msg=msg)


def _frozen_mlp(seed=0):
    """A frozen MLP of the tiny LoRA model with O(1) weights (the init's are small)."""
    model, _ = _model(*LORA)
    mlp = model.model.layers[0].mlp
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape) / p.shape[1] ** 0.5)
    return mlp


# --- one MLP ----------------------------------------------------------------------------------------
def test_forward_is_dense_and_the_input_gradient_the_masked_reference():
    mlp = _frozen_mlp()
    x = torch.randn(2, 40, 64, requires_grad=True)
    dense_out = mlp(x)
    (dense_dx,) = torch.autograd.grad((dense_out * dense_out.detach()).sum(), x)
    wrapped = el.SavedChannelsMLP(mlp, 0.25, el.SequenceGroup())
    y = wrapped.forward(x)
    assert torch.equal(y, dense_out)  # the same ops in forward
    (dx,) = torch.autograd.grad((y * dense_out.detach()).sum(), x)
    idx = wrapped.last_channels
    assert idx.shape == (32,) and torch.equal(idx, idx.sort().values)
    with torch.no_grad():  # the largest ||silu(gate)[:, c]|| + ||up[:, c]|| over the 80 tokens
        a, u = F.silu(mlp.gate_proj(x)).reshape(80, -1), mlp.up_proj(x).reshape(80, -1)
        want = (a.norm(dim=0) + u.norm(dim=0)).topk(32).indices.sort().values
    assert torch.equal(idx, want)
    ref = el.reference_mlp_channels(mlp, x, idx)
    (ref_dx,) = torch.autograd.grad((ref * dense_out.detach()).sum(), x)
    _close(dx, ref_dx)
    assert (dx - dense_dx).norm() > 0.1 * dense_dx.norm()  # dropping channels changes the gradient
    full = el.SavedChannelsMLP(mlp, 1.0, el.SequenceGroup())  # every channel: the dense MLP itself
    (full_dx,) = torch.autograd.grad((full.forward(x) * dense_out.detach()).sum(), x)
    assert torch.equal(full_dx, dense_dx)


def test_bf16_autocast_error_is_within_twice_the_dense_mlps():
    """The trainer's regime: bf16 autocast over fp32 weights. The saved-channel gradient against its
    fp32 reference errs no more than twice what the dense MLP's bf16 gradient errs against fp32."""
    mlp = _frozen_mlp()
    x = torch.randn(1, 256, 64, requires_grad=True)
    w = torch.randn(1, 256, 64)
    wrapped = el.SavedChannelsMLP(mlp, 0.25, el.SequenceGroup())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = wrapped.forward(x)
        dense_bf16 = mlp(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, dense_bf16)
    (dx,) = torch.autograd.grad((y.float() * w).sum(), x)
    (dense_dx_bf16,) = torch.autograd.grad((dense_bf16.float() * w).sum(), x)
    (ref,) = torch.autograd.grad((el.reference_mlp_channels(mlp, x, wrapped.last_channels) * w).sum(), x)
    (dense_ref,) = torch.autograd.grad((mlp(x) * w).sum(), x)
    assert dx.dtype == torch.float32
    ours, dense = (dx - ref).abs().max(), (dense_dx_bf16 - dense_ref).abs().max()
    assert 0 < ours <= 2 * dense, (ours, dense)


# --- the model ----------------------------------------------------------------------------------------
def _reference(channels: dict, *overrides, kept: dict | None = None):
    """The same LoRA model with every MLP replaced by its masked reference on `channels[i]`, and with
    `kept`, the eliminating layers as elimination.reference_layer."""
    model, _ = _model(*LORA, *overrides)
    for i, block in enumerate(model.model.layers):
        block.mlp.forward = lambda h, mlp=block.mlp, i=i: el.reference_mlp_channels(mlp, h, channels[i])
        if kept and i in kept:
            block.forward = lambda x, cos, sin, block=block, i=i: el.reference_layer(block, x, cos, sin, kept[i])
    return model


ELIM = ["memory.elimination.keep_ratio=0.5", "memory.elimination.dense_layers=[]", "memory.elimination.block_tokens=8"]


@pytest.mark.parametrize("eliminating", [False, True], ids=["alone", "with token elimination"])
def test_lora_model_equals_the_masked_reference(eliminating):
    """Loss bitwise the model without mlp_channels (forward is exact); every trained gradient equals the
    model whose MLPs mask the same channels (fp32 1e-5); the MLP weights get none."""
    ids, labels = _batch()
    extra = ELIM if eliminating else []
    model, _ = _model(*CHANNELS, *extra)
    assert len(model.mlp_channels) == 2
    got = _loss_and_grads(model, ids, labels)
    plain = _loss_and_grads(_model(*LORA, *extra)[0], ids, labels)
    assert torch.equal(got[0], plain[0])
    channels = {i: m.last_channels for i, m in enumerate(model.mlp_channels)}
    kept = {lay.index: lay.last_kept for lay in model.elimination} if eliminating else None
    want = _loss_and_grads(_reference(channels, *extra, kept=kept), ids, labels)
    assert set(got[1]) == set(want[1]) and not any("mlp" in n for n in got[1])
    _close(got[0], want[0])
    for n, g in want[1].items():
        _close(got[1][n], g, n)
    assert any((got[1][n] - g).norm() > 1e-3 * g.norm() for n, g in plain[1].items())


def test_eval_and_no_grad_run_the_dense_mlp():
    model, _ = _model(*CHANNELS)
    ids, labels = _batch()
    model.eval()
    with torch.no_grad():
        model(ids, labels=labels)
    model.train()
    with torch.no_grad():
        model(ids, labels=labels)
    assert all(m.last_channels is None for m in model.mlp_channels)


def test_saved_bytes_shrink_by_the_channels_not_kept():
    """bf16 autocast, no recompute, intermediate 96 (not 2 x hidden): per token, a frozen exact MLP
    saves gate, silu(gate) and up (3 x 96 bf16 values; its projections' inputs are not needed without
    weight gradients), the saved-channel MLP gate and up of its 24 channels; measured as the slope
    between 128 and 256 tokens. The casts autocast makes of the frozen weights (which the exact MLP's
    matmuls keep, once per layer) are counted apart, not as activations."""
    per_layer, copies = {}, {}
    for name, overrides in (("dense", LORA), ("channels", CHANNELS)):
        for tokens in (128, 256):
            model, _ = _model("run.dtype=bf16", "model.config.intermediate_size=96", *overrides)
            ids = torch.randint(0, 256, (1, tokens), generator=torch.Generator().manual_seed(0))
            with SavedBytes(model, list(model.model.layers)) as saved, torch.autocast("cpu", dtype=torch.bfloat16):
                model(ids, labels=ids).backward()
            per_layer[name, tokens] = saved.bytes[("layers.0", "device")]
            copies[name, tokens] = saved.weight_copy_bytes
    slope = {name: (per_layer[name, 256] - per_layer[name, 128]) / 128 for name in ("dense", "channels")}
    assert slope["dense"] - slope["channels"] == (3 * 96 - 2 * 24) * 2
    assert per_layer["channels", 128] - 128 * slope["channels"] == 24 * 8 + per_layer["dense", 128] - 128 * slope["dense"]
    # the exact MLP's three weight casts in both layers (64 x 96 bf16 each) beside the attention's
    assert copies["dense", 128] - copies["channels", 128] == 2 * 3 * 64 * 96 * 2
    assert copies["dense", 128] == copies["dense", 256]


# --- sequence parallelism -------------------------------------------------------------------------------
def _sp_configs(world):
    configs = [["parallel.attention=token_ring"], ["parallel.attention=ring", *ELIM]]
    if world == 2:  # and FSDP2 over the sp ranks: the MLP reads its unsharded weights in forward and backward
        configs += [["parallel.attention=ulysses"], ["parallel.attention=bidir_kv", "parallel.sharding=fsdp2"]]
    return configs


def _sp_worker(rank, world):
    ids, labels = _batch(rows=1)
    out = []
    for overrides in _sp_configs(world):
        mesh = mesh_lib.init(CPU, "gloo", 120, world)
        model, spa = _model(f"parallel.sp_degree={world}", *CHANNELS, *overrides, mesh=mesh)
        loss, grads, kept = sp_step(model, spa, ids, labels, rank, world, LENGTH, _loss_and_grads,
                                    fsdp2="parallel.sharding=fsdp2" in overrides)
        out.append((loss, grads, [m.last_channels for m in model.mlp_channels], kept))
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_sequence_parallel_equals_one_process(world):
    """The channels are chosen from the whole sequence's norms (one all-reduce): every rank picks the
    channels one process picks, and the summed loss and gradients equal one process's (fp32 1e-5).
    With token elimination (whose blocks sp chooses per zigzag chunk) they equal the masked reference
    of the kept blocks and the channels every rank agreed on."""
    ids, labels = _batch(rows=1)
    per_rank = _dist.run(_sp_worker, world)
    for c, overrides in enumerate(_sp_configs(world)):
        channels = per_rank[0][c][2]
        assert all(torch.equal(a, b) for r in per_rank for a, b in zip(r[c][2], channels)), overrides
        if any("keep_ratio" in o for o in overrides):
            kept = {i: torch.cat([r[c][3][i] for r in per_rank], dim=1).sort(dim=1).values for i in per_rank[0][c][3]}
            loss, grads = _loss_and_grads(_reference(dict(enumerate(channels)), *ELIM, kept=kept), ids, labels)
        else:
            model, _ = _model(*CHANNELS)
            loss, grads = _loss_and_grads(model, ids, labels)
            assert all(torch.equal(a, b.last_channels) for a, b in zip(channels, model.mlp_channels)), overrides
        for r in per_rank:
            _close(r[c][0], loss, str(overrides))
            for n, g in grads.items():
                _close(r[c][1][n], g, f"{overrides}: {n}")


# --- the recipe ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (["memory.elimination.mlp_channels=0"], "memory.elimination.mlp_channels=0: must be > 0.0"),
    (["memory.elimination.mlp_channels=0.2"], "memory.elimination.mlp_channels=0.2: the MLP's input gradient flows "
                                               "through the saved channels only, so its weights must be frozen"),
    (["memory.elimination.mlp_channels=0.2", "model.adapter.type=lora"],
     "model.adapter.targets lists gate_proj, up_proj, down_proj: the MLP weights must be frozen"),
    ([*CHANNELS, "memory.policy=full"], "memory.elimination.mlp_channels=0.25: needs memory.policy none"),
    ([*CHANNELS, "memory.policy=memo"], "memory.elimination.mlp_channels=0.25: needs memory.policy none"),
    ([*CHANNELS, "memory.recompute_num_layers=2"], "needs memory.recompute_num_layers 1"),
    ([*CHANNELS, "parallel.sharding=deepspeed"], "not with parallel.sharding deepspeed"),
])
def test_recipe_keys_are_checked(overrides, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        schema.load(TINY, overrides)


def test_cli_refuses_with_exit_2_and_one_line(tmp_path, capsys):
    from longctx.cli import main

    assert main(["train", str(TINY), f"run.dir={tmp_path / 'run'}", "memory.elimination.mlp_channels=0.2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "memory.elimination.mlp_channels=0.2" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "run").exists()


def test_plan_counts_the_saved_channels(capsys):
    """longctx plan: with 0.25 of the channels the 2 layers' activations drop by 2 bytes x 128 x (4 - 0.5)
    a token: the plan counts an exact MLP's gate, silu, up and product (bf16; full fine-tuning's
    tensors: it does not model a frozen MLP's smaller set yet), and gate and up of a quarter of the
    channels, the measured saved-channel MLP (test above)."""
    import json

    from longctx.cli import main

    acts = {}
    for name, overrides in (("dense", LORA), ("channels", CHANNELS)):
        assert main(["plan", str(TINY), "run.dtype=bf16", *overrides, "--gpus", "1", "--json",
                     "--seq-len", "65536"]) in (0, 1)
        acts[name] = json.loads(capsys.readouterr().out)["terms_bytes"]["activations"]
    assert acts["dense"] - acts["channels"] == pytest.approx(65536 * 2 * 2 * 128 * (4 - 2 * 0.25), rel=1e-6)
