"""HF export: from a live (possibly FSDP2-sharded) model, or from a checkpoint folder in one
process, whatever world size wrote it (DCP reads every rank's shards into full tensors)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from ..kernels.attention import local_attention
from ..models.config import load_hf_config
from ..models.hf import CheckpointError, save_folder
from ..models.llama import CausalLM
from . import checkpoint as ckpt


def export_checkpoint(checkpoint: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> Path:
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint}: checkpoint folder not found")
    why = ckpt.problem(checkpoint)
    if why is not None:
        raise CheckpointError(f"{checkpoint}: not a usable checkpoint: {why}")
    cfg = load_hf_config(checkpoint)
    model = CausalLM(cfg, local_attention, loss=None)
    state = model.state_dict()
    try:
        dcp.load({"model": state}, checkpoint_id=checkpoint / "dcp", no_dist=True)
    except Exception as e:  # noqa: BLE001 - DCP raises several types for a mismatch
        raise CheckpointError(f"{checkpoint}: weights do not match its config.json ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:300]})") from None
    return save_folder(model, out, tokenizer_dir=checkpoint, dtype=dtype)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective under FSDP2: every rank gathers; the full tensors, on the CPU."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
