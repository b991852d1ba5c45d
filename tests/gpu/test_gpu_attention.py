"""Every CUDA attention backend run for real (kernels/attention.py), against the naive fp32
reference: the shapes of tests/test_attention_kernels.py at lengths that are multiples of no
block size (strided inputs, GQA, causal, Sq != Sk non-causal, causal Sq < Sk top-left), forward
(out, lse) and the block backward from a strided lse and out, as the ring schedules pass them;
BlockAttention and LocalAttention (MEMO's forward_lse/backward_lse under autocast, SDPA restricted to the kernel auto picks
for `auto`); and what `auto` resolves to on this GPU. Tolerance (DESIGN.md): within twice the error
of the naive same-dtype computation (plain ops + autograd in bf16/fp16/fp32) against the fp32
reference, plus two roundings of the largest value (2 ulps in bf16/fp16; 2e-5 in fp32). TF32 is off
in this file."""

import _gpu
import pytest
import torch
from longctx.kernels import capability
from longctx.kernels.attention import (
    BlockAttention,
    LocalAttention,
    block_attn,
    block_attn_bwd,
    check_kernel_available,
    reference_block_attn,
    reference_block_attn_bwd,
    resolve_kernel,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

_FLASH_ATTN_OK, _FLASH_ATTN_WHY = capability.flash_attn_status()
_needs_flash_attn = pytest.mark.skipif(not _FLASH_ATTN_OK, reason=f"flash_attn kernel unavailable: {_FLASH_ATTN_WHY}")
KERNELS = [  # (kernel, dtype): the flash kernels take fp16/bf16 only; efficient takes fp32 too
    pytest.param("aten_flash", torch.bfloat16, id="aten_flash-bf16"),
    pytest.param("aten_flash", torch.float16, id="aten_flash-fp16"),
    pytest.param("aten_efficient", torch.float32, id="aten_efficient-fp32"),
    pytest.param("aten_efficient", torch.bfloat16, id="aten_efficient-bf16"),
    pytest.param("flash_attn", torch.bfloat16, id="flash_attn-bf16", marks=_needs_flash_attn),
]
SHAPES = {  # B, Sq, Sk, Hq, Hkv, D, causal
    "causal": (2, 1000, 1000, 8, 8, 64, True),
    "gqa-causal-d128": (1, 1061, 1061, 12, 4, 128, True),
    "gqa-noncausal-sq-lt-sk": (2, 300, 777, 8, 2, 64, False),
    "noncausal-sq-gt-sk": (1, 777, 300, 4, 4, 64, False),
    "causal-sq-lt-sk-topleft": (1, 333, 1000, 8, 8, 64, True),
}
LAYOUTS = ["contiguous", "gap", "bhsd"]
# plus two final roundings of the largest value (2 ulps: 2^-7 bf16, 2^-10 fp16), or 2e-5 in fp32
SLACK = {torch.float32: 2e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@pytest.fixture(autouse=True)
def _clean():
    with _gpu.ieee_fp32():
        yield
    _gpu.release_cuda_memory()


def _make(B, S, H, D, dtype, layout, g):
    if layout == "gap":  # a gap between heads: a slice of a wider projection (cast first: .to() would copy)
        return torch.randn(B, S, H, D + 8, generator=g, device="cuda").to(dtype)[..., :D]
    if layout == "bhsd":  # [B, H, S, D] memory seen as [B, S, H, D], as a transpose gives
        return torch.randn(B, H, S, D, generator=g, device="cuda").to(dtype).transpose(1, 2)
    return torch.randn(B, S, H, D, generator=g, device="cuda").to(dtype)


def _inputs(B, Sq, Sk, Hq, Hkv, D, dtype, layout="contiguous", seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = _make(B, Sq, Hq, D, dtype, layout, g)
    k, v = _make(B, Sk, Hkv, D, dtype, layout, g), _make(B, Sk, Hkv, D, dtype, layout, g)
    dout = _make(B, Sq, Hq, D, dtype, "contiguous", g)
    if layout != "contiguous":
        assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    return q, k, v, dout


def _gold(q, k, v, dout, causal):
    """The library's naive reference in fp32 math on the same values: out, lse, dq, dk, dv (fp32)."""
    qf, kf, vf = q.float(), k.float(), v.float()
    out, lse = reference_block_attn(qf, kf, vf, causal)
    return out, lse, *reference_block_attn_bwd(dout.float(), qf, kf, vf, out, lse, causal)


def _naive_same_dtype(q, k, v, dout, causal):
    """Attention with plain ops in the inputs' dtype and autograd: out, dq, dk, dv. Its error against
    the fp32 reference is what "twice the naive same-dtype error" measures against."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    kk, vv = k.repeat_interleave(groups, 2), v.repeat_interleave(groups, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, kk) * q.shape[-1] ** -0.5
    if causal:
        visible = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool, device="cuda").tril()
        scores = scores.masked_fill(~visible, float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, -1), vv)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _check(what, got, gold, naive, dtype):
    err = _gpu.max_abs(got.float() - gold)
    naive_err = _gpu.max_abs(naive.float() - gold)
    scale = max(1.0, _gpu.max_abs(gold))
    bound = 2 * naive_err + SLACK[dtype] * scale
    assert err <= bound, (f"{what}: max error {err:.3g} > {bound:.3g} (naive {dtype} error {naive_err:.3g}, "
                          f"max |reference| {scale:.3g})")
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"


def _strided_rows(lse):
    """The same values as a non-contiguous row slice of a bigger block's lse (lse[:, :, rows])."""
    big = torch.cat([lse, lse], 2)[:, :, lse.shape[2]:]
    assert not big.is_contiguous()
    return big


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("kernel, dtype", KERNELS)
def test_block_kernel_matches_reference(kernel, dtype, shape, layout):
    """block_attn -> (out, lse) and block_attn_bwd from the reference's out (in dtype) and a strided
    lse, against the fp32 reference; lse to 1e-4. ~30 ms each on an H200."""
    B, Sq, Sk, Hq, Hkv, D, causal = SHAPES[shape]
    q, k, v, dout = _inputs(B, Sq, Sk, Hq, Hkv, D, dtype, layout)
    gold_out, gold_lse, *gold_grads = _gold(q, k, v, dout, causal)
    naive_out, *naive_grads = _naive_same_dtype(q, k, v, dout, causal)

    out, lse = block_attn(q, k, v, causal, impl=kernel)
    assert out.shape == q.shape and lse.shape == (B, Hq, Sq) and lse.dtype == torch.float32, (out.shape, lse.shape)
    _check(f"{kernel} {shape} {layout} out", out, gold_out, naive_out, dtype)
    lse_err = _gpu.max_abs(lse - gold_lse)
    assert lse_err <= 1e-4, f"{kernel} {shape} {layout} lse: max error {lse_err:.3g}"

    grads = block_attn_bwd(dout, q, k, v, gold_out.to(dtype), _strided_rows(gold_lse), causal, impl=kernel)
    for name, g, x, r, t in zip(("dq", "dk", "dv"), grads, gold_grads, naive_grads, (q, k, v)):
        assert g.shape == t.shape, f"{name}: shape {tuple(g.shape)}, expected {tuple(t.shape)}"
        _check(f"{kernel} {shape} {layout} {name}", g, x, r, dtype)


@pytest.mark.parametrize("kernel, dtype", KERNELS)
def test_block_attention_function_gives_autograd_gradients(kernel, dtype):
    """BlockAttention.apply (what LocalAttention(kernel) runs at sp=1) forward and autograd
    backward on strided GQA inputs, against the reference. ~20 ms each."""
    q, k, v, dout = _inputs(2, 1000, 1000, 8, 2, 64, dtype, "gap")
    gold_out, _, *gold_grads = _gold(q, k, v, dout, True)
    naive_out, *naive_grads = _naive_same_dtype(q, k, v, dout, True)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = BlockAttention.apply(q, k, v, True, kernel)
    out.backward(dout)
    _check(f"{kernel} out", out, gold_out, naive_out, dtype)
    for name, g, x, r in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), gold_grads, naive_grads):
        _check(f"{kernel} {name}", g, x, r, dtype)


@pytest.mark.parametrize("kernel", ["auto", "aten_flash", "aten_efficient",
                                    pytest.param("flash_attn", marks=_needs_flash_attn)])
def test_local_attention_lse_path_under_autocast(kernel):
    """MEMO's calls: forward_lse/backward_lse under torch.autocast(cuda, bf16) with q/k in fp32 (RoPE
    leaves them there) and v in bf16. The kernels get bf16, the gradients come back in each input's
    dtype, values within twice the naive bf16 error. ~20 ms each."""
    dtype = torch.bfloat16
    q, k, v, dout = _inputs(1, 1061, 1061, 12, 4, 128, dtype, "bhsd")
    gold_out, gold_lse, *gold_grads = _gold(q, k, v, dout, True)
    naive_out, *naive_grads = _naive_same_dtype(q, k, v, dout, True)
    attention = LocalAttention(kernel)
    with torch.autocast("cuda", dtype=dtype):
        out, lse = attention.forward_lse(q.float(), k.float(), v)
        grads = attention.backward_lse(dout, q.float(), k.float(), v, out, lse)
    _check(f"{kernel} forward_lse out", out, gold_out, naive_out, dtype)
    assert _gpu.max_abs(lse - gold_lse) <= 1e-4, f"{kernel} lse: max error {_gpu.max_abs(lse - gold_lse):.3g}"
    assert [g.dtype for g in grads] == [torch.float32, torch.float32, dtype]
    for name, g, x, r in zip(("dq", "dk", "dv"), grads, gold_grads, naive_grads):
        _check(f"{kernel} backward_lse {name}", g.to(dtype), x, r, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_local_attention_auto_is_fused_sdpa(dtype):
    """LocalAttention("auto") at sp=1 on CUDA: SDPA restricted to its fused kernels, GQA (bf16:
    natively; fp32: K/V expanded for the efficient kernel), strided inputs, autograd. ~20 ms each."""
    q, k, v, dout = _inputs(2, 1000, 1000, 8, 2, 64, dtype, "bhsd")
    gold_out, _, *gold_grads = _gold(q, k, v, dout, True)
    naive_out, *naive_grads = _naive_same_dtype(q, k, v, dout, True)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    attention = LocalAttention("auto")
    out = attention(q, k, v)
    out.backward(dout)
    _check("sdpa out", out, gold_out, naive_out, dtype)
    for name, g, x, r in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), gold_grads, naive_grads):
        _check(f"sdpa {name}", g, x, r, dtype)
    want = resolve_kernel("auto", "cuda", dtype, 64)
    assert attention.describe("cuda", dtype, 64) == (f"sdpa:{want}" if want != "flash_attn" else want)


def test_auto_resolves_to_a_fused_kernel_on_this_gpu():
    """`auto` never picks the naive reference on CUDA, and what it picks is available here."""
    assert capability.cuda_capability() >= (8, 0), "the suite expects an sm80+ GPU (H200 is sm90)"
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for head_dim in (64, 80, 96, 128, 256):
            kernel = resolve_kernel("auto", "cuda", dtype, head_dim)
            if dtype == torch.float32:
                assert kernel == "aten_efficient", (dtype, head_dim, kernel)
            else:
                want = "flash_attn" if capability.has_flash_attn() else "aten_flash"
                assert kernel == want, (dtype, head_dim, kernel)
            assert check_kernel_available(kernel, "cuda", dtype, head_dim) is None, (dtype, head_dim, kernel)
    assert capability.aten_flash_supports(torch.bfloat16, 128)
    assert "needs fp16/bf16" in check_kernel_available("aten_flash", "cuda", torch.float32, 64)
    q, k, v, _ = _inputs(1, 256, 256, 4, 2, 64, torch.bfloat16)
    out, lse = block_attn(q, k, v, True, impl="auto")  # resolves per call, runs the fused kernel
    gold_out, gold_lse, *_ = _gold(q, k, v, torch.zeros_like(q), True)
    assert _gpu.max_abs(lse - gold_lse) <= 1e-4 and _gpu.max_abs(out.float() - gold_out) <= 2e-2


@pytest.mark.parametrize("kernel", ["aten_flash", pytest.param("flash_attn", marks=_needs_flash_attn)])
def test_causal_block_with_more_queries_than_keys_is_refused(kernel):
    """Top-left causal masking with Sq > Sk is not what the FA2 kernels compute: a clear error."""
    q, k, v, _ = _inputs(1, 64, 32, 4, 4, 64, torch.bfloat16)
    with pytest.raises(ValueError, match="more queries"):
        block_attn(q, k, v, True, impl=kernel)


@pytest.mark.parametrize("kernel", ["auto", "aten_flash", "aten_efficient",
                                    pytest.param("flash_attn", marks=_needs_flash_attn)])
def test_local_attention_rows_path_under_autocast(kernel):
    """MEMO's sp-1 path by query tiles (memory/offload.py _forward_by_rows/_backward_by_rows):
    forward_rows/backward_rows over tiles of 256 queries, last first, keys before a tile in blocks
    of 512, under torch.autocast(cuda, bf16) with k, v held in bf16 and dK/dV accumulated in fp32;
    out and the summed dq, dk, dv within twice the naive bf16 error of the whole causal sequence."""
    dtype = torch.bfloat16
    q, k, v, dout = _inputs(1, 1061, 1061, 12, 4, 128, dtype)
    gold_out, gold_lse, *gold_grads = _gold(q, k, v, dout, True)
    naive_out, *naive_grads = _naive_same_dtype(q, k, v, dout, True)
    attention = LocalAttention(kernel)
    S, tile = q.shape[1], 256
    out = torch.empty_like(q)
    dq = torch.empty(q.shape, dtype=torch.float32, device="cuda")
    dk = torch.zeros(k.shape, dtype=torch.float32, device="cuda")
    dv = torch.zeros(v.shape, dtype=torch.float32, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        for start in reversed(range(0, S, tile)):
            rows = slice(start, min(start + tile, S))
            o, lse = attention.forward_rows(q[:, rows].float(), k, v, start)
            assert o.dtype == dtype and lse.dtype == torch.float32
            assert _gpu.max_abs(lse - gold_lse[:, :, rows]) <= 1e-4
            out[:, rows] = o
            dq[:, rows] = attention.backward_rows(dout[:, rows], q[:, rows].float(), k, v, o, lse, start, dk, dv, 512)
    _check(f"{kernel} forward_rows out", out, gold_out, naive_out, dtype)
    for name, g, x, r in zip(("dq", "dk", "dv"), (dq, dk, dv), gold_grads, naive_grads):
        _check(f"{kernel} backward_rows {name}", g.to(dtype), x, r, dtype)
