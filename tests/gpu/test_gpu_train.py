"""The trainer on `cuda`: the tiny recipe (fp32 and bf16; every CUDA attention kernel and memory
policy agree), a SmolLM2-135M-shaped random model at 8K tokens with MEMO, and the export that
transformers loads. A few steps each.

The lent GPU machine has no model weights, no corpus wheel and maybe no `datasets`: the data is a
local .jsonl written here and read without `datasets` (its reader is tested on CPU in
tests/test_data.py; the CUDA path is what is under test), tokenized with the byte tokenizer.

longctx.train and longctx.recipes are imported inside the tests: a missing dependency there (scipy,
omegaconf) then fails these tests with its ImportError instead of stopping the whole session at
collection."""

import json
import math
import random
from pathlib import Path

import _gpu
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml"
WORDS = ("the long context model reads every token of the book and learns which word comes next while its "
         "activations move to the host and attention runs in fused kernels on the device").split()
SMOLLM2_135M = dict(  # HuggingFaceTB/SmolLM2-135M's shape; random weights (none on the GPU machine)
    family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
    num_kv_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
    bos_token_id=256, eos_token_id=257, pad_token_id=258,  # the byte tokenizer's ids
)


@pytest.fixture(autouse=True)
def _clean():
    _gpu.assert_compiled_triton()
    yield
    _gpu.release_cuda_memory()


@pytest.fixture
def corpus(monkeypatch, tmp_path):
    """Writes documents of pseudo-English (`chars` characters each) to a .jsonl and returns its path."""
    _gpu.read_jsonl_without_datasets(monkeypatch)

    def write(n_docs, chars, seed=0):
        rng = random.Random(seed)
        docs = [" ".join(rng.choice(WORDS) for _ in range(chars // 3))[:chars] for _ in range(n_docs)]
        path = tmp_path / f"corpus-{n_docs}x{chars}.jsonl"
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        return path

    return write


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _build_and_train(recipe):
    from longctx.train.build import build
    from longctx.train.trainer import train

    run = build(recipe)
    return run, train(run)["history"]


def _tiny(tmp_path, corpus_path, name, *overrides, steps=4):
    from longctx.recipes import schema

    recipe = schema.load(TINY, [f"run.dir={tmp_path / name}", "run.device=cuda", "run.threads=0",
                                f"data.source={corpus_path}", "data.max_documents=null", "data.cache=false",
                                f"train.max_steps={steps}", "train.warmup_steps=0", "log.wandb=false", *overrides])
    run, history = _build_and_train(recipe)
    return run, history, _metrics(tmp_path / name)


def _local_name(dtype: str) -> str:
    """What the run log names at sp = 1 without MEMO: SDPA restricted to the block kernel auto picks."""
    kernel = _block_kernel(dtype)
    return kernel if kernel == "flash_attn" else f"sdpa:{kernel}"


def _block_kernel(dtype: str) -> str:
    from longctx.kernels.capability import has_flash_attn

    if dtype == "fp32":
        return "aten_efficient"
    return "flash_attn" if has_flash_attn() else "aten_flash"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_tiny_recipe_trains_on_cuda(tmp_path, corpus, dtype):
    """4 steps: parameters on cuda, finite losses that start at ln(259) (random init, byte
    vocabulary) and fall, and the first record names a fused attention kernel and the Triton loss.
    ~5 s on an H200 (the first call compiles the CCE kernels for this shape)."""
    run, history, records = _tiny(tmp_path, corpus(12, 3000), "tiny", f"run.dtype={dtype}")
    assert all(p.is_cuda for p in run.model.parameters())
    losses = [r["loss"] for r in records]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses), losses
    assert abs(losses[0] - math.log(259)) < 0.3, f"first loss {losses[0]:.4f} vs ln(259) = {math.log(259):.4f}"
    assert losses[-1] < losses[0], f"loss did not fall: {losses}"
    first = records[0]
    assert first["loss_impl"] == "cce_triton", first
    assert first["attention_kernel"] == _local_name(dtype), first
    assert run.describe["device"].startswith("cuda") and first["peak_memory_bytes"] > 0


# memory.policy other than none runs the block kernel (MEMO keeps attention's (out, lse))
VARIANTS = {
    "bf16": [("auto", ()), ("aten_flash", ("parallel.attention_kernel=aten_flash",)),
             ("aten_efficient", ("parallel.attention_kernel=aten_efficient",)),
             ("flash_attn", ("parallel.attention_kernel=flash_attn",)),
             ("memo", ("memory.policy=memo", "memory.alpha=0.5", "memory.resident_layers=1")),
             ("memo-auto-alpha", ("memory.policy=memo", "memory.resident_layers=0")),
             ("full", ("memory.policy=full", "memory.recompute_chunk_tokens=100"))],
    "fp32": [("auto", ()), ("aten_efficient", ("parallel.attention_kernel=aten_efficient",)),
             ("memo", ("memory.policy=memo", "memory.alpha=0.5", "memory.resident_layers=1")),
             ("full", ("memory.policy=full",))],
}
LOSS_TOLERANCE = {"bf16": 3e-2, "fp32": 1e-4}  # absolute, on losses near 5.5, over 2 steps


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_tiny_recipe_kernels_and_memory_policies_agree_on_cuda(tmp_path, corpus, dtype):
    """2 steps per variant: each CUDA attention kernel, MEMO (fixed and planned alpha, host tier) and
    full recomputation give the default run's losses within the dtype's tolerance, and the first
    record names what ran. ~10 s."""
    from longctx.kernels.capability import flash_attn_status

    path = corpus(12, 3000)
    base = None
    for name, overrides in VARIANTS[dtype]:
        if name == "flash_attn" and not flash_attn_status()[0]:
            continue  # the flash_attn param of tests/gpu/test_gpu_attention.py reports why
        _, _, records = _tiny(tmp_path, path, f"{dtype}-{name}", f"run.dtype={dtype}", *overrides, steps=2)
        losses = [r["loss"] for r in records]
        first = records[0]
        assert first["loss_impl"] == "cce_triton", (name, first)
        want = {"auto": _local_name(dtype), "memo": _block_kernel(dtype), "memo-auto-alpha": _block_kernel(dtype),
                "full": _block_kernel(dtype)}.get(name, name)
        assert first["attention_kernel"] == want, (name, first["attention_kernel"], want)
        if name.startswith("memo"):
            assert all(r["memory_host_bytes"] > 0 and 0.0 <= r["memory_alpha"] <= 1.0 for r in records), records
        if base is None:
            base = losses
            continue
        diff = max(abs(a - b) for a, b in zip(base, losses))
        assert diff <= LOSS_TOLERANCE[dtype], f"{dtype} {name}: losses {losses} vs default {base}"


def test_cuda_recipe_refuses_kernels_the_run_cannot_use(tmp_path, corpus):
    """On a real GPU: aten_flash in an fp32 run is a recipe error naming the key; flash_attn without
    a usable flash-attn says why. <1 s."""
    from longctx.kernels.capability import flash_attn_status
    from longctx.recipes import schema

    path = corpus(2, 500)
    with pytest.raises(schema.RecipeError, match=r"parallel.attention_kernel='aten_flash': aten_flash needs fp16/bf16"):
        _tiny(tmp_path, path, "refuse", "run.dtype=fp32", "parallel.attention_kernel=aten_flash")
    ok, why = flash_attn_status()
    with pytest.raises(schema.RecipeError) as refused:
        _tiny(tmp_path, path, "refuse2", "run.dtype=fp32", "parallel.attention_kernel=flash_attn")
    expected = "parallel.attention_kernel='flash_attn': " + ("flash_attn needs fp16/bf16" if ok else why)
    assert expected in str(refused.value), str(refused.value)


def _smollm2_recipe(tmp_path, corpus_path, policy):
    import yaml
    from longctx.recipes import schema

    data = {
        "run": {"name": f"smollm2-{policy}", "seed": 0, "device": "cuda", "dtype": "bf16"},
        "model": {"path": None, "tokenizer": "bytes", "rope": {"theta": 100000.0}, "config": SMOLLM2_135M},
        "data": {"source": str(corpus_path), "batching": "decompose", "min_len": 1024, "max_len": 8192,
                 "tokens_per_step": 8192, "curriculum": "fixed", "fixed_len": 8192, "cache": False},
        "memory": {"policy": policy},
        "train": {"max_steps": 2, "lr": 1e-4, "warmup_steps": 0},
        "log": {"wandb": False},
    }
    path = tmp_path / f"smollm2-{policy}.yaml"
    path.write_text(yaml.safe_dump(data))
    return schema.load(path, [f"run.dir={tmp_path / policy}"])


def test_smollm2_shape_at_8k_tokens_trains_on_cuda_with_memo(tmp_path, corpus):
    """SmolLM2-135M's shape (30 layers, GQA 9/3, vocab 49152, tied) with random weights, one 8192-token
    row per step, bf16, 2 steps: unwrapped, then MEMO (alpha planned, host tier). Both finite and
    starting near ln(49152); the same first-step loss; MEMO swaps to the host and peaks lower on the
    device. ~20 s."""
    from longctx.train.build import build
    from longctx.train.trainer import train

    path = corpus(4, 2 * 8192 + 100)  # each document: two 8192-token pieces (+ a dropped remainder)
    results = {}
    for policy in ("none", "memo"):  # none first: anything it leaves behind only raises memo's peak
        run = build(_smollm2_recipe(tmp_path, path, policy))
        assert run.model.config.rope.theta == 100000.0 and run.model.config.head_dim == 64
        _gpu.release_cuda_memory()
        torch.cuda.reset_peak_memory_stats()
        history = train(run)["history"]
        records = _metrics(tmp_path / policy)
        results[policy] = records
        assert [(r["seq_len"], r["rows"]) for r in records] == [(8192, 1), (8192, 1)], records
        losses = [r["loss"] for r in records]
        assert all(math.isfinite(x) for x in losses), (policy, losses)
        assert abs(losses[0] - math.log(49152)) < 0.5, f"{policy}: first loss {losses[0]:.3f} vs ln(49152) = 10.80"
        assert records[0]["loss_impl"] == "cce_triton"
        del run, history
        _gpu.release_cuda_memory()
    none, memo = results["none"], results["memo"]
    assert none[0]["attention_kernel"] == _local_name("bf16") and memo[0]["attention_kernel"] == _block_kernel("bf16")
    assert abs(none[0]["loss"] - memo[0]["loss"]) < 2e-2, (none[0]["loss"], memo[0]["loss"])
    assert all(r["memory_host_bytes"] > 0 for r in memo), memo
    gib = 2**30
    peak_none, peak_memo = none[-1]["peak_memory_bytes"], memo[-1]["peak_memory_bytes"]
    assert peak_memo < 0.8 * peak_none, (
        f"device peak with MEMO {peak_memo / gib:.2f} GiB vs unwrapped {peak_none / gib:.2f} GiB "
        f"(alpha {memo[-1]['memory_alpha']}, host {memo[-1]['memory_host_bytes'] / gib:.2f} GiB)")


def test_export_on_cuda_loads_in_transformers_with_equal_logits(tmp_path, corpus):
    """A bf16 run on cuda with train.export=true and a checkpoint: the exported folder loads with
    AutoModelForCausalLM and its fp32 logits on cuda match ours (fp32, no TF32) within 1e-4; the
    `longctx export` CLI on the checkpoint writes the same weights. ~10 s (transformers' import)."""
    from longctx.cli import main
    from transformers import AutoModelForCausalLM

    run, _, _ = _tiny(tmp_path, corpus(12, 3000), "export", "run.dtype=bf16", "train.export=true",
                      "train.checkpoint_every=2", steps=2)
    folder = tmp_path / "export" / "export"
    assert (folder / "config.json").is_file()
    hf = AutoModelForCausalLM.from_pretrained(folder).float().to("cuda").eval()
    ids = torch.randint(0, 256, (2, 300), generator=torch.Generator().manual_seed(0)).to("cuda")
    run.model.eval()
    with _gpu.ieee_fp32(), torch.no_grad():
        theirs, ours = hf(ids).logits.float(), run.model.logits(ids).float()
    err = _gpu.max_abs(theirs - ours)
    assert err <= 1e-4 * max(1.0, _gpu.max_abs(ours)), f"max logit difference {err:.3g}"

    assert main(["export", str(tmp_path / "export" / "checkpoints" / "step-2"), str(tmp_path / "cli-export")]) == 0
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "cli-export").float()
    ours_state = {k: v.cpu() for k, v in hf.state_dict().items()}
    for name, tensor in again.state_dict().items():
        assert torch.equal(tensor, ours_state[name]), f"{name}: the CLI export differs from train.export"
