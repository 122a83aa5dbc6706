"""The annotated 0..1 heatmap every accuracy matrix is drawn with, and the Agg figure it is drawn on.

A ground-floor drawing primitive: the sequence runner writes each run's `matrix_heatmap.png` with
`matrix_heatmap`, and the report's side-by-side panels (harness/report/figures.py) use `draw_heatmap`
with their own HeatmapStyle. Object-oriented Matplotlib on the Agg canvas: no pyplot, so no global
backend switch and no figure registry to leak into from a long-running process.
"""

from __future__ import annotations

import io
import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from harness.io import atomic_write_bytes

DPI = 110


@dataclass(frozen=True)
class HeatmapStyle:
    """How the cells and labels of an annotated 0..1 heatmap look."""

    missing_color: str | None  # not-evaluated cells; None leaves them transparent
    missing_text: str | None  # text in not-evaluated cells; None writes nothing
    white_below: float  # values below this get white text (dark end of viridis)
    rotate_after: int  # rotate the column labels when the longest has more characters (-1: always)
    rotation: int
    tick_fontsize: float | None  # None: Matplotlib's default size
    title_fontsize: float | None


# The per-run file the sequence runner writes next to matrix.json.
RUN_STYLE = HeatmapStyle(None, None, 0.6, -1, 30, None, None)


def text_size(fontsize: float | None) -> dict[str, float]:
    """fontsize as keyword arguments; {} for None (passing fontsize=None would not mean "default" everywhere)."""
    return {} if fontsize is None else {"fontsize": fontsize}


def new_figure(w: float, h: float, dpi: float | None = DPI, layout: str | None = "constrained") -> Figure:
    fig = Figure(figsize=(w, h), dpi=dpi, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def fit_title(title: str, width_in: float, fontsize: float) -> str:
    """The title wrapped onto lines that fit a figure `width_in` inches wide (a centred line wider than the figure
    is cut on both sides). An average character is taken as 0.6 em."""
    per_line = max(16, int(width_in * 72 / (0.6 * fontsize)))
    return textwrap.fill(title, per_line)


def draw_heatmap(ax, M: np.ndarray, row_labels, col_labels, title: str, style: HeatmapStyle, fontsize: float):
    """One annotated heatmap on ax (fixed 0..1 colour scale, the value in every cell); returns the image."""
    cmap = matplotlib.colormaps["viridis"]
    if style.missing_color is not None:
        cmap = cmap.with_extremes(bad=style.missing_color)
    im = ax.imshow(np.ma.masked_invalid(M), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    rotate = max(map(len, col_labels), default=0) > style.rotate_after
    ax.set_xticks(
        range(M.shape[1]),
        col_labels,
        rotation=style.rotation if rotate else 0,
        ha="right" if rotate else "center",
        **text_size(style.tick_fontsize),
    )
    ax.set_yticks(range(M.shape[0]), row_labels[: M.shape[0]], **text_size(style.tick_fontsize))
    ax.set_title(title, **text_size(style.title_fontsize))
    for i in range(M.shape[0]):
        for j in range(M.shape[1]):
            v = M[i, j]
            if np.isfinite(v):
                ax.text(
                    j,
                    i,
                    f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=fontsize,
                    color="white" if v < style.white_below else "black",
                )
            elif style.missing_text is not None:
                ax.text(j, i, style.missing_text, ha="center", va="center", fontsize=fontsize - 1, color="#555555")
    return im


def matrix_heatmap(R: np.ndarray, tasks: list[str], title: str, path: Path) -> None:
    """Write one run's accuracy matrix as a PNG heatmap: rows = stage 0..T, columns = tasks.

    The file is replaced atomically. Not-evaluated (NaN) cells stay blank.
    """
    # dpi=None: the layout is computed at Matplotlib's default 100 dpi, as the file always was.
    fig = new_figure(1.2 + 1.1 * len(tasks), 1.0 + 0.55 * R.shape[0], dpi=None, layout=None)
    ax = fig.subplots()
    im = draw_heatmap(
        ax,
        R,
        [f"stage {i}" for i in range(R.shape[0])],
        tasks,
        fit_title(title, 0.7 * fig.get_figwidth(), RUN_STYLE.title_fontsize or 10),
        RUN_STYLE,
        8,
    )
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    atomic_write_bytes(Path(path), png_bytes(fig))
