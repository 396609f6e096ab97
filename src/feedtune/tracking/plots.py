"""Matplotlib figures logged to MLflow (Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def confusion_matrix_figure(cm: np.ndarray, classes: Sequence[str], *, title: str = "") -> Figure:
    """Row-normalised confusion matrix with raw counts in the cells."""
    n = len(classes)
    size = max(4.0, 0.55 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.9), dpi=100)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm, dtype=float), where=rows > 0)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            if cm[i, j]:
                ax.text(
                    j,
                    i,
                    str(cm[i, j]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    ax.set_title(title or "confusion matrix (row-normalised colour, counts in cells)", fontsize=9)
    fig.tight_layout()
    return fig


def bar_figure(names: Sequence[str], values: Sequence[float], *, xlabel: str, title: str) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.5), dpi=100)
    ax.barh(list(names)[::-1], list(values)[::-1], color="tab:blue")
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def close(fig: Figure) -> None:
    plt.close(fig)


def pareto_figure(
    points: Sequence[tuple[float, float, int]], *, xlabel: str, ylabel: str
) -> Figure:
    """Scatter of (x, y, trial number) with the non-dominated points (max x, max y) joined."""
    fig, ax = plt.subplots(figsize=(7, 5), dpi=100)
    xs = np.array([p[0] for p in points])
    ys = np.array([p[1] for p in points])
    front = [
        i
        for i in range(len(points))
        if not any(
            (xs[j] >= xs[i] and ys[j] >= ys[i]) and (xs[j] > xs[i] or ys[j] > ys[i])
            for j in range(len(points))
        )
    ]
    ax.scatter(xs, ys, color="tab:gray", label="trials")
    order = sorted(front, key=lambda i: xs[i])
    ax.plot(xs[order], ys[order], "o-", color="tab:red", label="Pareto front")
    for x, y, number in points:
        ax.annotate(str(number), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel} vs {xlabel} (numbers: trials)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    return fig
