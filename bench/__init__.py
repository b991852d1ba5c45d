"""Benchmarks: one program per figure, JSON out."""


def machine(device) -> dict:
    """What a GPU bench records about where it ran: versions, CPU, and the GPU on CUDA."""
    import os
    import platform

    import torch

    out = {"torch": torch.__version__, "python": platform.python_version(),
           "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    if device.type == "cuda":
        out.update(gpu=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                   cuda=torch.version.cuda, alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
    return out
