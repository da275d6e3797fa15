"""The label image of a stitch being built, chunk by chunk, in bounded memory.

:class:`ChunkStore` holds the label chunks being painted (int32), at most a budget of them in
memory, the least recently used waiting in a scratch folder; :class:`ChunkedStitch` is what
the large-image path's two stitchers share (:class:`~.large.GridStitcher` for instances,
:class:`~.components.ComponentStitcher` for a semantic model's components): the tiling, the
tiles added so far, the chunks reached and handed over.

No torch, no detectron2.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from .tiling import tile_grid

__all__ = ["DEFAULT_CHUNK", "ChunkStore", "ChunkedStitch", "chunk_keys"]

#: Side of the label chunks written (px).
DEFAULT_CHUNK = 512


def chunk_keys(box: Tuple[int, int, int, int], chunk: int) -> List[Tuple[int, int]]:
    """Grid keys ``(cy, cx)`` of the ``chunk``-px chunks a box ``(t, l, b, r)`` reaches."""
    t, l, b, r = box
    return [(cy, cx) for cy in range(t // chunk, (b - 1) // chunk + 1)
            for cx in range(l // chunk, (r - 1) // chunk + 1)]


class ChunkStore:
    """The label chunks of an image being stitched, int32 (``> 0`` an id, ``< 0`` a pixel
    taken, then pruned), created zero when first reached.

    At most ``budget`` chunks are held in memory: when :meth:`settle` finds more, the least
    recently used go to ``scratch`` (one ``.npy`` file a chunk, in the page cache rather than
    the process' memory) and come back when reached again. A chunk is taken out once, when
    final (:meth:`pop`), and forgotten. So the labels held cost at most about ``budget``
    chunks whatever the image's size; ``peak_held`` and ``spills`` say what a run held and
    moved.
    """

    def __init__(self, shape: Tuple[int, int], chunk: int, budget: int,
                 scratch: Optional[Path] = None) -> None:
        if chunk < 1 or budget < 1:
            raise ValueError(f"chunk and budget must be >= 1, got {chunk} and {budget}")
        self.shape = tuple(shape)
        self.chunk = int(chunk)
        self.budget = int(budget)
        self.scratch = scratch
        self._held: "OrderedDict[Tuple[int, int], np.ndarray]" = OrderedDict()
        self._spilled: set = set()
        self.peak_held = 0
        self.spills = 0

    def bounds(self, key: Tuple[int, int]) -> Tuple[int, int, int, int]:
        """The pixels ``(t, l, b, r)`` of chunk ``key``."""
        cy, cx = key
        c = self.chunk
        return cy * c, cx * c, min((cy + 1) * c, self.shape[0]), min((cx + 1) * c,
                                                                      self.shape[1])

    def _file(self, key: Tuple[int, int]) -> Path:
        return self.scratch / f"{key[0]}_{key[1]}.npy"

    def _get(self, key: Tuple[int, int]) -> np.ndarray:
        values = self._held.get(key)
        if values is not None:
            self._held.move_to_end(key)
            return values
        if key in self._spilled:
            path = self._file(key)
            values = np.load(path)
            path.unlink()
            self._spilled.discard(key)
        else:
            t, l, b, r = self.bounds(key)
            values = np.zeros((b - t, r - l), dtype=np.int32)
        self._held[key] = values
        self.peak_held = max(self.peak_held, len(self._held))
        return values

    def region(self, box: Tuple[int, int, int, int]) -> Tuple[np.ndarray, bool]:
        """The labels of ``box``: ``(values, shared)``, a view into the chunk when the box
        lies in one (``shared``: edits are the chunk's), else a copy to :meth:`write` back."""
        t, l, b, r = box
        keys = chunk_keys(box, self.chunk)
        if len(keys) == 1:
            ct, cl, _, _ = self.bounds(keys[0])
            return self._get(keys[0])[t - ct:b - ct, l - cl:r - cl], True
        out = np.empty((b - t, r - l), dtype=np.int32)
        for key in keys:
            ct, cl, cb, cr = self.bounds(key)
            y0, x0, y1, x1 = max(t, ct), max(l, cl), min(b, cb), min(r, cr)
            out[y0 - t:y1 - t, x0 - l:x1 - l] = self._get(key)[y0 - ct:y1 - ct, x0 - cl:x1 - cl]
        return out, False

    def read(self, box: Tuple[int, int, int, int]) -> np.ndarray:
        """A copy of the labels of ``box``, its chunks not in the store (never reached, or
        taken out) read as zeros and not created."""
        t, l, b, r = box
        out = np.zeros((b - t, r - l), dtype=np.int32)
        for key in chunk_keys(box, self.chunk):
            if key not in self._held and key not in self._spilled:
                continue
            ct, cl, cb, cr = self.bounds(key)
            y0, x0, y1, x1 = max(t, ct), max(l, cl), min(b, cb), min(r, cr)
            out[y0 - t:y1 - t, x0 - l:x1 - l] = self._get(key)[y0 - ct:y1 - ct, x0 - cl:x1 - cl]
        return out

    def write(self, box: Tuple[int, int, int, int], values: np.ndarray) -> None:
        """Put the labels of ``box`` (a copy :meth:`region` gave) back into its chunks."""
        t, l, b, r = box
        for key in chunk_keys(box, self.chunk):
            ct, cl, cb, cr = self.bounds(key)
            y0, x0, y1, x1 = max(t, ct), max(l, cl), min(b, cb), min(r, cr)
            self._get(key)[y0 - ct:y1 - ct, x0 - cl:x1 - cl] = values[y0 - t:y1 - t,
                                                                     x0 - l:x1 - l]

    def pop(self, key: Tuple[int, int]) -> np.ndarray:
        """Chunk ``key``'s labels, taken out of the store (zeros if it was never reached)."""
        if key in self._held or key in self._spilled:
            values = self._get(key)
            del self._held[key]
            return values
        t, l, b, r = self.bounds(key)
        return np.zeros((b - t, r - l), dtype=np.int32)

    def settle(self) -> None:
        """Spill the least recently used chunks beyond the budget to ``scratch``."""
        while len(self._held) > self.budget:
            if self.scratch is None:
                raise ValueError(f"{len(self._held)} label chunks held, over the budget of "
                                 f"{self.budget}, and no scratch folder to spill them to")
            key, values = self._held.popitem(last=False)
            self.scratch.mkdir(parents=True, exist_ok=True)
            np.save(self._file(key), values, allow_pickle=False)
            self._spilled.add(key)
            self.spills += 1

    @property
    def held(self) -> int:
        """Chunks in memory now."""
        return len(self._held)


class ChunkedStitch:
    """The bookkeeping both stitchers share: ``tiles`` (:func:`~.tiling.tile_grid`'s, added
    in row-major order; ``taken`` so far), the label chunks (``store``, ``chunk`` px a side)
    reached by a tile added and not yet handed over, and those handed over
    (``chunks_taken``)."""

    def __init__(self, shape: Tuple[int, int], tile: int, overlap: int, chunk: int,
                 budget: int, scratch: Optional[Path]) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.tiles = tile_grid(self.shape[0], self.shape[1], tile, overlap)
        self.chunk = int(chunk)
        self.store = ChunkStore(self.shape, chunk, budget, scratch)
        self.taken = 0  # tiles added
        self.chunks_taken = 0
        self._reached: set = set()  # chunks a tile added reaches, not yet taken

    @property
    def chunk_count(self) -> int:
        """Chunks of the label image."""
        return math.ceil(self.shape[0] / self.chunk) * math.ceil(self.shape[1] / self.chunk)

    @property
    def done(self) -> bool:
        """Every tile added and every chunk taken."""
        return self.taken == len(self.tiles) and self.chunks_taken == self.chunk_count

    def _reach(self, box: Tuple[int, int, int, int]) -> None:
        """Note the chunks ``box`` (a tile's or block's pixels) reaches."""
        self._reached.update(chunk_keys(box, self.chunk))
