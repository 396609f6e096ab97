"""Matplotlib figures logged to MLflow (Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

if TYPE_CHECKING:
    import pandas as pd


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


def samples_per_s_figure(results: pd.DataFrame, *, series: Sequence[str]) -> Figure:
    """Samples/s against num_workers: loader alone and end to end, one line per combination
    of the ``series`` columns (the benchmark grid's other axes)."""
    series = list(series)
    groups = list(results.groupby(series, sort=False))
    legend_rows = -(-len(groups) // 2)
    fig = Figure(figsize=(11, 4.2 + 0.22 * legend_rows), dpi=100)
    axes = fig.subplots(1, 2)  # own y scales: on a CPU the model is often 10x slower
    for key, rows in groups:
        rows = rows.sort_values("num_workers")
        for ax, column in zip(axes, ("loader_samples_per_s", "train_samples_per_s"), strict=True):
            ax.plot(rows["num_workers"], rows[column], marker="o", label=" / ".join(map(str, key)))
    for ax, title in zip(axes, ("loader alone", "end to end (training)"), strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("num_workers")
        ax.set_ylabel("samples / s")
        ax.set_xticks(sorted(results["num_workers"].unique()))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.legend(
        *axes[0].get_legend_handles_labels(),
        title=" / ".join(series),
        loc="lower center",
        ncol=2,
        fontsize=8,
        title_fontsize=8,
        frameon=False,
    )
    fig.tight_layout(rect=(0, min(0.5, 0.05 + 0.055 * legend_rows), 1, 1))
    return fig
