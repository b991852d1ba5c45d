"""Process groups: data-parallel (dp) x sequence-parallel (sp) degrees over the launched world.

Rank = dp_rank * sp + sp_rank, so an sp group is sp consecutive ranks (one node when sp <= GPUs
per node). Gloo on CPU, NCCL on CUDA. For per-bucket sequence parallelism every power-of-two
sub-group of the sp group is created up front (`sp_groups[k]`, k <= sp). Parameters are
replicated on every rank, so gradients sum over all of them (`grad_group`). A single process gets
a Mesh without process groups, so one code path serves one process and `torchrun`.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


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
        size = sp
        while size >= 2:
            for start in range(0, world, size):
                group = dist.new_group(list(range(start, start + size)))
                if start <= rank < start + size:
                    sp_groups[size] = group
            size //= 2
    return Mesh(rank, world, dp_rank, world // sp, dp_group, device, sp_rank, sp, sp_groups)


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
