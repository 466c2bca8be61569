"""PNG figures for ``softgrad train``: loss curve, weights as images, confusion matrix, decision regions.

Everything draws with matplotlib's Agg backend into a file and closes its figure, so
it works without a display and leaks nothing across calls.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def loss_curve(curves: dict[str, np.ndarray], path, *, reference: float | None = None,
               reference_label: str = "scikit-learn optimum", xlabel: str = "iteration") -> Path:
    """Objective per iteration (left) and its distance to the best value seen, log scale (right).

    Args:
        curves: label -> ``(n_iter,)`` objective values.
        path: the PNG to write.
        reference: an objective to draw as a horizontal line (e.g. scikit-learn's).
        reference_label: its legend entry.
        xlabel: ``"iteration"`` or ``"epoch"``.
    """
    plt = _pyplot()
    fig, (ax, ax_gap) = plt.subplots(1, 2, figsize=(11, 4))
    finite = [np.asarray(c, dtype=float) for c in curves.values() if len(c)]
    best = min([c.min() for c in finite] + ([reference] if reference is not None else []), default=0.0)
    for label, curve in curves.items():
        curve = np.asarray(curve, dtype=float)
        it = np.arange(1, curve.shape[0] + 1)
        ax.plot(it, curve, lw=2, label=label)
        gap = curve - best
        keep = gap > 0
        ax_gap.semilogy(it[keep], gap[keep], lw=2, label=label)
    if reference is not None:
        ax.axhline(reference, color="k", ls="--", lw=1, label=reference_label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("objective  (mean cross-entropy + L2)")
    ax.set_title("Training objective")
    ax.grid(alpha=0.3)
    ax.legend()
    ax_gap.set_xlabel(xlabel)
    ax_gap.set_ylabel(f"objective - {best:.6g}")
    ax_gap.set_title("Distance to the best objective (log scale)")
    ax_gap.grid(alpha=0.3, which="both")
    return _save(fig, path)


def weight_images(coef: np.ndarray, image_shape: Sequence[int], path, *,
                  class_names: Sequence[str] | None = None) -> Path:
    """Each class's weight vector drawn as an image.

    Grey-scale images use a diverging map centred on 0 (red: the pixel votes for the
    class, blue: against), scaled per class. Colour images ``(3, H, W)`` are rescaled
    per class to ``[0, 1]`` and shown in RGB, as in CS231n's notes.
    """
    plt = _pyplot()
    coef = np.asarray(coef, dtype=float)
    C = coef.shape[0]
    cols = min(C, 5) if C <= 10 else math.ceil(math.sqrt(C))
    rows = math.ceil(C / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    colour = len(image_shape) == 3 and image_shape[0] == 3
    im = None
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= C:
            continue
        w = coef[k].reshape(image_shape)
        if colour:
            w = np.moveaxis(w, 0, -1)
            lo, hi = w.min(), w.max()
            ax.imshow((w - lo) / (hi - lo) if hi > lo else np.zeros_like(w), interpolation="nearest")
        else:
            m = np.abs(w).max() or 1.0
            im = ax.imshow(w / m, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(class_names[k] if class_names is not None else f"class {k}", fontsize=10)
    fig.suptitle("Learned weights per class" + ("" if colour else "  (red: evidence for, blue: against)"))
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.6, label="weight / max |weight| of the class")
    return _save(fig, path)


def confusion_matrix(y_true, y_pred, labels: Sequence, path, *, title: str = "Confusion matrix (test)",
                     class_names: Sequence[str] | None = None) -> Path:
    """Row-normalised confusion matrix with the counts written in the cells."""
    plt = _pyplot()
    labels = list(labels)
    index = {lab: i for i, lab in enumerate(labels)}
    C = len(labels)
    counts = np.zeros((C, C), dtype=np.int64)
    for t, p in zip(np.asarray(y_true).tolist(), np.asarray(y_pred).tolist()):
        counts[index[t], index[p]] += 1
    totals = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, totals, out=np.zeros((C, C)), where=totals > 0)
    size = max(4.5, 0.55 * C + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    names = [str(n) for n in (class_names if class_names is not None else labels)]
    ax.set_xticks(range(C), names, rotation=45 if max(map(len, names)) > 2 else 0, ha="right" if max(map(len, names)) > 2 else "center")
    ax.set_yticks(range(C), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if C <= 30:
        for i in range(C):
            for j in range(C):
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8 if C > 12 else 10,
                            color="white" if rates[i, j] > 0.5 else "black")
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    ax.set_title(f"{title}: accuracy {accuracy:.1%}")
    fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of the true class")
    return _save(fig, path)


def decision_regions(predict: Callable[[np.ndarray], np.ndarray], X: np.ndarray, y: np.ndarray,
                     labels: Sequence, path, *, title: str = "Decision regions") -> Path:
    """Coloured regions of the predicted class over a 2-D grid, with the points on top."""
    plt = _pyplot()
    X = np.asarray(X, dtype=float)
    pad = 0.1 * (X.max(axis=0) - X.min(axis=0) + 1e-12)
    lo, hi = X.min(axis=0) - pad, X.max(axis=0) + pad
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 300), np.linspace(lo[1], hi[1], 300))
    grid = np.column_stack([gx.ravel(), gy.ravel()])
    labels = list(labels)
    index = {lab: i for i, lab in enumerate(labels)}
    pred = np.array([index[p] for p in np.asarray(predict(grid)).tolist()]).reshape(gx.shape)
    truth = np.array([index[t] for t in np.asarray(y).tolist()])
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    colours = [cmap(i % cmap.N) for i in range(len(labels))]
    from matplotlib.colors import ListedColormap

    fig, ax = plt.subplots(figsize=(6, 6))
    ax.contourf(gx, gy, pred, levels=np.arange(len(labels) + 1) - 0.5, cmap=ListedColormap(colours), alpha=0.3)
    for i, lab in enumerate(labels):
        sel = truth == i
        ax.scatter(X[sel, 0], X[sel, 1], s=18, color=colours[i], edgecolor="k", linewidth=0.4, label=str(lab))
    acc = float(np.mean(np.asarray(predict(X)) == np.asarray(y)))
    ax.set_title(f"{title}  (accuracy on these points {acc:.1%})")
    ax.set_xlabel("x1")
    ax.set_ylabel("x2")
    ax.legend(title="class", loc="upper right", fontsize=8)
    ax.set_aspect("equal")
    return _save(fig, path)
