"""ModelConfig <-> Hugging Face config.json for the llama, qwen2, qwen3 and mistral families."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}


class ModelConfigError(ValueError):
    """A config.json (or a random-init config) this code cannot run, with the reason."""


@dataclass(frozen=True)
class RopeConfig:
    """RoPE base frequency and its context-extension scaling (transformers' `rope_parameters`)."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn; None = derived from factor (and mscale)
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn

    def to_hf(self) -> dict[str, Any]:
        params: dict[str, Any] = {"rope_theta": self.theta, "rope_type": self.type}
        if self.type == "default":
            return params
        params["factor"] = self.factor
        if self.type in ("yarn", "llama3"):
            params["original_max_position_embeddings"] = self.original_max_position_embeddings
        if self.type == "llama3":
            params["low_freq_factor"] = self.low_freq_factor
            params["high_freq_factor"] = self.high_freq_factor
        if self.type == "yarn":
            params["beta_fast"] = self.beta_fast
            params["beta_slow"] = self.beta_slow
            for key in ("attention_factor", "mscale", "mscale_all_dim"):
                if getattr(self, key) is not None:
                    params[key] = getattr(self, key)
            if not self.truncate:
                params["truncate"] = False
        return params

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> RopeConfig:
        """Reads transformers 5 `rope_parameters` or the older `rope_theta` + `rope_scaling`."""
        params = dict(config.get("rope_parameters") or {})
        legacy = config.get("rope_scaling") or {}
        if not params:
            params = dict(legacy)
            params["rope_theta"] = config.get("rope_theta", 10000.0)
        rope_type = params.get("rope_type", params.get("type", "default")) or "default"
        if rope_type not in ROPE_TYPES:
            raise ModelConfigError(
                f"rope type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in params.items() if k in known and v is not None}
        kwargs["theta"] = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
        kwargs["type"] = rope_type
        if "original_max_position_embeddings" not in kwargs and rope_type in ("yarn", "llama3"):
            kwargs["original_max_position_embeddings"] = config.get(
                "original_max_position_embeddings", config.get("max_position_embeddings")
            )
        return cls(**kwargs)


@dataclass(frozen=True)
class ModelConfig:
    """Everything our decoder needs; one instance describes one checkpoint."""

    family: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 1024
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    rope: RopeConfig = field(default_factory=RopeConfig)
    sliding_window: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ModelConfigError(f"model family {self.family!r} is not supported; supported: {', '.join(FAMILIES)}")
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads} (GQA)"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ModelConfigError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)

    @property
    def qkv_bias(self) -> bool:
        return self.family == "qwen2"

    @property
    def qk_norm(self) -> bool:
        return self.family == "qwen3"

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # --- Hugging Face config.json -------------------------------------------------------------
    @classmethod
    def from_hf(cls, config: dict[str, Any], source: str = "config.json") -> ModelConfig:
        family = config.get("model_type")
        if family not in FAMILIES:
            raise ModelConfigError(
                f"{source}: model_type {family!r} is not supported; supported: {', '.join(FAMILIES)}"
            )
        if config.get("attention_bias") and family != "qwen2":
            raise ModelConfigError(f"{source}: attention_bias=true is only supported for qwen2")
        if config.get("mlp_bias"):
            raise ModelConfigError(f"{source}: mlp_bias=true is not supported")
        sliding_window = config.get("sliding_window")
        if family in ("qwen2", "qwen3") and not config.get("use_sliding_window", False):
            sliding_window = None
        try:
            return cls(
                family=family,
                vocab_size=config["vocab_size"],
                hidden_size=config["hidden_size"],
                intermediate_size=config["intermediate_size"],
                num_layers=config["num_hidden_layers"],
                num_heads=config["num_attention_heads"],
                num_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
                head_dim=config.get("head_dim"),
                rms_norm_eps=config.get("rms_norm_eps", 1e-6),
                max_position_embeddings=config.get("max_position_embeddings", 2048),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                rope=RopeConfig.from_hf(config),
                sliding_window=sliding_window,
                bos_token_id=config.get("bos_token_id"),
                eos_token_id=config.get("eos_token_id"),
                pad_token_id=config.get("pad_token_id"),
                initializer_range=config.get("initializer_range", 0.02),
            )
        except KeyError as e:
            raise ModelConfigError(f"{source}: missing required key {e.args[0]!r}") from None

    def to_hf(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.family]],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_parameters": self.rope.to_hf(),
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "initializer_range": self.initializer_range,
            "attention_dropout": 0.0,
            "use_cache": True,
        }
        if self.family == "llama":
            config.update(attention_bias=False, mlp_bias=False)
        if self.family == "mistral":
            config["sliding_window"] = self.sliding_window
        if self.family in ("qwen2", "qwen3"):
            config["use_sliding_window"] = self.sliding_window is not None
            config["sliding_window"] = self.sliding_window
            config["max_window_layers"] = self.num_layers
        if self.family == "qwen3":
            config["attention_bias"] = False
        return config


def load_hf_config(folder: str | Path) -> ModelConfig:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ModelConfigError(f"{folder}: not a model folder (no config.json in it)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelConfigError(f"{path}: not valid JSON ({e})") from None
    return ModelConfig.from_hf(data, source=str(path))
