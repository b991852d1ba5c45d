"""One communicator for every sequence-parallel schedule: two channels, batched isend/irecv,
byte counters and an optional event trace.

`exchange` posts all sends and receives of one ring step on one channel as one batch (torch's
batch_isend_irecv), so transfers are in flight while the block of the current step computes;
`Pending.wait` completes them. A schedule posts the transfer that feeds step s+1 *before* it
computes step s and waits after (the order `tests/test_sp_comm.py` checks from the trace).

Channels: "ring" runs on the schedule's process group, "return" on a twin group over the same
ranks. `new_group` makes both together, collectively over the default group (every rank, the
same ranks in the same order: parallel/mesh.py does it at start-up for every sp sub-group and
hybrid's outer groups); only the world group's twin is made on first use, since every rank is a
member of it and reaches that first use in the same schedule call. On NCCL the operations of one communicator run in
order, so TokenRing's returning partials (or a ring's travelling dK/dV accumulator) on the ring
channel would queue in front of the next block the compute waits on; on their own communicator
both directions of the link carry traffic at once (as the TokenRing code does with its q and
out groups, arXiv 2412.20501).

Counters, per rank: bytes sent by direction ("next" = rank+1, "prev" = rank-1, "direct" = any
other peer) and to each peer, and bytes received. Two views of "the busiest link", because the
fabric decides which one limits: `max_bytes_per_pair_direction` is the most bytes sent to one
peer (a private link per peer pair: PCIe P2P, an NVLink mesh), `bytes_sent` is what leaves the
rank's one port (NVSwitch, a NIC).
"""

from __future__ import annotations

import contextlib
import itertools
from collections import defaultdict

import torch
import torch.distributed as dist

CHANNELS = ("ring", "return")

_trace: list[tuple] | None = None
_ids = itertools.count()
_TWINS: dict[int, dist.ProcessGroup] = {}  # id(group) -> its return-channel twin


def new_group(ranks: list[int], twin: bool = True):
    """dist.new_group(ranks) and, with `twin`, the twin its return channel runs on. Collective
    over the default group: every rank calls it with the same arguments in the same order."""
    group = dist.new_group(ranks)
    if twin:
        other = dist.new_group(ranks)
        if dist.get_rank() in ranks:
            _TWINS[id(group)] = other
    return group


@contextlib.contextmanager
def tracing():
    """Records ("post", id, channel, what), ("wait", id), ("begin", what), ("end", what) events in
    this process while the block runs; yields the list."""
    global _trace
    events: list[tuple] = []
    saved, _trace = _trace, events
    try:
        yield events
    finally:
        _trace = saved


def _record(*event) -> None:
    if _trace is not None:
        _trace.append(event)


@contextlib.contextmanager
def compute(what: str):
    """Marks the compute of one schedule step in the trace (nothing when not tracing)."""
    _record("begin", what)
    try:
        yield
    finally:
        _record("end", what)


class Pending:
    def __init__(self, works, ident: int = -1) -> None:
        self.works, self.ident = works, ident

    def wait(self) -> None:
        for w in self.works:
            w.wait()
        if self.works or self.ident >= 0:
            _record("wait", self.ident)
        self.works, self.ident = [], -1


def posted(works, what: str = "") -> Pending:
    """A Pending of collective work handles (torch's async_op), recorded in the trace like a post."""
    ident = next(_ids)
    _record("post", ident, "ring", what)
    return Pending(works, ident)


class Communicator:
    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.next = (self.rank + 1) % self.world
        self.prev = (self.rank - 1) % self.world
        self._groups = {"ring": group}
        self.bytes_sent: dict[str, int] = defaultdict(int)
        self.bytes_to_peer: dict[int, int] = defaultdict(int)
        self.bytes_received = 0

    def _global(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank)

    def channel_group(self, channel: str) -> dist.ProcessGroup:
        """The process group of a channel (module docstring)."""
        if channel not in CHANNELS:
            raise ValueError(f"channel={channel!r}: expected one of {CHANNELS}")
        if channel not in self._groups:
            twin = _TWINS.get(id(self.group))
            if twin is None and self.group is dist.group.WORLD:  # every rank is a member and gets here
                twin = dist.new_group(dist.get_process_group_ranks(self.group))
            if twin is None:
                raise RuntimeError("this sp group has no return channel: create it with parallel.p2p.new_group, "
                                   "collectively on every rank, as parallel/mesh.py does")
            self._groups[channel] = twin
        return self._groups[channel]

    def direction(self, peer: int) -> str:
        if peer == self.next:
            return "next"
        if peer == self.prev:
            return "prev"
        return "direct"

    def exchange(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]],
                 channel: str = "ring", what: str = "") -> Pending:
        """Posts sends [(tensor, peer)] and receives [(buffer, peer)] (group ranks) as one batch
        on `channel`; `what` names the transfer in the trace (e.g. "q 3": the block of step 3)."""
        group = self.channel_group(channel)
        ops = []
        for tensor, peer in sends:
            ops.append(dist.P2POp(dist.isend, tensor.contiguous(), self._global(peer), group))
            nbytes = tensor.numel() * tensor.element_size()
            self.bytes_sent[self.direction(peer)] += nbytes
            self.bytes_to_peer[peer] += nbytes
        for buffer, peer in recvs:
            ops.append(dist.P2POp(dist.irecv, buffer, self._global(peer), group))
            self.bytes_received += buffer.numel() * buffer.element_size()
        ident = next(_ids)
        _record("post", ident, channel, what)
        return Pending(dist.batch_isend_irecv(ops) if ops else [], ident)

    def to_every_peer(self, x: torch.Tensor, y: torch.Tensor, what: str = "", wait: bool = True) -> Pending:
        """y[j] = rank j's x[me] for x, y [P, ...]: an all-to-all as one batch of point-to-point
        transfers (what gloo's all-gather, reduce-scatter and all-to-all become here: gloo runs
        its collectives hop by hop in the calling thread, about 3x slower on this box). With
        wait=False the transfers are left in flight: wait on the returned Pending."""
        peers = [p for p in range(self.world) if p != self.rank]
        pending = self.exchange([(x[p], p) for p in peers], [(y[p], p) for p in peers], what=what)
        y[self.rank].copy_(x[self.rank])
        if wait:
            pending.wait()
        return pending

    def count_each_peer(self, nbytes: int) -> None:
        """Records a collective that sends `nbytes` to every other rank (and receives as much)."""
        for peer in range(self.world):
            if peer != self.rank:
                self.count("direct", nbytes, peer)

    def count(self, direction: str, nbytes: int, peer: int | None = None, received: int | None = None) -> None:
        """Records bytes moved by a collective (e.g. Ulysses' all-to-all) under `direction`; the
        rank receives as much unless `received` says otherwise (true of all-to-all, all-gather
        and reduce-scatter of equal shards)."""
        self.bytes_sent[direction] += nbytes
        self.bytes_received += nbytes if received is None else received
        if peer is not None:
            self.bytes_to_peer[peer] += nbytes

    def reset(self) -> None:
        self.bytes_sent.clear()
        self.bytes_to_peer.clear()
        self.bytes_received = 0

    def stats(self) -> dict[str, int]:
        """Bytes this rank sent, by direction, and the two busiest-link views (module docstring)."""
        stats = {f"bytes_sent_{k}": v for k, v in self.bytes_sent.items()}
        stats["bytes_sent"] = sum(self.bytes_sent.values())
        stats["bytes_received"] = self.bytes_received
        stats["max_bytes_per_pair_direction"] = max(self.bytes_to_peer.values(), default=0)
        return stats


_COMMUNICATORS: dict[int, Communicator] = {}


def forget() -> None:
    """Drops the communicators and twins (keyed by id(group)): before the process groups are
    destroyed, so a later group that reuses an id starts afresh."""
    _COMMUNICATORS.clear()
    _TWINS.clear()


def communicator(group: dist.ProcessGroup) -> Communicator:
    """The communicator of `group` (one per group, so byte counters accumulate over a step)."""
    key = id(group)
    if key not in _COMMUNICATORS:
        _COMMUNICATORS[key] = Communicator(group)
    return _COMMUNICATORS[key]
