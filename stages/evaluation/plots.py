"""Plots for evaluation reports, drawn with matplotlib's Agg canvas (no display, no pyplot state)."""

from __future__ import annotations

import io
import math
import os

import numpy as np

from pipeline.storage import storage_for


def score_distributions(scores: dict[str, np.ndarray], path: str | os.PathLike, title: str | None = None) -> str:
    """Write a PNG with one histogram per score (e.g. per-sample PSNR, 1-NN distances) to ``path``
    (a local path or ``s3://`` URI); returns the path.

    NaN and infinite values are left out and counted in the panel title; an empty or constant
    score still gets a panel.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(scores) or ["(no scores)"]
    cols = min(len(names), 3)
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(4 * cols, 3 * rows + (0.4 if title else 0)), layout="constrained")
    FigureCanvasAgg(fig)
    if title:
        fig.suptitle(title)
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        values = np.asarray(scores.get(name, []), dtype=np.float64).reshape(-1)
        finite = values[np.isfinite(values)]
        dropped = values.size - finite.size
        heading = f"{name} (n={finite.size}" + (f", {dropped} non-finite left out)" if dropped else ")")
        ax.set_title(heading, fontsize=9)
        if finite.size == 0:
            ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        ax.hist(finite, bins=min(50, max(1, int(np.sqrt(finite.size)) * 2)), color="tab:blue", alpha=0.8)
        mean = float(finite.mean())
        ax.axvline(mean, color="tab:red", linewidth=1, label=f"mean {mean:.4g}")
        ax.legend(fontsize=8, loc="upper right")
        ax.set_ylabel("count")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    uri = os.fspath(path)
    storage_for(uri).write_bytes(uri, buf.getvalue())
    return uri
