"""Process groups: data-parallel (dp) x sequence-parallel (sp) degrees over the launched world.

Rank = dp_rank * sp + sp_rank, so an sp group is sp consecutive ranks (one node when sp <= GPUs
per node). Gloo on CPU, NCCL on CUDA. Any sp works. For per-bucket sequence parallelism the
sub-groups of every divisor size d of sp are created up front (`sp_groups[d]`: d consecutive
ranks). Parameters are replicated on every rank, so gradients sum over all of them
(`grad_group`). A single process gets a Mesh without process groups, so one code path serves one
process and `torchrun`.

Hybrid attention (Ulysses inside a node x a ring schedule across nodes, USP arXiv 2405.07719)
splits each sp sub-group of size d into u = gcd(sp_inner, d) consecutive ranks (`inner`: one node
when sp_inner divides the ranks per node) times d/u ranks with the same inner index (`outer`): sub-group
rank = outer_index * u + inner_index. gcd keeps u a divisor of both d and sp_inner, so it still
divides the query heads; sizes where u is 1 or d have no hybrid groups (attention runs the outer
schedule, or Ulysses, on the sub-group itself). `add_hybrid_groups` makes them into
`mesh.hybrid_groups` once the model's query heads fix sp_inner (train/build.py).
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from . import p2p


class MeshError(ValueError):
    pass


@dataclass(frozen=True)
class Degrees:
    dp: int
    sp: int = 1

    def validate(self, world_size: int) -> None:
        if self.sp < 1 or self.dp < 1 or self.dp * self.sp != world_size:
            raise MeshError(
                f"dp ({self.dp}) x sp ({self.sp}) = {self.dp * self.sp} must equal the world size {world_size}: "
                f"choose parallel.sp_degree among the divisors {[d for d in range(1, world_size + 1) if world_size % d == 0]}"
            )


@dataclass(frozen=True)
class Mesh:
    rank: int
    world: int
    dp_rank: int
    dp_world: int
    dp_group: dist.ProcessGroup | None
    device: torch.device
    sp_rank: int = 0
    sp_world: int = 1
    sp_groups: dict = field(default_factory=dict)  # size -> this rank's sp sub-group of that size
    # size -> (inner group, outer group, inner degree u); filled by add_hybrid_groups
    hybrid_groups: dict = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def grad_group(self) -> dist.ProcessGroup | None:
        return dist.group.WORLD if self.world > 1 else None

    @property
    def sp_group(self) -> dist.ProcessGroup | None:
        return self.sp_groups.get(self.sp_world)


def init(device: torch.device, backend: str = "auto", timeout_seconds: int = 600, sp: int = 1) -> Mesh:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    Degrees(dp=max(1, world // sp), sp=sp).validate(world)
    if world == 1:
        return Mesh(0, 1, 0, 1, None, device)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_seconds))
    rank = dist.get_rank()
    dp_rank, sp_rank = divmod(rank, sp)
    dp_group = dist.group.WORLD if sp == 1 else None
    sp_groups: dict = {}
    if sp > 1:
        for r in range(sp):  # every rank must create every group, in the same order
            group = dist.new_group([d * sp + r for d in range(world // sp)])
            if r == sp_rank:
                dp_group = group
        for size in sorted(divisors(sp), reverse=True):
            if size > 1:
                for start in range(0, world, size):
                    group = p2p.new_group(list(range(start, start + size)))  # with its return channel
                    if start <= rank < start + size:
                        sp_groups[size] = group
    return Mesh(rank, world, dp_rank, world // sp, dp_group, device, sp_rank, sp, sp_groups)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def inner_degree(sp_inner: int, size: int) -> int:
    """Hybrid's Ulysses degree in an sp sub-group of `size` ranks (module docstring)."""
    return math.gcd(sp_inner, size)


def hybrid_layout(size: int, u: int) -> tuple[list[list[int]], list[list[int]]]:
    """(inner groups, outer groups) as sub-group ranks: inner = u consecutive ranks, outer = the
    ranks with the same inner index, so sub-group rank = outer_index * u + inner_index."""
    inner = [[o * u + i for i in range(u)] for o in range(size // u)]
    outer = [[o * u + i for o in range(size // u)] for i in range(u)]
    return inner, outer


def add_hybrid_groups(mesh: Mesh, sp_inner: int) -> dict:
    """Fills `mesh.hybrid_groups` with hybrid's inner and outer groups for every sp sub-group
    size d where 1 < gcd(sp_inner, d) < d, and returns it. Collective: every rank calls it once,
    creating the groups in the same order."""
    for size in sorted(divisors(mesh.sp_world), reverse=True):
        u = inner_degree(sp_inner, size)
        if size == 1 or u in (1, size):
            continue
        from .hybrid import make_groups  # the schedules sit above the mesh

        for start in range(0, mesh.world, size):  # every sub-group of this size, on every rank
            mine = make_groups(list(range(start, start + size)), u)
            if mine is not None:
                mesh.hybrid_groups[size] = (mine.inner, mine.outer, u)
    return mesh.hybrid_groups


def resolve_sp_inner(sp_inner: int | str, sp: int, heads_q: int, ranks_per_node: int) -> int:
    """`parallel.sp_inner`: an explicit value as it is; auto = the largest divisor of sp that
    divides the ranks per node (so every inner group of consecutive ranks stays on one node, and
    Ulysses' all-to-alls on its fast links) and the query heads (Ulysses shards heads)."""
    if sp_inner != "auto":
        return int(sp_inner)
    return max(d for d in divisors(sp) if max(1, ranks_per_node) % d == 0 and heads_q % d == 0)


def destroy() -> None:
    p2p.forget()
    if dist.is_initialized():
        dist.destroy_process_group()
