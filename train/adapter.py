"""LoRA adapters on our own CausalLM through peft, and what a run's adapter becomes on export.

LoRA (Hu et al., arXiv 2106.09685, sec. 4): a target projection W x becomes W x + alpha/r * B A x
with W frozen, A [r, in] random and B [out, r] zero, so training starts from the base model.
LongLoRA (Chen et al., arXiv 2309.12307, sec. 3.3) found that extending the context also needs
the embedding and the norms trained in full: `LoraSpec.trainable` names those.

peft's `inject_adapter_in_model` swaps each target `nn.Linear` for peft's `lora.Linear` (the
original kept as its `base_layer`) in place, so the model stays our CausalLM: sequence-parallel
attention, MEMO's block wrappers, token elimination, the CCE / vocabulary-parallel loss head and
FSDP2 apply to it exactly as to a fully fine-tuned one (they call the projections as modules).
State-dict names gain `.base_layer.` and `.lora_A.default.` / `.lora_B.default.`, and checkpoints
hold them. Export folds the adapters into the base weights with peft's own `merge_and_unload`
(plain HF names again), or writes a peft adapter folder for transformers' model of the same
architecture (`save_adapter_folder`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..models.config import ModelConfig
from ..models.hf import CheckpointError, check_destination, copy_tokenizer, swap_in_folder
from ..models.llama import CausalLM, RMSNorm

ADAPTER_NAME = "default"  # peft's name for a model's one adapter (in the state-dict keys)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class LoraSpec:
    """What a LoRA run trains: recipes' model.adapter as plain values (also recorded in checkpoints)."""
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    trainable: tuple[str, ...] = ("embed", "norm")
    base_model: str | None = None  # the folder the base weights came from (the adapter folder names it)

    def config(self, **extra):
        from peft import LoraConfig  # imported when an adapter is used: full fine-tuning never loads peft

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.targets), bias="none", **extra)

    def describe(self) -> str:
        return (f"lora rank {self.rank} alpha {self.alpha:g}" + (f" dropout {self.dropout:g}" if self.dropout else "")
                + f" on {','.join(self.targets)}; trained in full: {','.join(self.trainable) or 'nothing else'}")

    def to_json(self) -> dict:
        return {**asdict(self), "type": "lora"}

    @classmethod
    def from_json(cls, data: dict) -> LoraSpec:
        return cls(rank=int(data["rank"]), alpha=float(data["alpha"]), dropout=float(data.get("dropout", 0.0)),
                   targets=tuple(data["targets"]), trainable=tuple(data.get("trainable", ())),
                   base_model=data.get("base_model"))


def apply_lora(model: CausalLM, spec: LoraSpec, seed: int) -> None:
    """In place: LoRA on `spec.targets` (A initialised from `seed`, whatever the process drew
    before, so every rank starts from the same adapter), every other weight frozen except
    `spec.trainable`. Call it after the weights are loaded and before any wrapper or sharding."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        from peft import inject_adapter_in_model

        inject_adapter_in_model(spec.config(), model, adapter_name=ADAPTER_NAME)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable_parameters(model, spec.trainable, adapters=True):
        p.requires_grad_(True)


def trainable_parameters(model: CausalLM, trainable, adapters: bool = True) -> list[torch.nn.Parameter]:
    """The LoRA weights (with `adapters`) and the base weights `trainable` names: embed = the input
    embedding (one weight with the output head when tied; an untied lm_head is not included, as in
    LongLoRA), norm = every RMSNorm weight (the blocks', the final one, Qwen3's q/k norms)."""
    found = [p for name, p in model.named_parameters() if adapters and ".lora_" in name]
    if "embed" in trainable:
        found.append(model.model.embed_tokens.weight)
    if "norm" in trainable:
        found += [m.weight for m in model.modules() if isinstance(m, RMSNorm)]
    return found


def _tuner(model: CausalLM, spec: LoraSpec):
    """peft's LoRA tuner around `model` (adapters injected in place; their values are to be loaded)."""
    with torch.random.fork_rng(devices=[]):
        from peft.tuners.lora import LoraModel

        return LoraModel(model, spec.config(), ADAPTER_NAME)


def load_merged(model: CausalLM, spec: LoraSpec, load) -> CausalLM:
    """`model` (plain) given `spec`'s adapters, `load(state_dict)` fills every weight in place
    (a checkpoint's), then peft's `merge_and_unload` folds the adapters into the base weights:
    the same object, with plain HF module names again."""
    tuner = _tuner(model, spec)
    load(model.state_dict())
    return tuner.merge_and_unload(safe_merge=True)


def merged_state_dict(cfg: ModelConfig, state: dict[str, torch.Tensor], spec: LoraSpec) -> dict[str, torch.Tensor]:
    """A LoRA'd model's full state dict (peft names) -> the merged model's (HF names). The model is
    built on the meta device and takes `state`'s tensors (assign): no second copy of the weights;
    the merge updates the base weights of `state` in place."""
    with torch.device("meta"):
        model = CausalLM(cfg, attention=None, loss=None)
        tuner = _tuner(model, spec)
    model.load_state_dict(state, strict=True, assign=True)
    return tuner.merge_and_unload(safe_merge=True).state_dict()


def checkpoint_adapter(folder: Path) -> LoraSpec | None:
    """The adapter a checkpoint's run trained (trainer_state.json), None for full fine-tuning."""
    try:
        data = json.loads((Path(folder) / "trainer_state.json").read_text()).get("adapter")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    if not data:
        return None
    try:
        return LoraSpec.from_json(data)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{folder}: trainer_state.json has an unreadable adapter entry ({type(e).__name__}: "
                              f"{e})") from None


def save_adapter_folder(cfg: ModelConfig, state: dict[str, torch.Tensor], spec: LoraSpec, out: str | Path,
                        tokenizer_dir: Path | None = None, dtype: torch.dtype | None = None, force: bool = False,
                        protected: tuple = (), run_folders: tuple = ()) -> Path:
    """A peft adapter folder (adapter_config.json + adapter_model.safetensors, tokenizer files) that
    `PeftModel.from_pretrained(<transformers model of the base>, out)` loads into our model's
    function: transformers' model of this architecture gets peft's LoRA with the same settings and
    the base weights `trainable` names as peft's modules_to_save (tied with the head when the
    embeddings are tied), our weights are copied in by name, and peft's save_pretrained writes it.
    The base stays on the meta device: only the adapter's tensors are ever materialised."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = check_destination(out, force, protected, run_folders)
    hf = cfg.to_hf()
    hf_config = AutoConfig.for_model(hf.pop("model_type"), **hf)
    to_save = [name for key, name in (("embed", "embed_tokens"), ("norm", "norm")) if key in spec.trainable]
    tie = cfg.tie_word_embeddings and "embed" in spec.trainable
    config = spec.config(modules_to_save=to_save or None, ensure_weight_tying=tie)
    with torch.device("meta"):
        from peft import get_peft_model

        peft_model = get_peft_model(AutoModelForCausalLM.from_config(hf_config), config, adapter_name=ADAPTER_NAME)
    peft_model.peft_config[ADAPTER_NAME].base_model_name_or_path = spec.base_model  # get_peft_model reset it
    inner = peft_model.base_model.model
    values = {}
    for name, p in inner.named_parameters(remove_duplicate=False):  # what peft trains = what it saves
        if not p.requires_grad:
            continue
        ours = name.replace(f".modules_to_save.{ADAPTER_NAME}.", ".")
        if tie and ours == "lm_head.weight":
            ours = "model.embed_tokens.weight"
        if ours not in state:
            raise CheckpointError(f"the adapter's {name} has no counterpart {ours!r} in the checkpoint")
        values[name] = state[ours].detach().to(dtype or state[ours].dtype).contiguous().cpu()
    inner.load_state_dict(values, strict=False, assign=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    # written beside `out`, then swapped in whole (as models/hf.save_folder does): never half a folder
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        # the embedding goes in as modules_to_save; save_embedding_layers is for vocabularies resized under LoRA
        peft_model.save_pretrained(tmp, selected_adapters=[ADAPTER_NAME], save_embedding_layers=False)
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, tmp)
        swap_in_folder(tmp, out)  # empty, or replaced with --force (check_destination)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
