"""The model zoo's benchmark: held-out synthetic accuracy per style and throughput, for each
candidate model beside the classical threshold + watershed pipeline (:mod:`sharp_fpn.classical`).

For each candidate ``(name, config file, weights file)`` and for ``classical``, on the same images:

* **accuracy** per style of synthetic nuclei: the DSB2018 score
  (:func:`sharp_fpn.metrics.dataset_dsb_score`, mean over images of the mean over IoU 0.5..0.95
  of TP / (TP + FP + FN)) and COCO mask AP (pycocotools' ``COCOeval``, ``segm``, IoU
  0.50:0.95, maxDets raised to :data:`MAX_DETECTIONS`) on the label images turned into RLE
  instances, scored by the model's scores (1.0 for every classical nucleus). The images are
  drawn in memory from ``seed`` (by default :data:`HELDOUT_SEED`, which no training set uses)
  with the newest synthetic generator (version 2 when ``sharp_fpn.data.synthetic`` has it,
  else version 1 with its two styles), normalised by :func:`sharp_fpn.predict.image_io.normalise`
  as prediction does; or given by the caller (``images=``: style -> ``[(rgb, labels), ...]``).
* **throughput** in megapixels per second of each full prediction path
  (:meth:`sharp_fpn.d2.predictor.NucleiPredictor.predict` with ``tile``/``overlap``, and
  :func:`sharp_fpn.classical.segment`) on one ``1024 x 1024`` image with about
  :data:`THROUGHPUT_NUCLEI` nuclei (:func:`throughput_image`; the count is in the results), on
  this machine's cores, in this process (start-up and model loading excluded), under the one
  timing policy (:func:`sharp_fpn.perf.timing.time_interleaved`: interleaved rounds after a
  warm-up, fastest round).

:func:`evaluate` returns a JSON-ready dict; :func:`write_report` writes it as JSON and a short
markdown table beside it (for a model card). ``tools/benchmark.py zoo`` runs both.
torch and detectron2 are imported only when a candidate model is built.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..utils import write_text_atomic
from .timing import machine, time_interleaved

__all__ = [
    "CLASSICAL",
    "Candidate",
    "default_candidates",
    "dsb_and_mask_ap",
    "evaluate",
    "heldout_images",
    "mask_ap",
    "markdown_table",
    "parse_candidate",
    "registered_images",
    "synthetic_version",
    "throughput_image",
    "write_report",
]

CLASSICAL = "classical"
"""The name of the classical pipeline's rows."""
HELDOUT_SEED = 8_2018
"""Default seed of the held-out images (no training set of the project uses it)."""
THROUGHPUT_NUCLEI = 500
"""Nuclei wanted in the throughput image."""
MAX_DETECTIONS = 1000
"""COCOeval's largest maxDets: above the busiest image's nuclei (COCO's 100 would cut them)."""

ImagePair = Tuple[np.ndarray, np.ndarray]  # (H, W, 3) uint8 RGB, (H, W) int labels


@dataclass(frozen=True)
class Candidate:
    """A model to benchmark: its name in the results, config file, weights file (None: random
    initialisation, for tests)."""

    name: str
    config: str
    weights: Optional[str]


def parse_candidate(text: str) -> Candidate:
    """``NAME=CONFIG:WEIGHTS`` (``WEIGHTS`` may be ``random``) -> :class:`Candidate`; the
    weights are what follows the last ``:``."""
    name, sep, rest = text.partition("=")
    config, colon, weights = rest.rpartition(":")
    if not sep or not colon or not name or not config or not weights:
        raise ValueError(f"--candidate {text!r}: expected NAME=CONFIG:WEIGHTS")
    if name == CLASSICAL:
        raise ValueError(f"--candidate {text!r}: the name {CLASSICAL!r} is the classical "
                         f"pipeline's")
    return Candidate(name, config, None if weights == "random" else weights)


def default_candidates() -> Tuple[List[Candidate], List[str]]:
    """The zoo's default model as a candidate, if ``sharp_fpn.model_zoo`` exists and names one;
    and the notes saying why there is none otherwise."""
    try:
        from .. import model_zoo
    except ImportError as e:
        return [], [f"no model zoo in this install ({e}): only the given candidates"]
    try:
        config, weights = model_zoo.resolve()
        name = model_zoo.default_model_name() or "default"
    except Exception as e:  # noqa: BLE001  an empty zoo, a damaged file: a note, not a crash
        return [], [f"no default zoo model: {e}"]
    return [Candidate(str(name), str(config), str(weights))], []


# --------------------------------------------------------------------------------------------
# images


def synthetic_version() -> Tuple[int, Tuple[str, ...]]:
    """The newest synthetic generator this install has, and its styles: ``(2, (...))`` when
    ``generate_image`` takes ``version=``, else ``(1, ("fluorescence", "he"))``."""
    from ..data import synthetic

    if "version" in inspect.signature(synthetic.generate_image).parameters:
        styles = getattr(synthetic, "STYLES_V2", None) or ("fluorescence", "he", "brightfield")
        return 2, tuple(styles)
    return 1, tuple(synthetic.STYLES)


def _generate(rng: np.random.Generator, height: int, width: int, style: str,
              version: int) -> ImagePair:
    from ..data.synthetic import generate_image
    from ..predict.image_io import normalise

    if version >= 2:
        image, labels = generate_image(rng, height, width, style, empty=False, version=version)
    else:
        image, labels = generate_image(rng, height, width, style, False)
    return normalise(image)[0], np.asarray(labels)


def heldout_images(styles: Optional[Sequence[str]] = None, images_per_style: int = 10,
                   seed: int = HELDOUT_SEED, size: Sequence[int] = (256, 256),
                   version: Optional[int] = None) -> Dict[str, List[ImagePair]]:
    """style -> ``images_per_style`` ``(rgb, labels)`` synthetic images of ``size`` (H, W),
    image ``i`` of style ``s`` drawn from ``SeedSequence([seed, s's index, i])``."""
    newest, known = synthetic_version()
    version = newest if version is None else version
    styles = tuple(styles or known)
    unknown = [s for s in styles if s not in known]
    if unknown:
        raise ValueError(f"styles {unknown}: synthetic version {version} draws {list(known)}")
    height, width = (int(v) for v in size)
    out: Dict[str, List[ImagePair]] = {}
    for style in styles:
        stream = known.index(style)
        out[style] = [
            _generate(np.random.default_rng(np.random.SeedSequence([seed, stream, i])),
                      height, width, style, version)
            for i in range(images_per_style)
        ]
    return out


def registered_images(styles: Optional[Sequence[str]] = None,
                      limit: Optional[int] = None) -> Dict[str, List[ImagePair]]:
    """style -> ``(rgb, labels)`` of the registered held-out set ``nuclei_synth2_test_<style>``
    (:mod:`sharp_fpn.data.catalog`: synthetic v2 of a seed no training set uses, DSB2018's
    image sizes; generated on first use), read as prediction reads images; at most ``limit``
    images per style (the first by image id)."""
    from pycocotools import mask as mask_util

    from ..data.catalog import DATASETS, SYNTH2_TEST_STYLES, datasets_root, prepare
    from ..predict.image_io import load_image

    out: Dict[str, List[ImagePair]] = {}
    for style in styles or SYNTH2_TEST_STYLES:
        name = f"nuclei_synth2_test_{style}"
        if name not in DATASETS:
            raise ValueError(f"no registered held-out set {name!r}; styles: "
                             f"{list(SYNTH2_TEST_STYLES)}")
        coco = json.loads(prepare(name).read_text())
        root = DATASETS[name].root(datasets_root())
        by_image: Dict[int, List[Dict[str, Any]]] = {}
        for annotation in coco["annotations"]:
            by_image.setdefault(annotation["image_id"], []).append(annotation)
        images = sorted(coco["images"], key=lambda im: im["file_name"])[:limit]
        pairs = []
        for image in images:
            labels = np.zeros((image["height"], image["width"]), dtype=np.int32)
            for k, annotation in enumerate(by_image.get(image["id"], []), start=1):
                rle = dict(annotation["segmentation"])
                if isinstance(rle["counts"], str):
                    rle["counts"] = rle["counts"].encode()
                labels[mask_util.decode(rle).astype(bool)] = k
            pairs.append((load_image(root / image["file_name"]).rgb, labels))
        out[style] = pairs
    return out


def throughput_image(target: int = THROUGHPUT_NUCLEI, size: int = 1024,
                     style: str = "fluorescence", seed: int = 0, tries: int = 12,
                     version: Optional[int] = None) -> Tuple[np.ndarray, Dict[str, Any]]:
    """A ``size x size`` RGB image with about ``target`` nuclei, and how it was made.

    Tries seeds ``seed, seed + 1, ...`` (at most ``tries``) for the whole image and keeps the
    one nearest ``target``, stopping within 10 %. When the generator cannot place that many in
    one image (version 1 stops at 300 nuclei, i.e. fewer than 90 % of ``target``), a 2 x 2 mosaic of half-size images is built the same
    way, each aiming at a quarter of ``target``. The info holds ``nuclei``, ``layout``,
    ``seeds`` and ``version``.
    """
    version = synthetic_version()[0] if version is None else version

    def nearest(side: int, wanted: float, start: int) -> Tuple[int, ImagePair]:
        best: Optional[Tuple[float, int, ImagePair]] = None
        for s in range(start, start + tries):
            pair = _generate(np.random.default_rng(s), side, side, style, version)
            count = int(np.unique(pair[1][pair[1] > 0]).size)
            if best is None or abs(count - wanted) < best[0]:
                best = (abs(count - wanted), s, pair)
            if abs(count - wanted) <= 0.1 * wanted:
                break
        assert best is not None
        return best[1], best[2]

    s, (rgb, labels) = nearest(size, target, seed)
    count = int(np.unique(labels[labels > 0]).size)
    info: Dict[str, Any] = {"size": [size, size], "style": style, "version": version}
    if count >= 0.9 * target:
        return rgb, {**info, "layout": "one image", "seeds": [s], "nuclei": count}
    half = size // 2
    rgb = np.zeros((size, size, 3), dtype=np.uint8)
    seeds, total, start = [], 0, seed
    for row in range(2):
        for col in range(2):
            s, (part, part_labels) = nearest(half, target / 4, start)
            start = s + 1
            seeds.append(s)
            total += int(np.unique(part_labels[part_labels > 0]).size)
            rgb[row * half:(row + 1) * half, col * half:(col + 1) * half] = part
    return rgb, {**info, "layout": "2 x 2 mosaic", "seeds": seeds, "nuclei": total}


# --------------------------------------------------------------------------------------------
# metrics


def _rle_instances(labels: np.ndarray) -> List[Tuple[int, Dict[str, Any], float, List[float]]]:
    """``(label, rle, area, bbox)`` per nucleus of a label image (pycocotools' encoding)."""
    from pycocotools import mask as mask_util

    labels = np.asarray(labels)
    found = []
    ids = np.unique(labels)
    for label in ids[ids > 0]:
        mask = np.asfortranarray((labels == label).astype(np.uint8))
        rle = mask_util.encode(mask)
        area = float(mask_util.area(rle))
        bbox = [float(v) for v in mask_util.toBbox(rle)]
        rle["counts"] = rle["counts"].decode("ascii")
        found.append((int(label), rle, area, bbox))
    return found


def mask_ap(images: Sequence[Tuple[np.ndarray, np.ndarray, Optional[Mapping[int, float]]]]
            ) -> Optional[float]:
    """COCO mask AP (IoU 0.50:0.95, all areas) of label-image predictions.

    Args:
        images: ``(true_labels, pred_labels, scores)`` per image; ``scores`` maps a predicted
            label to its confidence (None: 1.0 for every nucleus).

    Returns:
        AP in [0, 1]; 0.0 when nothing is predicted; None when there is no true nucleus at all
        (AP is undefined).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_images, gt_annotations, detections = [], [], []
    for image_id, (true_labels, pred_labels, scores) in enumerate(images, 1):
        height, width = np.asarray(true_labels).shape
        gt_images.append({"id": image_id, "height": height, "width": width})
        for label, rle, area, bbox in _rle_instances(true_labels):
            gt_annotations.append({"id": len(gt_annotations) + 1, "image_id": image_id,
                                   "category_id": 1, "segmentation": rle, "area": area,
                                   "bbox": bbox, "iscrowd": 0})
        for label, rle, area, bbox in _rle_instances(pred_labels):
            score = 1.0 if scores is None else float(scores[label])
            detections.append({"id": len(detections) + 1, "image_id": image_id,
                               "category_id": 1, "segmentation": rle, "area": area,
                               "bbox": bbox, "score": score, "iscrowd": 0})
    if not gt_annotations:
        return None
    if not detections:
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        truth = COCO()
        truth.dataset = {"images": gt_images, "annotations": gt_annotations,
                         "categories": [{"id": 1, "name": "nucleus"}]}
        truth.createIndex()
        found = COCO()
        found.dataset = {"images": gt_images, "annotations": detections,
                         "categories": [{"id": 1, "name": "nucleus"}]}
        found.createIndex()
        evaluation = COCOeval(truth, found, iouType="segm")
        evaluation.params.maxDets = [1, 100, MAX_DETECTIONS]
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return float(max(evaluation.stats[0], 0.0))


def dsb_and_mask_ap(images: Sequence[Tuple[np.ndarray, np.ndarray, Optional[Mapping[int, float]]]]
                    ) -> Dict[str, Any]:
    """``{"dsb_score", "mask_ap", "images", "true_nuclei", "predicted_nuclei"}`` of
    ``(true_labels, pred_labels, scores)`` per image (see :func:`mask_ap`)."""
    from ..metrics import dataset_dsb_score

    def count(labels: np.ndarray) -> int:
        return int(np.unique(labels[labels > 0]).size)

    ap = mask_ap(images)
    return {
        "dsb_score": round(dataset_dsb_score((t, p) for t, p, _ in images), 4),
        "mask_ap": None if ap is None else round(ap, 4),
        "images": len(images),
        "true_nuclei": sum(count(t) for t, _, _ in images),
        "predicted_nuclei": sum(count(p) for _, p, _ in images),
    }


# --------------------------------------------------------------------------------------------
# the benchmark

Segmenter = Callable[[np.ndarray], Tuple[np.ndarray, Optional[Mapping[int, float]]]]


def _segmenters(candidates: Sequence[Candidate], tile: Optional[int], overlap: int,
                device: Optional[str], score_threshold: float,
                diameter: Optional[float], rescale: bool = True) -> Dict[str, Segmenter]:
    """name -> rgb -> (labels, scores by label), candidates first, the classical pipeline last."""
    from ..classical import segment

    found: Dict[str, Segmenter] = {}
    for candidate in candidates:
        import torch

        from ..d2.predictor import NucleiPredictor, load_config

        if candidate.name in found or candidate.name == CLASSICAL:
            raise ValueError(f"candidate name {candidate.name!r} given twice or reserved")
        from ..predict.run import default_tile, model_diameter
        from ..predict.scale import predict_at_scale

        torch.manual_seed(0)  # a random-initialised candidate (tests) is reproducible
        predictor = NucleiPredictor(load_config(candidate.config), candidate.weights,
                                    device=device, score_threshold=score_threshold)
        side = default_tile(predictor.cfg) if tile is None else tile
        trained = model_diameter(predictor.cfg) if rescale else 0.0

        def predict(rgb: np.ndarray, predictor=predictor, side=side, trained=trained):
            def once(image: np.ndarray):
                return predictor.predict(image, tile=side, overlap=overlap)

            if trained > 0:  # as tools/predict.py: nuclei brought to the training size
                scaled = predict_at_scale(once, rgb, trained)
                labels, found = scaled.labels, scaled.scores
            else:
                prediction = once(rgb)
                labels, found = prediction.labels, prediction.scores
            return labels, {k + 1: float(s) for k, s in enumerate(found)}

        found[candidate.name] = predict
    found[CLASSICAL] = lambda rgb: (segment(rgb, diameter=diameter), None)
    return found


def evaluate(
    candidates: Sequence[Candidate],
    styles: Optional[Sequence[str]] = None,
    images_per_style: int = 10,
    seed: int = HELDOUT_SEED,
    *,
    size: Sequence[int] = (256, 256),
    images: Optional[Mapping[str, Sequence[ImagePair]]] = None,
    throughput: bool = True,
    throughput_size: int = 1024,
    throughput_nuclei: int = THROUGHPUT_NUCLEI,
    rounds: int = 3,
    tile: Optional[int] = None,
    overlap: int = 64,
    rescale: bool = True,
    device: Optional[str] = None,
    score_threshold: float = 0.5,
    diameter: Optional[float] = None,
    notes: Sequence[str] = (),
    echo: Callable[[str], None] = lambda line: None,
    heldout_source: Optional[str] = None,
) -> Dict[str, Any]:
    """Accuracy per style and throughput of each candidate and of the classical pipeline.

    Args:
        candidates: the models (:class:`Candidate` or ``(name, config, weights)`` tuples).
        styles, images_per_style, seed, size: the held-out images (:func:`heldout_images`),
            unless ``images`` gives them (style -> ``[(rgb, labels), ...]``).
        throughput: also time every path on :func:`throughput_image` (``throughput_size``
            square, about ``throughput_nuclei`` nuclei), ``rounds`` interleaved rounds after a
            warm-up each.
        tile, overlap, device, score_threshold: the predictors' (as ``tools/predict.py``;
            tile None: its default for the model, :func:`sharp_fpn.predict.run.default_tile`).
        rescale: predict as ``tools/predict.py`` does without ``--diameter``: a model that
            knows its training nucleus diameter gets each image rescaled to it, the diameter
            estimated per image (:func:`sharp_fpn.predict.scale.predict_at_scale`).
        diameter: the classical pipeline's expected nucleus diameter (None: estimated per image).
        notes: lines carried into the results (e.g. why there is no zoo model).
        heldout_source: what the given ``images`` are, for the report.
        echo: progress lines (``print`` from the command line).

    Returns:
        ``{"methods": [...], "styles": {style: {method: {dsb_score, mask_ap, images,
        true_nuclei, predicted_nuclei}}}, "throughput": {...} or None, "heldout": {...},
        "candidates": [...], "notes": [...], "machine": {...}}``.
    """
    candidates = [c if isinstance(c, Candidate) else Candidate(*c) for c in candidates]
    if images is None:
        version = synthetic_version()[0]
        images = heldout_images(styles, images_per_style, seed, size)
        heldout = {"source": f"synthetic v{version}, drawn in memory", "seed": seed,
                   "size": [int(v) for v in size], "images_per_style": images_per_style}
    else:
        version = None
        if styles:
            images = {s: images[s] for s in styles}
        heldout = {"source": heldout_source or "given by the caller",
                   "images_per_style": {s: len(v) for s, v in images.items()}}
    segmenters = _segmenters(candidates, tile, overlap, device, score_threshold, diameter,
                             rescale)
    per_style: Dict[str, Dict[str, Any]] = {}
    for style, pairs in images.items():
        per_style[style] = {}
        for name, run in segmenters.items():
            scored = []
            for rgb, labels in pairs:
                pred, scores = run(rgb)
                scored.append((np.asarray(labels), pred, scores))
            per_style[style][name] = dsb_and_mask_ap(scored)
            row = per_style[style][name]
            echo(f"{style:13s} {name:20s} DSB {row['dsb_score']:.3f}  mask AP "
                 f"{row['mask_ap'] if row['mask_ap'] is not None else 'n/a'}  "
                 f"({row['predicted_nuclei']} found of {row['true_nuclei']})")
    speed = None
    if throughput:
        rgb, info = throughput_image(throughput_nuclei, throughput_size, version=version)
        megapixels = rgb.shape[0] * rgb.shape[1] / 1e6
        found: Dict[str, int] = {}

        def timed(name: str, run: Segmenter) -> Callable[[], None]:
            def call() -> None:
                labels, _ = run(rgb)
                found[name] = int(labels.max())
            return call

        timings = time_interleaved({n: timed(n, r) for n, r in segmenters.items()},
                                   rounds=rounds, warmup=1)
        speed = {"image": info, "megapixels": megapixels,
                 "tile": tile if tile is not None else "each model's tools/predict.py default",
                 "overlap": overlap,
                 "policy": f"fastest of {rounds} interleaved rounds after 1 warm-up",
                 "methods": {}}
        for name, timing in timings.items():
            speed["methods"][name] = {
                "megapixels_per_s": round(timing.per_second(megapixels), 3),
                "seconds": round(timing.best, 3),
                "rounds_s": [round(r, 3) for r in timing.rounds],
                "nuclei_found": found.get(name),
            }
            echo(f"throughput    {name:20s} {timing.per_second(megapixels):.3f} MP/s "
                 f"({timing.best:.2f} s, {found.get(name)} nuclei found of {info['nuclei']})")
    torch = sys.modules.get("torch")  # imported by the candidates, if any
    return {
        "methods": list(segmenters),
        "candidates": [{"name": c.name, "config": c.config, "weights": c.weights or "random"}
                       for c in candidates],
        "heldout": heldout,
        "styles": per_style,
        "throughput": speed,
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "notes": list(notes),
        "machine": machine(),
    }


def _cell(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown_table(results: Mapping[str, Any]) -> str:
    """The results as a short markdown report: per style the DSB score and mask AP of each
    method, then the throughput."""
    methods = list(results["methods"])
    lines = ["# Model zoo benchmark", ""]
    held = results.get("heldout", {})
    lines.append(f"Held-out images: {held.get('source', '?')}"
                 + (f", seed {held['seed']}" if "seed" in held else "")
                 + (f", {held['size'][0]} x {held['size'][1]} px" if "size" in held else "")
                 + (f", {held['images_per_style']} per style"
                    if isinstance(held.get("images_per_style"), int) else "") + ".")
    lines += ["", "DSB2018 score (mean over IoU 0.5..0.95) / COCO mask AP per style:", ""]
    lines.append("| style | " + " | ".join(methods) + " |")
    lines.append("|---|" + "---|" * len(methods))
    for style, rows in results["styles"].items():
        cells = [f"{_cell(rows[m]['dsb_score'])} / {_cell(rows[m]['mask_ap'])}" for m in methods]
        lines.append(f"| {style} | " + " | ".join(cells) + " |")
    speed = results.get("throughput")
    if speed:
        image = speed["image"]
        lines += ["", f"Throughput (MP/s) on a {image['size'][0]} x {image['size'][1]} image with "
                  f"{image['nuclei']} nuclei ({image['layout']}), tile {speed['tile']}, overlap "
                  f"{speed['overlap']}, {results['machine'].get('usable_cores')} cores, "
                  f"{speed['policy']}:", ""]
        lines.append("| method | MP/s | seconds | nuclei found |")
        lines.append("|---|---|---|---|")
        for name, row in speed["methods"].items():
            lines.append(f"| {name} | {row['megapixels_per_s']:.3f} | {row['seconds']:.2f} | "
                         f"{row['nuclei_found']} |")
    for note in results.get("notes", []):
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


def write_report(results: Mapping[str, Any], path: os.PathLike) -> Tuple[Path, Path]:
    """Write ``results`` as JSON to ``path`` and as markdown beside it (``.md``); both paths."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    markdown = path.with_suffix(".md")
    write_text_atomic(path, json.dumps(results, indent=2) + "\n")
    write_text_atomic(markdown, markdown_table(results))
    return path, markdown


# --------------------------------------------------------------------------------------------
# ``tools/benchmark.py zoo`` (:mod:`sharp_fpn.perf.benchmarks.registry`)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--candidate", action="append", default=[], metavar="NAME=CONFIG:WEIGHTS",
                        help="a model to benchmark (repeatable; WEIGHTS 'random' for a random "
                        "initialisation); the zoo's default model is always added when there is one")
    parser.add_argument("--no-default", action="store_true",
                        help="leave the zoo's default model out")
    parser.add_argument("--styles", nargs="+",
                        help="synthetic styles (default: every style of the newest generator)")
    parser.add_argument("--heldout", choices=("registered", "memory"), default="registered",
                        help="held-out images: the registered nuclei_synth2_test_<style> sets "
                        "(DSB2018's sizes, 40 per style) or images drawn in memory of --size "
                        "from --seed (%(default)s)")
    parser.add_argument("--images-per-style", type=int, default=None,
                        help="at most this many per style (default: registered all, memory 10)")
    parser.add_argument("--seed", type=int, default=HELDOUT_SEED,
                        help="seed of the held-out images (%(default)s)")
    parser.add_argument("--size", type=int, nargs=2, default=[256, 256], metavar=("H", "W"),
                        help="held-out image size (%(default)s)")
    parser.add_argument("--throughput-size", type=int, default=1024,
                        help="side of the throughput image (%(default)s)")
    parser.add_argument("--throughput-nuclei", type=int, default=THROUGHPUT_NUCLEI,
                        help="nuclei wanted in the throughput image (%(default)s)")
    parser.add_argument("--no-throughput", action="store_true", help="accuracy only")
    parser.add_argument("--rounds", type=int, default=3,
                        help="timed rounds, interleaved across methods (%(default)s)")
    parser.add_argument("--tile", type=int, default=None,
                        help="tile side (default: tools/predict.py's for each model)")
    parser.add_argument("--overlap", type=int, default=64, help="tile overlap (%(default)s)")
    parser.add_argument("--score-threshold", type=float, default=0.5)
    parser.add_argument("--no-rescale", action="store_true",
                        help="predict every image at its own size (default: as tools/predict.py "
                        "without --diameter, the nucleus diameter estimated per image)")
    parser.add_argument("--device", help="the models' device (default: each config's)")
    parser.add_argument("--diameter", type=float,
                        help="the classical pipeline's nucleus diameter (default: estimated)")


def _project_path(path: str) -> str:
    from ..experiments.tables import PROJECT_ROOT

    candidate = Path(path)
    if candidate.is_absolute() or candidate.exists():
        return str(candidate)
    return str(PROJECT_ROOT / candidate)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """:func:`evaluate` with the command line's options; writes ``zoo.md`` beside ``zoo.json``."""
    candidates, notes = ([], ["the zoo's default model left out (--no-default)"]) \
        if args.no_default else default_candidates()
    for text in args.candidate:
        try:
            given = parse_candidate(text)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        candidates.append(Candidate(given.name, _project_path(given.config),
                                    given.weights and _project_path(given.weights)))
    images = None
    if args.heldout == "registered":
        images = registered_images(args.styles, args.images_per_style)
        from ..data.catalog import SYNTH2_TEST_SEED

        source = (f"the registered nuclei_synth2_test_<style> sets (synthetic v2, seeds "
                  f"{SYNTH2_TEST_SEED} + style index, DSB2018's sizes)")
    else:
        source = None
    results = evaluate(
        candidates, args.styles, args.images_per_style or 10, args.seed, size=args.size,
        images=images, rescale=not args.no_rescale, heldout_source=source,
        throughput=not args.no_throughput, throughput_size=args.throughput_size,
        throughput_nuclei=args.throughput_nuclei, rounds=args.rounds, tile=args.tile,
        overlap=args.overlap, device=args.device, score_threshold=args.score_threshold,
        diameter=args.diameter, notes=notes, echo=print,
    )
    write_text_atomic(Path(args.out_dir) / "zoo.md", markdown_table(results))
    return results
