"""Convert the 2018 Data Science Bowl (DSB2018, BBBC038) to COCO instance annotations.

Two sources give the same annotations:

* mask folders, ``<root>/<split>/<ImageId>/images/<ImageId>.png`` and one 0/255 mask image per
  nucleus in ``<root>/<split>/<ImageId>/masks/``;
* a run-length labels CSV (:mod:`sharp_fpn.data.rle`) for splits that ship no masks:
  ``stage1_train_labels.csv`` (``ImageId,EncodedPixels``), ``stage1_solution.csv`` (adds
  ``Height,Width``) or ``stage2_solution_final.csv`` (adds ``Usage``).

The COCO dict has ``images`` (``id`` 1.. in sorted ImageId order, ``file_name`` relative to
``root``, ``height``, ``width`` and ``image_key``, the DSB ImageId), ``annotations`` (one per
nucleus: compressed RLE ``segmentation`` with ``str`` counts exactly as
``pycocotools.mask.encode(np.asfortranarray(mask))`` writes them, ``area``, ``bbox`` XYWH floats
from pycocotools, ``iscrowd`` 0, ``category_id`` 1, ``id`` 1..) and ``categories``
``[{"id": 1, "name": "nucleus"}]``. Of an image only its size is recorded: its pixels are
decoded to check that the file is whole, and nothing about their depth or range is kept (the
loaders read the image itself, 8- or 16-bit).

Canonical order: within an image, nuclei are sorted by their first pixel in DSB order
(column-major: top to bottom, then left to right), which masks cannot share since they never
overlap. So the folders and the CSV of the same data give byte-identical JSON whatever the mask
file names or the CSV row order, and whatever the number of worker processes.

File names. The image is ``images/<ImageId>.png`` with the suffix in any case (``.PNG``).
In ``masks/``, every file is a mask, read by one rule whatever its name:

* ``.png``, ``.tif``/``.tiff`` and ``.bmp`` (suffix in any case), lossless formats, are read
  exactly: single-channel 8-bit, one page, 0 and 255 only, the image's size;
* a JPEG (``.jpg``, ``.jpeg``, ``.jpe``, ``.jfif``) or WebP mask is refused: lossy compression
  blurs the edges into values between 0 and 255 and makes touching nuclei overlap, so no
  threshold gives back the masks that were drawn; save the masks as PNG;
* any other file is refused (``masks/`` holds one image per nucleus; move it out);
* ignored without a word: hidden names (``.DS_Store``, macOS ``._*`` files, temporary files)
  and Windows' ``Thumbs.db``/``desktop.ini``; skipped with a warning: files a sharp-fpn tool
  wrote there (:func:`sharp_fpn.outdir.is_recorded_output`), which are never inputs.

Image set: with mask folders, every image folder of the split. An image whose ``masks/`` is
empty, or whose masks are all empty, is kept as an image with no nucleus, with a warning naming
it; an image with no ``masks/`` folder at all is not labelled, and is left out with a warning
naming it (a split where no image has one is refused: convert it from its labels CSV). With a
CSV, the CSV defines it: each ImageId with a (kept) row must have its image file, whose size
must match the Height and Width columns when the CSV has them. An image folder with no row at
all is left out with one warning, since a missing row cannot tell "no nucleus" (written ``1 1``)
from "not labelled". ``Usage`` is read in any case: ``Private`` and ``Public`` rows (the scored
ones) are kept, ``Ignored`` rows left out (silently, whole images of them), and any other value
is refused naming the line.

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

from ..outdir import recorded_outputs
from ..utils import atomic_write, worker_count
from .rle import EMPTY_IMAGE_RUN, RLEError, parse_runs

PathLike = Union[str, "os.PathLike[str]"]
WarningHandler = Callable[[str], None]

CATEGORIES = [{"id": 1, "name": "nucleus"}]
KEPT_USAGES = ("private", "public")
"""``Usage`` values (any case) whose rows are kept: the scored ones."""
LEFT_OUT_USAGES = ("ignored",)
"""``Usage`` values (any case) whose rows are left out; any other value is an error."""
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")
"""Mask files read (suffix in any case): lossless formats, whose 0/255 values are exact."""
LOSSY_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".webp")
"""Mask files refused: lossy formats, whose edges are not 0/255 any more."""
IGNORED_NAMES = ("thumbs.db", "ehthumbs.db", "desktop.ini")
"""Files of ``masks/`` (any case) that operating systems write: not masks, ignored."""


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

    record: Optional[dict[str, Any]]  # the COCO image, without "id"; None: left out
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


def _image_path(root: Path, split: str, image_id: str) -> Optional[Path]:
    """``images/<image_id>.png`` of ``image_id``, the suffix in any case; None if missing."""
    folder = root / split / image_id / "images"
    path = folder / f"{image_id}.png"
    if path.is_file():
        return path
    wanted = path.name.casefold()
    try:
        found = sorted(p for p in folder.iterdir() if p.name.casefold() == wanted and p.is_file())
    except OSError:  # no images/ folder
        return None
    return found[0] if found else None


def _image_record(
    root: Path, split: str, image_id: str, missing: Optional[str] = None
) -> dict[str, Any]:
    """The COCO image (without ``id``) of ``image_id``, after checking that its PNG decodes.

    ``missing``: the message for a missing image file (default: the file's name).
    """
    path = _image_path(root, split, image_id)
    if path is None:
        rel = f"{split}/{image_id}/images/{image_id}.png"
        raise DSBFormatError(missing or f"{rel}: no such image file{_holds(root, split, image_id)}")
    rel = _rel(root, path)
    try:
        with Image.open(path) as image:
            image.load()
            width, height = image.size
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        raise DSBFormatError(f"{rel} is not a readable PNG ({err})") from None
    return {"file_name": rel, "height": height, "width": width, "image_key": image_id}


def _holds(root: Path, split: str, image_id: str) -> str:
    """`` (images/ holds a.tif, b.png)`` for a message about a missing image file, or ``""``."""
    try:
        names = sorted(p.name for p in (root / split / image_id / "images").iterdir())
    except OSError:
        return ""
    if not names:
        return " (images/ is empty)"
    return f" (images/ holds {', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"


def _read_mask(
    path: Path, rel: str, shape: tuple[int, int]
) -> Optional[tuple[int, int, np.ndarray]]:
    """Read one 0/255 mask file (PNG, TIFF or BMP) of an image of ``shape`` (H, W).

    Returns ``(top, left, foreground)`` with ``foreground`` the bool crop of the mask's bounding
    box, or ``None`` for an all-zero mask.
    """
    kind = (Image.registered_extensions().get(path.suffix.lower()) or "image").upper()
    try:
        with Image.open(path) as image:
            pages = getattr(image, "n_frames", 1)
            image.load()
            if image.mode == "1":
                image = image.convert("L")
            mode, (width, height) = image.mode, image.size
            box = image.getbbox() if mode == "L" else None
            crop = np.asarray(image.crop(box)) if box else None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        raise DSBFormatError(f"{rel} is not a readable {kind} ({err})") from None
    if pages != 1:
        raise DSBFormatError(
            f"{rel} has {pages} pages; a mask is one single-channel page (one file per nucleus)"
        )
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


def _mask_files(root: Path, masks: Path, notes: list[str]) -> list[Path]:
    """The mask files of a ``masks/`` folder, sorted by name, by the module docstring's rule.

    Raises :class:`DSBFormatError` for a lossy or unknown file; appends to ``notes`` the
    warnings about files skipped.
    """
    outputs = recorded_outputs(masks)
    files = []
    for path in sorted(masks.iterdir(), key=lambda p: p.name):
        name, rel = path.name, _rel(root, path)
        suffix = path.suffix.lower()
        if name.startswith(".") or name.casefold() in IGNORED_NAMES:
            continue
        if name in outputs:
            notes.append(f"{rel} is an output of a sharp-fpn tool, not a mask; skipped")
        elif path.is_dir():
            raise DSBFormatError(
                f"{rel} is a folder; masks/ holds one mask image per nucleus, nothing else"
            )
        elif suffix in MASK_SUFFIXES:
            files.append(path)
        elif suffix in LOSSY_SUFFIXES:
            raise DSBFormatError(
                f"{rel}: a {suffix[1:].upper()} mask, which is lossy: its edges are no longer "
                "0 and 255 and touching nuclei blur into each other; save the masks as PNG"
            )
        else:
            raise DSBFormatError(
                f"{rel} is not a mask image (masks are {', '.join(MASK_SUFFIXES)} files); move "
                "it out of masks/"
            )
    return files


def _convert_folder_image(task: tuple[str, str, str]) -> _ImageResult:
    """Convert ``<root>/<split>/<image_id>/`` (images/ and masks/ folders)."""
    root, split, image_id = Path(task[0]), task[1], task[2]
    folder = root / split / image_id
    if not (folder / "images").is_dir():
        raise DSBFormatError(f"{_rel(root, folder)} has no images/ folder")
    if not (folder / "masks").is_dir():
        return _ImageResult(None, [], [
            f"{_rel(root, folder)} has no masks/ folder: not labelled, left out (an image "
            "with no nucleus has an empty masks/ folder)"
        ])
    record = _image_record(root, split, image_id)
    shape = (record["height"], record["width"])
    owner = np.zeros(shape, dtype=np.int32)  # 1 + index of the mask holding each pixel
    names: list[str] = []
    nuclei: list[_Nucleus] = []
    notes: list[str] = []
    files = _mask_files(root, folder / "masks", notes)
    for path in files:
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
    if not nuclei:
        if not files:
            why = "its masks/ folder is empty"
        elif len(files) == 1:
            why = "its one mask is empty"
        else:
            why = f"its {len(files)} masks are empty"
        notes.append(f"{_rel(root, folder)} has no nucleus ({why}); kept as an image with none")
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
    """Read and check a DSB2018 labels CSV; of a CSV with Usage, keep the scored rows only."""
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
            if usage.casefold() not in KEPT_USAGES + LEFT_OUT_USAGES:
                raise DSBFormatError(
                    f"{name} line {line}: Usage {usage!r} is none of Private, Public (kept) "
                    "or Ignored (left out)"
                )
            seen = table.usage_of.setdefault(image_id, usage)
            if seen.casefold() != usage.casefold():
                raise DSBFormatError(
                    f"{name} line {line}: Usage {usage!r} but line {first} gives ImageId "
                    f"{image_id!r} Usage {seen!r}"
                )
            if usage.casefold() not in KEPT_USAGES:
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
        ids = _image_ids(folder)
        if not ids:
            raise DSBFormatError(f"{folder} holds no image folder")
        if not any((folder / image_id / "masks").is_dir() for image_id in ids):
            raise DSBFormatError(
                f"{folder}: no image folder has a masks/ folder; a split without masks (such "
                "as stage1_test) is converted from its labels CSV (--labels-csv)"
            )
        tasks = [(str(root), split, image_id) for image_id in ids]
        work: Callable[[Any], _ImageResult] = _convert_folder_image
    else:
        tasks = _csv_tasks(root, split, Path(labels_csv), warn)
        if not tasks:
            raise DSBFormatError(f"{Path(labels_csv).name} has no row for split {split}")
        work = _convert_csv_image

    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for result in _run(work, tasks, worker_count(workers), progress, split):
        for message in result.warnings:
            warn(message)
        if result.record is None:
            continue
        coco_id = len(images) + 1
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
