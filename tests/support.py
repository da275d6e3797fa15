"""Checks several test modules share (imported as ``support``: pytest puts this folder on the
path)."""
from pathlib import Path

import numpy as np


def bijection(a: np.ndarray, b: np.ndarray) -> dict:
    """``{id in a: id in b}`` when the two label images are one renumbering of each other
    (the same foreground, each id of one matching exactly one id of the other); fails the
    test saying how many pixels differ otherwise."""
    assert a.shape == b.shape
    assert np.array_equal(a > 0, b > 0), f"{int(((a > 0) != (b > 0)).sum())} pixels differ"
    pairs = np.unique(np.stack([a[a > 0].astype(np.int64), b[a > 0].astype(np.int64)]), axis=1)
    assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]
    return {int(x): int(y) for x, y in pairs.T}


def zarr_labels(folder: Path) -> np.ndarray:
    """The label image of an OME-Zarr folder the large-image path wrote (its level ``0``)."""
    import zarr

    return zarr.open_group(str(folder), mode="r")["0"][...]
