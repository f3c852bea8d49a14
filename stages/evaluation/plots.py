"""Plots for evaluation reports, drawn with matplotlib's Agg canvas (no display, no pyplot state)."""

from __future__ import annotations

import io
import math
import os

import numpy as np

from arpipe.pipeline.storage import storage_for


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
    return _save_png(fig, path)


def confusion_matrix(panels: dict[str, np.ndarray], classes: list[str], path: str | os.PathLike,
                     title: str | None = None) -> str:
    """Write a PNG with one confusion matrix per panel (e.g. samples, reference) to ``path``; returns it.

    Each panel is ``counts_RP``: rows the requested (true) class, columns the predicted one, both
    in ``classes`` order. Colours are row shares, so a sharp diagonal reads the same whatever the
    counts; cells show counts while the matrix is small enough to read them.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k = len(classes)
    side = min(12.0, max(3.5, 0.45 * k + 1.5))
    fig = Figure(figsize=(side * max(1, len(panels)), side + (0.4 if title else 0)), layout="constrained")
    FigureCanvasAgg(fig)
    if title:
        fig.suptitle(title)
    for i, (name, counts_RP) in enumerate(panels.items()):
        ax = fig.add_subplot(1, max(1, len(panels)), i + 1)
        counts_RP = np.asarray(counts_RP)
        shares = counts_RP / np.maximum(counts_RP.sum(axis=1, keepdims=True), 1)
        ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
        accuracy = np.trace(counts_RP) / max(int(counts_RP.sum()), 1)
        ax.set_title(f"{name}: {accuracy:.1%} on the diagonal (n={int(counts_RP.sum())})", fontsize=9)
        ticks = range(k) if k <= 40 else []
        ax.set_xticks(list(ticks), [classes[t] for t in ticks], fontsize=7, rotation=90 if k > 12 else 0)
        ax.set_yticks(list(ticks), [classes[t] for t in ticks], fontsize=7)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("requested class")
        if k <= 20:
            for r, c in zip(*np.nonzero(counts_RP)):
                ax.text(c, r, str(counts_RP[r, c]), ha="center", va="center", fontsize=7,
                        color="white" if shares[r, c] > 0.5 else "black")
    return _save_png(fig, path)


def _save_png(fig, path: str | os.PathLike) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    uri = os.fspath(path)
    storage_for(uri).write_bytes(uri, buf.getvalue())
    return uri


def segment_curves(rows: list[dict[str, float | str]], path: str | os.PathLike, title: str | None = None) -> str:
    """Held-out loss and top-1 accuracy per segment (scale or part) against the step: two panels, one line per
    segment. ``rows`` hold ``step``, ``segment``, ``loss`` and ``accuracy``; returns ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    if title:
        fig.suptitle(title)
    segments = sorted({str(r["segment"]) for r in rows}, key=lambda s: (len(s), s))
    for i, metric in enumerate(("loss", "accuracy")):
        ax = fig.add_subplot(1, 2, i + 1)
        for seg in segments:
            mine = sorted((r for r in rows if r["segment"] == seg), key=lambda r: r["step"])
            ax.plot([r["step"] for r in mine], [r[metric] for r in mine], marker=".", label=seg)
        ax.set_xlabel("step")
        ax.set_ylabel("held-out " + ("loss (nats/token)" if metric == "loss" else "top-1 accuracy"))
        ax.grid(alpha=0.3)
    if segments:
        fig.axes[-1].legend(fontsize=7, ncol=2)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    storage_for(str(path)).write_bytes(str(path), buf.getvalue())
    return str(path)
