"""The sequence-parallel attention schedules by name (see parallel/choose.py for `auto`)."""

import logging

from ..kernels.attention import LocalAttention, autocast_inputs
from . import bidir_kv, ring, token_ring, ulysses
from .bidir_kv import bidir_kv_attention
from .choose import LINKS, Shape, choose
from .ring import ring_attention
from .token_ring import token_ring_attention
from .ulysses import ulysses_attention

log = logging.getLogger("longctx")

SCHEDULE_FUNCTIONS = {
    "ring": ring_attention,
    "token_ring": token_ring_attention,
    "bidir_kv": bidir_kv_attention,
    "ulysses": ulysses_attention,
}

SCHEDULE_MODULES = {"ring": ring, "token_ring": token_ring, "bidir_kv": bidir_kv, "ulysses": ulysses}


class SequenceParallelAttention:
    """The model's attention callable under sequence parallelism.

    Each step the trainer tells it the bucket's sp degree and (padded) length; it picks the
    schedule (fixed, or `auto` from the cost model, logged once per shape with the reason) and
    the sp sub-group, and attention calls go to that schedule. sp = 1 runs local attention.
    """

    def __init__(self, schedule: str, groups: dict, heads_q: int, heads_kv: int, head_dim: int,
                 dtype_bytes: int, link: str = "cpu_gloo", log_choices: bool = True, kernel: str = "auto") -> None:
        if schedule != "auto" and schedule not in SCHEDULE_FUNCTIONS:
            raise ValueError(f"parallel.attention={schedule!r}: expected auto or one of {sorted(SCHEDULE_FUNCTIONS)}")
        self.schedule, self.groups, self.link = schedule, groups, LINKS[link]
        self.heads = (heads_q, heads_kv, head_dim, dtype_bytes)
        self.log_choices = log_choices
        self.kernel, self.local = kernel, LocalAttention(kernel)  # the block kernel every schedule runs
        self.sp, self.name = 1, "local"
        self._chosen: dict[tuple[int, int], str] = {}

    def set_step(self, sp: int, seq_len: int) -> str:
        self.sp = sp
        if sp == 1:
            self.name = "local"
        elif self.schedule != "auto":
            self.name = self.schedule
        else:
            key = (sp, seq_len)
            if key not in self._chosen:
                hq, hkv, d, b = self.heads
                name, why = choose(Shape(seq_len, hq, hkv, d, sp, b), self.link)
                self._chosen[key] = name
                if self.log_choices:
                    log.info("attention auto -> %s: %s", name, why)
            self.name = self._chosen[key]
        return self.name

    def __call__(self, q, k, v):
        if self.sp == 1:
            return self.local(q, k, v)
        return SCHEDULE_FUNCTIONS[self.name](*autocast_inputs(q, k, v), self.groups[self.sp], kernel=self.kernel)

    # For memory/offload.py, which keeps (out, lse) and runs attention's backward itself.
    def forward_lse(self, q, k, v):
        if self.sp == 1:
            return self.local.forward_lse(q, k, v)
        return SCHEDULE_MODULES[self.name].forward(self.groups[self.sp], *autocast_inputs(q, k, v), kernel=self.kernel)

    def backward_lse(self, dout, q, k, v, out, lse):
        if self.sp == 1:
            return self.local.backward_lse(dout, q, k, v, out, lse)
        q2, k2, v2 = autocast_inputs(q, k, v)
        grads = SCHEDULE_MODULES[self.name].backward(self.groups[self.sp], dout.to(out.dtype).contiguous(),
                                                     q2, k2, v2, out, lse, kernel=self.kernel)
        return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v)))