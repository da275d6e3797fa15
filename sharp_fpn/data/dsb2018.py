"""Convert the 2018 Data Science Bowl (DSB2018, BBBC038) to COCO instance annotations.

Two sources give the same annotations:

* mask folders, ``<root>/<split>/<ImageId>/images/<ImageId>.png`` and one 0/255 PNG per
  nucleus in ``<root>/<split>/<ImageId>/masks/``;
* a run-length labels CSV (:mod:`sharp_fpn.data.rle`) for splits that ship no masks:
  ``stage1_train_labels.csv`` (``ImageId,EncodedPixels``), ``stage1_solution.csv`` (adds
  ``Height,Width``) or ``stage2_solution_final.csv`` (adds ``Usage``; only ``Private`` rows, the
  scored ones, are kept).

The COCO dict has ``images`` (``id`` 1.. in sorted ImageId order, ``file_name`` relative to
``root``, ``height``, ``width`` and ``image_key``, the DSB ImageId), ``annotations`` (one per
nucleus: compressed RLE ``segmentation`` with ``str`` counts exactly as
``pycocotools.mask.encode(np.asfortranarray(mask))`` writes them, ``area``, ``bbox`` XYWH floats
from pycocotools, ``iscrowd`` 0, ``category_id`` 1, ``id`` 1..) and ``categories``
``[{"id": 1, "name": "nucleus"}]``.

Canonical order: within an image, nuclei are sorted by their first pixel in DSB order
(column-major: top to bottom, then left to right), which masks cannot share since they never
overlap. So the folders and the CSV of the same data give byte-identical JSON whatever the mask
file names or the CSV row order, and whatever the number of worker processes.

Image set: with mask folders, every image folder of the split. With a CSV, the CSV defines it:
each ImageId with a (kept) row must have its image file, whose size must match the Height and
Width columns when the CSV has them. An image folder with no row at all is left out with one
warning, since a missing row cannot tell "no nucleus" (written ``1 1``) from "not labelled".
Images whose rows all have another ``Usage`` are left out silently.

Masks are turned into COCO RLE from their runs (read off the mask's bounding box, or the CSV),
not by re-encoding whole images: the counts strings are the same bytes, far fewer pixels.

``1 1`` (:data:`~sharp_fpn.data.rle.EMPTY_IMAGE_RUN`) as an image's only row marks an image
with no nucleus: the image is listed with no annotation. Beside other rows it is what it says, a
one-pixel nucleus at the top-left pixel. DSB2018's format cannot tell a lone one-pixel nucleus
there from the marker; the mask folders can, so only for such an image do the two sources differ.

Bad input raises :class:`DSBFormatError` naming the file or CSV line and what is wrong; an
empty mask file is only warned about (:class:`DSBFormatWarning`) and skipped.
"""
from __future__ import annotations

import csv
import json
import multiprocessing
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from ..utils import atomic_write, worker_count
from .rle import EMPTY_IMAGE_RUN, RLEError, parse_runs

PathLike = Union[str, "os.PathLike[str]"]
WarningHandler = Callable[[str], None]

CATEGORIES = [{"id": 1, "name": "nucleus"}]
KEPT_USAGE = "Private"


class DSBFormatError(ValueError):
    """DSB2018 input that cannot be converted; the message names the file or CSV line."""


class DSBFormatWarning(UserWarning):
    """DSB2018 input that is skipped rather than converted (an empty mask file, say)."""


@dataclass(frozen=True)
class _Nucleus:
    """One nucleus, ready for COCO: its first pixel (column-major, 0-based) and its RLE counts."""

    first_pixel: int
    counts: np.ndarray  # uncompressed COCO RLE counts, uint32


@dataclass(frozen=True)
class _ImageResult:
    """What a worker hands back for one image."""

    record: dict[str, Any]  # the COCO image, without "id"
    nuclei: list[_Nucleus]  # in canonical order
    warnings: list[str]


@dataclass(frozen=True)
class _CsvRow:
    """One kept row of a labels CSV."""

    line: int  # line number in the CSV file, 1 = header
    rle: str


@dataclass(frozen=True)
class _CsvImageTask:
    """One image of a labels CSV, as handed to a worker."""

    root: str
    split: str
    image_id: str
    csv_name: str
    rows: tuple[_CsvRow, ...]
    shape: Optional[tuple[int, int]]  # (H, W) from the CSV's Height/Width, if it has them


# --------------------------------------------------------------------------------------------
# run-length helpers


def _merge_touching(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge runs that touch (one starts where the previous ends); runs sorted, disjoint."""
    if len(starts) < 2:
        return starts, lengths
    ends = starts + lengths
    first_of_group = np.ones(len(starts), dtype=bool)
    first_of_group[1:] = starts[1:] != ends[:-1]
    if first_of_group.all():
        return starts, lengths
    heads = np.flatnonzero(first_of_group)
    tails = np.append(heads[1:] - 1, len(starts) - 1)
    return starts[heads], ends[tails] - starts[heads]


def coco_counts_from_runs(
    starts: np.ndarray, lengths: np.ndarray, num_pixels: int
) -> np.ndarray:
    """Uncompressed COCO RLE counts of the mask made of the given runs.

    ``starts`` (0-based, column-major) and ``lengths`` describe sorted, disjoint, non-empty runs
    (touching runs are merged) of an image of ``num_pixels`` pixels. The counts alternate
    background and foreground lengths, starting with background (0 if pixel 0 is foreground)
    and ending with the last run of either kind, as ``pycocotools``' own encoder writes them.
    """
    starts, lengths = _merge_touching(np.asarray(starts), np.asarray(lengths))
    n = len(starts)
    counts = np.empty(2 * n + 1, dtype=np.int64)
    counts[0] = starts[0]
    counts[1::2] = lengths
    counts[2:-1:2] = starts[1:] - (starts[:-1] + lengths[:-1])
    counts[-1] = num_pixels - (starts[-1] + lengths[-1])
    if counts[-1] == 0:
        counts = counts[:-1]
    return counts.astype(np.uint32)


def _crop_runs(
    foreground: np.ndarray, top: int, left: int, height: int
) -> tuple[np.ndarray, np.ndarray]:
    """Column-major runs, in the full image of ``height`` rows, of a cropped bool mask.

    ``foreground`` (h, w) sits at row ``top``, column ``left``. Returns 0-based starts and
    lengths (int64); runs of neighbouring columns that touch are not merged yet.
    """
    h, w = foreground.shape
    # Each column padded with a background pixel above and below, so runs never cross columns.
    padded = np.zeros((w, h + 2), dtype=np.int8)
    padded[:, 1:-1] = foreground.T
    steps = np.diff(padded.ravel())
    begins = np.flatnonzero(steps == 1) + 1
    ends = np.flatnonzero(steps == -1) + 1
    column, row = np.divmod(begins, h + 2)
    starts = (left + column) * height + top + row - 1
    return starts, ends - begins


# --------------------------------------------------------------------------------------------
# per-image work (runs in the worker processes)


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _image_record(
    root: Path, split: str, image_id: str, missing: Optional[str] = None
) -> dict[str, Any]:
    """The COCO image (without ``id``) of ``image_id``, after checking that its PNG decodes.

    ``missing``: the message for a missing image file (default: the file's name).
    """
    path = root / split / image_id / "images" / f"{image_id}.png"
    rel = _rel(root, path)
    if not path.is_file():
        raise DSBFormatError(missing or f"{rel}: no such image file")
    try:
        with Image.open(path) as image:
            image.load()
            width, height = image.size
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        raise DSBFormatError(f"{rel} is not a readable PNG ({err})") from None
    return {"file_name": rel, "height": height, "width": width, "image_key": image_id}


def _read_mask(
    path: Path, rel: str, shape: tuple[int, int]
) -> Optional[tuple[int, int, np.ndarray]]:
    """Read one 0/255 mask PNG of an image of ``shape`` (H, W).

    Returns ``(top, left, foreground)`` with ``foreground`` the bool crop of the mask's bounding
    box, or ``None`` for an all-zero mask.
    """
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode == "1":
                image = image.convert("L")
            mode, (width, height) = image.mode, image.size
            box = image.getbbox() if mode == "L" else None
            crop = np.asarray(image.crop(box)) if box else None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        raise DSBFormatError(f"{rel} is not a readable PNG ({err})") from None
    if mode != "L":
        raise DSBFormatError(
            f"{rel} is a {mode} image; masks must be single-channel 8-bit with 0 and 255"
        )
    if (height, width) != shape:
        raise DSBFormatError(
            f"{rel} is {height}x{width} but its image is {shape[0]}x{shape[1]} (height x width)"
        )
    if crop is None:
        return None
    left, top = box[0], box[1]
    foreground = crop == 255
    bad = (crop != 0) & ~foreground
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise DSBFormatError(
            f"{rel} has value {crop[r, c]} at row {top + r}, column {left + c}; masks must be "
            "0 (background) or 255 (nucleus)"
        )
    return top, left, foreground


def _convert_folder_image(task: tuple[str, str, str]) -> _ImageResult:
    """Convert ``<root>/<split>/<image_id>/`` (images/ and masks/ folders)."""
    root, split, image_id = Path(task[0]), task[1], task[2]
    folder = root / split / image_id
    if not (folder / "images").is_dir():
        raise DSBFormatError(f"{_rel(root, folder)} has no images/ folder")
    if not (folder / "masks").is_dir():
        raise DSBFormatError(
            f"{_rel(root, folder)} has no masks/ folder (a split without masks is converted "
            "from its labels CSV)"
        )
    record = _image_record(root, split, image_id)
    shape = (record["height"], record["width"])
    owner = np.zeros(shape, dtype=np.int32)  # 1 + index of the mask holding each pixel
    names: list[str] = []
    nuclei: list[_Nucleus] = []
    notes: list[str] = []
    for path in sorted((folder / "masks").glob("*.png"), key=lambda p: p.name):
        rel = _rel(root, path)
        read = _read_mask(path, rel, shape)
        if read is None:
            notes.append(f"{rel} is empty (no 255 pixel); skipped")
            continue
        top, left, foreground = read
        h, w = foreground.shape
        region = owner[top : top + h, left : left + w]
        clash = foreground & (region > 0)
        if clash.any():
            r, c = np.argwhere(clash)[0]
            other = names[region[r, c] - 1]
            raise DSBFormatError(
                f"{other} and {rel} overlap at {int(clash.sum())} pixel(s), first at row "
                f"{top + r}, column {left + c}; DSB2018 masks never overlap"
            )
        names.append(rel)
        region[foreground] = len(names)
        starts, lengths = _crop_runs(foreground, top, left, shape[0])
        counts = coco_counts_from_runs(starts, lengths, shape[0] * shape[1])
        nuclei.append(_Nucleus(int(starts[0]), counts))
    nuclei.sort(key=lambda n: n.first_pixel)
    return _ImageResult(record, nuclei, notes)


def _convert_csv_image(task: _CsvImageTask) -> _ImageResult:
    """Convert one image's rows of a labels CSV."""
    root = Path(task.root)
    where = f"{task.csv_name} line {task.rows[0].line}"
    image_rel = f"{task.split}/{task.image_id}/images/{task.image_id}.png"
    record = _image_record(
        root,
        task.split,
        task.image_id,
        missing=f"{where}: ImageId {task.image_id!r} has no image ({image_rel} does not exist)",
    )
    shape = (record["height"], record["width"])
    if task.shape is not None and task.shape != shape:
        raise DSBFormatError(
            f"{where}: Height/Width say {task.shape[0]}x{task.shape[1]} but {image_rel} is "
            f"{shape[0]}x{shape[1]}"
        )
    if len(task.rows) == 1 and " ".join(task.rows[0].rle.split()) == EMPTY_IMAGE_RUN:
        return _ImageResult(record, [], [])

    runs: list[tuple[np.ndarray, np.ndarray]] = []
    for row in task.rows:
        try:
            runs.append(parse_runs(row.rle, shape))
        except RLEError as err:
            raise DSBFormatError(
                f"{task.csv_name} line {row.line} (ImageId {task.image_id!r}): {err}"
            ) from None

    # Rows must not overlap: sort every run of the image and compare each with its predecessor.
    all_starts = np.concatenate([s for s, _ in runs])
    all_ends = np.concatenate([s + n for s, n in runs])
    row_of = np.concatenate([np.full(len(s), k) for k, (s, _) in enumerate(runs)])
    order = np.argsort(all_starts, kind="stable")
    clash = all_starts[order][1:] < all_ends[order][:-1]
    if clash.any():
        k = int(np.flatnonzero(clash)[0])
        a, b = sorted((task.rows[row_of[order[k]]].line, task.rows[row_of[order[k + 1]]].line))
        column, r = divmod(int(all_starts[order[k + 1]]), shape[0])
        raise DSBFormatError(
            f"{task.csv_name} lines {a} and {b}: two masks of ImageId {task.image_id!r} overlap "
            f"(at row {r}, column {column}); DSB2018 masks never overlap"
        )

    num_pixels = shape[0] * shape[1]
    nuclei = [_Nucleus(int(s[0]), coco_counts_from_runs(s, n, num_pixels)) for s, n in runs]
    nuclei.sort(key=lambda n: n.first_pixel)
    return _ImageResult(record, nuclei, [])


# --------------------------------------------------------------------------------------------
# reading the split and the CSV (parent process)


def _split_folder(root: Path, split: str) -> Path:
    folder = root / split
    if not folder.is_dir():
        raise DSBFormatError(f"{folder} is not a folder (expected {split}/<ImageId>/images/...)")
    return folder


def _image_ids(folder: Path) -> list[str]:
    """The ImageIds of a split folder: its sub-folders, sorted, hidden ones left out."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


@dataclass
class _LabelsTable:
    """A labels CSV grouped by image: kept rows, (H, W) from Height/Width, Usage per image."""

    rows: dict[str, list[_CsvRow]]
    shapes: Optional[dict[str, tuple[int, int]]]  # None: the CSV has no Height/Width
    usage_of: dict[str, str]  # every ImageId of a CSV with a Usage column, kept or not


def _read_labels_csv(path: Path) -> _LabelsTable:
    """Read and check a DSB2018 labels CSV; keep only ``Usage == Private`` rows if it has Usage."""
    name = path.name
    try:
        handle = open(path, newline="", encoding="utf-8-sig")
    except OSError as err:
        raise DSBFormatError(f"cannot read labels CSV {path}: {err.strerror}") from None
    reader = csv.reader(handle)
    try:
        with handle:
            return _parse_labels(reader, name)
    except csv.Error as err:
        raise DSBFormatError(f"{name} line {reader.line_num}: {err}") from None
    except UnicodeDecodeError as err:
        raise DSBFormatError(f"{name} is not UTF-8 text ({err})") from None


def _parse_labels(reader: Any, name: str) -> _LabelsTable:
    """The body of :func:`_read_labels_csv`; ``reader`` is a :func:`csv.reader`."""
    header = next(reader, None)
    if header is None:
        raise DSBFormatError(f"{name} is empty (expected a header ImageId,EncodedPixels,...)")
    header = [h.strip() for h in header]
    column = {h: i for i, h in enumerate(header)}
    for required in ("ImageId", "EncodedPixels"):
        if required not in column:
            raise DSBFormatError(
                f"{name} line 1: no {required} column (header: {','.join(header)})"
            )
    if ("Height" in column) != ("Width" in column):
        raise DSBFormatError(
            f"{name} line 1: Height and Width come together (header: {','.join(header)})"
        )
    sized, has_usage = "Height" in column, "Usage" in column
    table = _LabelsTable({}, {} if sized else None, {})
    first_line: dict[str, int] = {}
    for fields in reader:
        line = reader.line_num
        if not fields:
            continue
        if len(fields) != len(header):
            raise DSBFormatError(
                f"{name} line {line}: {len(fields)} fields, expected {len(header)} "
                f"({','.join(header)})"
            )
        image_id = fields[column["ImageId"]].strip()
        if not image_id:
            raise DSBFormatError(f"{name} line {line}: empty ImageId")
        first = first_line.setdefault(image_id, line)
        if has_usage:
            usage = fields[column["Usage"]].strip()
            seen = table.usage_of.setdefault(image_id, usage)
            if seen != usage:
                raise DSBFormatError(
                    f"{name} line {line}: Usage {usage!r} but line {first} gives ImageId "
                    f"{image_id!r} Usage {seen!r}"
                )
            if usage != KEPT_USAGE:
                continue
        if table.shapes is not None:
            shape = _csv_shape(fields[column["Height"]], fields[column["Width"]], name, line)
            seen_shape = table.shapes.setdefault(image_id, shape)
            if seen_shape != shape:
                raise DSBFormatError(
                    f"{name} line {line}: ImageId {image_id!r} is {shape[0]}x{shape[1]} but line "
                    f"{first} says {seen_shape[0]}x{seen_shape[1]}"
                )
        rle = fields[column["EncodedPixels"]]
        if not rle.strip():
            raise DSBFormatError(
                f"{name} line {line}: empty EncodedPixels (an image with no nucleus is written "
                f"'{EMPTY_IMAGE_RUN}')"
            )
        table.rows.setdefault(image_id, []).append(_CsvRow(line, rle))
    return table


def _csv_tasks(
    root: Path, split: str, labels_csv: Path, warn: WarningHandler
) -> list[_CsvImageTask]:
    """One task per image of a labels CSV, in sorted ImageId order.

    Warns once about image folders of the split that have no row at all.
    """
    table = _read_labels_csv(labels_csv)
    folder = root / split
    if folder.is_dir():
        unlabelled = sorted(set(_image_ids(folder)) - set(table.rows) - set(table.usage_of))
        if unlabelled:
            shown = ", ".join(unlabelled[:3]) + (", ..." if len(unlabelled) > 3 else "")
            warn(
                f"{len(unlabelled)} image folder(s) of {split} have no row in {labels_csv.name} "
                f"and are left out: {shown}"
            )
    return [
        _CsvImageTask(
            root=str(root),
            split=split,
            image_id=image_id,
            csv_name=labels_csv.name,
            rows=tuple(table.rows[image_id]),
            shape=None if table.shapes is None else table.shapes[image_id],
        )
        for image_id in sorted(table.rows)
    ]


def _csv_shape(height: str, width: str, name: str, line: int) -> tuple[int, int]:
    """Parse a CSV row's Height and Width (positive integers)."""
    try:
        shape = (int(height), int(width))
    except ValueError:
        shape = (0, 0)
    if min(shape) <= 0:
        raise DSBFormatError(
            f"{name} line {line}: Height {height!r} and Width {width!r} must be positive integers"
        )
    return shape


# --------------------------------------------------------------------------------------------
# driver


def _run(
    work: Callable[[Any], _ImageResult],
    tasks: list[Any],
    workers: int,
    progress: bool,
    desc: str,
) -> Iterable[_ImageResult]:
    """Yield ``work(task)`` for every task, in task order, over ``workers`` processes."""
    workers = max(1, min(workers, len(tasks)))
    with tqdm(total=len(tasks), desc=desc, unit="image", disable=not progress) as bar:
        if workers == 1:
            for task in tasks:
                yield work(task)
                bar.update()
            return
        # Small chunks (~1/64 of a worker's share): one image can cost 1000x another (a
        # 1040x1388 image with hundreds of masks), so balance matters more than round trips.
        chunksize = max(1, len(tasks) // (64 * workers))
        with multiprocessing.get_context().Pool(workers) as pool:
            for result in pool.imap(work, tasks, chunksize=chunksize):
                yield result
                bar.update()


def convert_split(
    root: PathLike,
    split: str = "stage1_train",
    labels_csv: Optional[PathLike] = None,
    *,
    workers: Optional[int] = None,
    progress: bool = False,
    on_warning: Optional[WarningHandler] = None,
) -> dict[str, Any]:
    """Convert one DSB2018 split to a COCO dict (see the module docstring for its content).

    Args:
        root: the DSB2018 folder, holding ``<split>/<ImageId>/images/<ImageId>.png``.
        split: the split folder under ``root``, e.g. ``stage1_train`` or ``stage1_test``.
        labels_csv: a run-length labels CSV to read instead of the ``masks/`` folders.
        workers: processes to use (:func:`~sharp_fpn.utils.worker_count`: None = every core
            this process may use).
        progress: show a tqdm progress bar.
        on_warning: called with each warning's message (default: :func:`warnings.warn` with
            :class:`DSBFormatWarning`), in image order.

    Raises:
        DSBFormatError: bad input; the message names the file or CSV line.
    """
    root = Path(root)
    warn = on_warning or (lambda message: warnings.warn(message, DSBFormatWarning, stacklevel=3))
    tasks: list[Any]
    if labels_csv is None:
        folder = _split_folder(root, split)
        tasks = [(str(root), split, image_id) for image_id in _image_ids(folder)]
        if not tasks:
            raise DSBFormatError(f"{folder} holds no image folder")
        work: Callable[[Any], _ImageResult] = _convert_folder_image
    else:
        tasks = _csv_tasks(root, split, Path(labels_csv), warn)
        if not tasks:
            raise DSBFormatError(f"{Path(labels_csv).name} has no row for split {split}")
        work = _convert_csv_image

    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    results = _run(work, tasks, worker_count(workers), progress, split)
    for coco_id, result in enumerate(results, start=1):
        for message in result.warnings:
            warn(message)
        images.append({"id": coco_id, **result.record})
        if not result.nuclei:
            continue
        height, width = result.record["height"], result.record["width"]
        rles = mask_utils.frPyObjects(
            [{"size": [height, width], "counts": n.counts} for n in result.nuclei], height, width
        )
        # pycocotools' area() sizes a scratch uint8 array by the number of RLEs, which numpy 2
        # refuses past 255 (OverflowError): hand it at most 255 at a time.
        areas = np.concatenate(
            [mask_utils.area(rles[i : i + 255]) for i in range(0, len(rles), 255)]
        )
        boxes = mask_utils.toBbox(rles)
        for rle, area, box in zip(rles, areas, boxes):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": coco_id,
                    "category_id": 1,
                    "segmentation": {"size": [height, width], "counts": rle["counts"].decode()},
                    "area": int(area),
                    "bbox": [float(v) for v in box],
                    "iscrowd": 0,
                }
            )
    return {
        "images": images,
        "annotations": annotations,
        "categories": [dict(c) for c in CATEGORIES],
    }


def write_json_atomic(obj: Any, path: PathLike) -> None:
    """Write ``obj`` as compact JSON to ``path``, all or nothing (:func:`~sharp_fpn.utils.atomic_write`)."""
    text = json.dumps(obj, separators=(",", ":"))
    with atomic_write(path, "w", encoding="utf-8") as out:
        out.write(text)
