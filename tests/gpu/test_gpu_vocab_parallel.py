"""Vocabulary parallelism's CUDA branch (issue 20): the CCE Triton kernels run one vocabulary shard
at a time (kernels/cce.py shard_lse_target / shard_grads), the shards' statistics merged by
log-add-exp as parallel/vocab.py merges them across ranks. Three uneven shards of a Llama-3-sized
vocabulary on one GPU against the whole-vocabulary reference head, values and gradients, fp32 and
bf16 (the trainer's autocast dtype), with z-loss and labels of other shards."""

import pytest
import torch
from longctx.kernels import cce
from longctx.kernels.loss import reference_linear_cross_entropy
from longctx.parallel import vocab

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_shard_kernels_merged_equal_the_whole_vocabulary(dtype, tol):
    V, D, N, P, z_loss = 128256, 512, 4096, 3, 1e-4
    g = torch.Generator(device="cuda").manual_seed(0)
    h = (torch.randn(N, D, device="cuda", generator=g)).to(dtype)
    w = (torch.randn(V, D, device="cuda", generator=g) * 0.05).to(dtype)
    y = torch.randint(0, V, (N,), device="cuda", generator=g)
    hr, wr = h.float().requires_grad_(), w.float().requires_grad_()
    ref = reference_linear_cross_entropy(hr, wr, y, reduction="sum", z_loss=z_loss)
    ref.backward()
    lse = torch.full((N,), float("-inf"), device="cuda")
    target = torch.zeros(N, device="cuda")
    for r in range(P):
        a, b = vocab.bounds(V, P, r)
        part_lse, part_target = cce.shard_lse_target(h, w[a:b], y - a)
        lse, target = torch.logaddexp(lse, part_lse), target + part_target
    loss = (lse - target + z_loss * lse * lse).sum()
    assert abs(loss.item() - ref.item()) <= tol * abs(ref.item())
    ones = torch.ones(N, device="cuda")
    dh = torch.zeros(N, D, device="cuda")
    dw = torch.zeros(V, D, device="cuda")
    for r in range(P):
        a, b = vocab.bounds(V, P, r)
        dh += cce.shard_grads(h, w[a:b], y - a, lse, ones, z_loss, None, dw[a:b], filter_eps=None)
    torch.testing.assert_close(dh, hr.grad, rtol=tol, atol=tol * hr.grad.abs().max().item())
    torch.testing.assert_close(dw, wr.grad, rtol=tol, atol=tol * wr.grad.abs().max().item())


def test_filtering_on_a_shard_uses_the_global_softmax():
    """bf16 with CCE's default filtering (2^-12): the shard's gradients stay within bf16 tolerance
    of the unfiltered ones (filtering against a shard-local softmax would not)."""
    V, D, N = 65536, 256, 2048
    g = torch.Generator(device="cuda").manual_seed(1)
    h = torch.randn(N, D, device="cuda", generator=g).bfloat16()
    w = (torch.randn(V, D, device="cuda", generator=g) * 0.05).bfloat16()
    y = torch.randint(0, V, (N,), device="cuda", generator=g)
    lse = torch.logaddexp(cce.shard_lse_target(h, w[:V // 2], y)[0], cce.shard_lse_target(h, w[V // 2:], y - V // 2)[0])
    ones = torch.ones(N, device="cuda")
    out = []
    for eps in (None, "auto"):
        dw = torch.zeros(V // 2, D, device="cuda")
        dh = cce.shard_grads(h, w[V // 2:], y - V // 2, lse, ones, 0.0, None, dw, filter_eps=eps)
        out.append((dh, dw))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=2e-2, atol=2e-2 * out[0][0].abs().max().item())
    torch.testing.assert_close(out[1][1], out[0][1], rtol=2e-2, atol=2e-2 * out[0][1].abs().max().item())
