"""HF export: from a live (possibly FSDP2-sharded) model, or from a checkpoint folder in one
process, whatever world size wrote it (DCP reads every rank's shards into full tensors). A LoRA
run's adapters are merged into the base weights (train/adapter.py, peft's merge), or written as a
peft adapter folder (`adapter_only`)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from ..kernels.attention import local_attention
from ..models.config import load_hf_config
from ..models.hf import CheckpointError, check_destination, save_folder
from ..models.llama import CausalLM
from ..parallel import vocab
from . import adapter
from . import checkpoint as ckpt


def export_checkpoint(checkpoint: str | Path, out: str | Path, dtype: torch.dtype | None = None,
                      force: bool = False, adapter_only: bool = False) -> Path:
    """`out` must be new or empty (or `force`); never the checkpoint, its run folder or a folder
    holding them. A LoRA checkpoint exports merged, or with `adapter_only` as a peft adapter folder."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint}: checkpoint folder not found")
    run_folders = (checkpoint.parent.parent,) if checkpoint.parent.name == "checkpoints" else ()
    check_destination(out, force, (checkpoint,), run_folders)  # before the slow part
    why = ckpt.problem(checkpoint)
    if why is not None:
        raise CheckpointError(f"{checkpoint}: not a usable checkpoint: {why}")
    spec = adapter.checkpoint_adapter(checkpoint)
    if adapter_only and spec is None:
        raise CheckpointError(f"{checkpoint}: --adapter-only needs a LoRA run's checkpoint (model.adapter); this run "
                              "trained every weight: export it without --adapter-only")
    cfg = load_hf_config(checkpoint)
    model = CausalLM(cfg, local_attention, loss=None)
    if adapter_only:
        adapter.apply_lora(model, spec, seed=0)  # the adapters' shapes; their values come from the checkpoint
        state = model.state_dict()
        ckpt.dcp_load({"model": state}, checkpoint, "weights do not match its config.json and adapter")
        return adapter.save_adapter_folder(cfg, state, spec, out, tokenizer_dir=checkpoint, dtype=dtype, force=force,
                                           protected=(checkpoint,), run_folders=run_folders)
    load_checkpoint_weights(model, checkpoint)
    return save_folder(model, out, tokenizer_dir=checkpoint, dtype=dtype, force=force, protected=(checkpoint,),
                       run_folders=run_folders)


def load_checkpoint_weights(model: CausalLM, checkpoint: Path) -> None:
    """A training checkpoint's weights into `model` (plain, unwrapped); a LoRA run's with its
    adapters merged into the base weights, so `model` keeps its plain HF module names."""
    spec = adapter.checkpoint_adapter(checkpoint)

    def load(state: dict) -> None:
        ckpt.dcp_load({"model": state}, checkpoint, "weights do not match its config.json"
                      + (" and adapter" if spec else ""))

    if spec is None:
        load(model.state_dict())
    else:
        adapter.load_merged(model, spec, load)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective under FSDP2 and vocabulary parallelism: every rank gathers; the full tensors, on
    the CPU (rank 0's; FSDP2 leaves the others empty)."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    vp = getattr(model, "vocab_parallel", None)
    for name, p in vocab.sharded_names(model).items():
        state[name] = vocab.full_weight(p.detach(), vp.shard).cpu()
    return state
