"""Planned buffers at run time (MEMO, Wu et al., arXiv 2407.12117, §5: buffers laid out ahead so
that memory does not fragment): the whole-sequence buffers a wrapped block allocates for itself
in its forward and backward by query tiles (memory/offload.py: k and v in the kernels' dtype,
their fp32 gradient accumulators) are views into one buffer per device, laid out by
`plan.plan_layout` (the MIP, or greedy where it already meets the lower bound) for the
block's requests and reused by every block and every step at that length (MEMO's level 1: one
block's tensors; level 2: every identical block reuses the layout). Tensors that outlive the
block (its output, what it keeps for backward, the gradient it returns) stay with the allocator.

`memory.arena` turns it on; bench/fragmentation.py measures what it changes (peak process
memory over the peak of live tensor bytes), with and without it.
"""

from __future__ import annotations

import torch

from .plan import plan_layout

_ALIGN = 256  # bytes: the CUDA allocator's granularity, and every dtype's element size divides it


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class Arena:
    """One byte buffer per device; `views(key, specs)` hands out tensors laid out in it for
    requests that are all live at once (a block's whole-sequence buffers), the same layout every
    time the key (shapes and dtypes) repeats. Growing replaces the buffer; views handed out before
    keep the old one alive until they go, so a view is never overwritten while in use — as long
    as its user is done with it before asking for the same key again (every block's forward and
    backward finish before the next block's start)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.buffer: torch.Tensor | None = None
        self.layouts: dict = {}  # key -> (offsets, peak bytes)
        self.grows = 0
        self.requests = 0

    def layout(self, sizes: list[int]) -> tuple[list[int], int]:
        # every request of one call is live for the same span: the lower bound is their sum, which
        # the greedy layout meets, so plan_layout returns it without solving the MIP
        lay = plan_layout([_aligned(n) for n in sizes], [(0, 1)] * len(sizes))
        return lay.offsets, lay.peak

    def views(self, specs: list[tuple[tuple[int, ...], torch.dtype, torch.device]]) -> list[torch.Tensor]:
        """Views for (shape, dtype, device) specs, the device this arena's."""
        if any(torch.device(d) != self.device for _, _, d in specs):
            raise ValueError(f"arena on {self.device}: asked for {[str(d) for _, _, d in specs]}")
        specs = [(shape, dtype) for shape, dtype, _ in specs]
        key = tuple((tuple(shape), dtype) for shape, dtype in specs)
        self.requests += 1
        if key not in self.layouts:
            sizes = [int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size() for shape, dtype in specs]
            self.layouts[key] = self.layout(sizes)
        offsets, peak = self.layouts[key]
        if self.buffer is None or self.buffer.numel() < peak:
            self.buffer = torch.empty(peak, dtype=torch.uint8, device=self.device)
            self.grows += 1
        out = []
        for (shape, dtype), off in zip(specs, offsets):
            n = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            out.append(self.buffer[off:off + n].view(dtype).view(shape))
        return out

    @property
    def nbytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel()
