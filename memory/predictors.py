"""LeMo pattern predictors: per eliminating layer, a small network that predicts the block scores of
memory/elimination.py from the layer input, so the layer does not compute q.k over the sequence
to decide which blocks it keeps (Wang et al., arXiv 2501.09767, section "pattern predictor"; the
artifact `Pairshoe/Jenga-AE` trains a Q and a K predictor of 3 linear layers with ReLU per layer,
offline, against the exact block scores, with the base model frozen).

Here each predictor (`Tower`) reads one block of the normed layer input (the tokens the layer's
q/k projections read): a small per-token network (hidden -> `token_rank` -> `width`, ReLU), its
maximum and mean over the block's tokens (the exact score is a maximum over a tile's tokens), and
2 linear layers with ReLU -> `heads` x `head_dim` values. A key block j's predicted score is
Q^ . K^_j with Q^ the sum of the sequence's query-block vectors (the exact score sums over every
query block, not causally), fitted (train/elimination_fit.py) to the log of the exact score (only
the ranking matters). It costs O(s * hidden * token_rank) per layer, and under sequence
parallelism one all-reduce of a [B, heads x head_dim] sum, against the exact score's
O(s^2 * heads * head_dim) and an all-gather of every key. (The artifact flattens a block's tokens
into 3 linear layers; max/mean pooling generalized better from the few rows a CPU fit captures:
held-out recall 0.78 against 0.66, compared once on 5 of SmolLM2's layers at 4K with 24 rows.)

Saved as safetensors (`predictors.safetensors`) with their settings in the file's metadata;
`longctx elimination fit` (train/elimination_fit.py) trains them, `memory.elimination.source:
predictor` loads them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

FILE = "predictors.safetensors"


@dataclass(frozen=True)
class PredictorShape:
    hidden: int
    block_tokens: int
    token_rank: int = 32
    width: int = 128
    heads: int = 4
    head_dim: int = 32


class Tower(nn.Module):
    """Normed layer input [B, nb * block_tokens, hidden] -> [B, nb, heads * head_dim], one vector per block."""

    def __init__(self, s: PredictorShape) -> None:
        super().__init__()
        self.block_tokens, self.width = s.block_tokens, s.width
        self.token = nn.Sequential(nn.Linear(s.hidden, s.token_rank), nn.ReLU(), nn.Linear(s.token_rank, s.width),
                                   nn.ReLU())
        self.block = nn.Sequential(nn.Linear(2 * s.width, s.width), nn.ReLU(), nn.Linear(s.width, s.heads * s.head_dim))

    def forward(self, h: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """valid [nb * block_tokens] (1 = a real token, 0 = a partial block's padding): the pooling
        reads the real tokens only (features are >= 0, so a zeroed one never wins the max)."""
        t = self.token(h).view(h.shape[0], -1, self.block_tokens, self.width)
        if valid is None:
            return self.block(torch.cat([t.amax(2), t.mean(2)], dim=-1))
        v = valid.to(t.dtype).view(1, -1, self.block_tokens, 1)
        t = t * v
        return self.block(torch.cat([t.amax(2), t.sum(2) / v.sum(2).clamp_min(1)], dim=-1))


class BlockPredictor(nn.Module):
    """A layer's Q^ and K^ towers."""

    def __init__(self, s: PredictorShape) -> None:
        super().__init__()
        self.shape = s
        self.q, self.k = Tower(s), Tower(s)

    def predict(self, h: torch.Tensor) -> torch.Tensor:
        """[B, nb]: the fitted estimate of log(mean over query blocks of the exact tile / scale), one
        process (the scores divided by the number of blocks: the same ranking)."""
        return torch.einsum("bd,bjd->bj", self.q(h).mean(1), self.k(h))

    def scores(self, h: torch.Tensor, sp: int = 1, group=None, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted key-block scores [B, nb]: (sum of this sequence's Q^) . K^. Under sequence
        parallelism h is this rank's blocks, and the Q^ sums of every rank are added first.
        `valid`: see Tower.forward (partial blocks zero padded to whole ones)."""
        qsum = self.q(h, valid).sum(1)  # [B, heads * head_dim]
        if sp > 1:
            dist.all_reduce(qsum, group=group)
        return torch.einsum("bd,bjd->bj", qsum, self.k(h, valid))

    def flops_per_token(self) -> int:
        return flops_per_token(self.shape)


def flops_per_token(s: PredictorShape) -> int:
    """Multiply-adds x 2 per token of the layer input for both towers (the score's dot products, one
    per block, are left out)."""
    per_block = 2 * s.width * s.width + s.width * s.heads * s.head_dim
    return 2 * 2 * (s.hidden * s.token_rank + s.token_rank * s.width + per_block // s.block_tokens)


def read_shape(path: Path) -> PredictorShape | None:
    """The settings of a predictors file (a folder or the file), None when it is not readable."""
    from safetensors import SafetensorError, safe_open

    file = path / FILE if path.is_dir() else path
    try:
        with safe_open(str(file), "pt") as f:
            return PredictorShape(**json.loads((f.metadata() or {})["shape"]))
    except (SafetensorError, KeyError, TypeError, ValueError, OSError):
        return None


@dataclass
class Predictors:
    """The fitted predictors of a model's eliminating layers, and what they were fitted on."""

    shape: PredictorShape
    layers: dict[int, BlockPredictor]
    info: dict = field(default_factory=dict)  # num_layers, seq_len, recall per layer, costs ...

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"layers.{i}.{k}": v.detach().float().cpu().contiguous()
                   for i, p in self.layers.items() for k, v in p.state_dict().items()}
        meta = {"shape": json.dumps(asdict(self.shape)), "layers": json.dumps(sorted(self.layers)),
                "info": json.dumps(self.info)}
        tmp = folder / (FILE + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(folder / FILE)
        return folder / FILE

    @classmethod
    def load(cls, path: Path, device: torch.device | str = "cpu") -> Predictors:
        """From a folder holding predictors.safetensors, or the file. ValueError: not a predictors file."""
        path = Path(path)
        file = path / FILE if path.is_dir() else path
        if not file.is_file():
            raise ValueError(f"{file} does not exist (longctx elimination fit RECIPE --out FOLDER writes it)")
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(file), "pt") as f:
                meta = f.metadata() or {}
            shape = PredictorShape(**json.loads(meta["shape"]))
            numbers = [int(i) for i in json.loads(meta["layers"])]
            info = json.loads(meta.get("info", "{}"))
            tensors = load_file(str(file))
            layers = {}
            for i in numbers:
                p = BlockPredictor(shape)
                prefix = f"layers.{i}."
                p.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
                layers[i] = p.to(device).eval().requires_grad_(False)
        except (SafetensorError, KeyError, TypeError, ValueError, RuntimeError, OSError) as e:
            raise ValueError(f"{file}: not a longctx predictors file ({type(e).__name__}: {str(e)[:200]})") from None
        return cls(shape, layers, info)


def recall(predicted: torch.Tensor | None, exact: torch.Tensor | None) -> tuple[int, int]:
    """(hits, total): of the token indices [B, k] the exact scores keep, how many the predicted keep
    too (whole layers kept dense on both sides count as all hit)."""
    if exact is None or predicted is None:
        n = 0 if exact is None else exact.numel()
        return n, n
    hits = sum(len(set(p.tolist()) & set(e.tolist())) for p, e in zip(predicted, exact))
    return hits, exact.numel()
