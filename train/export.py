"""HF export: from a live model or from a checkpoint folder, without the original world size."""

from __future__ import annotations

from pathlib import Path

import torch

from ..kernels.attention import local_attention
from ..models.config import load_hf_config
from ..models.hf import CheckpointError, load_weights, save_folder
from ..models.llama import CausalLM


def export_checkpoint(checkpoint: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> Path:
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint}: checkpoint folder not found")
    cfg = load_hf_config(checkpoint)
    model = CausalLM(cfg, local_attention, loss=None)
    load_weights(model, checkpoint)
    return save_folder(model, out, tokenizer_dir=checkpoint, dtype=dtype)
