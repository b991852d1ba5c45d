"""The only place that probes CUDA, NCCL, flash-attn and Triton-on-GPU.

Everything else asks these functions, so a CPU run takes its fallback path knowingly and the run
log can name what ran.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import inspect

import torch

# The flash-attn >= 2.7 private API we call (flash_attn.flash_attn_interface), parameter by
# parameter: 2.6 took `window_size` as one tuple and returned 8 values, so a name check is what
# tells the two apart before a call silently binds the wrong arguments.
FLASH_ATTN_MIN_VERSION = (2, 7)
FLASH_ATTN_FORWARD_PARAMS = ("q", "k", "v", "dropout_p", "softmax_scale", "causal", "window_size_left",
                             "window_size_right", "softcap", "alibi_slopes", "return_softmax")
FLASH_ATTN_BACKWARD_PARAMS = ("dout", "q", "k", "v", "out", "softmax_lse", "dq", "dk", "dv", "dropout_p",
                              "softmax_scale", "causal", "window_size_left", "window_size_right", "softcap",
                              "alibi_slopes", "deterministic", "rng_state")


def has_cuda() -> bool:
    return torch.cuda.is_available()


def has_nccl() -> bool:
    return has_cuda() and torch.distributed.is_nccl_available()


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for p in text.split(".")[:2]:
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _param_names(fn) -> tuple[str, ...]:
    # flash-attn >= 2.7 wraps these functions in torch.library.custom_op; the Python function
    # it was built from is kept as `_init_fn`.
    fn = getattr(fn, "_init_fn", fn)
    return tuple(inspect.signature(fn).parameters)


def flash_attn_status(require_cuda: bool = True) -> tuple[bool, str]:
    """(usable, why): flash-attn is installed, at least 2.7, and its private forward/backward take
    exactly the arguments kernels/attention.py passes."""
    if require_cuda and not has_cuda():
        return False, "no CUDA device"
    if importlib.util.find_spec("flash_attn") is None:
        return False, "flash-attn is not installed"
    try:
        version = importlib.metadata.version("flash-attn")
    except importlib.metadata.PackageNotFoundError:
        version = getattr(importlib.import_module("flash_attn"), "__version__", "0")
    if _version_tuple(version) < FLASH_ATTN_MIN_VERSION:
        return False, f"flash-attn {version} is older than 2.7 (pip install 'flash-attn>=2.7')"
    try:
        api = importlib.import_module("flash_attn.flash_attn_interface")
        fwd, bwd = _param_names(api._flash_attn_forward), _param_names(api._flash_attn_backward)
    except (ImportError, AttributeError, ValueError, TypeError) as e:
        return False, f"flash-attn {version}: its private API is not the one expected ({e})"
    if fwd != FLASH_ATTN_FORWARD_PARAMS or bwd != FLASH_ATTN_BACKWARD_PARAMS:
        return False, f"flash-attn {version}: _flash_attn_forward/_backward take {fwd} / {bwd}, not the 2.7 arguments"
    return True, f"flash-attn {version}"


@functools.cache
def has_flash_attn() -> bool:
    return flash_attn_status()[0]


def cuda_capability() -> tuple[int, int]:
    return torch.cuda.get_device_capability() if has_cuda() else (0, 0)


def aten_flash_supports(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether PyTorch's own CUDA flash kernel (`aten._scaled_dot_product_flash_attention`) takes
    this: fp16/bf16, head_dim a multiple of 8 up to 256, an sm80+ GPU."""
    return (has_cuda() and cuda_capability() >= (8, 0) and dtype in (torch.float16, torch.bfloat16)
            and head_dim % 8 == 0 and head_dim <= 256)


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
