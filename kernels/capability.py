"""The only place that probes CUDA, NCCL, flash-attn and Triton-on-GPU.

Everything else asks these functions, so a CPU run takes its fallback path knowingly and the run
log can name what ran.
"""

from __future__ import annotations

import functools
import importlib.util

import torch


def has_cuda() -> bool:
    return torch.cuda.is_available()


def has_nccl() -> bool:
    return has_cuda() and torch.distributed.is_nccl_available()


@functools.cache
def has_flash_attn() -> bool:
    return has_cuda() and importlib.util.find_spec("flash_attn") is not None


@functools.cache
def has_triton_gpu() -> bool:
    return has_cuda() and importlib.util.find_spec("triton") is not None


def default_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" and not has_cuda():
        raise RuntimeError("run.device='cuda' but no CUDA device is available (use auto or cpu)")
    if requested == "cpu" or (requested == "auto" and not has_cuda()):
        return torch.device("cpu")
    return torch.device("cuda")


def peak_memory_bytes(device: torch.device) -> int:
    """Peak device memory: CUDA's allocator peak, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
