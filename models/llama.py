"""The decoder: embed -> blocks -> norm -> loss, for llama / qwen2 / qwen3 / mistral.

Plain modules that read like the architecture (Touvron et al., arXiv 2302.13971 / 2407.21783;
Qwen2 adds q/k/v biases, Qwen3 RMS-normalises q and k per head). Module names mirror the Hugging
Face checkpoints so state dicts load and export without renaming.

Attention and loss are injected callables so parallelism and fused kernels are applied from
outside (train/build.py); this file never talks to other ranks.
  attention(q, k, v) -> out        q [B, S, Hq, D], k/v [B, S, Hkv, D], causal, scale D**-0.5
  loss(hidden [N, D], weight [V, D], labels [N]) -> summed loss over valid labels
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .rope import apply_rope, cos_sin, inv_freq_and_scale

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32, scale in the input dtype: the order transformers uses.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class _TiledHead(torch.autograd.Function):
    """The final norm and the loss over tiles of `tile` tokens, their gradients computed in forward
    tile by tile (as Cut Cross-Entropy computes its own): what stays for backward is the gradient
    of the residual stream's last value (its dtype, per token) and of the two weights, instead of
    the norm's saved input, statistics and output and the loss's input and gradient over the whole
    local sequence (issue 21, the loss head tiled; ALST's tiled loss). Summed loss, as `loss_fn`
    returns it; the one backward scales the stored gradients in place."""

    @staticmethod
    def forward(ctx, x, norm_weight, out_weight, labels, eps, loss_fn, tile):
        wanted = ctx.needs_input_grad[:3]
        dx = torch.zeros_like(x) if wanted[0] else None
        dnorm = dout = None
        total = None
        for start in range(0, x.shape[0], tile):
            t = slice(start, start + tile)
            with torch.enable_grad():
                leaves = [a.detach().requires_grad_(w) for a, w in zip((x[t], norm_weight, out_weight), wanted)]
                loss = loss_fn(rms_norm(leaves[0], leaves[1], eps), leaves[2], labels[t])
            inputs = [a for a, w in zip(leaves, wanted) if w]
            grads = iter(torch.autograd.grad(loss, inputs, allow_unused=True) if inputs and loss.requires_grad
                         else [None] * len(inputs))
            if wanted[0]:
                g = next(grads)
                if g is not None:
                    dx[t] = g
            if wanted[1]:  # summed in fp32 whatever the weights' dtype (bf16 under FSDP2's bf16 copies)
                dnorm = _accumulate(dnorm, next(grads), norm_weight)
            if wanted[2]:
                dout = _accumulate(dout, next(grads), out_weight)
            total = loss.detach() if total is None else total + loss.detach()
            del leaves, loss, inputs, grads
        ctx.save_for_backward(dx, dnorm, dout)
        ctx.dtypes = (norm_weight.dtype, out_weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad):
        # one backward: the stored gradients are scaled in place (no second copy of the residual
        # stream's gradient), so a retained graph cannot be back-propagated twice
        dx, dnorm, dout = ctx.saved_tensors
        dnorm = None if dnorm is None else dnorm.mul_(grad).to(ctx.dtypes[0])
        dout = None if dout is None else dout.mul_(grad).to(ctx.dtypes[1])
        return None if dx is None else dx.mul_(grad), dnorm, dout, None, None, None, None


def _accumulate(total, g, like):
    """total + g in fp32 (g None: nothing to add)."""
    if g is None:
        return total if total is not None else torch.zeros(like.shape, dtype=torch.float32, device=like.device)
    if total is None:
        return g.float()  # the first tile's own buffer when it is fp32 already
    return total.add_(g)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.attention_fn: AttentionFn | None = None

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Per-token projections to q [B, S, Hq, D], k/v [B, S, Hkv, D], RoPE applied."""
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, S, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, S, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        out = self.attention_fn(*self.qkv(x, cos, sin))
        return self.o_proj(out.flatten(2))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One pre-norm decoder layer; everything but `self_attn.attention_fn` is per token."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    # The block split at attention, for memory/offload.py (MEMO): both halves are per token.
    @property
    def attention_fn(self) -> AttentionFn:
        return self.self_attn.attention_fn

    def before_attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, S, hidden] -> (q, k, v) for the attention callable."""
        return self.self_attn.qkv(self.input_layernorm(x), cos, sin)

    def after_attention(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """The block's output from its input and the attention output [B, S, Hq, D]."""
        x = x + self.self_attn.o_proj(attn_out.flatten(2))
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q, k, v = self.before_attention(x, cos, sin)
        return self.after_attention(x, self.self_attn.attention_fn(q, k, v))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """Decoder-only LM. `forward` returns the summed loss when labels are given, else hidden states.

    Labels are already shifted (labels[t] is the token after input t) and use -100 for ignored
    positions; the caller divides the summed loss by the global count of valid labels.
    """

    def __init__(self, cfg: ModelConfig, attention: AttentionFn, loss: LossFn) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.loss_fn = loss
        # tokens per tile of the final norm + loss in training (`_TiledHead`); None: one pass over
        # the whole local sequence. The trainer sets memory.recompute_chunk_tokens under recompute.
        self.loss_tile_tokens: int | None = None
        # the whole output weight when it is sharded by vocabulary rows (parallel/vocab.py sets it; collective)
        self.whole_output_weight: Callable[[], torch.Tensor] | None = None
        self.set_attention(attention)

    # --- injected pieces ---------------------------------------------------------------------
    def set_attention(self, attention: AttentionFn) -> None:
        for layer in self.model.layers:
            layer.self_attn.attention_fn = attention

    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    # --- forward -----------------------------------------------------------------------------
    def rope_cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype, seq_len: int | None = None):
        """`seq_len` is the whole sequence's length (dynamic RoPE depends on it); by default the
        largest position + 1, which is wrong for a shard of a sequence, so sharded callers pass it."""
        cfg = self.config
        if cfg.rope.type != "dynamic":
            seq_len = 0
        elif seq_len is None:
            seq_len = int(position_ids.max()) + 1
        inv_freq, scaling = inv_freq_and_scale(cfg.rope, cfg.head_dim, cfg.max_position_embeddings, seq_len)
        return cos_sin(position_ids, inv_freq, scaling, dtype)

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                      seq_len: int | None = None) -> torch.Tensor:
        return self.model.norm(self.residual_stream(input_ids, position_ids, seq_len))

    def residual_stream(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                        seq_len: int | None = None) -> torch.Tensor:
        """The last block's output, before the final norm."""
        B, S = input_ids.shape
        window = self.config.sliding_window
        if window is not None and (seq_len or S) > window:
            raise ValueError(
                f"sequence length {S} exceeds the model's sliding_window={window}; longctx trains full "
                "causal attention: set sliding_window to null in the model's config.json"
            )
        if position_ids is None:
            position_ids = torch.arange(S, device=input_ids.device).expand(B, S)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope_cos_sin(position_ids, x.dtype, seq_len)
        return self.run_layers(x, cos, sin)

    def run_layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The blocks in order (memory/offload.py `segment` replaces this on an instance)."""
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return x

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        seq_len: int | None = None,
    ) -> torch.Tensor:
        if labels is None:
            return self.hidden_states(input_ids, position_ids, seq_len)
        tile = self.loss_tile_tokens
        if tile and torch.is_grad_enabled():
            x = self.residual_stream(input_ids, position_ids, seq_len)
            norm = self.model.norm
            return _TiledHead.apply(x.flatten(0, 1), norm.weight, self.output_weight, labels.flatten(), norm.eps,
                                    self.loss_fn, tile)
        hidden = self.hidden_states(input_ids, position_ids, seq_len)
        return self.loss_fn(hidden.flatten(0, 1), self.output_weight, labels.flatten())

    def logits(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Full [B, S, V] logits: for evaluation and tests at small sizes, never for training."""
        weight = self.whole_output_weight() if self.whole_output_weight is not None else self.output_weight
        return self.hidden_states(input_ids, position_ids) @ weight.T

    @torch.no_grad()
    def generate_greedy(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding without a KV cache (recomputes the prefix): for checks, not serving."""
        ids = input_ids
        for _ in range(max_new_tokens):
            next_id = self.logits(ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
        return ids

    # --- init --------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * self.config.initializer_range)
