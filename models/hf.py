"""Hugging Face folders in and out: config.json + (sharded) safetensors + tokenizer files.

Our module names equal the HF checkpoint keys, so loading is a key-set check and a copy.
Also converts a Llama-family GGUF file (e.g. the embedded SmolLM2-135M-Instruct Q4_1) to such a
folder, reading it with transformers' GGUF reader, which dequantises to fp32.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig, ModelConfigError, load_hf_config

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",  # transformers >= 4.47 writes the chat template here, not in tokenizer_config.json
    "chat_template.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
)


class CheckpointError(ValueError):
    """A model folder or file that cannot be read, naming the file and what was expected."""


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index (expected JSON with a weight_map of tensor "
                                  f"name -> shard file; {type(e).__name__})") from None
        if not all(isinstance(name, str) and "/" not in name and name.endswith(".safetensors") for name in shards):
            raise CheckpointError(f"{index}: weight_map must name .safetensors files in {folder}")
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"{index}: lists shard(s) {missing} that are not in {folder}")
        return [folder / s for s in shards]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(
        f"{folder}: no model.safetensors or model.safetensors.index.json (only safetensors weights are read)"
    )


def read_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(Path(folder)):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    state[key] = f.get_tensor(key)
        except Exception as e:  # safetensors raises its own error types for truncated files
            raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None
    return state


def load_weights(model: torch.nn.Module, folder: str | Path) -> None:
    """Copies an HF checkpoint into `model` (a models.llama.CausalLM), strictly."""
    state = read_state_dict(folder)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(k for k in set(state) - set(own) if not k.endswith("rotary_emb.inv_freq"))
    if missing or unexpected:
        raise CheckpointError(
            f"{folder}: weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    with torch.no_grad():
        for key, tensor in own.items():
            if tensor.shape != state[key].shape:
                raise CheckpointError(
                    f"{folder}: {key} has shape {tuple(state[key].shape)}, config expects {tuple(tensor.shape)}"
                )
            tensor.copy_(state[key])


def check_destination(out: str | Path, force: bool = False, protected: tuple = (), run_folders: tuple = ()) -> Path:
    """Refuses a destination whose replacement would lose what we did not write: a file or a
    symbolic link, a non-empty folder (unless `force`); with or without `force`, a `protected`
    path (a source checkpoint, an input file), a folder holding one, or a folder inside one (its
    files are what the checkpoint's manifest lists); and a `run_folders` entry or a folder holding
    one (a folder inside a run folder is fine while it is new or empty)."""
    out = Path(out).absolute()
    if out.is_symlink():
        raise CheckpointError(f"{out}: is a symbolic link; give the folder it points to, or another destination")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a folder; choose another destination")
    real = out.resolve()
    for path in protected:
        path = Path(path).absolute().resolve()
        if real == path or real in path.parents or path in real.parents:
            raise CheckpointError(f"{out}: writing there would change or delete {path}; choose a destination "
                                  "outside it")
    replacing = out.is_dir() and any(out.iterdir())
    for path in run_folders:
        path = Path(path).absolute().resolve()
        if real == path or real in path.parents or (replacing and path in real.parents):
            raise CheckpointError(f"{out}: replacing it would delete files of the run in {path}; choose a "
                                  "destination outside it (or a new folder)")
    if replacing and not force:
        raise CheckpointError(f"{out}: exists and is not empty; choose another destination or pass --force to replace it")
    return out


def save_folder(
    model: torch.nn.Module,
    out: str | Path,
    tokenizer_dir: str | Path | None = None,
    config: ModelConfig | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
    state: dict[str, torch.Tensor] | None = None,
    force: bool = False,
    protected: tuple = (),
    run_folders: tuple = (),
) -> Path:
    """Writes an HF folder that `AutoModelForCausalLM.from_pretrained` loads offline: `model`'s
    weights, or `state` (full tensors gathered from a sharded model) with `model`'s config.

    `out` must be new or empty (or `force`), and never holds a `protected` path (check_destination).
    Written to a hidden temporary folder beside `out` and swapped in only when complete, so a
    crash never leaves half a folder and never loses the old one.
    """
    out = check_destination(out, force, protected, run_folders)
    try:
        _write_folder(model, out, tokenizer_dir, config, dtype, max_shard_bytes, state)
    except BaseException:
        for leftover in out.parent.glob(f".{out.name}.*.tmp"):
            shutil.rmtree(leftover, ignore_errors=True)
        raise
    return out


def _write_folder(model, out: Path, tokenizer_dir, config, dtype, max_shard_bytes, state) -> None:
    import tempfile

    cfg = config or model.config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # a plain folder's mode, not mkdtemp's private 0700
    state = {
        k: (v.to(dtype) if dtype is not None else v).detach().contiguous().cpu()
        for k, v in (model.state_dict() if state is None else state).items()
    }
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    hf = cfg.to_hf()
    hf["dtype"] = str(dtype or next(iter(state.values())).dtype).removeprefix("torch.")
    (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, tmp)
    for path in [*tmp.iterdir(), tmp]:  # on disk before it takes the old one's place
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    swap_in_folder(tmp, out)


def swap_in_folder(tmp: Path, out: Path) -> None:
    """`tmp` (complete) becomes `out`; an existing `out` (empty, or replaced with --force) is kept
    until the new one is in place, so a crash leaves one whole folder, never half of one."""
    import uuid

    if out.exists():
        old = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.old.tmp")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def copy_tokenizer(src: str | Path, dst: str | Path) -> None:
    src, dst = Path(src), Path(dst)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def convert_gguf(gguf_path: str | Path, out: str | Path, force: bool = False) -> Path:
    """Dequantises a Llama-family GGUF file into an HF folder (fp32 safetensors + tokenizer)."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise CheckpointError(f"{gguf_path}: GGUF file not found")
    with open(gguf_path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise CheckpointError(f"{gguf_path}: not a GGUF file (bad magic bytes)")
    check_destination(out, force, (gguf_path,))  # before the slow part
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .llama import CausalLM

    try:
        hf_model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as e:
        raise CheckpointError(f"{gguf_path}: unreadable GGUF file ({type(e).__name__}: {e})") from None
    hf_config = hf_model.config.to_dict()
    hf_config.pop("quantization_config", None)
    try:
        cfg = ModelConfig.from_hf(hf_config, source=str(gguf_path))
    except ModelConfigError as e:
        raise CheckpointError(str(e)) from None
    model = CausalLM(cfg, attention=None, loss=None)
    state = hf_model.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model.load_state_dict(state, strict=True)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="longctx-tokenizer-") as tok_tmp:
        tokenizer.save_pretrained(tok_tmp)
        return save_folder(model, out, tokenizer_dir=tok_tmp, force=force, protected=(gguf_path,))


def load_model_folder(folder: str | Path) -> ModelConfig:
    """Validates a model folder up front: config.json readable and weights present."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: model folder not found")
    cfg = load_hf_config(folder)
    weight_files(folder)
    return cfg
