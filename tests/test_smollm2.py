"""The embedded default model: GGUF -> our folder -> same logits and greedy tokens as transformers."""

import pytest
import torch
from longctx.cli import main
from longctx.kernels.attention import local_attention
from longctx.models.config import load_hf_config
from longctx.models.hf import load_weights
from longctx.models.llama import CausalLM
from transformers import AutoTokenizer, LlamaForCausalLM


@pytest.fixture(scope="module")
def both(smollm2_dir):
    ours = CausalLM(load_hf_config(smollm2_dir), local_attention, loss=None).eval()
    load_weights(ours, smollm2_dir)
    hf = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return ours, hf, AutoTokenizer.from_pretrained(smollm2_dir)


def test_converted_folder_is_smollm2(smollm2_dir):
    cfg = load_hf_config(smollm2_dir)
    assert (cfg.family, cfg.vocab_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == ("llama", 49152, 30, 9, 3)
    assert cfg.tie_word_embeddings and cfg.max_position_embeddings == 8192


def test_logits_match_transformers(both):
    ours, hf, tok = both
    ids = tok("In the beginning God created the heaven and the earth.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert (ours.logits(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def test_greedy_decoding_matches_transformers(both):
    ours, hf, tok = both
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    expected = hf.generate(ids, max_new_tokens=8, do_sample=False)
    got = ours.generate_greedy(ids, max_new_tokens=8)
    assert got.tolist() == expected.tolist()


def test_convert_rejects_a_file_that_is_not_gguf(tmp_path, capsys):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all")
    assert main(["convert", "gguf", str(bad), str(tmp_path / "out")]) == 2
    assert f"{bad}: not a GGUF file" in capsys.readouterr().err
    assert main(["convert", "gguf", str(tmp_path / "missing.gguf"), str(tmp_path / "out")]) == 2
    assert "missing.gguf: GGUF file not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_convert_rejects_a_truncated_gguf(tmp_path, capsys):
    from longctx.train.build import default_gguf

    bad = tmp_path / "cut.gguf"
    bad.write_bytes(default_gguf().read_bytes()[:4096])
    assert main(["convert", "gguf", str(bad), str(tmp_path / "out")]) == 2
    assert f"{bad}: unreadable GGUF file" in capsys.readouterr().err
