"""Small matplotlib figures shared by the scheduler (per-sequence heatmap) and the report."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def matrix_heatmap(R: np.ndarray, tasks: list[str], title: str, path: Path, ax=None, vmin: float = 0.0, vmax: float = 1.0):
    """Accuracy matrix as a heatmap: rows = stage 0..T, columns = tasks, numbers in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(tasks), 1.0 + 0.55 * R.shape[0]))
    masked = np.ma.masked_invalid(R)
    im = ax.imshow(masked, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_yticks(range(R.shape[0]), [f"stage {i}" for i in range(R.shape[0])])
    ax.set_title(title)
    for i in range(R.shape[0]):
        for j in range(R.shape[1]):
            if not np.isnan(R[i, j]):
                ax.text(j, i, f"{R[i, j]:.2f}", ha="center", va="center", color="white" if R[i, j] < 0.6 else "black", fontsize=8)
    if own:
        fig.colorbar(im, ax=ax, fraction=0.05)
        fig.tight_layout()
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        tmp.replace(path)
    return im
