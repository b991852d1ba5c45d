"""Process groups: data-parallel (dp) x sequence-parallel (sp) degrees over the launched world.

Gloo on CPU, NCCL on CUDA. Single-process runs get a Mesh with no process group, so the same
code path serves one process and `torchrun`.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


class MeshError(ValueError):
    pass


@dataclass(frozen=True)
class Degrees:
    dp: int
    sp: int = 1

    def validate(self, world_size: int) -> None:
        if self.dp * self.sp != world_size:
            raise MeshError(f"dp ({self.dp}) x sp ({self.sp}) = {self.dp * self.sp} != world size {world_size}")


@dataclass(frozen=True)
class Mesh:
    rank: int
    world: int
    dp_rank: int
    dp_world: int
    dp_group: dist.ProcessGroup | None
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: torch.device, backend: str = "auto", timeout_seconds: int = 600, sp: int = 1) -> Mesh:
    world = int(os.environ.get("WORLD_SIZE", "1"))
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
    degrees = Degrees(dp=world // sp, sp=sp)
    degrees.validate(world)
    return Mesh(rank, world, rank // sp, degrees.dp, dist.group.WORLD, device)


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
