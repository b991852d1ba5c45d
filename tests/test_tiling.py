"""Sequence tiling in forward (issue 21, item 2): a wrapped block's work that runs without a graph
(the tokens MEMO recomputes, all of them under full recomputation) goes through the MLP in tiles
of `chunk_tokens` tokens, as its backward already does, so no [tokens, intermediate] transient of
the whole local sequence exists. Exact against the unwrapped model (fp32, values and gradients),
alone, with MEMO's host tier, and with the Cut Cross-Entropy loss."""

import pytest
import torch
from longctx.kernels.loss import linear_cross_entropy
from longctx.memory.offload import FULL_RECOMPUTE, LayerPolicy
from test_memory import assert_same, batch, run, tiny, wrapped
from torch.utils._python_dispatch import TorchDispatchMode

CHUNK = 17  # tokens per tile: divides nothing here (2 rows x 48 positions)


class _Widest(TorchDispatchMode):
    """The largest number of elements of any activation ([rows, tokens, ...]) an op outputs whose
    last dimension is `width`."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width, self.largest = width, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() >= 3 and t.shape[-1] == self.width:  # activations, not weights
                self.largest = max(self.largest, t.numel())
        return out


def _forward_widest(model, ids, labels) -> int:
    widest = _Widest(model.config.intermediate_size)
    with widest:
        loss = model(ids, labels=labels)
    loss.backward()
    return widest.largest


@pytest.mark.parametrize("policy", [FULL_RECOMPUTE, LayerPolicy(alpha=0.25, tier="host")], ids=["full", "memo-0.25"])
def test_forward_mlp_runs_in_tiles_and_stays_exact(policy):
    model = tiny()
    ids, labels = batch()
    B, S = ids.shape
    inter = model.config.intermediate_size
    want = run(model, ids, labels, steps=2)
    m, _ = wrapped(model, [policy] * model.config.num_layers, chunk_tokens=CHUNK)
    assert_same(want, run(m, ids, labels, steps=2))
    kept = round(policy.alpha * S)  # the kept tokens' graph is built whole: its tensors are saved anyway
    tile = max(1, CHUNK // B) * B  # _chunks: positions per tile x rows
    bound = max(kept * B, tile) * inter
    widest = _forward_widest(m, ids, labels)
    assert widest <= bound, f"a forward tensor of {widest} elements of width {inter}: tiles hold {bound}"
    assert _forward_widest(model, ids, labels) == B * S * inter  # the unwrapped model: whole sequence


def test_tiled_forward_with_cce_loss_matches():
    """The same with the loss the trainer uses (the chunked CCE path on CPU), summed."""
    def cce(h, w, y):
        return linear_cross_entropy(h, w, y, reduction="sum", impl="cce_torch")

    model = tiny()
    model.loss_fn = cce
    ids, labels = batch()
    want = run(model, ids, labels, steps=1)
    m, _ = wrapped(model, [LayerPolicy(alpha=0.5, tier="host")] * model.config.num_layers, chunk_tokens=CHUNK)
    assert_same(want, run(m, ids, labels, steps=1), tol=2e-6)


# --- block inputs kept in the compute dtype under autocast (issue 21, item 2) --------------------
def _grads(model, ids, labels, autocast):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(ids, labels=labels)
    loss.backward()
    return loss.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("policy", [FULL_RECOMPUTE, LayerPolicy(alpha=0.5, tier="host")], ids=["full", "memo-0.5"])
def test_recomputed_tokens_inputs_kept_in_bf16_under_autocast(policy):
    """Under bf16 autocast over fp32 weights the residual stream is fp32; the block input kept for
    recomputation is stored in bf16 (`input_dtype`), half the bytes. The projections see bf16
    casts of the normalised input anyway, so the gradients stay within twice the unwrapped autocast
    model's own error against fp32 (per tensor, relative Frobenius norm), and the kept bytes halve."""
    import dataclasses

    from longctx.memory.offload import HostPool

    model = tiny()
    ids, labels = batch()
    _, exact = _grads(model, ids, labels, autocast=False)
    plain_loss, plain = _grads(model, ids, labels, autocast=True)
    kept = {}
    for dtype in (None, torch.bfloat16):
        pool = HostPool("cpu")
        m, _ = wrapped(model, [dataclasses.replace(policy, input_dtype=dtype)] * model.config.num_layers, pool=pool,
                       chunk_tokens=CHUNK)
        loss, got = _grads(m, ids, labels, autocast=True)
        kept[dtype] = pool.last_step_bytes if policy.tier == "host" else None
    for name, g in got.items():
        ref = exact[name]
        err = ((g - ref).norm() / ref.norm()).item()
        plain_err = ((plain[name] - ref).norm() / ref.norm()).item()
        assert err <= 2 * plain_err + 1e-6, f"{name}: relative error {err:.3g}, unwrapped autocast {plain_err:.3g}"
    assert abs(loss.item() - plain_loss.item()) <= 1e-2
    if policy.tier == "host":  # x_b is half of what a dropped token keeps beside attention's output
        assert kept[torch.bfloat16] < kept[None], kept


def test_layer_policy_input_dtype_defaults_to_as_is():
    assert LayerPolicy().input_dtype is None and FULL_RECOMPUTE.input_dtype is None
