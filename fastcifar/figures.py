"""Figures of the error-analysis report, drawn with matplotlib (Agg, no display)."""

from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fastcifar.analysis import Analysis, row_normalized, without_diagonal  # noqa: E402
from fastcifar.atomic import write_atomic  # noqa: E402
from fastcifar.errors import UserError  # noqa: E402

DPI = 110


def figure_format(path: Path) -> str:
    """The format a figure file's suffix names (PNG without one), checked before any work."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fmt = Path(path).suffix[1:].lower() or "png"
    if fmt not in FigureCanvasAgg.get_supported_filetypes():
        raise UserError(f"{path}: matplotlib writes no .{fmt} figure; name it .png, .pdf or .svg")
    return fmt


def save(fig, path: Path) -> Path:
    """Write the figure atomically, in the format its suffix names."""
    path = Path(path)
    try:
        fmt = figure_format(path)
        fig.tight_layout()
        write_atomic(path, lambda f: fig.savefig(f, dpi=DPI, format=fmt))
    finally:
        plt.close(fig)
    return path


def training_curves(runs: dict[str, list[dict]], path: Path) -> Path:
    """Loss and accuracy against epoch for train/val/test (figures 3, 5, 7, 9); several
    runs overlay, one colour each (tab10, tab20 beyond ten runs), named once in the legend,
    with the line style telling the split. A curve pooled over seeds (rows with
    `<metric>_std`) is drawn in a band of one standard deviation either side."""
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"train": "-", "val": "--", "test": ":"}
    palette = plt.cm.tab10.colors if len(runs) <= 10 else plt.cm.tab20.colors
    for color, (name, rows) in zip(itertools.cycle(palette), runs.items()):
        epochs = [r["epoch"] for r in rows]
        named = False
        for split, style in styles.items():
            label = split if len(runs) == 1 else (None if named else name)
            losses = [r.get(f"{split}_loss") for r in rows]
            accs = [r.get(f"{split}_acc") for r in rows]
            if all(v is not None for v in losses):
                loss_ax.plot(epochs, losses, style, color=color, label=label)
                _band(loss_ax, epochs, rows, f"{split}_loss", color)
            if all(v is not None for v in accs):
                acc_ax.plot(epochs, [100 * a for a in accs], style, color=color, label=label)
                _band(acc_ax, epochs, rows, f"{split}_acc", color, scale=100)
                named = True
    splits = "" if len(runs) == 1 else " (solid: train, dashed: val, dotted: test)"
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy loss",
                title="loss (train: as optimised, with any label smoothing)")  # fmt: skip
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy" + splits)
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8 if len(runs) <= 10 else 6)
    return save(fig, path)


def _band(ax, epochs, rows, field: str, color, scale: float = 1.0) -> None:
    """Mean +- one standard deviation, where the rows carry `<field>_std`."""
    if not all(f"{field}_std" in r for r in rows):
        return
    low = [scale * (r[field] - r[f"{field}_std"]) for r in rows]
    high = [scale * (r[field] + r[f"{field}_std"]) for r in rows]
    ax.fill_between(epochs, low, high, color=color, alpha=0.15, linewidth=0)


def _matrix(ax, values, classes, title, fmt):
    image = ax.imshow(values, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    threshold = values.max() / 2 if values.max() > 0 else 1
    for i in range(len(classes)):
        for j in range(len(classes)):
            color = "white" if values[i, j] > threshold else "black"
            ax.text(j, i, fmt(values[i, j]), ha="center", va="center", fontsize=7, color=color)
    return image


def confusion_figure(a: Analysis, classes, path: Path) -> Path:
    """Counts and row-normalised confusion matrices side by side (figure 10)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.6))
    _matrix(left, a.confusion, classes, "confusion matrix (counts)", lambda v: f"{v:d}")
    _matrix(right, row_normalized(a.confusion), classes, "row-normalised", lambda v: f"{v:.2f}")
    return save(fig, path)


def confusion_without_diagonal_figure(a: Analysis, classes, path: Path) -> Path:
    """The confusion matrix with correct predictions removed (figure 11)."""
    fig, ax = plt.subplots(figsize=(6.8, 5.8))
    _matrix(ax, without_diagonal(a.confusion), classes, "errors only (diagonal removed)",
            lambda v: f"{v:d}" if v else "")  # fmt: skip
    return save(fig, path)


def per_class_errors_figure(a: Analysis, classes, path: Path) -> Path:
    """Misclassified test images per true class (figure 14)."""
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.bar(range(len(classes)), a.errors_per_class, color="tab:red")
    ax.bar_label(bars, fontsize=8)
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set(ylabel="misclassified test images", title="errors per true class")
    ax.grid(axis="y", alpha=0.3)
    return save(fig, path)


def misclassified_grid(
    images: np.ndarray, examples: list[tuple[int, float]], true_name: str, predicted_name: str,
    path: Path, columns: int = 8,
) -> Path:  # fmt: skip
    """A grid of test images of one class mistaken for another, with confidences
    (figures 12 and 13)."""
    rows = max(1, -(-len(examples) // columns))
    fig, axes = plt.subplots(
        rows, columns, figsize=(columns * 1.35, rows * 1.55 + 0.5), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, (index, confidence) in zip(axes.flat, examples, strict=False):
        ax.imshow(images[index], interpolation="nearest")
        ax.set_title(f"#{index} {confidence:.0%}", fontsize=7)
    fig.suptitle(
        f"true {true_name}, predicted {predicted_name} ({len(examples)} shown)", fontsize=10
    )
    return save(fig, path)
