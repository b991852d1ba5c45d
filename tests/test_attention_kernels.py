"""Every attention kernel branch on CPU: the CUDA-only ones (aten_flash, aten_efficient,
flash_attn) through strict stand-ins of their APIs (tests/_standins.py), against the naive
reference, values and gradients; every sequence-parallel schedule and MEMO through them; and the
choice `auto` makes on CUDA (never the naive reference)."""

import _dist
import _standins
import pytest
import torch
from longctx.kernels import capability
from longctx.kernels.attention import (
    BlockAttention,
    block_attn,
    block_attn_bwd,
    reference_block_attn,
    reference_block_attn_bwd,
    resolve_kernel,
)
from longctx.parallel import layout

CUDA_KERNELS = ["aten_flash", "aten_efficient", "flash_attn"]
# flash kernels take fp16/bf16 only: they are tested in bf16, the trainer's dtype
DTYPE = {"aten_flash": torch.bfloat16, "flash_attn": torch.bfloat16, "aten_efficient": torch.float32}


@pytest.fixture
def standins(monkeypatch):
    _standins.install(monkeypatch)
    _standins.calls.clear()
    return _standins.calls


def test_standins_take_the_real_aten_signatures():
    """The stand-ins' parameters are the installed torch's schemas for the real ops (name, order,
    keyword-only), so a call that binds on CPU binds on CUDA."""
    import inspect

    for name, fn in _standins.StrictAten()._ops.items():
        schema = getattr(torch.ops.aten, name).default._schema
        want = [(a.name, a.kwarg_only) for a in schema.arguments]
        got = [(p.name, p.kind == p.KEYWORD_ONLY) for p in inspect.signature(fn).parameters.values()]
        assert got == want, name


def _inputs(B, Sq, Sk, Hq, Hkv, D, dtype, seed=0, strided=False):
    g = torch.Generator().manual_seed(seed)
    def make(S, H):
        if strided:  # a view with a gap between heads, as a schedule's slices and transposes give
            return torch.randn(B, S, H, D + 8, generator=g).to(dtype)[..., :D]
        return torch.randn(B, S, H, D, generator=g).to(dtype)
    q, k, v = make(Sq, Hq), make(Sk, Hkv), make(Sk, Hkv)
    assert strided == (not q.is_contiguous())
    return q, k, v, make(Sq, Hq)


def _close(got, want, dtype, what):
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    err = (got.float() - want.float()).abs().max().item()
    assert err <= tol * max(1.0, want.abs().max().item()), f"{what}: max error {err}"


SHAPES = [  # B, Sq, Sk, Hq, Hkv, D, causal
    (2, 24, 24, 4, 4, 64, True),
    (1, 40, 40, 6, 2, 64, True),  # GQA
    (2, 16, 40, 4, 2, 32, False),  # Sq != Sk
    (1, 12, 40, 4, 4, 64, True),  # causal, Sq < Sk: top-left (query i sees keys <= i)
]


@pytest.mark.parametrize("kernel", CUDA_KERNELS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("strided", [False, True])
def test_cuda_kernels_match_reference_through_standins(standins, kernel, shape, strided):
    *dims, causal = shape
    dtype = DTYPE[kernel]
    q, k, v, dout = _inputs(*dims, dtype, strided=strided)
    out, lse = block_attn(q, k, v, causal, impl=kernel)
    want_out, want_lse = reference_block_attn(q, k, v, causal)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == want_lse.shape
    _close(out, want_out, dtype, "out")
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    # the backward from a *strided* lse and out, as the schedules pass them (rows of a larger block)
    big_lse = torch.cat([want_lse, want_lse], 2)[:, :, want_lse.shape[2]:]
    assert not big_lse.is_contiguous()
    got = block_attn_bwd(dout, q, k, v, want_out, big_lse, causal, impl=kernel)
    want = reference_block_attn_bwd(dout, q, k, v, want_out, want_lse, causal)
    for g, w, n in zip(got, want, ("dq", "dk", "dv")):
        assert g.shape == w.shape, n
        _close(g, w, dtype, n)
    assert standins[f"{kernel}.fwd"] == 1 and standins[f"{kernel}.bwd"] == 1


def test_strided_lse_is_what_broke_flash_attn_backward(standins):
    """Issue 15, defect 2: flash-attn reads the lse densely. Handing it the strided slice (what
    the CUDA branch did before .contiguous()) gives wrong gradients; the stand-in reproduces it."""
    q, k, v, dout = _inputs(2, 24, 24, 4, 4, 64, torch.bfloat16)
    out, lse = reference_block_attn(q, k, v, True)
    strided = torch.cat([lse, lse], 2)[:, :, :24]  # same values, not contiguous
    assert not strided.is_contiguous()
    dq, dk, dv = q.clone(), k.clone(), v.clone()
    api = _standins.flash_attn_module().flash_attn_interface
    api._flash_attn_backward(dout, q, k, v, out, strided, dq, dk, dv, 0.0, 64 ** -0.5, True, -1, -1, 0.0, None,
                             False, None)
    want = reference_block_attn_bwd(dout, q, k, v, out, lse, True)
    assert (dq.float() - want[0].float()).abs().max() > 0.1, "the stand-in must read the lse as the kernel does"
    got = block_attn_bwd(dout, q, k, v, out, strided, True, impl="flash_attn")  # ours passes it contiguous
    _close(got[0], want[0], torch.bfloat16, "dq")


@pytest.mark.parametrize("kernel", CUDA_KERNELS + ["aten_cpu", "reference"])
def test_block_attention_function_gives_autograd_gradients(standins, kernel):
    dtype = DTYPE.get(kernel, torch.float32)
    q, k, v, dout = _inputs(1, 20, 20, 4, 2, 64, dtype)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    BlockAttention.apply(q, k, v, True, kernel).backward(dout)
    want = reference_block_attn_bwd(dout, q.detach(), k.detach(), v.detach(),
                                     *reference_block_attn(q.detach(), k.detach(), v.detach(), True), True)
    for g, w, n in zip((q.grad, k.grad, v.grad), want, "qkv"):
        _close(g, w, dtype, f"d{n}")


@pytest.mark.parametrize("kernel", CUDA_KERNELS + ["aten_cpu", "reference"])
def test_rows_of_a_causal_sequence_match_the_whole(standins, kernel):
    """LocalAttention.forward_rows/backward_rows (MEMO's backward at sp 1 goes query tile by
    query tile): the rows [start, start + n) against the keys before them (unmasked, in key
    blocks) and their own diagonal block (causal) give the whole causal sequence's out, lse and,
    summed over the tiles, dq, dk, dv; the CUDA kernels through their stand-ins."""
    from longctx.kernels.attention import LocalAttention

    dtype = DTYPE.get(kernel, torch.float32)
    B, S, Hq, Hkv, D, n = 2, 36, 4, 2, 64, 12
    q, k, v, dout = _inputs(B, S, S, Hq, Hkv, D, dtype)
    want_out, want_lse = reference_block_attn(q, k, v, True)
    want = reference_block_attn_bwd(dout, q, k, v, want_out, want_lse, True)
    attn = LocalAttention(kernel)
    dk = torch.zeros(k.shape, dtype=torch.float32)
    dv = torch.zeros(v.shape, dtype=torch.float32)
    dq = torch.empty(q.shape, dtype=torch.float32)
    for start in reversed(range(0, S, n)):
        rows = slice(start, start + n)
        out, lse = attn.forward_rows(q[:, rows], k, v, start)
        assert out.dtype == dtype and lse.dtype == torch.float32
        _close(out, want_out[:, rows], dtype, f"out of rows {start}")
        torch.testing.assert_close(lse, want_lse[:, :, rows], atol=1e-4, rtol=1e-4)
        dq[:, rows] = attn.backward_rows(dout[:, rows], q[:, rows], k, v, out, lse, start, dk, dv, key_block=5)
    for g, w, name in zip((dq, dk, dv), want, ("dq", "dk", "dv")):
        _close(g, w, dtype, name)


# --- what `auto` picks ------------------------------------------------------------------------------
def _pretend_cuda(monkeypatch, flash_attn: bool, sm=(9, 0)):
    monkeypatch.setattr(capability, "has_cuda", lambda: True)
    monkeypatch.setattr(capability, "has_flash_attn", lambda: flash_attn)
    monkeypatch.setattr(capability, "cuda_capability", lambda: sm)


@pytest.mark.parametrize("flash_attn", [False, True])
def test_auto_on_cuda_never_picks_the_naive_reference(monkeypatch, flash_attn):
    """Issue 15, defect 3: without flash-attn, CUDA fell back to the O(S^2) fp32 reference."""
    _pretend_cuda(monkeypatch, flash_attn)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for head_dim in (64, 128, 96, 256, 80):
            got = resolve_kernel("auto", "cuda", dtype, head_dim)
            assert got != "reference"
            if dtype == torch.float32:
                assert got == "aten_efficient"
            else:
                assert got == ("flash_attn" if flash_attn else "aten_flash")
    _pretend_cuda(monkeypatch, False, sm=(7, 5))  # pre-Ampere: PyTorch's flash kernel is not built for it
    assert resolve_kernel("auto", "cuda", torch.float16, 64) == "aten_efficient"
    assert resolve_kernel("auto", "cpu", torch.float32, 64) == "aten_cpu"
    assert resolve_kernel("reference", "cuda", torch.bfloat16, 64) == "reference"  # only when asked


def test_sdpa_on_cuda_runs_only_the_kernel_auto_picks_and_the_log_names_it(monkeypatch):
    """sp = 1 on CUDA: SDPA restricted to one backend (never the math kernel), named in the run log."""
    from longctx.kernels.attention import LocalAttention, sdpa_plan

    _pretend_cuda(monkeypatch, False)
    assert sdpa_plan(torch.bfloat16, 64, True) == ("aten_flash", "FLASH_ATTENTION", False)  # GQA native
    assert sdpa_plan(torch.float32, 64, True) == ("aten_efficient", "EFFICIENT_ATTENTION", True)  # heads expanded
    assert LocalAttention("auto").describe("cuda", torch.bfloat16, 64) == "sdpa:aten_flash"
    assert LocalAttention("auto").describe("cpu", torch.float32, 64) == "sdpa"
    _pretend_cuda(monkeypatch, True)
    assert sdpa_plan(torch.bfloat16, 64, False) == ("flash_attn", None, False)  # through BlockAttention
    assert LocalAttention("auto").describe("cuda", torch.bfloat16, 64) == "flash_attn"


def test_flash_attn_is_used_only_at_2_7_with_the_expected_signature(monkeypatch):
    import sys
    import types

    monkeypatch.setattr(capability, "has_cuda", lambda: True)
    package = _standins.flash_attn_module("2.7.4")
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", package.flash_attn_interface)
    monkeypatch.setattr(capability.importlib.util, "find_spec", lambda name: object())
    assert capability.flash_attn_status() == (True, "flash-attn 2.7.4")
    package.__version__ = "2.6.3"
    ok, why = capability.flash_attn_status()
    assert not ok and "older than 2.7" in why
    package.__version__ = "2.8.0"
    old = types.ModuleType("flash_attn.flash_attn_interface")  # 2.6's window_size tuple

    def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                            return_softmax):
        raise AssertionError("must not be called")

    old._flash_attn_forward = _flash_attn_forward
    old._flash_attn_backward = package.flash_attn_interface._flash_attn_backward
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", old)
    ok, why = capability.flash_attn_status()
    assert not ok and "not the 2.7 arguments" in why


# --- every schedule through the stand-ins (2 gloo ranks) --------------------------------------------
def _schedule_worker(rank, world, name, shape):
    import torch.distributed as dist
    from longctx.parallel.attention import SCHEDULE_FUNCTIONS

    _standins.install()
    results = {}
    for kernel in CUDA_KERNELS:
        dtype = DTYPE[kernel]
        q, k, v, dout = _inputs(shape[0], shape[1], shape[1], *shape[2:], dtype)
        ql, kl, vl = (layout.split(t, rank, world).clone().requires_grad_() for t in (q, k, v))
        out = SCHEDULE_FUNCTIONS[name](ql, kl, vl, dist.group.WORLD, kernel=kernel)
        out.backward(layout.split(dout, rank, world))
        assert _standins.calls[f"{kernel}.fwd"] and _standins.calls[f"{kernel}.bwd"], kernel
        results[kernel] = (out.detach(), ql.grad, kl.grad, vl.grad)
    return results


@pytest.mark.parametrize("name", ["ring", "token_ring", "bidir_kv", "ulysses"])
def test_every_schedule_runs_every_cuda_kernel_through_standins(name):
    shape = (1, 32, 4, 2, 64)  # B, S, Hq, Hkv (GQA), D
    results = _dist.run(_schedule_worker, 2, name, shape)
    for kernel in CUDA_KERNELS:
        dtype = DTYPE[kernel]
        q, k, v, dout = _inputs(shape[0], shape[1], shape[1], *shape[2:], dtype)
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
        out = reference_block_attn(q, k, v, True)[0]
        out.backward(dout)
        want = (out.detach(), q.grad, k.grad, v.grad)
        for i, what in enumerate(("out", "dq", "dk", "dv")):
            got = layout.unsplit([r[kernel][i] for r in results], shape[1])
            _close(got, want[i], dtype, f"{name}/{kernel} {what}")


# --- MEMO through the stand-ins -----------------------------------------------------------------------
@pytest.mark.parametrize("kernel", CUDA_KERNELS)
def test_memo_runs_cuda_kernels_through_standins(standins, kernel):
    from longctx.kernels.attention import LocalAttention
    from longctx.kernels.loss import linear_cross_entropy
    from longctx.memory import offload
    from longctx.models.config import ModelConfig
    from longctx.models.llama import CausalLM

    cfg = ModelConfig(vocab_size=97, hidden_size=128, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=32, max_position_embeddings=256)

    def loss(h, w, y):
        return linear_cross_entropy(h, w, y, reduction="sum")

    def run(wrap):
        torch.manual_seed(0)
        model = CausalLM(cfg, attention=LocalAttention(kernel), loss=loss)
        model.init_weights(0)
        if wrap:
            pool = offload.HostPool("cpu")
            for block in model.model.layers:
                offload.wrap(block, offload.LayerPolicy(alpha=0.5, tier="host"), pool, chunk_tokens=7)
        ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=DTYPE[kernel] != torch.float32):
            out = model(ids, labels=ids)
        out.backward()
        return out.detach(), [p.grad for p in model.parameters()]

    plain, wrapped = run(False), run(True)
    assert standins[f"{kernel}.fwd"] and standins[f"{kernel}.bwd"]
    tol = 1e-5 if DTYPE[kernel] == torch.float32 else 2e-2
    torch.testing.assert_close(wrapped[0], plain[0], atol=tol, rtol=tol)
    for g, w in zip(wrapped[1], plain[1]):
        torch.testing.assert_close(g, w, atol=tol * max(1.0, w.abs().max().item()), rtol=tol)
