"""HF export: from a live (possibly FSDP2-sharded) model, or from a checkpoint folder in one
process, whatever world size wrote it (DCP reads every rank's shards into full tensors)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from ..kernels.attention import local_attention
from ..models.config import load_hf_config
from ..models.hf import CheckpointError, check_destination, save_folder
from ..models.llama import CausalLM
from ..parallel import vocab
from . import checkpoint as ckpt


def export_checkpoint(checkpoint: str | Path, out: str | Path, dtype: torch.dtype | None = None,
                      force: bool = False) -> Path:
    """`out` must be new or empty (or `force`); never the checkpoint, its run folder or a folder
    holding them."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint}: checkpoint folder not found")
    run_folders = (checkpoint.parent.parent,) if checkpoint.parent.name == "checkpoints" else ()
    check_destination(out, force, (checkpoint,), run_folders)  # before the slow part
    why = ckpt.problem(checkpoint)
    if why is not None:
        raise CheckpointError(f"{checkpoint}: not a usable checkpoint: {why}")
    cfg = load_hf_config(checkpoint)
    model = CausalLM(cfg, local_attention, loss=None)
    state = model.state_dict()
    ckpt.dcp_load({"model": state}, checkpoint, "weights do not match its config.json")
    return save_folder(model, out, tokenizer_dir=checkpoint, dtype=dtype, force=force, protected=(checkpoint,),
                       run_folders=run_folders)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective under FSDP2 and vocabulary parallelism: every rank gathers; the full tensors, on
    the CPU (rank 0's; FSDP2 leaves the others empty)."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    vp = getattr(model, "vocab_parallel", None)
    for name, p in vocab.sharded_names(model).items():
        state[name] = vocab.full_weight(p.detach(), vp.shard).cpu()
    return state
