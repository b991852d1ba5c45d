"""Cut Cross-Entropy: torch path and Triton kernels against the naive reference, values and gradients."""

import os

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
    if os.environ.get("TRITON_INTERPRET") != "1":  # a CUDA machine: tests/gpu runs the real kernels
        pytest.skip("the Triton interpreter tests run where TRITON_INTERPRET=1 (CPU machines)")
    from longctx.kernels.cce import linear_cross_entropy

    return linear_cross_entropy(*args, **kw, **BLOCKS)


@pytest.mark.parametrize("options", [dict(reduction="mean"), dict(reduction="none", softcap=20.0, z_loss=1e-3)])
def test_triton_matches_reference_fp32_exact(options):
    hidden, weight, labels = _inputs(97, 301, 40)
    _assert_fp32_close(_value_and_grads(_triton, hidden, weight, labels, filter_eps=None, **options),
                       _value_and_grads(reference, hidden, weight, labels, **options))


@pytest.mark.parametrize("options", [dict(reduction="sum"), dict(reduction="mean", softcap=30.0)])
def test_triton_bf16_with_filtering_within_twice_reference_error(options):
    _bf16_within_twice_reference_error(lambda *a, **k: _triton(*a, filter_eps="auto", **k), (90, 257, 48), **options)


def _trainer_step_grads(fn, hidden, weight, labels, n_global, **kw):
    """The trainer's step: reduction='sum', divided by the global count of valid tokens, then backward."""
    loss = fn(hidden, weight, labels, reduction="sum", **kw) / n_global
    return torch.autograd.grad(loss, (hidden, weight))


@pytest.mark.parametrize("n_global", [8192, 65536])
@pytest.mark.parametrize("filter_eps", ["auto", "off", None])
@pytest.mark.parametrize("options", [dict(), dict(softcap=30.0, z_loss=1e-4)])
def test_triton_bf16_in_the_trainer_regime(options, filter_eps, n_global):
    # The upstream gradient is 1/n_global (<= 2^-13): filtering must look at the unscaled
    # softmax - onehot, else every tile, the target's too, falls under eps and nothing flows back.
    hidden, weight, labels = _inputs(96, 283, 48, dtype=torch.bfloat16)
    exact_h = hidden.detach().float().requires_grad_()
    exact_w = weight.detach().float().requires_grad_()
    gold = _trainer_step_grads(reference, exact_h, exact_w, labels, n_global, **options)
    naive = _trainer_step_grads(reference, hidden, weight, labels, n_global, **options)
    got = _trainer_step_grads(_triton, hidden, weight, labels, n_global, filter_eps=filter_eps, **options)
    for name, g, r, x in zip(("dhidden", "dweight"), got, naive, gold):
        assert g.dtype == torch.bfloat16
        err, ref_err = (g.float() - x).abs(), (r.float() - x).abs()
        relative = (err.norm() / x.norm()).item()
        assert relative < 0.02, f"{name}: relative error {relative:.3g} (all zero: {not g.any().item()})"
        assert err.max().item() <= 2 * ref_err.max().item(), (
            f"{name}: max error {err.max().item():.3g} vs naive bf16 error {ref_err.max().item():.3g}")


@pytest.mark.parametrize("n_global", [1, 8192])
def test_triton_filtering_skips_only_negligible_tiles(n_global):
    # Labels in a few columns and hidden states pointing at their label rows: a peaked softmax,
    # so many (token block, vocab block) tiles have every |softmax - onehot| < eps and are skipped.
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(512, 32, generator=g).requires_grad_()
    labels = torch.randint(0, 64, (64,), generator=g)
    hidden = (weight.detach()[labels] + 0.1 * torch.randn(64, 32, generator=g)).requires_grad_()
    eps = 2.0**-12
    exact = _trainer_step_grads(_triton, hidden, weight, labels, n_global, filter_eps="off")
    filtered = _trainer_step_grads(_triton, hidden, weight, labels, n_global, filter_eps=eps)
    gold = _trainer_step_grads(reference, hidden.detach().double().requires_grad_(),
                               weight.detach().double().requires_grad_(), labels, n_global)
    # Not fp32-tight: LSE (~60 here) is saved in fp32, so every softmax entry p is off by up to
    # p * lse_err; dH[t] moves by at most lse_err/n_global * max_v |W[v]|, dW[v] by lse_err/n_global * sum_t |H[t]|.
    lse_err = torch.finfo(torch.float32).eps * (hidden @ weight.T).abs().max().item()
    for e, x, bound in zip(exact, gold, (weight.detach().abs().amax(0), hidden.detach().abs().sum(0))):
        assert torch.all((e - x).abs() <= 2 * lse_err / n_global * bound)
    assert not torch.equal(filtered[1], exact[1]), "filtering skipped no tile"
    # A skipped entry of dz is below eps / n_global, so dH[t] moves by at most eps/n_global * sum_v |W[v]|
    # and dW[v] by at most eps/n_global * sum_t |H[t]| (elementwise over D).
    for f, e, other in zip(filtered, exact, (weight, hidden)):
        bound = eps / n_global * other.detach().abs().sum(0)
        assert torch.all((f - e).abs() <= bound), "filtering dropped more than negligible entries"


@pytest.mark.parametrize("filter_eps", ["auto", "off"])
def test_triton_under_cpu_autocast_runs_in_bf16_and_returns_grads_in_input_dtypes(filter_eps):
    # bf16 activations with an fp32 master weight, as in an autocast run: the kernels get one dtype.
    hidden, weight, labels = _inputs(96, 283, 48, dtype=torch.bfloat16)
    weight = weight.detach().float().requires_grad_()
    n_global = 8192
    gold = _trainer_step_grads(reference, hidden.detach().float().requires_grad_(), weight, labels, n_global)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_sum = _triton(hidden, weight, labels, reduction="sum", filter_eps=filter_eps)
        naive = _trainer_step_grads(reference, hidden, weight, labels, n_global)
    assert [t.dtype for t in loss_sum.grad_fn.saved_tensors[:2]] == [torch.bfloat16, torch.bfloat16]
    got = torch.autograd.grad(loss_sum / n_global, (hidden, weight))
    for name, g, r, x, dtype in zip(("dhidden", "dweight"), got, naive, gold, (torch.bfloat16, torch.float32)):
        assert g.dtype == r.dtype == dtype
        err, ref_err = (g.float() - x).abs().max().item(), (r.float() - x).abs().max().item()
        assert err <= 2 * ref_err, f"{name}: max error {err:.3g} vs naive bf16 autocast error {ref_err:.3g}"


def test_triton_promotes_mixed_dtypes_without_autocast():
    hidden, weight, labels = _inputs(96, 283, 48)
    loss_sum = _triton(hidden.detach().bfloat16().requires_grad_(), weight, labels, reduction="sum")
    assert [t.dtype for t in loss_sum.grad_fn.saved_tensors[:2]] == [torch.float32, torch.float32]
    exact_h = hidden.detach().bfloat16().float().requires_grad_()
    got = _value_and_grads(_triton, hidden.detach().bfloat16().requires_grad_(), weight, labels, reduction="sum")
    want = _value_and_grads(reference, exact_h, weight, labels, reduction="sum")
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    _assert_fp32_close((got[0], got[2]), (want[0], want[2]))
    torch.testing.assert_close(got[1], want[1].bfloat16())


def test_filter_eps_values_and_errors():
    from longctx.kernels.loss import linear_cross_entropy, resolve_filter_eps
    from longctx.recipes.schema import RecipeError, build

    assert resolve_filter_eps("auto", torch.bfloat16) == 2.0**-12
    assert resolve_filter_eps("auto", torch.float32) == 2.0**-28
    assert resolve_filter_eps(1e-3, torch.bfloat16) == 1e-3 and resolve_filter_eps(0, torch.float32) == 0.0
    assert all(resolve_filter_eps(off, torch.bfloat16) is None for off in ("off", None, False))
    for bad in ("sometimes", -1e-3, float("nan"), True, 1.0, 5.0):  # >= 1 would skip every tile
        with pytest.raises(ValueError, match=r"filter_eps=.*: expected 'auto', 'off'"):
            resolve_filter_eps(bad, torch.float32)
    hidden, weight, labels = _inputs(8, 11, 4)
    with pytest.raises(ValueError, match="filter_eps='sometimes'"):  # also where nothing filters
        linear_cross_entropy(hidden, weight, labels, impl="cce_torch", filter_eps="sometimes")
    assert build({"loss": {"filter_eps": False}}).loss.filter_eps == "off"  # YAML reads `off` as false
    assert build({"loss": {"filter_eps": 1e-4}}).loss.filter_eps == 1e-4
    with pytest.raises(RecipeError, match=r"loss\.filter_eps='sometimes': expected float or one of 'auto', 'off'"):
        build({"loss": {"filter_eps": "sometimes"}})
    with pytest.raises(RecipeError, match=r"loss\.filter_eps=-1: must be >= 0"):
        build({"loss": {"filter_eps": -1}})
    with pytest.raises(RecipeError, match=r"loss\.filter_eps=5: must be < 1"):
        build({"loss": {"filter_eps": 5}})


def test_dot_precision_contract(monkeypatch):
    # tl.dot input_precision for fp32 tiles: tf32 only on a real GPU and only when torch allows it.
    from types import SimpleNamespace

    from longctx.kernels.cce import _dot_precision

    assert _dot_precision(torch.float32) == "ieee"  # the interpreter: IEEE fp32 always
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for flags, want in ((dict(fp32_precision="tf32"), "tf32"), (dict(fp32_precision="ieee"), "ieee"),
                        (dict(fp32_precision="none"), "ieee"), (dict(allow_tf32=True), "tf32"),
                        (dict(allow_tf32=False), "ieee")):
        monkeypatch.setattr(torch.backends.cuda, "matmul", SimpleNamespace(**flags))
        assert _dot_precision(torch.float32) == want, flags
        assert _dot_precision(torch.bfloat16) == "ieee"  # bf16 tiles go to tl.dot as they are


def test_autotuned_kernels_match_reference_and_start_from_zero():
    """The CUDA path autotunes the block sizes (kernels/cce.py `tuned`): the autotuner runs each
    candidate config several times on the real tensors before the run that counts, so what the
    kernels accumulate with atomics (dH, dW, the column sums) must be zeroed between runs. Here the
    same autotuners run under the interpreter with a wall-clock timer and two configs each: loss
    and gradients equal the reference's (fp32, no filtering), and each kernel was timed."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton interpreter tests run where TRITON_INTERPRET=1 (CPU machines)")
    import time

    from longctx.kernels import cce

    timed = []

    def wall_clock(fn, quantiles=None):
        t0 = time.perf_counter()
        fn()
        fn()
        timed.append(fn)
        t = (time.perf_counter() - t0) / 2
        return [t, t, t] if quantiles else t

    tuners = cce.tuned({"fwd": [(32, 64, 32, 4, 1), (16, 128, 16, 4, 1)],
                        "bwd": [(32, 64, 32, 4, 1), (16, 64, 16, 4, 1)]}, do_bench=wall_clock)
    hidden, weight, labels = _inputs(97, 301, 40)
    got = _value_and_grads(cce.linear_cross_entropy, hidden, weight, labels, reduction="sum", filter_eps=None,
                           blocks=tuners)
    assert len(timed) == 4, "each of the 2 configs of each kernel is timed once"
    _assert_fp32_close(got, _value_and_grads(reference, hidden, weight, labels, reduction="sum"))
    # the picks are cached per (V, D, dtypes): a second call is not timed again and is still exact
    again = _value_and_grads(cce.linear_cross_entropy, hidden, weight, labels, reduction="sum", filter_eps=None,
                             blocks=tuners)
    assert len(timed) == 4
    _assert_fp32_close(again, got)


def test_block_choice_contract(monkeypatch):
    """Explicit sizes: both kernels, DEFAULT_BLOCKS filling the rest. The interpreter: DEFAULT_BLOCKS.
    A GPU: CUDA_BLOCKS[dtype] over the defaults where its shared memory holds them (bf16's forward
    takes the H200-tuned tiles on Hopper and A100, not on sm86/89; fp32 keeps the defaults). `autotune` on a GPU: the module's
    autotuners over CANDIDATES, whose first config is the default (tuning can only match or beat it)."""
    from longctx.kernels import cce

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    default = {"fwd": cce.DEFAULT_BLOCKS, "bwd": cce.DEFAULT_BLOCKS}
    assert cce.resolve_blocks(torch.bfloat16, cpu) == default
    explicit = (32, *cce.DEFAULT_BLOCKS[1:])
    assert cce.resolve_blocks(torch.bfloat16, cuda, block_n=32) == {"fwd": explicit, "bwd": explicit}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert cce.resolve_blocks(torch.bfloat16, cuda, autotune=True) == default
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(cce, "_shared_memory_per_block", lambda device: 227 * 1024)  # H100/H200
    assert cce.resolve_blocks(torch.float32, cuda) == default
    bf16 = cce.resolve_blocks(torch.bfloat16, cuda)
    assert bf16 == {"fwd": (128, 256, 64, 8, 3), "bwd": cce.DEFAULT_BLOCKS} and bf16 != default
    # 144 KiB of pipelined loads: A100's 163 KiB holds them, sm86/89's 99 KiB does not
    assert cce._tile_shared_bytes(cce.CUDA_BLOCKS[torch.bfloat16]["fwd"], 2) == 144 * 1024
    monkeypatch.setattr(cce, "_shared_memory_per_block", lambda device: 163 * 1024)
    assert cce.resolve_blocks(torch.bfloat16, cuda) == bf16
    monkeypatch.setattr(cce, "_shared_memory_per_block", lambda device: 99 * 1024)
    assert cce.resolve_blocks(torch.bfloat16, cuda) == default
    monkeypatch.setattr(cce, "_TUNED", None)
    tuners = cce.resolve_blocks(torch.bfloat16, cuda, autotune=True)
    assert tuners is cce._TUNED and len(tuners) == 2
    for kind, tuner in zip(("fwd", "bwd"), tuners):
        first = tuner.configs[0]
        assert (first.kwargs["BLOCK_N"], first.kwargs["BLOCK_V"], first.kwargs["BLOCK_D"], first.num_warps,
                first.num_stages) == cce.DEFAULT_BLOCKS
        assert len(tuner.configs) == len(cce.CANDIDATES[kind])
    assert {"COLSUM"} == set(tuners[0].reset_to_zero) and {"DH", "DW"} == set(tuners[1].reset_to_zero)


def test_fixed_cuda_tiles_run_exact_in_the_interpreter():
    """The forward and backward with the tiles a GPU gets (CUDA_BLOCKS for bf16: the forward's
    128 x 256 x 64) and with different tiles per kernel: fp32 values and gradients equal the
    reference's. (Warps and stages mean nothing to the interpreter; tests/gpu runs them compiled.)"""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton interpreter tests run where TRITON_INTERPRET=1 (CPU machines)")
    from longctx.kernels import cce

    hidden, weight, labels = _inputs(150, 301, 72)
    blocks = {"fwd": cce.CUDA_BLOCKS[torch.bfloat16]["fwd"], "bwd": (16, 64, 32, 4, 3)}
    got = _value_and_grads(cce.linear_cross_entropy, hidden, weight, labels, reduction="sum", filter_eps=None,
                           blocks=blocks)
    _assert_fp32_close(got, _value_and_grads(reference, hidden, weight, labels, reduction="sum"))
