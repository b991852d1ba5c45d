"""Cut Cross-Entropy: torch path and Triton kernels against the naive reference, values and gradients."""

import pytest
import torch
from longctx.kernels.cce_torch import linear_cross_entropy as cce_torch
from longctx.kernels.loss import reference_linear_cross_entropy as reference
from longctx.kernels.loss import resolve_impl


def _inputs(N, V, D, dtype=torch.float32, ignored=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=g) * D**-0.5 * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < ignored] = -100
    return hidden, weight, labels


def _value_and_grads(fn, hidden, weight, labels, **kw):
    loss = fn(hidden, weight, labels, **kw)
    upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(7)) if loss.ndim else torch.tensor(1.3)
    dh, dw = torch.autograd.grad(loss, (hidden, weight), upstream)
    return loss, dh, dw


def _assert_fp32_close(got, want):
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-5, rtol=1e-5)


CASES = [  # N, V, D: none is a multiple of the chunk or block sizes
    (257, 1003, 64),
    (1000, 4099, 96),
]
OPTIONS = [
    dict(reduction="mean"),
    dict(reduction="sum", softcap=30.0),
    dict(reduction="none", z_loss=1e-3),
    dict(reduction="mean", softcap=15.0, z_loss=1e-4),
]


@pytest.mark.parametrize("shape", CASES)
@pytest.mark.parametrize("options", OPTIONS)
def test_torch_path_matches_reference_fp32(shape, options):
    hidden, weight, labels = _inputs(*shape)
    want = _value_and_grads(reference, hidden, weight, labels, **options)
    _assert_fp32_close(_value_and_grads(cce_torch, hidden, weight, labels, **options), want)
    # a tiny slab forces token and vocabulary chunking (two-pass online LSE)
    small = _value_and_grads(cce_torch, hidden, weight, labels, slab_elements=3000, min_token_chunk=7, **options)
    _assert_fp32_close(small, want)


@pytest.mark.slow
def test_torch_path_matches_reference_at_smollm2_vocab():
    hidden, weight, labels = _inputs(4096, 49152, 64)
    for options in (dict(reduction="mean"), dict(reduction="none", softcap=30.0, z_loss=1e-4)):
        _assert_fp32_close(_value_and_grads(cce_torch, hidden, weight, labels, **options),
                           _value_and_grads(reference, hidden, weight, labels, **options))


def _bf16_within_twice_reference_error(fn, shape, **options):
    hidden, weight, labels = _inputs(*shape, dtype=torch.bfloat16)
    exact_h = hidden.detach().float().requires_grad_()
    exact_w = weight.detach().float().requires_grad_()
    gold = _value_and_grads(reference, exact_h, exact_w, labels, **options)
    ref = _value_and_grads(reference, hidden, weight, labels, **options)
    got = _value_and_grads(fn, hidden, weight, labels, **options)
    for name, g, r, x in zip(("loss", "dhidden", "dweight"), got, ref, gold):
        assert g.dtype == r.dtype
        ref_err = (r.float() - x).abs().max().item()
        our_err = (g.float() - x).abs().max().item()
        assert our_err <= 2 * ref_err + 1e-6, f"{name}: {our_err} vs reference bf16 error {ref_err}"


@pytest.mark.parametrize("options", OPTIONS[:3])
def test_torch_path_bf16_within_twice_reference_error(options):
    _bf16_within_twice_reference_error(cce_torch, (517, 3001, 64), **options)


def test_ignored_tokens_get_zero_gradient_and_all_ignored_is_zero():
    hidden, weight, labels = _inputs(64, 101, 16)
    labels[:10] = -100
    loss, dh, _ = _value_and_grads(cce_torch, hidden, weight, labels, reduction="sum")
    assert torch.all(dh[:10] == 0)
    labels[:] = -100
    loss, dh, dw = _value_and_grads(cce_torch, hidden, weight, labels, reduction="mean")
    assert loss.item() == 0 and torch.all(dh == 0) and torch.all(dw == 0)


def test_dispatch_names_the_cpu_path():
    assert resolve_impl("cce", torch.device("cpu")) == "cce_torch"
    assert resolve_impl("reference", torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match="not one of"):
        resolve_impl("liger", torch.device("cpu"))


# --- Triton kernels under TRITON_INTERPRET=1 (set in conftest.py) ---------------------------------
triton = pytest.importorskip("triton")
BLOCKS = dict(block_n=32, block_v=64, block_d=32)  # big blocks, small grid: the interpreter is slow


def _triton(*args, **kw):
    from longctx.kernels.cce import linear_cross_entropy

    return linear_cross_entropy(*args, **kw, **BLOCKS)


@pytest.mark.parametrize("options", [dict(reduction="mean"), dict(reduction="none", softcap=20.0, z_loss=1e-3)])
def test_triton_matches_reference_fp32_exact(options):
    hidden, weight, labels = _inputs(97, 301, 40)
    _assert_fp32_close(_value_and_grads(_triton, hidden, weight, labels, filter_eps=None, **options),
                       _value_and_grads(reference, hidden, weight, labels, **options))


@pytest.mark.slow
@pytest.mark.parametrize("options", [dict(reduction="sum"), dict(reduction="mean", softcap=30.0)])
def test_triton_bf16_with_filtering_within_twice_reference_error(options):
    _bf16_within_twice_reference_error(lambda *a, **k: _triton(*a, filter_eps="auto", **k), (90, 257, 48), **options)


@pytest.mark.slow
def test_triton_filtering_skips_only_negligible_tiles():
    # Labels in a few columns and hidden states pointing at their label rows: a peaked softmax,
    # so most (token block, vocab block) tiles have every |dz| < eps and are skipped.
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(512, 32, generator=g).requires_grad_()
    labels = torch.randint(0, 64, (64,), generator=g)
    hidden = (2 * weight.detach()[labels] + 0.1 * torch.randn(64, 32, generator=g)).requires_grad_()
    exact = _value_and_grads(_triton, hidden, weight, labels, reduction="sum", filter_eps=None)
    filtered = _value_and_grads(_triton, hidden, weight, labels, reduction="sum", filter_eps=2.0**-12)
    want = _value_and_grads(reference, hidden, weight, labels, reduction="sum")
    _assert_fp32_close(exact, want)
    assert not torch.equal(filtered[2], exact[2]), "filtering skipped no tile"
    # each skipped entry of dz is below eps, so the error is bounded by eps * (rows summed) * |values|
    bound = 64 * 2.0**-12 * max(hidden.abs().max().item(), weight.abs().max().item())
    for f, w in zip(filtered, want):
        assert (f - w).abs().max().item() <= bound
