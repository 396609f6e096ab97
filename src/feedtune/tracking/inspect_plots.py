"""Figures of ``feedtune inspect``: class counts, image sizes, aspect ratios, example images.

Built as plain ``matplotlib.figure.Figure`` objects (Agg canvas, no pyplot state), so a figure
that is never logged needs no closing; ``mlflow_store.log_figure`` saves them as PNG.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from feedtune.sources.imageio import BadImageError  # noqa: E402
from feedtune.sources.inspection import Inspection  # noqa: E402

SIDE_COLOURS = {"train": "tab:blue", "val": "tab:orange"}
# Example grid: images per class, and classes shown (one row each) before the grid is cut.
EXAMPLES_PER_CLASS = 4
MAX_EXAMPLE_CLASSES = 20
# Example thumbnails: JPEGs this large or larger are decoded at reduced size (cheap).
_THUMB_MIN_SIZE = 128


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def class_counts_figure(found: Inspection) -> Figure:
    """Images per class on each side of the split (horizontal bars, train and val side by side);
    the bar lengths show the imbalance, the val bars how thin validation is per class."""
    counts = found.summary["class_counts"]
    classes = list(counts["used"])[::-1]  # first class on top
    y = np.arange(len(classes))
    fig = _figure(7, 0.4 * len(classes) + 1.6)
    ax = fig.add_subplot()
    for offset, side in ((0.2, "train"), (-0.2, "val")):
        values = [counts[side][c] for c in classes]
        ax.barh(y + offset, values, height=0.4, color=SIDE_COLOURS[side], label=side)
    ax.set_yticks(y, classes)
    ax.set_xlabel("images")
    ax.legend(loc="lower right")
    ratio = found.summary["imbalance_ratio"]
    ax.set_title(f"images per class and split side (imbalance {ratio:.1f}:1)", fontsize=10)
    return fig


def image_sizes_figure(found: Inspection) -> Figure:
    """Width against height (one dot per image) and the shorter side's histogram, with the
    working size marked: how far decoding is from the resolution training uses."""
    good = found.good
    sizes = found.summary["sizes"]
    fig = _figure(11, 4.2)
    scatter, hist = fig.subplots(1, 2)
    for side, colour in SIDE_COLOURS.items():
        rows = good[good["side"] == side]
        scatter.scatter(rows["width"], rows["height"], s=10, alpha=0.5, color=colour, label=side)
    scatter.set_xlabel("width (px)")
    scatter.set_ylabel("height (px)")
    scatter.set_title(f"image sizes ({sizes['n_distinct']} distinct)", fontsize=10)
    scatter.legend()
    shorter = np.minimum(good["width"], good["height"]).to_numpy(dtype=float)
    # Bins span the images and both marked sizes, so one common size still shows as a bar.
    marks = [sizes["image_size"], sizes["working_size"]]
    lo, hi = min([*shorter, *marks]), max([*shorter, *marks])
    hist.hist(shorter, bins=np.linspace(lo, hi + (hi - lo) / 30 + 1, 32), color="tab:gray")
    for value, style, name in (
        (sizes["working_size"], "--", "working size"),
        (sizes["image_size"], ":", "augment.image_size"),
    ):
        hist.axvline(value, color="tab:red", linestyle=style, label=f"{name} {value} px")
    hist.set_xlabel("shorter side (px)")
    hist.set_ylabel("images")
    hist.set_title("shorter side", fontsize=10)
    hist.legend()
    return fig


def aspect_ratios_figure(found: Inspection) -> Figure:
    """Histogram of width / height: square crops of very wide or tall images cut content."""
    good = found.good
    ratios = (good["width"].astype(float) / good["height"].astype(float)).to_numpy()
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    ax.hist(ratios, bins=min(30, max(5, len(ratios) // 4)), color="tab:green")
    ax.axvline(1.0, color="black", linestyle=":", label="square")
    ax.set_xlabel("aspect ratio (width / height)")
    ax.set_ylabel("images")
    ax.set_title("aspect ratios", fontsize=10)
    ax.legend()
    return fig


def examples_figure(found: Inspection, per_class: int = EXAMPLES_PER_CLASS) -> Figure:
    """A few images of each class (one row per class), decoded as training decodes them."""
    examples = found.examples(per_class)
    shown = list(examples.items())[:MAX_EXAMPLE_CLASSES]
    cols = max([len(paths) for _, paths in shown], default=1)
    fig = _figure(1.8 * cols + 1, 1.8 * max(1, len(shown)) + 0.4)
    if not shown:
        fig.text(0.5, 0.5, "no readable images", ha="center", va="center")
        return fig
    axes = np.atleast_2d(fig.subplots(len(shown), cols, squeeze=False))
    for row, (label, paths) in enumerate(shown):
        for col in range(cols):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(paths):
                ax.axis("off")
                continue
            try:
                image = found.reader.decode(
                    paths[col], backend=found.decoder, min_size=_THUMB_MIN_SIZE
                )
                ax.imshow(image)
            except BadImageError as exc:
                ax.text(0.5, 0.5, exc.reason, ha="center", va="center", fontsize=6, wrap=True)
            ax.set_xlabel(found.relative(paths[col])[-28:], fontsize=6)
            if col == 0:
                ax.set_ylabel(label, fontsize=9)
    more = len(examples) - len(shown)
    title = "examples per class" + (f" (first {len(shown)}; {more} more)" if more else "")
    fig.suptitle(title, fontsize=10)
    return fig


def inspection_figures(found: Inspection) -> dict[str, Figure]:
    """Artifact name -> figure; ``feedtune inspect`` logs each as ``inspect/<name>.png``."""
    return {
        "class_counts": class_counts_figure(found),
        "image_sizes": image_sizes_figure(found),
        "aspect_ratios": aspect_ratios_figure(found),
        "examples": examples_figure(found),
    }
