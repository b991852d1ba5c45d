"""Cut Cross-Entropy in chunked PyTorch: the CPU path, never materialising N x V logits.

Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models" (arXiv 2411.09009), §4:
loss_t = LSE_t - z_{t,y_t} with z = h W^T (optionally softcapped s*tanh(z/s)); the gradient of
the logits is softmax - onehot. Only per-token LSE (fp32) survives the forward.

Formulation chosen for CPU speed: ignored tokens are removed first (they cost nothing), then
tokens are processed in chunks whose [T, V] logit slab stays small (T*V <= `slab_elements`).
When the upstream gradient is a scalar (reduction mean/sum) the gradients are computed chunk by
chunk *inside the forward* (6*N*V*D flops, like the naive head, instead of CCE's 8 with its
recompute) and the backward only scales them. For reduction='none' the backward recomputes the
logit chunks from the saved LSE, as the Triton kernels do. If even `min_token_chunk` tokens times
the vocabulary exceed the slab, the vocabulary is chunked too (two passes: online LSE, then
gradients), so memory stays bounded for any V.
"""

from __future__ import annotations

import torch


def _logits(h: torch.Tensor, w: torch.Tensor, softcap: float | None):
    """z in fp32 (matmul in the input dtype, like the reference head), and tanh(z/s) if capped."""
    z = (h @ w.T).float()
    if softcap is None:
        return z, None
    t = torch.tanh(z / softcap)
    return t * softcap, t


def _vocab_slices(V: int, vocab_chunk: int):
    return [slice(v, min(v + vocab_chunk, V)) for v in range(0, V, vocab_chunk)]


def _chunk_lse_target(h, w, y, softcap, vocab_chunk):
    """Per-token LSE and target logit over the whole vocabulary, vocab-chunked with an online LSE."""
    lse = torch.full((h.shape[0],), float("-inf"), dtype=torch.float32, device=h.device)
    target = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
    for vs in _vocab_slices(w.shape[0], vocab_chunk):
        z, _ = _logits(h, w[vs], softcap)
        lse = torch.logaddexp(lse, torch.logsumexp(z, -1))
        inside = (y >= vs.start) & (y < vs.stop)
        local = (y - vs.start).clamp(0, z.shape[1] - 1)
        target += torch.where(inside, z.gather(1, local[:, None]).squeeze(1), 0.0)
    return lse, target


def _chunk_grads(h, w, y, lse, g_nll, g_lse, softcap, vocab_chunk, dw, dw_dtype):
    """dH for this token chunk; adds into dw. dz = p*(g_nll+g_lse) - onehot(y)*g_nll, per token."""
    dh = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
    scale = (g_nll + g_lse)[:, None]
    rows = torch.arange(h.shape[0], device=h.device)
    for vs in _vocab_slices(w.shape[0], vocab_chunk):
        z, t = _logits(h, w[vs], softcap)
        dz = z.sub_(lse[:, None]).exp_().mul_(scale)  # in place: one [T, v] slab
        inside = (y >= vs.start) & (y < vs.stop)
        dz[rows[inside], y[inside] - vs.start] -= g_nll[inside]
        if t is not None:
            dz.mul_(1 - t * t)
        dz = dz.to(h.dtype)
        dh += (dz @ w[vs]).float()
        if dw.dtype == h.dtype:
            dw[vs].addmm_(dz.T, h)
        else:
            dw[vs] += (dz.T @ h).to(dw_dtype)
    return dh


def _accumulate(dz, h, w, dh, ts, dw):
    """dh[ts] = dz @ w; dw += dz^T @ h, in place when dtypes allow (no V x D temporary)."""
    dh[ts] = (dz @ w).float()
    if dw.dtype == h.dtype:
        dw.addmm_(dz.T, h)
    else:
        dw += (dz.T @ h).to(dw.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, softcap, z_loss, reduction, opts):
        slab, min_tokens, accum_fp32 = opts
        N, V = labels.shape[0], weight.shape[0]
        keep = (labels != ignore_index).nonzero().squeeze(1)
        h, y = (hidden, labels) if len(keep) == N else (hidden[keep], labels[keep])
        token_chunk = max(min_tokens, slab // V)
        vocab_chunk = V if token_chunk * V <= slab else max(1, slab // token_chunk)
        lse = torch.empty(len(keep), dtype=torch.float32, device=hidden.device)
        nll = torch.empty_like(lse)
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grads_now = needs_grad and reduction != "none"
        dw_dtype = torch.float32 if accum_fp32 else weight.dtype
        dw = torch.zeros(weight.shape, dtype=dw_dtype, device=weight.device) if grads_now else None
        dh = torch.empty(h.shape, dtype=torch.float32, device=h.device) if grads_now else None
        for start in range(0, len(keep), token_chunk):
            ts = slice(start, start + token_chunk)
            if grads_now and vocab_chunk == V:
                # One slab, updated in place: logits -> exp(z - max) -> dz. LSE, target and both
                # gradients come from the same logits, so this costs what the naive head costs.
                z, t = _logits(h[ts], weight, softcap)
                target = z.gather(1, y[ts, None]).squeeze(1)
                row_max = z.max(1).values
                e = z.sub_(row_max[:, None]).exp_()
                total = e.sum(1)
                lse[ts] = row_max + total.log()
                nll[ts] = lse[ts] - target
                g_lse = 1 + 2 * z_loss * lse[ts] if z_loss else torch.ones_like(target)
                dz = e.mul_((g_lse / total)[:, None])
                dz[torch.arange(dz.shape[0]), y[ts]] -= 1
                if t is not None:
                    dz.mul_(t.mul_(t).neg_().add_(1))
                _accumulate(dz.to(h.dtype), h[ts], weight, dh, ts, dw)
                continue
            lse[ts], target = _chunk_lse_target(h[ts], weight, y[ts], softcap, vocab_chunk)
            nll[ts] = lse[ts] - target
            if grads_now:
                ones = torch.ones_like(target)
                g_lse = 2 * z_loss * lse[ts] if z_loss else torch.zeros_like(target)
                dh[ts] = _chunk_grads(h[ts], weight, y[ts], lse[ts], ones, g_lse, softcap, vocab_chunk, dw, dw_dtype)
        per_token = nll + z_loss * lse * lse if z_loss else nll
        ctx.reduction, ctx.n_valid, ctx.N = reduction, len(keep), N
        ctx.h_dtype, ctx.w_dtype = hidden.dtype, weight.dtype
        ctx.softcap, ctx.z_loss, ctx.vocab_chunk, ctx.token_chunk, ctx.dw_dtype = (
            softcap, z_loss, vocab_chunk, token_chunk, dw_dtype)
        if grads_now:
            ctx.save_for_backward(keep, dh, dw)
        elif needs_grad:
            ctx.save_for_backward(keep, hidden, weight, labels, lse)
        if reduction == "none":
            out = torch.zeros(N, dtype=torch.float32, device=hidden.device)
            return out.index_copy_(0, keep, per_token)
        total = per_token.sum()
        return total / max(len(keep), 1) if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.reduction != "none":
            # The gradients were computed in the forward for a unit upstream gradient; scale them in
            # place (no second V x D buffer). The saved buffers are consumed: one backward only.
            keep, dh_valid, dw = ctx.saved_tensors
            scale = grad_out / max(ctx.n_valid, 1) if ctx.reduction == "mean" else grad_out
            dh_valid, dw = dh_valid.mul_(scale).to(ctx.h_dtype), dw.mul_(scale).to(ctx.w_dtype)
            if ctx.n_valid == ctx.N:
                return dh_valid, dw, None, None, None, None, None, None
            dhidden = torch.zeros((ctx.N, dh_valid.shape[1]), dtype=ctx.h_dtype, device=dh_valid.device)
            return dhidden.index_copy_(0, keep, dh_valid), dw, None, None, None, None, None, None
        keep, hidden, weight, labels, lse = ctx.saved_tensors
        h, y, g = hidden[keep], labels[keep], grad_out[keep].float()
        dw = torch.zeros(weight.shape, dtype=ctx.dw_dtype, device=weight.device)
        dhidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        for start in range(0, len(keep), ctx.token_chunk):
            ts = slice(start, start + ctx.token_chunk)
            g_lse = 2 * ctx.z_loss * lse[ts] * g[ts]
            dh = _chunk_grads(h[ts], weight, y[ts], lse[ts], g[ts], g_lse, ctx.softcap, ctx.vocab_chunk, dw, ctx.dw_dtype)
            dhidden.index_copy_(0, keep[ts], dh)
        return dhidden.to(hidden.dtype), dw.to(weight.dtype), None, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
    z_loss: float = 0.0,
    slab_elements: int = 1 << 24,
    min_token_chunk: int = 64,
    accum_fp32: bool = True,
) -> torch.Tensor:
    """Cross-entropy of softmax(hidden @ weight.T [, softcap]) against labels, without N x V logits.

    hidden [N, D], weight [V, D], labels [N] (ignore_index marks tokens without a target).
    Returns fp32: a scalar for mean/sum, [N] for none (0 at ignored tokens).
    `slab_elements` bounds the [T, v] fp32 logit slab (default 16M elements = 64 MiB).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction={reduction!r}: expected mean, sum or none")
    opts = (slab_elements, min_token_chunk, accum_fp32)
    return _LinearCrossEntropy.apply(hidden, weight, labels, ignore_index, softcap, z_loss, reduction, opts)
