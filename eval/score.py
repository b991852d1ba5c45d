"""Forward-only scoring of chosen target tokens without N x V logits.

A `Scorer` wraps the training path's forward: `forward(ids [1, S]) -> (hidden [n, D], positions
[n])`, this rank's part of the sequence (all of it at sp 1; a zigzag shard under sequence
parallelism, with the global position of each row, padding included). For the targets it is asked
about (the tokens after positions first .. S-2) it projects only those rows onto the vocabulary, in
tiles of `tile_tokens`, in fp32: log p(target) = logit[target] - logsumexp(logits), and whether the
target is the arg-max. Each position belongs to one rank of the sequence-parallel group, so a sum
over the group gathers them.

Exact match by teacher forcing: greedy decoding reproduces the answer's n tokens exactly when, at
each answer position, the arg-max given the prompt and the answer's earlier tokens is the answer's
token, which is what one forward over prompt + answer tells (ties aside); no KV cache, no n
forwards.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

Forward = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class Scorer:
    def __init__(self, forward: Forward, output_weight: Callable[[], torch.Tensor], group=None,
                 tile_tokens: int = 1024) -> None:
        self.forward, self.output_weight, self.group, self.tile_tokens = forward, output_weight, group, tile_tokens

    @torch.no_grad()
    def targets(self, ids, first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p, arg-max == target) of ids[first + 1:] given what precedes each, fp64 and bool,
        the same on every rank of the group."""
        ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        S = ids.numel()
        if not 0 <= first < S - 1:
            raise ValueError(f"first={first}: expected a position in [0, {S - 2}] of a {S}-token sequence")
        hidden, positions = self.forward(ids[None])
        device = hidden.device
        T = S - 1 - first
        logp = torch.zeros(T, dtype=torch.float64, device=device)
        hit = torch.zeros(T, dtype=torch.float64, device=device)
        positions = positions.to(device).flatten()
        wanted = (positions >= first) & (positions <= S - 2)
        rows, pos = hidden.reshape(-1, hidden.shape[-1])[wanted], positions[wanted]
        target = ids.to(device)[pos + 1]
        weight = self.output_weight().float()
        for start in range(0, rows.shape[0], self.tile_tokens):
            t = slice(start, start + self.tile_tokens)
            logits = rows[t].float() @ weight.T
            picked = logits.gather(1, target[t, None]).squeeze(1)
            logp[pos[t] - first] = (picked - torch.logsumexp(logits, dim=-1)).double()
            hit[pos[t] - first] = (logits.argmax(-1) == target[t]).double()
            del logits
        if self.group is not None:
            dist.all_reduce(logp, group=self.group)
            dist.all_reduce(hit, group=self.group)
        return logp, hit > 0.5

    def answer(self, prompt: list[int], answer: list[int]) -> dict:
        """The answer's summed log-likelihood given the prompt, per token, and exact match."""
        logp, hit = self.targets(list(prompt) + list(answer), len(prompt) - 1)
        return {"answer_logprob": logp.sum().item(), "answer_token_logprob": logp.mean().item(),
                "exact": bool(hit.all().item()), "answer_tokens_right": hit.double().mean().item()}
