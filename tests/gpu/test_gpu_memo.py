"""MEMO swap + recompute (memory/offload.py) on CUDA for real: the host tier's pinned slab, its D2H
and H2D side streams and the two device staging buffers. A CausalLM wrapped with the host tier
(alpha 0.5 and 1.0) against the same model unwrapped, fp32 and bf16 autocast: loss and gradients
equal over two steps (the slab and staging buffers reused); device memory after forward lower than
the unwrapped model's by most of what the swap should free; nothing left on the device after
backward but the staging buffers; and one case run again under TORCH_CUDA_SANITIZER=1 (CSAN).

Both models call the same attention kernel through LocalAttention(kernel), so only MEMO differs;
the loss head is the naive reference (deterministic, so equality is not blurred by atomics)."""

import copy
import functools
import os
import subprocess
import sys
from pathlib import Path

import _gpu
import pytest
import torch
from longctx.kernels.attention import LocalAttention
from longctx.kernels.loss import linear_cross_entropy
from longctx.memory import offload
from longctx.memory.offload import FULL_RECOMPUTE, HostPool, LayerPolicy
from longctx.models.config import ModelConfig
from longctx.models.llama import CausalLM

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

REPO = Path(__file__).resolve().parents[2]
BIG = dict(num_layers=8, hidden_size=1024, intermediate_size=2816, num_heads=16, num_kv_heads=4, vocab_size=4096,
           seq=2048)
SMALL = dict(num_layers=6, hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=2, vocab_size=1024,
             seq=1024)
CASES = {  # id: (compute dtype, alpha, shape)
    "fp32-alpha0.5": (torch.float32, 0.5, BIG),
    "fp32-alpha1": (torch.float32, 1.0, BIG),
    "bf16-alpha0.5": (torch.bfloat16, 0.5, BIG),
    "bf16-alpha1": (torch.bfloat16, 1.0, BIG),
    "small-bf16-alpha0.5": (torch.bfloat16, 0.5, SMALL),  # the case the sanitizer run repeats
    # the trainer's regime: recomputed tokens' inputs kept in bf16 (LayerPolicy.input_dtype)
    "bf16-alpha0.5-bf16-inputs": (torch.bfloat16, 0.5, BIG),
}
KEPT_INPUTS = {"bf16-alpha0.5-bf16-inputs": torch.bfloat16}
KERNEL = {torch.float32: "aten_efficient", torch.bfloat16: "aten_flash"}
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2}  # of each gradient's largest entry
CHUNK_TOKENS = 300  # backward recomputes in uneven chunks (1024 dropped tokens -> 300, 300, 300, 124)


@pytest.fixture(autouse=True)
def _clean():
    with _gpu.ieee_fp32():
        yield
    _gpu.release_cuda_memory()


def _loss(h, w, y):
    return linear_cross_entropy(h, w, y, reduction="sum", impl="reference")


@functools.cache
def _cpu_model(shape_items):
    """One CPU initialisation per shape (init_weights draws ~100M numbers on the CPU); copied per use."""
    shape = dict(shape_items)
    cfg = ModelConfig(**{k: v for k, v in shape.items() if k != "seq"}, max_position_embeddings=shape["seq"])
    model = CausalLM(cfg, attention=LocalAttention("reference"), loss=_loss)
    model.init_weights(0)
    with torch.no_grad():  # non-trivial norm scales
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    return model


def _model(shape, dtype):
    model = copy.deepcopy(_cpu_model(tuple(sorted(shape.items()))))
    model.set_attention(LocalAttention(KERNEL[dtype]))
    return model.cuda()


def _batch(shape):
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (1, shape["seq"] + 1), generator=g, device="cuda")
    return ids[:, :-1], ids[:, 1:]


def _step(model, ids, labels, dtype):
    """One forward + backward as the trainer runs it (sum / valid tokens). Returns the loss, the
    gradients, the bytes the forward left allocated, and the bytes left after backward beyond the
    parameter gradients."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss = model(ids, labels=labels) / labels.numel()
    torch.cuda.synchronize()
    forward_bytes = torch.cuda.memory_allocated() - base
    loss.backward()
    value = loss.detach().clone()
    del loss
    torch.cuda.synchronize()
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    left_bytes = torch.cuda.memory_allocated() - base - grad_bytes
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return value, grads, forward_bytes, left_bytes


def _assert_same(what, ref, got, tol):
    (l0, g0), (l1, g1) = ref, got
    assert abs(l0.item() - l1.item()) <= tol * max(1.0, abs(l0.item())), f"{what} loss: {l1.item()} vs {l0.item()}"
    for name in g0:
        scale = _gpu.max_abs(g0[name])
        diff = _gpu.max_abs(g1[name] - g0[name])
        assert torch.isfinite(g1[name]).all(), f"{what} {name}: non-finite gradient"
        assert diff <= tol * max(scale, 1e-12), f"{what} {name}: max difference {diff:.3g}, max |grad| {scale:.3g}"


def staging_bound(pool) -> int:
    """What may stay allocated after backward besides the gradients: the two staging buffers + 4 MiB."""
    return sum(b.numel() for b in pool.staging if b is not None) + 4 * _gpu.MiB


def _wrap(model, policy, pool):
    for layer in model.model.layers:
        offload.wrap(layer, policy, pool, CHUNK_TOKENS)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_memo_host_swap_matches_unwrapped(case):
    """Loss and every gradient equal to the unwrapped model's for two steps; forward memory: the
    swapped model keeps at most half of what the unwrapped model keeps above the full-recompute
    floor (expected ~20%: only the last two blocks' copies are still in flight); after backward only
    the two staging buffers remain. ~2 s (BIG) on an H200."""
    dtype, alpha, shape = CASES[case]
    ids, labels = _batch(shape)
    mib = _gpu.MiB

    plain = _model(shape, dtype)
    loss, grads, plain_fwd, plain_left = _step(plain, ids, labels, dtype)
    ref = (loss, grads)
    del plain

    floor_model = _wrap(_model(shape, dtype), FULL_RECOMPUTE, None)
    floor_loss, floor_grads, floor_fwd, _ = _step(floor_model, ids, labels, dtype)
    del floor_model
    _assert_same(f"{case} full recompute", ref, (floor_loss, floor_grads), TOLERANCE[dtype])
    del floor_grads
    possible = plain_fwd - floor_fwd
    assert possible > plain_fwd / 2, (
        f"unwrapped forward keeps {plain_fwd / mib:.1f} MiB, full recompute {floor_fwd / mib:.1f} MiB: "
        "too little to swap for this test to mean anything")

    pool = HostPool("cuda")
    memo = _wrap(_model(shape, dtype), LayerPolicy(alpha, "host", input_dtype=KEPT_INPUTS.get(case)), pool)
    for step in (1, 2):  # the second step reuses the pinned slab and the staging buffers
        # a failure below names what is still allocated, and where from (seen on an H200: 8 MiB over
        # at fp32 alpha 0.5 when this case ran after other tests, not when it ran first)
        torch.cuda.memory._record_memory_history(max_entries=200_000)
        before = _gpu.active_blocks()
        loss, grads, memo_fwd, memo_left = _step(memo, ids, labels, dtype)
        known = {t.data_ptr() for t in grads.values()} | {b.data_ptr() for b in pool.staging if b is not None}
        leftover = _gpu.describe_new_blocks(before, known) if memo_left > staging_bound(pool) else ""
        torch.cuda.memory._record_memory_history(enabled=None)
        _assert_same(f"{case} step {step}", ref, (loss, grads), TOLERANCE[dtype])
        del grads
        assert not pool.records and pool.bytes_in_use == 0, "the host pool still holds records after backward"
        assert pool.last_step_bytes > 0, "nothing was swapped to the host"
        staging = sum(b.numel() for b in pool.staging if b is not None)
        assert memo_left <= staging_bound(pool), (
            f"step {step}: {memo_left / mib:.1f} MiB left on the device after backward besides the gradients; "
            f"the staging buffers are {staging / mib:.1f} MiB (unwrapped model: {plain_left / mib:.1f} MiB); {leftover}")
        saved = plain_fwd - memo_fwd
        assert saved >= 0.5 * possible, (
            f"step {step}: after forward the swapped model holds {memo_fwd / mib:.1f} MiB, the unwrapped one "
            f"{plain_fwd / mib:.1f} MiB and full recompute {floor_fwd / mib:.1f} MiB: the swap freed "
            f"{saved / mib:.1f} MiB of a possible {possible / mib:.1f} MiB "
            f"(host pool {pool.last_step_bytes / mib:.1f} MiB)")


def test_memo_host_copies_survive_reuse_of_freed_device_memory():
    """The D2H copies of a block's kept tensors run on a side stream while compute goes on. Device
    memory a block frees at the end of its forward must not be handed to compute-stream work before
    its copy has read it: right after forward, fill freshly allocated blocks of the freed tensors'
    sizes with NaN; backward must still match the unwrapped model. The second step is the one that
    counts (the pinned slab exists by then: no host allocation in forward). ~3 s."""
    dtype, shape = torch.float32, dict(BIG, num_layers=4, seq=4096)
    ids, labels = _batch(shape)
    plain = _model(shape, dtype)
    ref = _step(plain, ids, labels, dtype)[:2]
    del plain
    pool = HostPool("cuda")
    memo = _wrap(_model(shape, dtype), LayerPolicy(1.0, "host"), pool)
    cfg = memo.config
    sizes = [(1, shape["seq"], cfg.hidden_size), (1, shape["seq"], cfg.num_heads * cfg.head_dim),
             (1, shape["seq"], cfg.num_kv_heads * cfg.head_dim)]
    for step in (1, 2):
        loss = memo(ids, labels=labels) / labels.numel()
        # no synchronisation: the last blocks' copies are still queued on the D2H stream
        junk = [torch.full(size, float("nan"), device="cuda") for size in sizes for _ in range(4 * cfg.num_layers)]
        del junk
        loss.backward()
        got = (loss.detach(), {n: p.grad.clone() for n, p in memo.named_parameters()})
        memo.zero_grad(set_to_none=True)
        del loss
        _assert_same(f"step {step} after NaN fill", ref, got, TOLERANCE[dtype])
        assert not pool.records


def test_memo_swap_under_cuda_sanitizer():
    """The small bf16 case again in a fresh process under TORCH_CUDA_SANITIZER=1: PyTorch's CUDA
    sanitizer raises on any kernel that touches a tensor another stream used without
    synchronisation (the D2H/H2D copies against compute). ~30 s."""
    node = f"{Path(__file__).resolve()}::test_memo_host_swap_matches_unwrapped[small-bf16-alpha0.5]"
    env = dict(os.environ, TORCH_CUDA_SANITIZER="1")
    env.pop("PYTEST_ADDOPTS", None)  # the suite's own options (-k, reports) are not for this run
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=150)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "1 passed" in proc.stdout, f"exit code {proc.returncode}:\n{output[-6000:]}"
    assert "CSAN detected" not in output, output[-6000:]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_arena_and_tiled_head_match_on_cuda(dtype):
    """memory.arena (attention's whole-sequence buffers by query tiles from one device buffer,
    reused by every block) and the final norm + loss in tiles (model.loss_tile_tokens) on CUDA:
    loss and gradients equal to the plain model's over two steps, the arena allocated once per
    length, and nothing of it left besides its own buffer after backward."""
    from longctx.memory.arena import Arena

    shape = SMALL
    ids, labels = _batch(shape)
    plain = _model(shape, dtype)
    ref = _step(plain, ids, labels, dtype)[:2]
    del plain
    arena = Arena("cuda")
    model = _model(shape, dtype)
    for layer in model.model.layers:
        offload.wrap(layer, LayerPolicy(0.5, "device"), None, CHUNK_TOKENS, arena)
    model.loss_tile_tokens = CHUNK_TOKENS
    for step in (1, 2):
        loss, grads, _, left = _step(model, ids, labels, dtype)
        _assert_same(f"arena step {step}", ref, (loss, grads), TOLERANCE[dtype])
        assert arena.grows == 2, arena.grows  # forward's k, v, then backward's k, v, dk, dv: once per length
        assert left <= arena.nbytes + 4 * _gpu.MiB, f"{left / _gpu.MiB:.1f} MiB left besides the gradients"
