"""PNG figures of evaluation results (matplotlib, Agg): heatmaps of length x depth and curves of
loss by position, of one model or several on one figure."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(cells: list[dict], key: str) -> tuple[list[int], list[float], np.ndarray]:
    lengths = sorted({c["length"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for c in cells:
        grid[depths.index(c["depth"]), lengths.index(c["length"])] = c[key]
    return lengths, depths, grid


def _length_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def heatmaps(panels: list[tuple[str, list[dict]]], path: Path, title: str) -> Path:
    """One row per panel (a model or a task): exact match and the answer's mean token log-prob."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 2.4 * len(panels) + 0.8), squeeze=False)
    # one colour scale per column, shared by every panel, so models compare by colour too
    floor = min((c["answer_token_logprob"] for _, cells in panels for c in cells), default=-1.0)
    for row, (name, cells) in enumerate(panels):
        for col, (key, label, vmin, vmax, cmap) in enumerate((
                ("score", "exact match", 0.0, 1.0, "RdYlGn"),
                ("answer_token_logprob", "answer log p per token", min(floor, -1e-3), 0.0, "viridis"))):
            ax = axes[row][col]
            lengths, depths, grid = _grid(cells, key)
            im = ax.imshow(grid, aspect="auto", origin="upper", cmap=cmap, vmin=vmin, vmax=vmax)
            ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths])
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel("depth")
            ax.set_title(f"{name}: {label}", fontsize=9)
            for (i, j), v in np.ndenumerate(grid):
                if np.isfinite(v):
                    r, g, b, _ = im.cmap(im.norm(v))
                    dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="white" if dark else "black")
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def loss_curves(series: list[tuple[str, dict]], path: Path, title: str, marks: tuple[int, ...] = ()) -> Path:
    """Loss by position bucket, one line per (label, perplexity entry); vertical lines at `marks`
    (e.g. the native context length)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, entry in series:
        xs = [(b["start"] + b["end"]) / 2 for b in entry["by_position"]]
        ax.plot(xs, [b["loss"] for b in entry["by_position"]], marker=".", label=f"{label} (mean {entry['score']:.3f})")
    for m in marks:
        ax.axvline(m, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("position (tokens)")
    ax.set_ylabel(f"next-token loss, {series[0][1]['bucket_tokens']}-token buckets" if series else "loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
