"""Helpers the tests/gpu files share (imported as `_gpu`, like tests/_dist.py; no conftest here)."""

from __future__ import annotations

import contextlib
import gc
import os

import torch

MiB = 1 << 20


@contextlib.contextmanager
def ieee_fp32():
    """fp32 matmuls in IEEE fp32 (no TF32) inside, for tight fp32 comparisons; restores the setting.

    torch >= 2.9 raises when the legacy `allow_tf32` and the new `fp32_precision` APIs are mixed,
    so only the new one is used where it exists (kernels/cce.py reads the same flag)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        old = matmul.fp32_precision
        matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = old
    else:
        old = matmul.allow_tf32
        matmul.allow_tf32 = False
        try:
            yield
        finally:
            matmul.allow_tf32 = old


def release_cuda_memory() -> None:
    """Frees what the last test left in the caching allocator (big tests run back to back)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def assert_compiled_triton() -> None:
    """The GPU suite checks the compiled Triton kernels, not the CPU interpreter."""
    assert os.environ.get("TRITON_INTERPRET") != "1", (
        "TRITON_INTERPRET=1 is set: the GPU suite must run the compiled Triton kernels; unset it "
        "(tests/conftest.py only defaults it when CUDA is unavailable)")


def max_abs(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0
