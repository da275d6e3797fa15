"""large: peak memory and time of :func:`sharp_fpn.predict.large.segment_large` on images of
4k, 16k and 30k px (square, or of one ``--width`` and those heights), each run in its own
process.

Each image is a procedural field of nuclei (:func:`blob_window`: discs on a jittered grid, 16-bit
with noise, a pure function of the pixel's position) written by tifffile as a tiled BigTIFF
from a generator of tiles (:func:`write_blob_tiff`), never whole in memory. A child process
(``python -m sharp_fpn.perf.benchmarks.large``) segments it and reports its own peak resident
memory (``getrusage(RUSAGE_SELF).ru_maxrss``), its resident memory once the model is loaded
and before the image is touched, the wall time, and :class:`~sharp_fpn.predict.large.
LargeResult`'s counters (label chunks held at most and spilled to disk, undecided instances
held at most).

``--model threshold`` (default) segments with :class:`~sharp_fpn.predict.large.ThresholdModel`
(the outputs' and memory's shape at a threshold's speed: a 30k image in minutes on 2 cores);
``--model zoo`` with the shipped default model (about 1.4 MP/s on this CPU: a 30k image takes
over ten minutes). The images are deleted after each size unless ``--keep``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator

import numpy as np


#: The checkout the child runs in (``python -m sharp_fpn...`` finds the package there).
PROJECT_ROOT = Path(__file__).resolve().parents[3]
#: Grid cell of the procedural nuclei (px): at most one disc per cell, inside it.
CELL = 32
_MIX = np.uint64(0x9E3779B97F4A7C15)


def _hash(*keys: np.ndarray) -> np.ndarray:
    """A 64-bit mix (splitmix64's finaliser) of integer arrays, uniform floats in [0, 1)."""
    value = np.zeros(np.broadcast(*keys).shape, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in keys:
            value = (value ^ np.asarray(k).astype(np.uint64)) * _MIX
            value ^= value >> np.uint64(31)
            value *= np.uint64(0xBF58476D1CE4E5B9)
            value ^= value >> np.uint64(29)
    return (value >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def blob_window(top: int, left: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """``(height, width)`` uint16 pixels at ``[top, top + height) x [left, left + width)`` of
    the procedural image ``seed``: in each ``CELL``-px cell, with probability 0.8, a disc of
    radius 6..11 px, jittered within the cell, of brightness 1500..4000 over a background of
    ~300 with noise (standard deviation ~30). Windows of one image agree where they overlap."""
    ys = np.arange(top, top + height)[:, None]
    xs = np.arange(left, left + width)[None, :]
    cy, cx = ys // CELL, xs // CELL
    value = 300.0 + 30.0 * np.sqrt(12.0) * (_hash(seed + 1, ys, xs) - 0.5)
    present = _hash(seed, cy, cx, 0) < 0.8
    radius = 6.0 + 5.0 * _hash(seed, cy, cx, 1)
    room = CELL / 2 - radius - 1.0
    centre_y = cy * CELL + CELL / 2 + room * (2.0 * _hash(seed, cy, cx, 2) - 1.0)
    centre_x = cx * CELL + CELL / 2 + room * (2.0 * _hash(seed, cy, cx, 3) - 1.0)
    bright = 1500.0 + 2500.0 * _hash(seed, cy, cx, 4)
    inside = present & ((ys + 0.5 - centre_y) ** 2 + (xs + 0.5 - centre_x) ** 2 < radius ** 2)
    return np.rint(np.where(inside, value + bright, value)).astype(np.uint16)


def write_blob_tiff(path: os.PathLike, height: int, width: int, tile: int = 512,
                    seed: int = 0) -> Path:
    """The procedural image as a tiled, uncompressed BigTIFF written tile by tile (tifffile
    from a generator: never more than one tile in memory)."""
    import tifffile

    def tiles() -> Iterator[np.ndarray]:
        for top in range(0, height, tile):
            for left in range(0, width, tile):
                yield blob_window(top, left, tile, tile, seed)

    path = Path(path)
    tifffile.imwrite(path, tiles(), shape=(height, width), dtype=np.uint16, tile=(tile, tile),
                     bigtiff=True, photometric="minisblack")
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 30000],
                        help="square image sides in px (%(default)s)")
    parser.add_argument("--width", type=int, default=None,
                        help="image width in px; default square images (with --width the sizes "
                        "are heights)")
    parser.add_argument("--model", choices=("threshold", "zoo"), default="threshold",
                        help="threshold: a cheap stand-in (ThresholdModel); zoo: the shipped "
                        "default model (%(default)s)")
    parser.add_argument("--tile", type=int, default=1024, help="tile side (%(default)s)")
    parser.add_argument("--overlap", type=int, default=64, help="tile overlap (%(default)s)")
    parser.add_argument("--chunk", type=int, default=512, help="label chunk side (%(default)s)")
    parser.add_argument("--label-memory-mb", type=float, default=None,
                        help="label chunks held in memory at most, MB (default: segment_large's)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where the images and outputs go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the images and outputs")


def _child(image: Path, out: Path, model_name: str, tile: int, overlap: int,
           chunk: int, label_memory_mb: float) -> Dict[str, Any]:
    """One measurement, in this (fresh) process."""
    from ...predict.large import LargeOutputs, ThresholdModel, segment_large

    if model_name == "zoo":
        import torch

        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
        from ... import model_zoo
        from ...d2.predictor import NucleiPredictor

        config, weights = model_zoo.resolve()
        model: Any = NucleiPredictor(config, weights)
    else:
        # after the stretch (0.1..99.9th percentiles) the discs are above ~100
        model = ThresholdModel(level=100.0, min_area=20)
    setup_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    result = segment_large(image, LargeOutputs(out / "labels.ome.zarr", out / "nuclei.csv",
                                               chunk=chunk),
                           predictor=model, tile=tile, overlap=overlap, progress=False,
                           label_memory_mb=label_memory_mb)
    seconds = time.perf_counter() - started
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "tiles": result.tiles, "nuclei": result.nuclei, "seconds": round(seconds, 1),
        "megapixels_per_s": round(result.shape[0] * result.shape[1] / 1e6 / seconds, 3),
        "rss_after_setup_mb": round(setup_kb / 1024, 1), "peak_rss_mb": round(peak_kb / 1024, 1),
        "label_chunk_budget": int(label_memory_mb * 2 ** 20 // (4 * chunk * chunk)),
        "peak_chunks_held": result.peak_chunks_held, "chunks_spilled": result.chunks_spilled,
        "peak_pending": result.peak_pending,
    }


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Per size: the image's writing time, and the child's figures (module docstring)."""
    import shutil

    from ...predict.large import DEFAULT_LABEL_MEMORY_MB

    memory = args.label_memory_mb or DEFAULT_LABEL_MEMORY_MB
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="sharp_fpn_large_"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for size in args.sizes:
            width = args.width or size
            image = work / f"blobs_{size}x{width}.tif"
            out = work / f"out_{size}x{width}"
            out.mkdir(exist_ok=True)
            started = time.perf_counter()
            write_blob_tiff(image, size, width)
            written_s = time.perf_counter() - started
            command = [sys.executable, "-m", "sharp_fpn.perf.benchmarks.large", str(image),
                       str(out), args.model, str(args.tile), str(args.overlap), str(args.chunk), str(memory)]
            started = time.perf_counter()
            done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True)
            wall = time.perf_counter() - started
            if done.returncode != 0:
                raise RuntimeError(f"size {size}: the child failed:\n{done.stderr[-3000:]}")
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            record = {"size": size, "height": size, "width": width,
                      "megapixels": round(size * width / 1e6, 1),
                      "image_bytes": image.stat().st_size,
                      "image_written_s": round(written_s, 1), "child_wall_s": round(wall, 1),
                      **figures}
            print(f"{size:6d} x {width:6d} px: {figures['seconds']:8.1f} s, peak RSS "
                  f"{figures['peak_rss_mb']:8.1f} MB (after setup {figures['rss_after_setup_mb']}"
                  f" MB), {figures['nuclei']} nuclei, label chunks held {figures['peak_chunks_held']}, "
                  f"spilled {figures['chunks_spilled']}, undecided {figures['peak_pending']}")
            results.append(record)
            if not args.keep:
                image.unlink()
                shutil.rmtree(out)
    finally:
        if not args.keep and args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    peaks = [r["peak_rss_mb"] for r in results]
    return {"model": args.model, "tile": args.tile, "overlap": args.overlap,
            "chunk": args.chunk, "label_memory_mb": memory, "results": results,
            "peak_rss_largest_over_smallest": round(max(peaks) / min(peaks), 3) if peaks else None}


if __name__ == "__main__":  # the child: image out model tile overlap chunk label-memory-mb
    image_arg, out_arg, model_arg, tile_arg, overlap_arg, chunk_arg, memory_arg = sys.argv[1:8]
    print(json.dumps(_child(Path(image_arg), Path(out_arg), model_arg, int(tile_arg),
                            int(overlap_arg), int(chunk_arg), float(memory_arg))))
