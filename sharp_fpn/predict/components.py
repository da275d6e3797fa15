"""Streaming connected components: a semantic model's labels, tile by tile (numpy, scipy).

The whole-image path labels a semantic model's image in two steps: every pixel's nucleus
probability is taken from the tile whose core holds the pixel's centre
(:func:`~.tiling.stitch_cores`), then the labels are the 8-connected components of
``probabilities > threshold`` over the whole map, each scored by its mean probability
(``sharp_fpn.d2.predictor.semantic_labels``). :class:`ComponentStitcher` computes the same
labels and scores, up to a renumbering, from the tiles taken one at a time in row-major
order, holding only the components not yet complete.

**Blocks.** Each tile contributes its *block*: the pixels of its core, exactly those
``stitch_cores`` takes from it. The blocks partition the image into a grid (the rows of
tiles share their block rows, the columns their block columns), taken in row-major order.

**Pieces.** A block's foreground (``> threshold``) is labelled on its own (8-connected,
``scipy.ndimage.label``); each piece gets the next *provisional* id, written into the label
chunks (:class:`~.chunks.ChunkStore`), with its additive statistics: area, sum of
probabilities, sum of intensities, bounding box. Two pieces of neighbouring blocks are one
component when a pixel of one is among the 8 neighbours of a pixel of the other: the
block's first row is compared with the image row just above it (kept from the previous row
of blocks, one row of the image's width), its first column with the last column of the
block to its left; the three neighbours above (diagonals included) and the three to the
left make every 8-contact across a block edge or corner seen exactly once, when the later
of the two blocks is added. Contacts are merged by a union-find over the provisional ids
(the smaller id stays the root), and the statistics of the roots added.

**Complete components.** A component is complete when its bounding box grown by one pixel
meets no block still to come: no pixel added later can touch it. It is then given the next
final id (``1, 2, ...`` in the order components complete; within one tile by provisional
id: stable from run to run), its mask read from the chunks over its box (the pixels whose
provisional id has it as root; a chunk of the box already handed over, between the arms of
a U joined late, holds none of them), and handed back (:class:`Component`). Its score is its sum
of probabilities over its area; the whole path's mean (``np.bincount`` over the image) sums
the same float64 values in another order, so the two can differ in the last bits (about
``1e-15`` relative); likewise the mean intensity (exact for integer gray images, whose sums
are exact in float64).

**Chunks.** A label chunk is final when every block meeting it has been added and no open
component's box meets it: every provisional id in it then has a final id. :meth:`take`
hands it over once, provisional ids translated to final ones, and forgets it.

**Memory.** The chunks held (at most ``budget``, the others spilled to ``scratch`` by the
store), the open components' statistics (those along the frontier between the blocks done
and those to come: ``peak_open`` does not grow with the image's height, only with its
width), two rows of provisional ids of the image's width, and the union-find: 12 bytes per
piece of the whole image (its parent and, for a root, its final id), the one term that
grows with the image: a few MB for a slide's half a million nuclei. One component is held
whole when it completes (its box's provisional ids, then its mask): a nucleus' few kB, but a
component spanning much of the image (a model that takes the background for nuclei) costs
its box's pixels, and the chunks under an open component's box wait (spilled) until it
completes; the whole-image path holds the whole map in any case.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from scipy import ndimage

from .chunks import DEFAULT_CHUNK, ChunkedStitch
from .tiling import axis_spans

__all__ = ["Component", "ComponentStitcher", "DEFAULT_THRESHOLD"]

#: The probability a pixel must exceed to be a nucleus pixel (``sharp_fpn.d2.predictor.
#: SEMANTIC_THRESHOLD``, repeated here so this module needs no torch).
DEFAULT_THRESHOLD = 0.5

_EIGHT = np.ones((3, 3), dtype=bool)
_LARGEST_ID = 2 ** 31 - 1  # provisional ids live in the store's int32 chunks


@dataclass
class Component:
    """A complete component: its final id, score (mean probability), tight box ``(top,
    left, bottom, right)`` (image coordinates, bottom and right exclusive), bool mask over
    the box, and mean intensity (None when the tiles came without intensities).

    ``intensity`` is None: the mean intensity is already measured (``mean_intensity``), the
    pixels under the box are not kept (a component can span many tiles)."""

    label: int
    score: float
    box: Tuple[int, int, int, int]
    mask: np.ndarray
    mean_intensity: Optional[float] = None
    intensity = None


def _block_bounds(tiles) -> List[Tuple[int, int, int, int]]:
    """Each tile's block: the pixels ``(y0, x0, y1, x1)`` whose centre its core holds (the
    rule of :func:`~.tiling.stitch_cores`)."""
    out = []
    for t in tiles:
        top, left, bottom, right = t.core
        out.append((math.ceil(top - 0.5), math.ceil(left - 0.5), math.ceil(bottom - 0.5),
                    math.ceil(right - 0.5)))
    return out


class ComponentStitcher(ChunkedStitch):
    """The streaming form of ``semantic_labels(stitch_cores(...))`` (module docstring), one
    tile's probability map at a time in row-major order.

    :meth:`add` takes the next tile's probabilities (and, optionally, its intensities) and
    returns the components it completed, in id order; :meth:`final_chunks` then names the
    label chunks that are final, and :meth:`take` hands each one over, once (uint32, final
    ids), and forgets it.

    Args:
        shape: ``(H, W)``; tile, overlap: the tiling (:func:`~.tiling.tile_grid`).
        chunk: side of the label chunks (px); budget: label chunks held in memory at most
            (:class:`~.chunks.ChunkStore`; ``scratch`` the folder the others wait in).
        threshold: a pixel is foreground where its probability is above this.

    Attributes:
        tiles: the tiles, in the order they are added; taken: how many were added;
        count: components completed; pieces: provisional ids given; open: components held
        open now; peak_open: the most at once; chunks_taken; store.

    Raises:
        ValueError: a tiling whose blocks are empty, or more pieces than int32 ids hold.
    """

    def __init__(self, shape: Tuple[int, int], tile: int, overlap: int,
                 chunk: int = DEFAULT_CHUNK, budget: int = 64,
                 threshold: float = DEFAULT_THRESHOLD, scratch: Optional[Path] = None) -> None:
        super().__init__(shape, tile, overlap, chunk, budget, scratch)
        self.threshold = float(threshold)
        self.blocks = _block_bounds(self.tiles)
        self.columns = len(axis_spans(self.shape[1], tile, overlap))
        self.rows = len(self.tiles) // self.columns
        # block row and column edges: block (r, c) is [ys[r], ys[r + 1]) x [xs[c], xs[c + 1])
        self.ys = [self.blocks[r * self.columns][0] for r in range(self.rows)] + [self.shape[0]]
        self.xs = [self.blocks[c][1] for c in range(self.columns)] + [self.shape[1]]
        if any(a >= b for a, b in zip(self.ys[:-1], self.ys[1:])) or any(
                a >= b for a, b in zip(self.xs[:-1], self.xs[1:])):
            raise ValueError(f"tiling {tile}/{overlap} of {self.shape} has empty tile cores")
        self.count = 0
        self.pieces = 0
        self.peak_open = 0
        self._parent = np.arange(1024, dtype=np.int64)  # union-find over provisional ids
        self._final = np.zeros(1024, dtype=np.uint32)  # a complete root's final id
        # per open root: [area, probability sum, intensity sum, top, left, bottom, right]
        self._open: Dict[int, list] = {}
        self._above = np.zeros(self.shape[1], dtype=np.int64)  # ids of the row above
        self._next_above = np.zeros(self.shape[1], dtype=np.int64)
        self._left = np.zeros(0, dtype=np.int64)  # ids of the column left of the block
        self._lit: Optional[bool] = None  # whether the tiles come with intensities

    @property
    def open(self) -> int:
        """Components held open now."""
        return len(self._open)

    # ------------------------------------------------------------------ union-find

    def _find(self, i: int) -> int:
        parent = self._parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving
            i = int(parent[i])
        return i

    def _roots(self, ids: np.ndarray) -> np.ndarray:
        """The roots of many provisional ids at once (0 stays 0)."""
        roots = self._parent[ids]
        while True:
            up = self._parent[roots]
            if np.array_equal(up, roots):
                return roots
            roots = up

    def _grow(self, size: int) -> None:
        if size > _LARGEST_ID:
            raise ValueError(f"more than {_LARGEST_ID} pieces: too many for int32 label ids")
        if size < self._parent.size:
            return
        capacity = max(size + 1, 2 * self._parent.size)
        parent = np.arange(capacity, dtype=np.int64)
        parent[:self._parent.size] = self._parent
        final = np.zeros(capacity, dtype=np.uint32)
        final[:self._final.size] = self._final
        self._parent, self._final = parent, final

    def _union(self, pairs: np.ndarray) -> None:
        """Merge the components of each ``(a, b)`` pair of provisional ids."""
        if pairs.size == 0:
            return
        for a, b in np.unique(pairs, axis=0).tolist():
            ra, rb = self._find(a), self._find(b)
            if ra == rb:
                continue
            if ra > rb:
                ra, rb = rb, ra
            keep, gone = self._open.get(ra), self._open.pop(rb, None)
            if keep is None or gone is None:  # a complete component cannot grow
                raise AssertionError(f"pieces {a} and {b} meet, one of them complete")
            self._parent[rb] = ra
            keep[0] += gone[0]
            keep[1] += gone[1]
            keep[2] += gone[2]
            keep[3], keep[4] = min(keep[3], gone[3]), min(keep[4], gone[4])
            keep[5], keep[6] = max(keep[5], gone[5]), max(keep[6], gone[6])

    # ------------------------------------------------------------------ the frontier

    def _untouched(self, boxes: np.ndarray, grow: int = 0) -> np.ndarray:
        """Whether each box ``(t, l, b, r)``, grown by ``grow`` px, meets no block still to
        come."""
        if self.taken == len(self.tiles):
            return np.ones(len(boxes), dtype=bool)
        r, c = divmod(self.taken, self.columns)  # the next block
        t, l, b, rr = (boxes[:, 0] - grow, boxes[:, 1] - grow, boxes[:, 2] + grow,
                       boxes[:, 3] + grow)
        in_row = (t < self.ys[r + 1]) & (b > self.ys[r]) & (rr > self.xs[c])
        return ~(in_row | (b > self.ys[r + 1]))

    def add(self, probabilities: np.ndarray,
            intensity: Optional[np.ndarray] = None) -> List[Component]:
        """Take the next tile's probabilities (``(h, w)``, the tile's shape) and, optionally,
        its intensities (``(h, w)`` float64, as :attr:`~.image_io.LoadedImage.intensity`);
        returns the components completed, in id order."""
        if self.taken >= len(self.tiles):
            raise ValueError(f"all {len(self.tiles)} tiles were already added")
        tile = self.tiles[self.taken]
        probabilities = np.asarray(probabilities)
        if probabilities.shape != tile.shape or (
                intensity is not None and np.shape(intensity) != tile.shape):
            raise ValueError(f"a map of {probabilities.shape} (intensities "
                             f"{None if intensity is None else np.shape(intensity)}) for a tile "
                             f"of {tile.shape}")
        if self._lit is None:
            self._lit = intensity is not None
        elif self._lit != (intensity is not None):
            raise ValueError("intensities must be given with every tile or with none")
        y0, x0, y1, x1 = self.blocks[self.taken]
        r, c = divmod(self.taken, self.columns)
        inner = (slice(y0 - tile.top, y1 - tile.top), slice(x0 - tile.left, x1 - tile.left))
        values = probabilities[inner]
        local, number = ndimage.label(values > self.threshold, structure=_EIGHT)
        first = self.pieces + 1
        self._grow(self.pieces + number)
        ids = np.where(local > 0, local.astype(np.int64) + (first - 1), 0)
        if number:
            flat = local.ravel()
            areas = np.bincount(flat, minlength=number + 1)
            sums = np.bincount(flat, weights=values.ravel().astype(np.float64),
                               minlength=number + 1)
            light = np.zeros(number + 1) if intensity is None else np.bincount(
                flat, weights=np.asarray(intensity, dtype=np.float64)[inner].ravel(),
                minlength=number + 1)
            for k, where in enumerate(ndimage.find_objects(local), 1):
                self._open[first + k - 1] = [int(areas[k]), float(sums[k]), float(light[k]),
                                             y0 + where[0].start, x0 + where[1].start,
                                             y0 + where[0].stop, x0 + where[1].stop]
            self.pieces += number
            self.store.write((y0, x0, y1, x1), ids.astype(np.int32))
        # contacts across the block's top edge (three neighbours above) and left edge
        pairs = []
        if r > 0 and number:
            top = ids[0]
            for dx in (-1, 0, 1):
                xs = np.arange(x0, x1) + dx
                ok = (xs >= 0) & (xs < self.shape[1])
                pairs.append(np.stack([top[ok], self._above[xs[ok]]], axis=1))
        if c > 0 and number:
            left = ids[:, 0]
            for dy in (-1, 0, 1):
                ys = np.arange(left.size) + dy
                ok = (ys >= 0) & (ys < left.size)
                pairs.append(np.stack([left[ok], self._left[ys[ok]]], axis=1))
        if pairs:
            both = np.concatenate(pairs)
            self._union(both[(both[:, 0] > 0) & (both[:, 1] > 0)])
        self._left = ids[:, -1].copy()
        self._next_above[x0:x1] = ids[-1]
        if c == self.columns - 1:
            self._above, self._next_above = self._next_above, self._above
            self._next_above[:] = 0
        self.taken += 1
        self._reach((y0, x0, y1, x1))
        self.peak_open = max(self.peak_open, len(self._open))
        completed = self._complete()
        self.store.settle()
        return completed

    def _complete(self) -> List[Component]:
        if not self._open:
            return []
        roots = np.fromiter(self._open.keys(), dtype=np.int64, count=len(self._open))
        boxes = np.asarray([s[3:] for s in self._open.values()], dtype=np.int64)
        done = roots[self._untouched(boxes, grow=1)]
        out = []
        for root in np.sort(done).tolist():
            area, total, light, t, l, b, r = self._open.pop(root)
            # chunks of the box already taken hold none of its pixels (their boxes were open)
            region = self.store.read((t, l, b, r))
            present = np.unique(region)
            present = present[present > 0]
            mine = present[self._roots(present) == root]
            mask = np.isin(region, mine)
            if int(mask.sum()) != area:
                raise AssertionError(f"component {root}: {int(mask.sum())} pixels, {area} "
                                     f"counted")
            self.count += 1
            self._final[root] = self.count
            out.append(Component(self.count, total / area, (t, l, b, r), mask,
                                 light / area if self._lit else None))
        return out

    def final_chunks(self) -> List[Tuple[int, int]]:
        """Keys of the chunks reached so far whose labels are final (every block meeting
        them added, no open component's box meeting them), in grid order; each is named
        once."""
        if not self._reached:
            return []
        keys = sorted(self._reached)
        bounds = np.asarray([self.store.bounds(k) for k in keys], dtype=np.int64)
        ok = self._untouched(bounds)
        if self._open and ok.any():
            boxes = np.asarray([s[3:] for s in self._open.values()], dtype=np.int64)
            for n in np.flatnonzero(ok):
                t, l, b, r = bounds[n]
                if ((boxes[:, 0] < b) & (boxes[:, 2] > t) & (boxes[:, 1] < r)
                        & (boxes[:, 3] > l)).any():
                    ok[n] = False
        final = [k for k, good in zip(keys, ok) if good]
        self._reached.difference_update(final)
        return final

    def take(self, key: Tuple[int, int]) -> np.ndarray:
        """The final labels of chunk ``key`` (uint32), forgotten here."""
        values = self.store.pop(key)
        present, inverse = np.unique(values, return_inverse=True)
        final = self._final[self._roots(present.astype(np.int64))]
        if (final[present > 0] == 0).any():
            raise AssertionError(f"chunk {key} taken with an open component in it")
        self.chunks_taken += 1
        return final[inverse].reshape(values.shape).astype(np.uint32, copy=False)
