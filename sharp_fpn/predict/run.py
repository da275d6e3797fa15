"""Predict the nuclei of many images and write a biologist's outputs (``tools/predict.py``).

For each image ``<stem>`` (:mod:`.outputs`): ``<stem>_labels.tif``, ``<stem>_overlay.png``,
``<stem>_nuclei.csv``; for the run, ``summary.csv`` (one row per input, failed ones with the
reason). A file that cannot be read is reported and skipped; the others are processed.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Union

import numpy as np
from tqdm import tqdm

from ..utils import write_csv_atomic
from .image_io import ImageError, expand_inputs, load_image
from .outputs import (
    MAX_LABELS,
    TABLE_COLUMNS,
    nuclei_table,
    overlay_outlines,
    write_label_tiff,
    write_png,
)

if TYPE_CHECKING:  # the predictor is detectron2 glue (sharp_fpn.d2), imported when a run needs one
    from ..d2.predictor import CfgNode, NucleiPredictor

__all__ = ["SUMMARY_COLUMNS", "Failure", "ImageResult", "PredictionReport", "predict_images"]

#: Columns of ``summary.csv``. Areas in pixels; ``foreground_fraction`` = nucleus pixels /
#: image pixels; ``stretch_low/high``: stored values mapped to 0 and 255 (non-8-bit input).
SUMMARY_COLUMNS = (
    "image",
    "status",
    "error",
    "output_stem",
    "height",
    "width",
    "dtype",
    "channels",
    "stretch_low",
    "stretch_high",
    "model_output",
    "tiles",
    "nuclei",
    "mean_area",
    "median_area",
    "min_area",
    "max_area",
    "mean_score",
    "foreground_fraction",
    "seconds",
)


class TooManyNuclei(ImageError):
    """More nuclei than a uint16 label image can number."""


@dataclass
class ImageResult:
    """The outputs of one image."""

    image: Path
    labels: Path  # <stem>_labels.tif
    overlay: Path  # <stem>_overlay.png
    table: Path  # <stem>_nuclei.csv
    nuclei: int
    summary: Dict[str, Any]


@dataclass
class Failure:
    """An input that gave no output, and why."""

    image: str  # the file, folder or pattern as given
    reason: str  # the message, naming the input


@dataclass
class PredictionReport:
    """What a run did: one result per image processed, one failure per input skipped."""

    out_dir: Path
    summary: Path
    results: List[ImageResult] = field(default_factory=list)
    failures: List[Failure] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def _output_stems(paths: Sequence[Path]) -> List[str]:
    """One output stem per input: the file stem, ``_2``, ``_3``... added on collisions."""
    stems: List[str] = []
    taken = set()
    for path in paths:
        stem, n = path.stem, 1
        while stem in taken:
            n += 1
            stem = f"{path.stem}_{n}"
        taken.add(stem)
        stems.append(stem)
    return stems


def _area_stats(labels: np.ndarray, count: int) -> Dict[str, Any]:
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    if count == 0:
        return {"mean_area": "", "median_area": "", "min_area": "", "max_area": ""}
    return {
        "mean_area": round(float(areas.mean()), 2),
        "median_area": float(np.median(areas)),
        "min_area": int(areas.min()),
        "max_area": int(areas.max()),
    }


def predict_images(
    cfg: Union[CfgNode, str, os.PathLike],
    weights: Optional[Union[str, os.PathLike]],
    inputs: Sequence[Union[str, os.PathLike]],
    out_dir: Union[str, os.PathLike],
    *,
    tile: int = 512,
    overlap: int = 64,
    score_threshold: float = 0.5,
    min_kept_fraction: float = 0.5,
    device: Optional[str] = None,
    progress: bool = True,
    predictor: Optional[NucleiPredictor] = None,
) -> PredictionReport:
    """Label the nuclei of every input image and write the outputs to ``out_dir``.

    Args:
        cfg: the model's config (``CfgNode`` or yaml file).
        weights: its checkpoint (None: random weights, for tests).
        inputs: image files, folders and glob patterns (:func:`~.image_io.expand_inputs`).
        out_dir: where the outputs go (created).
        tile, overlap: tiling in pixels (:meth:`NucleiPredictor.predict`).
        score_threshold: instances scoring below are dropped.
        min_kept_fraction: instances keeping less of their mask are dropped as duplicates.
        device: torch device; default the config's ``MODEL.DEVICE``.
        progress: show tqdm progress bars (images, and tiles of large images).
        predictor: a model already built (then ``cfg``, ``weights``, ``device`` and
            ``score_threshold``, ``min_kept_fraction`` are not used).

    Returns:
        The report; ``summary.csv`` in ``out_dir`` lists every input, failed ones included.

    Raises:
        ValueError: ``overlap`` is not in ``[0, tile)`` (with ``tile > 0``).
    """
    if tile > 0 and not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile) = [0, {tile}), got {overlap}")
    out_dir = Path(out_dir)
    files, problems = expand_inputs([os.fspath(p) for p in inputs])
    report = PredictionReport(out_dir, out_dir / "summary.csv")
    report.failures.extend(Failure(spec, f"{spec}: {reason}") for spec, reason in problems)
    rows: List[Dict[str, Any]] = [
        {"image": f.image, "status": "failed", "error": f.reason} for f in report.failures
    ]
    if files and predictor is None:
        from ..d2.predictor import NucleiPredictor

        predictor = NucleiPredictor(
            cfg, weights, device=device, score_threshold=score_threshold,
            min_kept_fraction=min_kept_fraction,
        )
    for path, stem in tqdm(
        list(zip(files, _output_stems(files))), desc="nuclei", unit="image", disable=not progress
    ):
        try:
            result = _predict_one(predictor, path, out_dir, stem, tile, overlap, progress)
        except ImageError as e:
            report.failures.append(Failure(str(path), str(e)))
            rows.append({"image": str(path), "status": "failed", "error": str(e)})
            tqdm.write(f"skipped: {e}")
            continue
        report.results.append(result)
        rows.append(result.summary)
    write_csv_atomic(report.summary, rows, SUMMARY_COLUMNS)
    return report


def _predict_one(
    predictor: NucleiPredictor,
    path: Path,
    out_dir: Path,
    stem: str,
    tile: int,
    overlap: int,
    progress: bool,
) -> ImageResult:
    start = time.perf_counter()
    image = load_image(path)
    prediction = predictor.predict(image.rgb, tile=tile, overlap=overlap, progress=progress)
    if prediction.count > MAX_LABELS:
        raise TooManyNuclei(
            f"{path}: {prediction.count} nuclei do not fit a uint16 label image "
            f"(at most {MAX_LABELS})"
        )
    result = ImageResult(
        image=path,
        labels=out_dir / f"{stem}_labels.tif",
        overlay=out_dir / f"{stem}_overlay.png",
        table=out_dir / f"{stem}_nuclei.csv",
        nuclei=prediction.count,
        summary={},
    )
    write_label_tiff(result.labels, prediction.labels)
    write_png(result.overlay, overlay_outlines(image.rgb, prediction.labels))
    table = nuclei_table(prediction.labels, prediction.scores, image.intensity)
    write_csv_atomic(result.table, table, TABLE_COLUMNS)
    height, width = image.shape
    low, high = image.stretch if image.stretch else ("", "")
    result.summary = {
        "image": str(path),
        "status": "ok",
        "error": "",
        "output_stem": stem,
        "height": height,
        "width": width,
        "dtype": str(image.dtype),
        "channels": image.channels,
        "stretch_low": low,
        "stretch_high": high,
        "model_output": prediction.kind,
        "tiles": prediction.tiles,
        "nuclei": prediction.count,
        **_area_stats(prediction.labels, prediction.count),
        "mean_score": round(float(prediction.scores.mean()), 4) if prediction.count else "",
        "foreground_fraction": round(float((prediction.labels > 0).mean()), 4),
        "seconds": round(time.perf_counter() - start, 2),
    }
    return result
