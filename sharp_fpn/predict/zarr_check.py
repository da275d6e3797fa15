"""A Zarr image whose stored chunks do not cover its array: found, named, refused.

zarr reads a chunk that is not in the store as the array's fill value, without a word: a
chunk lost in a copy (an interrupted ``rsync``, a sync client that skipped a file) or a write
that did not finish gives an image with a rectangle of zeros in it, and predict would segment
it as if it were the real image. :func:`check_zarr_chunks` compares the objects stored for
the array predict reads (an OME-Zarr's highest-resolution level, :mod:`.image_io`) with the
array's chunk grid, and refuses the image naming the first missing chunk, where it lies and
how many are missing.

The rule it keeps: every stored object of the grid must be there (the chunks; the shards of
a sharded Zarr v3 array, whose inner chunks the shard's index accounts for). A writer may
leave out chunks that hold nothing but the fill value on purpose (zarr 3's default
``write_empty_chunks=False``); a store cannot tell such a chunk from a lost one, so the image
is refused all the same, and ``allow_missing_chunks`` (``--allow-missing-chunks``) reads it
as zarr does. Only local folders are checked (the Zarr inputs predict takes); the listing is
of the folder, no chunk is read.

No torch, no detectron2.
"""
from __future__ import annotations

import itertools
import math
import os
from pathlib import Path
from typing import List, Sequence, Tuple

from .image_io import ImageReadError

__all__ = ["check_zarr_chunks", "missing_chunks", "stored_level"]


def stored_level(group) -> Tuple[str, object]:
    """``(path, array)`` of the OME-Zarr level predict reads: the first dataset of the first
    ``multiscales`` entry (NGFF 0.4 attributes, or 0.5's under ``ome``). KeyError when the
    group has no such metadata (:mod:`.image_io` says what it is)."""
    attrs = dict(group.attrs)
    meta = attrs.get("ome", attrs)
    level = meta["multiscales"][0]["datasets"][0]["path"]
    return str(level), group[level]


def missing_chunks(folder: Path, array) -> List[Tuple[int, ...]]:
    """Grid coordinates of the chunks (or shards) of ``array`` that its store, the local
    folder ``folder`` (the array's own folder), does not hold, in grid order."""
    stored_shape: Sequence[int] = array.shards or array.chunks
    grid = [math.ceil(n / c) for n, c in zip(array.shape, stored_shape)]
    present = set()
    for root, _, names in os.walk(folder):
        rel = os.path.relpath(root, folder)
        for name in names:
            key = name if rel == "." else f"{rel}/{name}".replace(os.sep, "/")
            present.add(key)
    encode = array.metadata.encode_chunk_key
    return [coords for coords in itertools.product(*(range(n) for n in grid))
            if encode(coords) not in present]


def check_zarr_chunks(path: Path) -> None:
    """Refuse the OME-Zarr image ``path`` when a chunk of the level predict reads is missing.

    Raises:
        ImageReadError: one line naming the folder, the array, the first missing chunk (its
            key and the pixels it covers), how many of how many are missing, and the way to
            read it anyway (``--allow-missing-chunks``). A folder zarr cannot open, or one
            without OME multiscales metadata, passes: :func:`~.image_io.read_planes` says
            what it is.
    """
    path = Path(path)
    try:
        import zarr

        level, array = stored_level(zarr.open_group(str(path), mode="r"))
    except Exception:  # noqa: BLE001  not an OME-Zarr image: the reader names the problem
        return
    folder = path / level
    if not folder.is_dir():
        return
    missing = missing_chunks(folder, array)
    if not missing:
        return
    stored_shape = array.shards or array.chunks
    first = missing[0]
    region = ", ".join(f"{c * n}:{min((c + 1) * n, size)}"
                       for c, n, size in zip(first, stored_shape, array.shape))
    total = math.prod(math.ceil(n / c) for n, c in zip(array.shape, stored_shape))
    kind = "shard" if array.shards else "chunk"
    raise ImageReadError(
        f"{path}: {kind} {array.metadata.encode_chunk_key(first)} of array '{level}' (pixels "
        f"[{region}]) is missing from the store, {len(missing)} of {total} {kind}s missing; "
        f"zarr would read them as the fill value {array.fill_value!r} (a copy or a write that "
        f"did not finish). If the writer left out empty {kind}s on purpose "
        f"(write_empty_chunks=False), --allow-missing-chunks reads it so"
    )
