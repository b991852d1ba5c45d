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
