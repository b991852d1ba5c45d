"""The model behind `longctx plan`: per-GPU memory and step time of a recipe, and the longest
sequence that fits.

Memory terms (bytes, per GPU):
- params / grads / optimizer: fp32 master weights (autocast keeps them fp32), fp32 gradients, AdamW
  m and v; divided over data parallelism as the sharding says (fsdp2 = ZeRO-3; ZeRO-1 shards the
  optimizer, -2 also gradients, -3 also parameters);
- activations: what each block saves per token under its policy (`layer_bytes`, exact counts of
  our block's saved tensors, checked against memory/accounting.py in tests) x tokens on this GPU,
  plus what is saved outside the blocks (embedding, final norm, loss inputs);
- layer workspace: the transient peak inside one block's backward: its recomputed activations
  plus gradient buffers (coefficients measured on CPU, see bench/max_context.py);
- loss head: CCE's [T, V] slab (or the full N x V logits and their gradients for `reference`);
- attention workspace: K/V (or Q) blocks in flight under sequence parallelism;
- communication: FSDP's all-gathered layer (two in flight) and reduce-scatter buffer, and under
  FSDP2 the root unit's unsharded embedding and head;
- vocabulary parallelism (Setting.vocab_parallel over vocab_group ranks): each rank holds ceil(V/P)
  rows of the embedding and of the untied head, with their gradients and AdamW states, and
  nothing else of them: no further sharding (FSDP2 ignores them), no root-unit copy, and they stay
  on the GPU under cpu_offload. The loss head's term becomes its variant's buffers per tile
  (vocab_buffers.py), and two phases hold the embedding's: its forward, and its backward on top
  of every gradient;
- LoRA (Setting.adapter, model.adapter): the adapters' A and B add to the parameters; gradients,
  AdamW states and its temporaries are the trained weights' only (the adapters, and the embedding
  and norms when trained in full), and the head's weight gradient is made only when it is the
  trained embedding (tied);
- arena: memory.arena's buffer (attention's whole-sequence buffers by query tiles);
- runtime: CUDA context / process baseline.
The peak is not the sum of the terms: the loss head's slab and a block's backward workspace are
never live together, and the blocks' gradients fill up as their saved activations are freed. So
the peak is the persistent terms (params, optimizer, staging, communication, arena, runtime) plus the
largest of four phases: the loss (activations + loss head + the swapped blocks still in flight),
the first block's backward (activations + the head's gradient + workspace, + the blocks in flight
when a resident block comes first), the last block's (all gradients + workspace) and the
optimizer step (all gradients + AdamW's temporaries). `longctx plan` adds an allocator reserve
(train/plan_report.py). Calibrated on one H200 step (bench/results/gpu-h200-step.jsonl).
Host memory: MEMO's kept activations (per node). Step time: 6 x params x tokens + attention FLOPs
(+ recomputed forward work) at a sustained FLOP/s.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from . import vocab_buffers
from .accounting import pinned_bytes
from .plan import LayerBytes, plan_alpha

GiB = 1 << 30
# Gradient temporaries live at the peak of one block's backward on top of its saved (or, for a
# chunk, recomputed) tensors, in values per token: one intermediate-sized buffer. Fitted to the
# slope of measured CPU step peaks of SmolLM2-135M cut to one block at 8K-156K tokens before
# backward recomputed in chunks (62.0 KB/token, of which 44.6 KB are the recomputed tensors;
# bench/max_context.py).
WORKSPACE_INTERMEDIATE = 1.0
# Scratch of attention's backward beyond its inputs and gradients, bytes per token, as 4 x query
# heads x head dim (the size of an fp32 dQ accumulator, which the flash kernels keep) + 296: a
# two-parameter fit to two points, SmolLM2-135M cut to one block, fp32, CPU math attention at 16K
# and 64K tokens (2,600 B/token = 4 x 576 + 296; bench/max_context.py), and Llama-3.1-8B's shape
# on an H200 with PyTorch's flash kernel (16.7 KB/token closes the plan's last 1% at 32K and 64K
# tokens; bench/results/gpu-h200-step.jsonl). Not calibrated for flash-attn or the
# memory-efficient kernel (the issue cites ~33 KB/token for flash-attn 2 on Llama-8B).
ATTENTION_SCRATCH_CONSTANT = 296.0


def attention_backward_scratch(m: ModelShape) -> float:
    """Bytes per token of attention's backward scratch (see ATTENTION_SCRATCH_CONSTANT)."""
    return 4.0 * m.heads * m.head_dim + ATTENTION_SCRATCH_CONSTANT


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    qk_norm: bool = False
    qkv_bias: bool = False
    tied: bool = False

    def params_per_layer(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        p = h * (q + 2 * kv) + q * h + 3 * h * self.intermediate + 2 * h
        if self.qkv_bias:
            p += q + 2 * kv
        if self.qk_norm:
            p += 2 * self.head_dim
        return p

    def vocab_params(self, rows: int | None = None) -> int:
        """The embedding's and the untied head's parameters (`rows` of each: all V by default)."""
        return (self.vocab if rows is None else rows) * self.hidden * (1 if self.tied else 2)

    def params(self) -> int:
        return self.layers * self.params_per_layer() + self.vocab_params() + self.hidden


# in and out features of each projection LoRA may target
def _projection_dims(m: ModelShape) -> dict[str, tuple[int, int]]:
    h, i, q, kv = m.hidden, m.intermediate, m.heads * m.head_dim, m.kv_heads * m.head_dim
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def lora_elements_per_layer(m: ModelShape, rank: int, targets) -> int:
    """A [r, in] and B [out, r] of each targeted projection of one block."""
    dims = _projection_dims(m)
    return sum(rank * (dims[t][0] + dims[t][1]) for t in targets)


def trained_elements(m: ModelShape, adapter: tuple | None) -> tuple[int, int]:
    """(parameters with gradients and AdamW states, all parameters) of full fine-tuning or of
    Setting.adapter's LoRA (whose A and B are parameters too)."""
    tensors = param_tensors(m, adapter)
    return sum(n for n, trained in tensors if trained), sum(n for n, _ in tensors)


def param_tensor_elements(m: ModelShape, vocab: bool = True) -> list[int]:
    """Elements of each parameter tensor (FSDP2 shards and offloads them one by one); vocab=False
    leaves out the embedding and head (vocabulary parallel: FSDP2 ignores them)."""
    h, i, q, kv = m.hidden, m.intermediate, m.heads * m.head_dim, m.kv_heads * m.head_dim
    layer = [h * q, h * kv, h * kv, q * h, h * i, h * i, i * h, h, h]
    if m.qkv_bias:
        layer += [q, kv, kv]
    if m.qk_norm:
        layer += [m.head_dim, m.head_dim]
    return layer * m.layers + ([m.vocab * h] * (1 if m.tied else 2) if vocab else []) + [h]


def param_tensors(m: ModelShape, adapter: tuple | None = None, vocab: bool = True) -> list[tuple[int, bool]]:
    """(elements, trained) of each parameter tensor: param_tensor_elements' with, under LoRA
    (Setting.adapter), each target's A and B appended (trained) and the base tensors trained only
    when `trainable` names them (norms; the embedding, the first vocabulary tensor)."""
    elements = param_tensor_elements(m, vocab)
    if adapter is None:
        return [(n, True) for n in elements]
    rank, targets, full = adapter
    per_layer = 9 + (3 if m.qkv_bias else 0) + (2 if m.qk_norm else 0)
    norms = {7, 8} | ({per_layer - 2, per_layer - 1} if m.qk_norm else set())  # the layer's norm tensors
    out = []
    for i, n in enumerate(elements):
        in_layers = i < per_layer * m.layers
        if in_layers:
            trained = i % per_layer in norms and "norm" in full
        elif i == len(elements) - 1:
            trained = "norm" in full  # the final norm
        else:
            trained = "embed" in full and i == per_layer * m.layers  # the embedding, not an untied head
        out.append((n, trained))
    dims = _projection_dims(m)
    out += [(rank * dims[t][k], True) for _ in range(m.layers) for t in targets for k in (0, 1)]
    return out


def offloaded_host_bytes(m: ModelShape, world: int, gpus_per_node: int, vocab: bool = True,
                         adapter: tuple | None = None) -> float:
    """Host bytes per node under FSDP2's CPUOffloadPolicy over `world` ranks: each rank's sharded
    parameters and gradients in pinned memory (each tensor rounded up to a power of two by the
    pinned allocator) and AdamW's two states in ordinary memory. vocab=False: without the
    embedding and head (vocabulary parallel, they stay on the GPU). With a LoRA `adapter` the
    adapters are parameters too, and only trained tensors have gradients and states."""
    tensors = param_tensors(m, adapter, vocab)
    pinned = sum((2 if trained else 1) * pinned_bytes(int(4 * n / world)) for n, trained in tensors)
    return (pinned + 8.0 * sum(n for n, trained in tensors if trained) / world) * gpus_per_node


def layer_bytes(m: ModelShape, autocast: bool, inputs_in_compute_dtype: bool = True) -> tuple[float, LayerBytes]:
    """(bytes an unwrapped block saves per token, MEMO's split of what a kept token stores).

    fp32: norms save input, rsqrt, normalised (x3 with the projections' input), attention q, k, v,
    out (+ fp32 LSE), the MLP gate, silu, up and product. bf16 autocast: the residual stream and
    norms stay fp32, each projection saves its own bf16 cast of its input, matmul outputs are bf16.
    """
    h, i, q, kv = m.hidden, m.intermediate, m.heads * m.head_dim, m.kv_heads * m.head_dim
    lse = 4 * m.heads
    if autocast:
        base = 26 * h + 8 + 4 * q + 4 * kv + 8 * i + lse
        qk = 6 * (q + kv) + 4 * (m.heads + m.kv_heads) if m.qk_norm else 0
        act, kept_qk_extra = 2, 2 * (q + kv)  # MEMO keeps q, k after RoPE (fp32), SDPA their bf16 casts
    else:
        base = 4 * (6 * h + 2 + 2 * q + 2 * kv + 4 * i) + lse
        qk = 4 * (2 * q + m.heads + 2 * kv + m.kv_heads) if m.qk_norm else 0
        act, kept_qk_extra = 4, 0
    base += qk
    # the block input a recomputed token keeps: fp32, or under autocast its bf16 copy
    # (offload.LayerPolicy.input_dtype); a kept token's graph holds the fp32 input, in `other`
    inp, attn = (act if inputs_in_compute_dtype else 4) * h, act * q + lse
    return float(base), LayerBytes(float(inp), float(attn), float(base + kept_qk_extra - inp - attn))


def saved_bytes_per_token_layer(m: ModelShape, autocast: bool, policy: str, alpha: float = 0.0,
                                inputs_in_compute_dtype: bool = True) -> float:
    base, lb = layer_bytes(m, autocast, inputs_in_compute_dtype)
    if policy == "none":
        return base
    if policy == "full":
        return lb.inp
    return lb.inp + lb.attn + alpha * lb.other


def outside_bytes_per_token(m: ModelShape, autocast: bool, tiled_head: bool = False) -> float:
    """Saved outside the blocks: token ids, final norm (input, rsqrt, normalised), the loss's
    hidden input and its gradient (CCE computes it in forward). With the head in tiles
    (models/llama._TiledHead): token ids and the residual stream's gradient (fp32, the residual
    stream's dtype under autocast too). Both: RoPE's cos and sin (found by the traced step in
    tests/test_memory.py)."""
    rope = 2 * 4 * m.head_dim  # RoPE's cos and sin per position (fp32), which every block's backward reads
    if tiled_head:
        return 8 + 4 * m.hidden + rope
    return 8 + (8 * m.hidden + 4) + 2 * 4 * m.hidden + 16 + rope


def tiled_head_transient(m: ModelShape, tokens: int, tile: int, vocab_rows: int | None = None) -> float:
    """Live in the loss phase besides the kept activations when the head runs in tiles: the last
    block's output (its input, freed when it returns), one tile's graph (norm input, normalised and
    scaled values, the loss's input gradient and the tile's input gradient: 16 B x hidden per
    token) and, from the second tile on, the gradient of the output weight (this rank's
    `vocab_rows` of it, all V by default) being accumulated next to the tile's own."""
    rows = m.vocab if vocab_rows is None else vocab_rows
    weight_grad = 4.0 * rows * m.hidden if tokens > tile else 0.0
    return 4.0 * m.hidden * tokens + 16.0 * m.hidden * min(tokens, tile) + weight_grad


OPTIMIZER_TEMP_BYTES_PER_PARAM = 4.0  # foreach AdamW's transient at its step, per local parameter


@dataclass
class Setting:
    seq_len: int
    rows: int = 1
    sp: int = 1
    dp: int = 1
    gpus_per_node: int = 8
    sharding: str = "none"  # none | fsdp2 | zero1 | zero2 | zero3
    autocast: bool = True
    policy: str = "memo"  # none | full | memo
    recompute_num_layers: int = 1  # blocks per recomputed segment (offload.segment)
    recompute_chunk_tokens: int | None = 4096  # per chunk of a block's recomputed work; None = whole block
    alpha: float | str = "auto"
    tier: str = "host"
    resident_layers: int = 2
    loss: str = "cce"  # cce | reference
    device_bytes: float = 80 * GiB
    host_bytes_per_node: float = 1024 * GiB
    link_bytes_per_s: float = 25e9
    flops_per_s: float = 300e12
    runtime_bytes: float = 1.0 * GiB
    optimizer_foreach: bool = True  # the trainer's AdamW; bench/max_context.py steps without foreach
    # recomputed tokens' block inputs kept in the autocast dtype (the trainer since 2026-11-30)
    kept_inputs_in_compute_dtype: bool = True
    # the final norm + loss in tiles of this many tokens under recompute (None: whole; the trainer
    # uses recompute_chunk_tokens), and attention's backward by query tiles at sp 1 (offload.py)
    loss_tile_tokens: int | None = 4096
    attention_by_rows: bool = True
    # fsdp2 only: parallel.cpu_offload (parameters, gradients and AdamW on the host) and
    # parallel.fsdp_param_dtype bf16 (unsharded copies in bf16)
    cpu_offload: bool = False
    fsdp_param_bf16: bool = False
    arena: bool = False  # memory.arena: attention's whole-sequence buffers by query tiles in one persistent buffer
    # memory.elimination (LeMo): the fraction of the tokens each layer runs on (None: every token
    # everywhere). A layer's saved bytes scale with it, its linear work too and its attention with
    # its square; an eliminating layer also scores its blocks exactly (one non-causal QK^T).
    elimination_keep: tuple[float, ...] | None = None
    # source predictor: the pattern predictors' FLOPs per token of an eliminating layer, instead of the exact score
    elimination_predictor_flops: float | None = None
    # memory.elimination.mlp_channels (policy none, frozen MLP): the fraction of each MLP's intermediate
    # channels saved for backward (gate and up of those channels instead of gate, silu, up, product)
    mlp_channels: float = 1.0
    # parallel.vocab_parallel (off | gather | stream | auto) and the ranks its rows are sharded over
    # (the sp group, or every rank under fsdp2: the caller decides)
    vocab_parallel: str = "off"
    vocab_group: int = 1
    # model.adapter: (LoRA rank, target projections, base weights trained in full: "embed", "norm");
    # None = full fine-tuning
    adapter: tuple | None = None


@dataclass
class Estimate:
    terms: dict[str, float]
    host_bytes_per_node: float
    alpha: float
    alpha_binding: str
    step_seconds: float
    setting: dict = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)  # transient bytes on top of the persistent terms
    phase_parts: dict[str, dict[str, float]] = field(default_factory=dict)  # what each phase sums

    @property
    def persistent(self) -> float:
        t = self.terms
        return t["params"] + t["optimizer"] + t["staging_buffers"] + t["communication"] + t.get("arena", 0.0) + t["runtime"]

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def total(self) -> float:
        """The modelled peak: persistent terms + the largest phase."""
        return self.persistent + max(self.phases.values())

    @property
    def dominant(self) -> str:
        return max(self.terms, key=self.terms.get)


def segment_sizes(layers: int, per_segment: int) -> list[int]:
    """Blocks per segment under offload.segment; one segment of all blocks when there are none."""
    if per_segment <= 1 or per_segment >= layers:
        return [layers]
    return [min(per_segment, layers - i) for i in range(0, layers, per_segment)]


def segment_peaks(layers: int, per_segment: int) -> list[tuple[int, int]]:
    """The candidates for (segment inputs kept, blocks holding their saved activations) at the
    peak under offload.segment: forward keeps each segment's input, and one segment's blocks hold
    theirs at a time: the last segment's from forward on, or the one before it while it is
    recomputed (its input is then its first block's). Without segments: all blocks."""
    sizes = segment_sizes(layers, per_segment)
    if len(sizes) == 1:
        return [(0, layers)]
    n = len(sizes)
    return [(n - 1, sizes[-1]), (n - 2, sizes[0])]


KEY_BLOCK_TILES = 8  # memory/offload.KEY_BLOCK_TILES (not imported: offload imports torch)


def backward_workspace(m: ModelShape, tokens: int, autocast: bool, recomputes: bool, chunk_tokens: int | None,
                       by_rows: bool = False, kept_tokens: int = 0, arena: bool = False) -> float:
    """Transient bytes at the peak of one block's backward. Without recompute: gradient
    temporaries only; recomputing the whole block at once (chunk_tokens None, as transformers'
    checkpointing does): also its saved tensors. Recomputing in chunks (offload.py), the larger of
    - attention's backward: the whole sequence's q, k, v, attention output (+ LSE) and their
      gradients, the incoming and outgoing gradient of the residual stream (fp32 under autocast
      too) and the kernel's scratch;
    - a chunk's backward before attention: the gradients of q, k, v and of the residual stream,
      and one chunk's recomputed activations (at most a block's saved bytes per token) and
      gradient temporaries. (After attention the chunk also meets q, k, v, the output and its
      gradient; measured peaks at 16K-64K tokens with 4K-token chunks show attention's backward
      as the peak there, bench/max_context.py.)
    By query tiles (`by_rows`, sp 1: offload._backward_by_rows), the whole sequence's k, v, their
    fp32 gradient accumulators and the residual stream's two gradients stay all along, next to
    one tile's recomputed activations, gradient temporaries and attention scratch, and the dK, dV
    of one block of keys (KEY_BLOCK_TILES tiles); or, at the end, MEMO's kept tokens' gradients
    (their graph is whole: the attention output's and q's gradients and the input's). With the
    arena (memory/arena.py) k, v and their gradients are its buffer, a persistent term instead."""
    act = 2 if autocast else 4
    grads_tmp = act * WORKSPACE_INTERMEDIATE * m.intermediate
    if not recomputes:
        return grads_tmp * tokens
    base, _ = layer_bytes(m, autocast)
    if chunk_tokens is None:
        return (base + grads_tmp) * tokens
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    residual_grads, qkv = 2 * 4 * m.hidden, act * (q + 2 * kv)
    chunk = min(tokens, chunk_tokens) * (base + grads_tmp)
    if by_rows:
        whole = residual_grads + (0 if arena else (act + 4) * 2 * kv)
        keys = 2 * act * kv * min(tokens, KEY_BLOCK_TILES * chunk_tokens)
        tile = chunk + min(tokens, chunk_tokens) * attention_backward_scratch(m) + keys
        # the kept tokens' phase: their gradients next to one of their tiles' attention work
        kept = kept_tokens * ((act + 4) * q + 4 * m.hidden) + min(tokens, chunk_tokens) * attention_backward_scratch(m) + keys
        return whole * tokens + max(tile, kept)
    attention = residual_grads + 2 * qkv + 2 * act * q + 4 * m.heads + attention_backward_scratch(m)
    return max(attention * tokens, (residual_grads + qkv) * tokens + chunk)


def layer_forward_flops(m: ModelShape, tokens: int, seq_len: int) -> float:
    """2 x layer params per token + causal attention (QK and PV over seq_len/2 keys on average)."""
    return 2.0 * m.params_per_layer() * tokens + 2.0 * tokens * seq_len * m.heads * m.head_dim


def elimination_flops(m: ModelShape, tokens: int, seq_len: int, keep: float,
                      predictor_flops: float | None = None) -> tuple[float, float]:
    """(forward FLOPs, scoring FLOPs) of a layer that keeps `keep` of its tokens: linear work on the
    kept tokens and causal attention among them; the exact block score of every token (the q and k
    projections and a non-causal QK^T against the whole sequence), or the pattern predictors'
    `predictor_flops` per token, runs in forward only."""
    if keep >= 1.0:
        return layer_forward_flops(m, tokens, seq_len), 0.0
    if predictor_flops is not None:
        score = predictor_flops * tokens
    else:
        score = 2.0 * tokens * m.hidden * (m.heads + m.kv_heads) * m.head_dim + 2.0 * tokens * seq_len * m.heads * m.head_dim
    return layer_forward_flops(m, round(keep * tokens), round(keep * seq_len)), score


def estimate(m: ModelShape, s: Setting) -> Estimate:
    world_dp = s.dp
    shard = {"none": (1, 1, 1), "zero1": (1, 1, world_dp), "zero2": (1, world_dp, world_dp),
             "zero3": (world_dp, world_dp, world_dp), "fsdp2": (world_dp, world_dp, world_dp)}[s.sharding]
    # vocabulary parallel: this rank's rows of the vocabulary weights, held whole (outside the sharding)
    vocab_on = s.vocab_parallel != "off"
    vocab_rows = vocab_buffers.rows_per_rank(m.vocab, s.vocab_group) if vocab_on else m.vocab
    vocab_own = float(m.vocab_params(vocab_rows)) if vocab_on else 0.0
    sharded_params = m.params() - (m.vocab_params() if vocab_on else 0)  # what the sharding divides
    # what has gradients and AdamW states: every weight, or LoRA's adapters (+ embed / norms); the
    # vocabulary rows outside the sharding (vocabulary parallel) apart
    tensors = param_tensors(m, s.adapter, vocab=not vocab_on)
    trained = sum(n for n, t in tensors if t)
    adapters = sum(n for n, _ in tensors) - sharded_params
    if s.adapter is None:
        vocab_trained, head_trained, layer_trained = vocab_own, True, m.params_per_layer()
    else:
        rank, targets, full = s.adapter
        embed = "embed" in full
        vocab_trained = float(vocab_rows * m.hidden) if vocab_on and embed else 0.0  # the embedding's rows only
        head_trained = embed and m.tied  # an untied head stays frozen
        layer_norms = 2 * m.hidden + (2 * m.head_dim if m.qk_norm else 0)
        layer_trained = lora_elements_per_layer(m, rank, targets) + (layer_norms if "norm" in full else 0)
    tokens = s.rows * s.seq_len // s.sp  # on this GPU
    base, lb = layer_bytes(m, s.autocast, s.kept_inputs_in_compute_dtype)
    swapped = max(m.layers - s.resident_layers, 0) if s.policy == "memo" else 0
    layer_s = layer_forward_flops(m, tokens, s.seq_len) / s.flops_per_s
    offloaded = s.cpu_offload and s.sharding == "fsdp2"
    offload_host = offloaded_host_bytes(m, world_dp, s.gpus_per_node, not vocab_on, s.adapter) if offloaded else 0.0
    if s.policy == "memo":
        if s.alpha == "auto":  # MEMO's share of host memory: what the offloaded states leave
            ap = plan_alpha(tokens, lb, layer_s, s.link_bytes_per_s, max(s.host_bytes_per_node - offload_host, 0.0),
                            s.gpus_per_node, m.layers, s.resident_layers)
            alpha, binding = ap.alpha, ap.binding
        else:
            alpha, binding = float(s.alpha), "fixed"
        per_layer = saved_bytes_per_token_layer(m, s.autocast, "memo", alpha, s.kept_inputs_in_compute_dtype)
    else:
        alpha, binding = (1.0 if s.policy == "none" else 0.0), s.policy
        per_layer = saved_bytes_per_token_layer(m, s.autocast, s.policy, 0.0, s.kept_inputs_in_compute_dtype)
        if s.mlp_channels < 1.0 and s.policy == "none":
            act = 2 if s.autocast else 4
            per_layer -= act * m.intermediate * (4 - 2 * s.mlp_channels)
    keep = s.elimination_keep or (1.0,) * m.layers
    per_layer *= sum(keep) / len(keep)  # eliminated tokens save nothing in that layer (the mean over layers)
    host_tier = s.policy == "memo" and s.tier == "host"
    # Blocks whose saved activations are live at the peak, and segment inputs kept besides them
    # (offload.segment): all blocks without segments.
    device_act, host = 0.0, 0.0
    # Segment inputs (offload.segment) stay in the residual stream's fp32. While a segment is
    # recomputed its own input is held by the checkpoint as well: the same storage as its first
    # block's kept input, unless that block keeps a bf16 copy (then one more fp32 input).
    copies = s.autocast and s.kept_inputs_in_compute_dtype and s.policy != "none"
    # a MEMO block kept on the device also holds its kept tokens' graph output (the residual
    # stream's dtype) until backward; the host tier releases it once copied (traced step, tests)
    device_extra = alpha * 4 * m.hidden if s.policy == "memo" else 0.0
    for i, (seg_inputs, live_blocks) in enumerate(segment_peaks(m.layers, s.recompute_num_layers)):
        seg_inputs += 1 if copies and i == 1 else 0  # the second candidate is the recomputed segment's
        live_swapped = max(live_blocks - s.resident_layers, 0) if host_tier else 0
        device_act = max(device_act, ((live_blocks - live_swapped) * (per_layer + device_extra)
                                      + seg_inputs * 4 * m.hidden) * tokens)
        host = max(host, pinned_bytes(int(live_swapped * per_layer * tokens)) * s.gpus_per_node)  # pinned slabs
    # Two blocks' kept bytes: the two staging buffers HostPool keeps from step to step (live in
    # forward too, on every step after the first at this length).
    staging = 2 * per_layer * tokens if host_tier else 0.0
    # The device copies of the last two swapped blocks: their D2H copies are released by a later
    # block's seal or by the first fetch in backward (offload.HostPool), so they are still alive
    # at the loss and through the resident blocks' backward. (Measured on an H200: without this
    # term the plan was 10-16% low at 32K-64K tokens, bench/results/gpu-h200-step.jsonl.)
    in_flight = min(2, swapped) * per_layer * tokens if host_tier else 0.0
    recomputes = s.policy != "none"
    by_rows = recomputes and s.attention_by_rows and s.sp == 1 and s.recompute_chunk_tokens is not None
    tiled_head = recomputes and s.loss_tile_tokens is not None
    arena = by_rows and s.arena
    kept_tokens = round(alpha * tokens) if s.policy == "memo" else 0
    workspace = backward_workspace(m, tokens, s.autocast, recomputes, s.recompute_chunk_tokens, by_rows, kept_tokens,
                                   arena)
    act = 2 if s.autocast else 4  # bytes per element of the compute dtype
    q_w, kv_w = m.heads * m.head_dim, m.kv_heads * m.head_dim
    arena_bytes = (act + 4) * 2 * kv_w * tokens if arena else 0.0  # k, v and their fp32 gradients
    n = min(tokens, s.loss_tile_tokens) if tiled_head else tokens  # the tokens the loss sees at once
    if vocab_on:  # the sharded CCE (parallel/vocab.py) replaces loss.impl's head
        loss_ws = vocab_buffers.head_transient_bytes(s.vocab_parallel, n, vocab_rows, m.hidden, s.vocab_group)
        embed_fwd, embed_bwd = vocab_buffers.embedding_transient_bytes(s.vocab_parallel, tokens, vocab_rows, m.hidden,
                                                                       s.vocab_group)
    elif s.loss == "cce":
        loss_ws = 3 * 4 * min(n * m.vocab, 1 << 24) + 4 * m.vocab * m.hidden  # slab + dW
    else:  # logits, fp32 copy, log-softmax and their gradients
        loss_ws = n * m.vocab * (2 if s.autocast else 4) + 4 * 4 * n * m.vocab
    kv = kv_w * act
    attn_ws = 4 * kv * tokens if s.sp > 1 else 0.0
    pbytes = 2 if s.fsdp_param_bf16 and s.sharding == "fsdp2" else 4  # unsharded copies (fsdp_param_dtype)
    layer_params = m.params_per_layer() * pbytes
    comm = 3 * layer_params if s.sharding in ("fsdp2", "zero3") else 0.0
    if s.sharding == "fsdp2":
        # the root unit (embedding, head, final norm) stays unsharded from its forward to its
        # backward: FSDP2 does not reshard the root after forward (vocabulary parallel: the norm only)
        comm += pbytes * (sharded_params - m.layers * m.params_per_layer())
    host += offload_host
    terms = {
        "params": (0.0 if offloaded else 4.0 * (sharded_params + adapters) / shard[0]) + 4.0 * vocab_own,
        "grads": (0.0 if offloaded else 4.0 * trained / shard[1]) + 4.0 * vocab_trained,
        "optimizer": (0.0 if offloaded else 8.0 * trained / shard[2]) + 8.0 * vocab_trained,
        "activations": device_act + outside_bytes_per_token(m, s.autocast, tiled_head) * tokens,
        "staging_buffers": staging,
        "swap_in_flight": in_flight,
        "layer_workspace": workspace,
        "loss_head": float(loss_ws),
        "attention_workspace": float(attn_ws),
        "communication": comm,
        "arena": arena_bytes,
        "runtime": s.runtime_bytes,
    }
    if vocab_on:
        terms["vocab_embedding"] = max(embed_fwd, embed_bwd)
    head_grad = 4.0 * vocab_own if vocab_on else 4.0 * m.vocab_params() / shard[1]
    if s.adapter is not None:  # only a trained (tied) embedding has a head weight gradient
        head_grad = (4.0 * vocab_rows * m.hidden / (1 if vocab_on else shard[1])) if head_trained else 0.0
    outside = outside_bytes_per_token(m, s.autocast, tiled_head) * tokens
    head_tiles = tiled_head_transient(m, tokens, s.loss_tile_tokens, vocab_rows) if tiled_head else 0.0
    # the first block's backward still meets the swapped copies when a resident block comes first
    first_in_flight = in_flight if s.resident_layers > 0 else 0.0
    # With the head in tiles, the gradient reaching the last block is the head's stored one (in the
    # activations), which every workspace counts as its incoming gradient too; once the last
    # block's backward is done it is freed. (Found by the traced step, tests/test_memory.py.)
    head_dy = 4.0 * m.hidden * tokens if tiled_head else 0.0
    # forward of the last block: the kept tensors so far (the head's gradient not yet made) and
    # the block's whole-sequence transients: by query tiles k, v and the output next to one tile's
    # work; otherwise q, k, v (and their RoPE'd copies), the attention output and the output
    if not recomputes:  # the plain blocks: what they make is what they save
        fwd_whole = 0.0
    elif by_rows:
        fwd_whole = (0 if arena else act * 2 * kv_w) + 4 * m.hidden
    else:
        fwd_whole = act * (2 * q_w + 4 * kv_w) + 4 * m.heads + 3 * 4 * m.hidden
    fwd_tile = min(tokens, s.recompute_chunk_tokens or tokens) * base if recomputes else 0.0
    # AdamW's temporaries on the GPU: offloaded states step on the host, the vocabulary rows (if sharded) here
    if s.optimizer_foreach:
        optimizer_elements = (0.0 if offloaded else trained / shard[2]) + vocab_trained
    elif s.adapter is None:
        on_gpu = ([vocab_rows] if vocab_on or not offloaded else []) + ([] if offloaded else [m.intermediate])
        optimizer_elements = 2 * max(on_gpu, default=0) * m.hidden
    else:  # the largest trained tensor on the GPU: the embedding (its rows), else an adapter's A or B
        on_gpu = ([] if offloaded else [n for n, t in tensors if t]) + ([vocab_rows * m.hidden] if vocab_trained else [])
        optimizer_elements = 2 * max(on_gpu, default=0)
    # each phase's parts by name (a term's own name where it is one), summed in this order
    parts = {
        "loss": {"activations": terms["activations"], "loss_head": terms["loss_head"], "swap_in_flight": in_flight,
                 **({"head_tiles": head_tiles} if tiled_head else {})},
        "forward_block": {"activations": terms["activations"] - head_dy, "forward_transient": fwd_whole * tokens + fwd_tile,
                          "swap_in_flight": in_flight},
        "backward_first_block": {"activations": terms["activations"] - head_dy, "head_grad": head_grad,
                                 "layer_workspace": workspace, "attention_workspace": attn_ws,
                                 "swap_in_flight": first_in_flight},
        # offloaded, a unit's gradients leave the GPU once reduced: the root's (head) and about two
        # blocks' (the one reducing, the next computing) are on it at a time
        "backward_last_block": {"grads": head_grad + 2 * 4 * layer_trained if offloaded else terms["grads"],
                                "outside": outside - head_dy, "layer_workspace": workspace,
                                "attention_workspace": attn_ws},
        # torch.optim.AdamW(foreach=True) (train/optim.py): the gradients and one temporary of the
        # (local) parameters' size, 4 B each (measured on an H200: 7.2 GiB at 1.92 B parameters);
        # without foreach one parameter at a time, two temporaries of the largest (sqrt, then the
        # division; the embedding or an MLP matrix)
        "optimizer_step": {"grads": terms["grads"],
                           "optimizer_temp": OPTIMIZER_TEMP_BYTES_PER_PARAM * optimizer_elements},
    }
    if vocab_on:  # the embedding runs first in forward and last in backward, on top of every gradient
        parts["embedding_forward"] = {"vocab_embedding": embed_fwd}
        parts["embedding_backward"] = {"grads": terms["grads"], "vocab_embedding": embed_bwd}
    phases = {name: sum(p.values()) for name, p in parts.items()}
    # step time: fwd (1) + bwd (2) + recomputed forward work
    layer_flops = [elimination_flops(m, tokens, s.seq_len, k, s.elimination_predictor_flops) for k in keep]
    blocks_fwd = sum(f for f, _ in layer_flops)
    fwd = blocks_fwd + 2.0 * tokens * m.hidden * m.vocab
    scoring = sum(sc for _, sc in layer_flops)
    mean_layer = (layer_forward_flops(m, tokens, s.seq_len) if s.elimination_keep is None else
                  blocks_fwd / m.layers)  # a block's forward (of the tokens it keeps)
    if s.policy == "full":
        extra = m.layers * mean_layer
    elif s.policy == "memo":
        extra = swapped * (1 - alpha) * 2.0 * m.params_per_layer() * tokens
    else:
        extra = 0.0
    # segments but the last run their forward twice (nothing without segments)
    extra += (m.layers - segment_sizes(m.layers, s.recompute_num_layers)[-1]) * mean_layer
    step = (3 * fwd + scoring + extra) / s.flops_per_s
    return Estimate(terms, host, alpha, binding, step, asdict(s), phases, parts)


def hf_checkpointing_estimate(m: ModelShape, seq_len: int, autocast: bool, runtime_bytes: float) -> Estimate:
    """transformers' LlamaForCausalLM with gradient checkpointing, one process, no sharding:
    block inputs kept, one block recomputed at a time, full logits and their gradients."""
    s = Setting(seq_len=seq_len, autocast=autocast, policy="full", loss="reference", runtime_bytes=runtime_bytes,
                gpus_per_node=1, recompute_chunk_tokens=None, optimizer_foreach=False,
                kept_inputs_in_compute_dtype=False,  # checkpoint keeps its fp32 inputs
                loss_tile_tokens=None, attention_by_rows=False)
    e = estimate(m, s)
    # transformers upcasts the logits to fp32 and keeps more [N, V] buffers than our reference head
    e.terms["loss_head"] = seq_len * m.vocab * HF_LOGIT_BYTES_PER_VOCAB_ENTRY
    e.phase_parts["loss"] = {"activations": e.terms["activations"], "loss_head": e.terms["loss_head"]}
    e.phases["loss"] = e.terms["activations"] + e.terms["loss_head"]
    return e


# [N, V] bytes per logit in transformers' loss path (logits, log-softmax, their gradients and the
# allocator's slack): fitted to the slope of measured step peaks of SmolLM2-135M, fp32, with
# checkpointing on CPU at 4K and 8K tokens (2.74 and 5.47 GB above the process baseline,
# parameters and AdamW states; bench/max_context.py).
HF_LOGIT_BYTES_PER_VOCAB_ENTRY = 12.0


def longest_fitting(fn, budget: float, lo: int = 1024, hi: int = 1 << 24, step: int = 1024,
                    host_budget: float | None = None) -> int:
    """The largest multiple of `step` in [lo, hi] with fn(seq_len).total <= budget and, when
    `host_budget` is given, fn(seq_len).host_bytes_per_node <= host_budget (0 if none)."""
    def fits(n: int) -> bool:
        e = fn(n)
        return e.total <= budget and (host_budget is None or e.host_bytes_per_node <= host_budget)

    if not fits(lo):
        return 0
    while lo + step <= hi and fits(min(hi, lo * 2)) and lo * 2 <= hi:
        lo *= 2
    top = min(hi, lo * 2)
    while top - lo > step:
        mid = (lo + top) // 2 // step * step
        if fits(mid):
            lo = mid
        else:
            top = mid
    return lo
