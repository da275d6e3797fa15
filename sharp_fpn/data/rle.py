"""DSB2018 run-length encoding.

The Kaggle 2018 Data Science Bowl writes a mask as space-separated ``start length`` pairs.
Pixels are numbered from 1, column-major: top to bottom, then left to right. An image with no
nucleus appears in the label CSVs as the single run ``1 1`` (see :data:`EMPTY_IMAGE_RUN`).
"""
from __future__ import annotations

import re

import numpy as np

EMPTY_IMAGE_RUN = "1 1"

# ASCII decimal integers only (``int()`` would also take "1_000" and non-ASCII digits). At most
# 18 digits, so that values and their sums fit int64; longer ones cannot describe an image anyway.
_TOKEN = re.compile(r"-?[0-9]{1,18}")
_LONG_INTEGER = re.compile(r"-?[0-9]+")


class RLEError(ValueError):
    """A run-length string that does not describe a valid mask."""


def encode(mask: np.ndarray) -> str:
    """Encode a 2-D mask (H, W), nonzero = foreground, as a DSB2018 run-length string.

    Returns ``""`` for an empty mask.
    """
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    padded = np.concatenate(([False], flat, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))  # run starts and ends, 0-based, alternating
    starts, ends = edges[0::2], edges[1::2]
    pairs = np.empty(2 * len(starts), dtype=np.int64)
    pairs[0::2] = starts + 1
    pairs[1::2] = ends - starts
    return " ".join(map(str, pairs.tolist()))


def parse_runs(rle: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Parse and validate ``rle`` for an image of ``shape`` (H, W).

    Returns 0-based ``starts`` and ``lengths`` (int64). Raises :class:`RLEError` naming the
    problem: a token that is not an ASCII decimal integer (or has more than 18 digits), an odd
    count, a start below 1, a zero or negative length, a run past the image's last pixel, runs
    out of order or overlapping. Touching runs (one starting where the previous one ends) are
    accepted, as they describe a valid mask; :func:`encode` never writes them.
    """
    tokens = rle.split()
    for token in tokens:
        if not _TOKEN.fullmatch(token):
            if _LONG_INTEGER.fullmatch(token):
                raise RLEError(f"run-length value {token} is too large for any image")
            raise RLEError(f"run-length token {token!r} is not an integer")
    values = np.array([int(t) for t in tokens], dtype=np.int64)
    if len(values) % 2:
        raise RLEError(f"odd number of values ({len(values)}): runs are 'start length' pairs")
    starts, lengths = values[0::2] - 1, values[1::2]
    n_pixels = int(shape[0]) * int(shape[1])
    if (starts < 0).any():
        k = int(np.flatnonzero(starts < 0)[0])
        raise RLEError(f"run {k + 1} starts at {starts[k] + 1}; pixels are numbered from 1")
    if (lengths <= 0).any():
        k = int(np.flatnonzero(lengths <= 0)[0])
        raise RLEError(f"run {k + 1} (start {starts[k] + 1}) has length {lengths[k]}")
    ends = starts + lengths
    if (ends > n_pixels).any():
        k = int(np.flatnonzero(ends > n_pixels)[0])
        raise RLEError(
            f"run {k + 1} ({starts[k] + 1} {lengths[k]}) ends at pixel {ends[k]}, past the "
            f"image's {n_pixels} pixels ({shape[0]}x{shape[1]})"
        )
    if len(starts) > 1:
        clash = starts[1:] < ends[:-1]
        if clash.any():
            k = int(np.flatnonzero(clash)[0]) + 1
            how = "out of order" if starts[k] < starts[k - 1] else "overlapping"
            raise RLEError(
                f"run {k + 1} ({starts[k] + 1} {lengths[k]}) is {how} with run {k} "
                f"({starts[k - 1] + 1} {lengths[k - 1]})"
            )
    return starts, lengths


def decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """Decode a DSB2018 run-length string into a bool mask of ``shape`` (H, W).

    Raises :class:`RLEError` for a malformed string (see :func:`parse_runs`).
    """
    starts, lengths = parse_runs(rle, shape)
    flat = np.zeros(int(shape[0]) * int(shape[1]) + 1, dtype=np.int8)
    np.add.at(flat, starts, 1)
    np.add.at(flat, starts + lengths, -1)
    return np.cumsum(flat[:-1], dtype=np.int32).astype(bool).reshape(shape, order="F")
