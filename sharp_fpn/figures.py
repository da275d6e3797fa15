"""Figures: training curves from detectron2's ``metrics.json``, and predictions beside the truth.

* :func:`plot_training_curves`: ``losses.png`` (every loss term, the heads' training
  accuracies and sample counts, the learning rate) and ``metrics.png`` (the evaluation results: one panel per
  evaluator, e.g. ``bbox``, ``segm``, ``dsb``) against the iteration.
* :func:`plot_predictions`: for a few images of a registered dataset, the image, its ground
  truth and the model's prediction side by side, one image per row (the paper's Figure 6
  layout), each nucleus in its own colour; the prediction's panel names its DSB score.

matplotlib runs with the Agg backend (no display needed).
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from skimage.color import label2rgb  # noqa: E402

from .metrics import dsb_score  # noqa: E402
from .utils import PathLike, atomic_write  # noqa: E402

__all__ = [
    "CURVE_FIGURES",
    "TRAINING_STAT_PREFIXES",
    "Series",
    "plot_predictions",
    "plot_training_curves",
    "read_metrics",
    "save_figure",
    "true_labels",
]

#: Prefixes of the per-iteration statistics detectron2's heads log while training; any other
#: ``prefix/name`` scalar is an evaluation result (``bbox/AP``, ``dsb/score``, ...).
TRAINING_STAT_PREFIXES = ("rpn", "roi_head", "fast_rcnn", "mask_rcnn", "keypoint_head")
#: Bookkeeping scalars that are not curves worth drawing.
_IGNORED = {"iteration", "data_time", "time", "eta_seconds", "rank_data_time"}

#: The files :func:`plot_training_curves` may write into its folder.
CURVE_FIGURES = ("losses.png", "metrics.png")

Series = Dict[str, Tuple[np.ndarray, np.ndarray]]
"""Scalar name -> ``(iterations, values)``, both ``(n,)``, iterations increasing."""


def read_metrics(path: PathLike) -> Series:
    """Every scalar of a detectron2 ``metrics.json`` (one JSON object per line).

    A resumed run writes some iterations twice: the line written last wins. Lines that are
    not JSON objects with an ``iteration`` (a line cut by a crash) are skipped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: no line could be read (names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (is this a detectron2 output folder?)")
    values: Dict[str, Dict[int, float]] = defaultdict(dict)
    lines = 0
    for text in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or "iteration" not in record:
            continue
        lines += 1
        for key, value in record.items():
            if key not in _IGNORED and isinstance(value, (int, float)) and math.isfinite(value):
                values[key][int(record["iteration"])] = float(value)
    if not lines:
        raise ValueError(f"{path}: no metrics line (JSON objects with an 'iteration')")
    series = {}
    for key, by_iteration in values.items():
        iterations = np.array(sorted(by_iteration), dtype=np.int64)
        series[key] = (iterations, np.array([by_iteration[i] for i in iterations]))
    return series


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over up to ``window`` points (the first points use fewer)."""
    if window <= 1 or values.size < 2:
        return values
    sums = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, values.size + 1), window)
    return (sums[1:] - sums[np.arange(1, values.size + 1) - counts]) / counts


def save_figure(fig: "plt.Figure", path: PathLike, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` whole or not at all, then close it; returns the path.

    The format follows the suffix (PNG when there is none); the bounding box is trimmed to
    what is drawn. The figure is closed even when writing fails, so a loop of plots never
    keeps figures open.
    """
    path = Path(path)
    try:
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format=path.suffix[1:].lower() or "png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def _save_claimed(fig: "plt.Figure", path_of: Callable[[str], Path], name: str) -> Path:
    """:func:`save_figure` to ``path_of(name)``; the figure is closed if the claim fails too."""
    try:
        path = path_of(name)
    except BaseException:
        plt.close(fig)
        raise
    return save_figure(fig, path)


def plot_training_curves(
    series: Series,
    out_dir: PathLike,
    smooth: int = 20,
    claim: Optional[Callable[[str], Path]] = None,
) -> List[Path]:
    """Write ``losses.png`` and, when there are evaluation results, ``metrics.png``.

    Args:
        series: from :func:`read_metrics`.
        out_dir: where the PNGs go.
        smooth: moving-average window (in logged points) of the loss and statistics lines;
            the raw values are drawn faintly beneath.
        claim: called with each file's name just before it is written, returns the path to
            write (e.g. :meth:`sharp_fpn.outdir.OutputDir.claim`, which puts it on record or
            refuses it); default: the name in ``out_dir``.

    Returns:
        The files written.
    """
    out_dir = Path(out_dir)
    path_of = claim or (lambda name: out_dir / name)
    losses = sorted(k for k in series if k.startswith("loss") or k == "total_loss")
    stats = sorted(k for k in series if k.split("/")[0] in TRAINING_STAT_PREFIXES and "/" in k)
    evaluation: Dict[str, List[str]] = defaultdict(list)
    for key in sorted(series):
        prefix = key.split("/")[0]
        if "/" in key and prefix not in TRAINING_STAT_PREFIXES:
            evaluation[prefix].append(key)
    if not losses and not evaluation:
        raise ValueError("metrics hold neither losses nor evaluation results")
    written = []

    rates = [k for k in stats if not k.split("/")[1].startswith("num_")]
    counts = [k for k in stats if k.split("/")[1].startswith("num_")]
    panels = [("losses", losses, True), ("head accuracies and error rates", rates, False),
              ("sampled anchors and proposals per image", counts, False),
              ("learning rate", [k for k in ("lr",) if k in series], False)]
    panels = [p for p in panels if p[1]]
    if panels:
        fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3.2 * len(panels)), squeeze=False)
        for ax, (title, keys, log) in zip(axes[:, 0], panels):
            for key in keys:
                iterations, values = series[key]
                window = 1 if key == "lr" else smooth
                (line,) = ax.plot(iterations, _smooth(values, window), label=key, linewidth=1.4)
                if window > 1:
                    ax.plot(iterations, values, color=line.get_color(), alpha=0.2, linewidth=0.8)
            if log and all((series[k][1] > 0).all() for k in keys):
                ax.set_yscale("log")
            ax.set_title(title)
            ax.set_xlabel("iteration")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        written.append(_save_claimed(fig, path_of, CURVE_FIGURES[0]))

    if evaluation:
        cols = min(3, len(evaluation))
        rows = math.ceil(len(evaluation) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
        for ax, (prefix, keys) in zip(axes.ravel(), sorted(evaluation.items())):
            for key in keys:
                iterations, values = series[key]
                ax.plot(iterations, values, marker="o", markersize=3, label=key.split("/", 1)[1])
            ax.set_title(prefix)
            ax.set_xlabel("iteration")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
        for ax in axes.ravel()[len(evaluation):]:
            ax.axis("off")
        fig.tight_layout()
        written.append(_save_claimed(fig, path_of, CURVE_FIGURES[1]))
    return written


def true_labels(record: dict) -> np.ndarray:
    """``(H, W)`` int32 label image of a detectron2 dataset dict's annotations (1..N in their
    order; where annotations overlap, the earlier keeps the pixel)."""
    from .d2.evaluators import annotation_mask

    height, width = int(record["height"]), int(record["width"])
    labels = np.zeros((height, width), dtype=np.int32)
    for k, annotation in enumerate(record.get("annotations", [])):
        mask = annotation_mask(annotation["segmentation"], height, width, record["file_name"])
        np.putmask(labels, mask & (labels == 0), k + 1)
    return labels


def _nuclei(count: int) -> str:
    return f"{count} nucleus" if count == 1 else f"{count} nuclei"


def _colour_labels(labels: np.ndarray) -> np.ndarray:
    """Each nucleus in its own colour on black, ``(H, W, 3)`` float in [0, 1]."""
    if not labels.any():
        return np.zeros(labels.shape + (3,))
    return label2rgb(labels, bg_label=0, bg_color=(0, 0, 0))


def plot_predictions(
    rows: Sequence[Tuple[str, np.ndarray, Optional[np.ndarray], np.ndarray]],
    path: PathLike,
    model_name: str = "prediction",
) -> Path:
    """Write the image / ground truth / prediction figure, one row per image.

    Args:
        rows: per image ``(title, rgb (H, W, 3) uint8, true labels (H, W) or None,
            predicted labels (H, W))``.
        path: the PNG to write.
        model_name: the prediction column's heading.
    """
    if not rows:
        raise ValueError("no image to draw")
    fig, axes = plt.subplots(len(rows), 3, figsize=(11, 3.7 * len(rows)), squeeze=False)
    for (title, rgb, truth, predicted), ax_row in zip(rows, axes):
        ax_row[0].imshow(rgb)
        ax_row[0].set_title(title if len(title) <= 40 else f"{title[:18]}...{title[-19:]}",
                            fontsize=8)
        n_pred = len(np.unique(predicted[predicted > 0]))
        if truth is None:
            ax_row[1].text(0.5, 0.5, "no ground truth", ha="center", va="center")
            heading = f"{model_name}: {_nuclei(n_pred)}"
        else:
            ax_row[1].imshow(_colour_labels(truth))
            n_true = len(np.unique(truth[truth > 0]))
            ax_row[1].set_title(f"ground truth: {_nuclei(n_true)}", fontsize=9)
            score = dsb_score(truth, predicted)
            heading = f"{model_name}: {_nuclei(n_pred)}, DSB score {score:.3f}"
        ax_row[2].imshow(_colour_labels(predicted))
        ax_row[2].set_title(heading, fontsize=9)
        for ax in ax_row:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    return save_figure(fig, Path(path))
