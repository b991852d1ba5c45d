"""The sequence-parallel attention schedules by name, and the model's attention callable that
runs one of them per step (see parallel/choose.py for `auto`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..kernels.attention import LocalAttention, autocast_inputs
from . import allgather_kv, bidir_kv, hybrid, ring, token_ring, ulysses
from .choose import Shape, choose
from .hybrid import OUTER_SCHEDULES, HybridGroup
from .mesh import inner_degree

log = logging.getLogger("longctx")

SCHEDULE_MODULES = {"ring": ring, "token_ring": token_ring, "bidir_kv": bidir_kv, "allgather_kv": allgather_kv,
                    "ulysses": ulysses, "hybrid": hybrid}
SCHEDULE_FUNCTIONS = {name: getattr(module, f"{name}_attention") for name, module in SCHEDULE_MODULES.items()}


@dataclass(frozen=True)
class Plan:
    """What runs for one (sp, seq_len, rows): the schedule, the group it talks to (a process
    group, or a HybridGroup), hybrid's outer schedule and Ulysses degree, and why."""

    name: str
    group: object
    sp: int
    outer: str | None = None
    sp_inner: int = 1
    why: str = ""

    @property
    def label(self) -> str:
        """e.g. `hybrid (ulysses 2 x ring 2)` for the run log."""
        if self.name != "hybrid":
            return self.name
        return f"hybrid (ulysses {self.sp_inner} x {self.outer} {self.sp // self.sp_inner})"

    def process_groups(self) -> list:
        if isinstance(self.group, HybridGroup):
            return [g for g in (self.group.inner, self.group.outer) if g is not None]
        return [self.group]


class SequenceParallelAttention:
    """The model's attention callable under sequence parallelism.

    Each step the trainer tells it the bucket's sp degree, (padded) length and rows; it plans
    the schedule once per such key (fixed, or `auto` from the cost model on `machine`, logged
    once with the reason) and attention calls go to that schedule on that sp sub-group. sp = 1
    runs local attention. `hybrid` at a size whose inner degree u = gcd(sp_inner, sp) is the whole
    group runs Ulysses on it, and at u = 1 its outer schedule: the name that ran is what the run
    log and metrics record. `documents` (packed documents): None, or the document id of every
    position of the whole padded rows [B, S] in natural order, set by the trainer per
    micro-batch; every schedule then masks pairs of different documents (parallel/blocks.py).
    """

    def __init__(self, schedule: str, groups: dict, heads_q: int, heads_kv: int, head_dim: int,
                 dtype_bytes: int, machine=None, log_choices: bool = True, kernel: str = "auto",
                 hybrid_groups: dict | None = None, sp_inner: int = 1, hybrid_outer: str = "auto",
                 kept: bool = False) -> None:
        if schedule != "auto" and schedule not in SCHEDULE_FUNCTIONS:
            raise ValueError(f"parallel.attention={schedule!r}: expected auto or one of {sorted(SCHEDULE_FUNCTIONS)}")
        if hybrid_outer != "auto" and hybrid_outer not in OUTER_SCHEDULES:
            raise ValueError(f"parallel.hybrid_outer={hybrid_outer!r}: expected auto or one of {OUTER_SCHEDULES}")
        needs_model = schedule == "auto" or (schedule == "hybrid" and hybrid_outer == "auto")
        if needs_model and machine is None:
            raise ValueError(f"parallel.attention={schedule!r} (hybrid_outer {hybrid_outer!r}) chooses with the cost "
                             "model: pass the machine (parallel.topology.machine_for_run)")
        self.schedule, self.groups, self.machine = schedule, groups, machine
        self.hybrid_groups, self.sp_inner, self.hybrid_outer = hybrid_groups or {}, sp_inner, hybrid_outer
        self.heads = (heads_q, heads_kv, head_dim, dtype_bytes)
        self.kept = kept  # memory.policy keeps (out, lse) and calls forward_lse/backward_lse: priced as such
        self.log_choices = log_choices
        self.kernel, self.local = kernel, LocalAttention(kernel)  # the block kernel every schedule runs
        self.sp, self.name, self.plan = 1, "local", None
        self._plans: dict[tuple[int, int, int], Plan] = {}
        self._documents = None

    @property
    def documents(self):
        return self._documents

    @documents.setter
    def documents(self, ids) -> None:
        self._documents = ids
        self.local.documents = ids  # sp 1: the rows are whole

    def set_step(self, sp: int, seq_len: int, rows: int = 1) -> str:
        """Plans (once per key) and selects the schedule for a step at this sp degree, padded
        length and rows per rank. Every rank of the sub-group passes the same key and machine,
        so every rank runs the same schedule."""
        self.sp = sp
        if sp == 1:
            self.name, self.plan = "local", None
            return self.name
        key = (sp, seq_len, rows)
        if key not in self._plans:
            self._plans[key] = plan = self._make_plan(sp, seq_len, rows)
            if self.log_choices and plan.why:
                log.info("attention at sp %d, length %d, %d row(s) -> %s: %s", sp, seq_len, rows, plan.label, plan.why)
        self.plan = self._plans[key]
        self.name = self.plan.name
        return self.name

    def _shape(self, sp: int, seq_len: int, rows: int) -> Shape:
        hq, hkv, d, b = self.heads
        return Shape(seq_len, hq, hkv, d, sp, b, batch=rows, memo=self.kept)

    def _make_plan(self, sp: int, seq_len: int, rows: int) -> Plan:
        u = inner_degree(self.sp_inner, sp)
        if self.schedule == "auto":
            candidates = [*OUTER_SCHEDULES, "ulysses"] + (["hybrid"] if sp in self.hybrid_groups else [])
            c = choose(self._shape(sp, seq_len, rows), self.machine, candidates=tuple(candidates), sp_inner=u)
            return self._resolved(c.name, c.outer, sp, c.why)
        if self.schedule != "hybrid":
            return Plan(self.schedule, self.groups[sp], sp)
        if u == sp:  # the whole sub-group fits the inner degree: all Ulysses
            return Plan("ulysses", self.groups[sp], sp, why=f"hybrid with inner degree gcd(sp_inner, {sp}) = {sp}")
        outer, why = self.hybrid_outer, ""
        if outer == "auto":
            if u == 1:
                c = choose(self._shape(sp, seq_len, rows), self.machine, candidates=OUTER_SCHEDULES, sp_inner=1)
                outer = c.name
            else:
                c = choose(self._shape(sp, seq_len, rows), self.machine, candidates=("hybrid",), sp_inner=u)
                outer = c.outer
            why = f"hybrid_outer auto: {c.why}"
            outers = c.table.get("hybrid", {}).get("outers", {})
            if outers:
                why += " (outer schedules: " + ", ".join(f"{o} {t * 1e3:.3g} ms" for o, t in outers.items()) + ")"
        if u == 1:  # no inner dimension at this size: the outer schedule on the sub-group
            return Plan(outer, self.groups[sp], sp,
                        why="; ".join(filter(None, (f"hybrid with inner degree gcd(sp_inner, {sp}) = 1", why))))
        return self._resolved("hybrid", outer, sp, why or f"hybrid, inner degree {u}, outer {outer}")

    def _resolved(self, name: str, outer: str | None, sp: int, why: str) -> Plan:
        if name != "hybrid":
            return Plan(name, self.groups[sp], sp, why=why)
        inner_group, outer_group, u = self.hybrid_groups[sp]
        return Plan("hybrid", HybridGroup(inner_group, outer_group, outer), sp, outer, u, why)

    def process_groups(self) -> list:
        """The groups this step's schedule talks over (for the byte counters)."""
        return [] if self.plan is None else self.plan.process_groups()

    def _check(self, q) -> None:
        d = self._documents
        ids = d[0] if isinstance(d, (tuple, list)) else d
        if ids is not None and tuple(ids.shape[:2]) != (q.shape[0], q.shape[1] * self.sp):
            raise ValueError(f"document ids {tuple(ids.shape)} do not cover the rows ({q.shape[0]} x {q.shape[1]} "
                             f"tokens on each of {self.sp} ranks): set attention.documents for this batch (or None)")

    def __call__(self, q, k, v):
        if self.sp == 1:
            return self.local(q, k, v)
        self._check(q)
        return SCHEDULE_FUNCTIONS[self.name](*autocast_inputs(q, k, v), self.plan.group, kernel=self.kernel,
                                             docs=self._documents)

    # For memory/offload.py, which keeps (out, lse) and runs attention's backward itself.
    def by_rows(self):
        """The local kernel while this step runs at sp 1 (MEMO's backward then goes query rows at a
        time); None while the schedule shards the sequence (its backward takes the whole shard)."""
        return self.local if self.sp == 1 else None

    def forward_lse(self, q, k, v):
        if self.sp == 1:
            return self.local.forward_lse(q, k, v)
        self._check(q)
        return SCHEDULE_MODULES[self.name].forward(self.plan.group, *autocast_inputs(q, k, v), kernel=self.kernel,
                                                   docs=self._documents)

    def backward_lse(self, dout, q, k, v, out, lse):
        if self.sp == 1:
            return self.local.backward_lse(dout, q, k, v, out, lse)
        q2, k2, v2 = autocast_inputs(q, k, v)
        grads = SCHEDULE_MODULES[self.name].backward(self.plan.group, dout.to(out.dtype).contiguous(),
                                                     q2, k2, v2, out, lse, kernel=self.kernel, docs=self._documents)
        return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v)))

