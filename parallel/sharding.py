"""Parameter sharding over all ranks (dp x sp): FSDP2 or DeepSpeed ZeRO.

FSDP2 (`torch.distributed.fsdp.fully_shard`): one unit per transformer block plus the root (the
embedding, final norm and head), so one block's parameters are gathered at a time, in forward and
again in backward. Sequence-parallel ranks hold the same parameters, so the sharding spans the
whole world and the reduce-scatter sums the sp ranks' partial gradients together with dp's, as
torchtitan's `dp_shard_cp` does. Losses are already normalised by the global count of valid
tokens (train/trainer.py), so the reduction is a plain sum: the divide factor is 1.

DeepSpeed ZeRO-1/2/3 (an optional extra): `deepspeed_engine` builds the engine from the recipe's
stage and our optimizer; the engine then owns backward, gradient reduction and the step.

Gradient clipping over DTensor gradients: `clip_grad_norm` returns a plain tensor either way.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.distributed as dist


class ShardingError(ValueError):
    pass


def deepspeed_available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


DEEPSPEED_INSTALL = "install it with DS_BUILD_OPS=0 pip install deepspeed (or pip install -e '.[deepspeed]')"


def fully_shard_model(model: torch.nn.Module, blocks, device: torch.device, param_dtype: torch.dtype | None = None,
                      reduce_dtype: torch.dtype | None = None, cpu_offload: bool = False,
                      ignored_params: set | None = None) -> torch.nn.Module:
    """FSDP2 over the default process group, each of `blocks` its own unit, then the root;
    `ignored_params` (the vocabulary shards, sharded already) stay plain tensors that FSDP2 neither
    gathers nor reduces."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if not dist.is_initialized():
        raise ShardingError("parallel.sharding=fsdp2 needs a distributed launch (torchrun); with one process use 'none'")
    if cpu_offload and device.type != "cuda":
        raise ShardingError("parallel.cpu_offload: needs CUDA parameters to offload (this run is on the CPU already)")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("shard",))
    kwargs = {
        "mesh": mesh,
        "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
        "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy(),
    }
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs, ignored_params=ignored_params or None)
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            module.set_gradient_divide_factor(1.0)  # sum: the loss is normalised globally already
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
    return model


def _dtensor_type():
    from torch.distributed.tensor import DTensor

    return DTensor


def clip_grad_norm(params, max_norm: float, vocab_params=(), vocab_shard=None) -> torch.Tensor:
    """Global gradient norm (clipped to max_norm when > 0) over plain or DTensor gradients.
    `vocab_params` hold rows of weights sharded over `vocab_shard.group` (parallel/vocab.py): their
    squared norms add over the group, then every gradient is scaled by the one coefficient."""
    params = [p for p in params if p.grad is not None]
    if vocab_shard is not None:
        from .vocab import grad_norm_squared

        sharded = {id(p) for p in vocab_params}
        others = [p for p in params if id(p) not in sharded]
        norm = torch.nn.utils.get_total_norm([p.grad for p in others]) if others else torch.zeros(())
        if isinstance(norm, _dtensor_type()):
            norm = norm.full_tensor()
        total = (norm.double().to(params[0].device) ** 2 + grad_norm_squared(vocab_params, vocab_shard)).sqrt()
        if max_norm > 0:
            coef = min(1.0, max_norm / (total.item() + 1e-6))  # torch's clip_grads_with_norm_
            for p in params:
                p.grad.mul_(coef)
        return total.float()
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if isinstance(norm, _dtensor_type()):
        norm = norm.full_tensor()
    return norm


def deepspeed_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, stage: int, clip: float, bf16: bool):
    """A DeepSpeed engine running ZeRO-`stage` with our model and optimizer (torch AdamW: no JIT
    build). The trainer marks the accumulation boundary itself (variable micro-batches per step)
    and scales the loss by the world size: DeepSpeed averages gradients, our loss wants a sum."""
    if not deepspeed_available():
        raise ShardingError(f"parallel.sharding=deepspeed: DeepSpeed is not installed; {DEEPSPEED_INSTALL}")
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": clip,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                           dist_init_required=False)
    return engine
