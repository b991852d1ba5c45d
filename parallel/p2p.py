"""One communicator for every sequence-parallel schedule: batched isend/irecv, byte counters.

`exchange` posts all sends and receives of one ring step as one batch (torch's
batch_isend_irecv), so transfers to both ring neighbours are in flight at once and overlap the
block computed meanwhile; `wait` completes them. Bytes are counted per direction: "next"
(to rank+1), "prev" (to rank-1) and "direct" (any other peer, e.g. TokenRing's returns).
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist


class Pending:
    def __init__(self, works) -> None:
        self.works = works

    def wait(self) -> None:
        for w in self.works:
            w.wait()
        self.works = []


class Communicator:
    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.next = (self.rank + 1) % self.world
        self.prev = (self.rank - 1) % self.world
        self.bytes_sent: dict[str, int] = defaultdict(int)
        self.bytes_to_peer: dict[int, int] = defaultdict(int)

    def _global(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank)

    def direction(self, peer: int) -> str:
        if peer == self.next:
            return "next"
        if peer == self.prev:
            return "prev"
        return "direct"

    def exchange(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]) -> Pending:
        """Posts sends [(tensor, peer)] and receives [(buffer, peer)] (group ranks) as one batch."""
        ops = []
        for tensor, peer in sends:
            ops.append(dist.P2POp(dist.isend, tensor.contiguous(), self._global(peer), self.group))
            nbytes = tensor.numel() * tensor.element_size()
            self.bytes_sent[self.direction(peer)] += nbytes
            self.bytes_to_peer[peer] += nbytes
        for buffer, peer in recvs:
            ops.append(dist.P2POp(dist.irecv, buffer, self._global(peer), self.group))
        return Pending(dist.batch_isend_irecv(ops) if ops else [])

    def count(self, direction: str, nbytes: int, peer: int | None = None) -> None:
        """Records bytes moved by a collective (e.g. Ulysses' all-to-all) under `direction`."""
        self.bytes_sent[direction] += nbytes
        if peer is not None:
            self.bytes_to_peer[peer] += nbytes

    def reset(self) -> None:
        self.bytes_sent.clear()
        self.bytes_to_peer.clear()

    def stats(self) -> dict[str, int]:
        """Bytes this rank sent, by direction; the busiest outgoing link assumes one link per peer pair."""
        stats = {f"bytes_sent_{k}": v for k, v in self.bytes_sent.items()}
        stats["bytes_sent"] = sum(self.bytes_sent.values())
        stats["max_bytes_per_link_direction"] = max(self.bytes_to_peer.values(), default=0)
        return stats


_COMMUNICATORS: dict[int, Communicator] = {}


def communicator(group: dist.ProcessGroup) -> Communicator:
    """The communicator of `group` (one per group, so byte counters accumulate over a step)."""
    key = id(group)
    if key not in _COMMUNICATORS:
        _COMMUNICATORS[key] = Communicator(group)
    return _COMMUNICATORS[key]
