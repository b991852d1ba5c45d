"""Our decoder against transformers: logits for every family and rope scaling, export round trip."""

import json

import pytest
import torch
from longctx.kernels.attention import local_attention, reference_attention
from longctx.models.config import ModelConfigError, load_hf_config
from longctx.models.hf import CheckpointError, load_weights, save_folder
from longctx.models.llama import CausalLM
from transformers import AutoConfig, AutoModelForCausalLM

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "llama": {},
    "qwen2": {},
    "qwen3": {"head_dim": 32},
    "mistral": {"sliding_window": None},
}
ROPES = {
    "linear": dict(rope_type="linear", factor=2.0),
    "dynamic": dict(rope_type="dynamic", factor=2.0),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64),
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=32),
}


def _hf_tiny(tmp_path, family, **extra):
    cfg = AutoConfig.for_model(family, **TINY, **extra)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # random biases / norm scales so those paths are exercised
        for name, p in hf.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path / "hf")
    return hf, tmp_path / "hf"


def _ours(folder):
    model = CausalLM(load_hf_config(folder), local_attention, loss=None).eval()
    load_weights(model, folder)
    return model


def _assert_logits_match(hf, ours, seq_len=150):
    ids = torch.randint(0, TINY["vocab_size"], (2, seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = hf(ids).logits, ours.logits(ids)
    assert (expected - got).abs().max().item() <= 1e-4
    return ids, expected


@pytest.mark.parametrize("family", FAMILIES)
def test_family_logits_and_export_round_trip(tmp_path, family):
    hf, folder = _hf_tiny(tmp_path, family, **FAMILIES[family])
    ours = _ours(folder)
    ids, expected = _assert_logits_match(hf, ours)
    out = save_folder(ours, tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)


def test_tied_embeddings_round_trip(tmp_path):
    hf, folder = _hf_tiny(tmp_path, "llama", tie_word_embeddings=True)
    ours = _ours(folder)
    assert "lm_head.weight" not in ours.state_dict()
    _assert_logits_match(hf, ours)


@pytest.mark.parametrize("rope", ROPES)
def test_rope_scaling_matches_transformers(tmp_path, rope):
    # 150 tokens > max_position_embeddings=64, so dynamic scaling actually kicks in.
    hf, folder = _hf_tiny(tmp_path, "llama", rope_parameters=dict(rope_theta=500000.0, **ROPES[rope]))
    ours = _ours(folder)
    assert ours.config.rope.type == rope
    _assert_logits_match(hf, ours)
    saved = json.loads((save_folder(ours, tmp_path / "export") / "config.json").read_text())
    assert saved["rope_parameters"]["rope_type"] == rope
    assert saved["rope_parameters"]["rope_theta"] == 500000.0


def test_local_attention_matches_reference_gqa():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 37, 6, 16, generator=g, requires_grad=True)
    k = torch.randn(2, 37, 2, 16, generator=g, requires_grad=True)
    v = torch.randn(2, 37, 2, 16, generator=g, requires_grad=True)
    dout = torch.randn(2, 37, 6, 16, generator=g)
    grads = []
    for fn in (local_attention, reference_attention):
        out = fn(q, k, v)
        grads.append((out, *torch.autograd.grad(out, (q, k, v), dout)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_sliding_window_longer_than_sequence_is_refused(tmp_path):
    hf, folder = _hf_tiny(tmp_path, "mistral", sliding_window=16)
    ours = _ours(folder)
    with pytest.raises(ValueError, match="sliding_window=16"):
        ours.logits(torch.zeros(1, 32, dtype=torch.long))


def test_folder_without_config_is_named(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelConfigError, match=f"{tmp_path}.*no config.json"):
        load_hf_config(tmp_path)


def test_unsupported_family_and_missing_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelConfigError, match="model_type 'gpt2' is not supported"):
        load_hf_config(tmp_path)
    hf, folder = _hf_tiny(tmp_path, "llama")
    (folder / "model.safetensors").unlink()
    model = CausalLM(load_hf_config(folder), local_attention, loss=None)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_weights(model, folder)


def test_truncated_weights_are_named(tmp_path):
    hf, folder = _hf_tiny(tmp_path, "llama")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    model = CausalLM(load_hf_config(folder), local_attention, loss=None)
    with pytest.raises(CheckpointError, match="model.safetensors: unreadable"):
        load_weights(model, folder)


def test_sharded_export_loads(tmp_path):
    hf, folder = _hf_tiny(tmp_path, "qwen2")
    ours = _ours(folder)
    out = save_folder(ours, tmp_path / "sharded", max_shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").is_file()
    again = _ours(out)
    _assert_logits_match(hf, again)
