#!/usr/bin/env python
"""Benchmarks (not tests): time the project's heavy paths on realistic inputs.

    python tools/benchmark.py convert             # DSB2018 -> COCO on a DSB-size synthetic set
    python tools/benchmark.py predict             # prediction MP/s, whole image and tiled

Each subcommand prints its figures and writes them, with the machine and the arguments, to
``output/benchmarks/<subcommand>.json`` (``--out-dir`` to change). A new benchmark is one
function taking its parsed arguments and returning its figures, plus one that declares its
arguments, registered in :data:`BENCHMARKS`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

DEFAULT_OUT_DIR = Path("output/benchmarks")


@dataclass(frozen=True)
class Benchmark:
    """One subcommand: its help line, its arguments and the function that measures."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], dict[str, Any]]


# --------------------------------------------------------------------------------------------
# convert: DSB2018 -> COCO


def _convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-images", type=int, default=670, help="images (%(default)s, DSB's)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (%(default)s)")
    parser.add_argument(
        "--cache",
        type=Path,
        help="folder of the synthetic set, generated once and reused "
        "(default: <out-dir>/cache/dsb_synth_<num-images>_seed<seed>)",
    )
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time (%(default)s)"
    )


def _synthetic_set(folder: Path, num_images: int, seed: int) -> float:
    """Generate the synthetic DSB2018 set into ``folder`` unless it is there; return seconds.

    The set is reused only if made with the same arguments by the same generator source.
    """
    from sharp_fpn.data import synthetic

    marker = folder / "benchmark_set.json"
    wanted = {
        "num_images": num_images,
        "seed": seed,
        "split": "stage1_train",
        "generator_sha256": hashlib.sha256(Path(synthetic.__file__).read_bytes()).hexdigest(),
    }
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return 0.0
    start = time.perf_counter()
    synthetic.write_dataset(folder, num_images, seed, split="stage1_train", overwrite=True)
    seconds = time.perf_counter() - start
    marker.write_text(json.dumps(wanted))
    return seconds


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its waited-for child processes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _time_conversion(
    root: Path, labels_csv: Optional[Path], workers: int, scratch: Path
) -> tuple[float, float, dict[str, Any], str]:
    """Convert and write the JSON as the CLI does.

    Returns wall seconds, CPU seconds (all processes), the COCO dict and the JSON's sha256.
    """
    from sharp_fpn.data.dsb2018 import convert_split, write_json_atomic

    out = scratch / "coco.json"
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    coco = convert_split(root, "stage1_train", labels_csv, workers=workers, on_warning=print)
    write_json_atomic(coco, out)
    wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
    return wall, cpu, coco, hashlib.sha256(out.read_bytes()).hexdigest()


def run_convert(args: argparse.Namespace) -> dict[str, Any]:
    """Time the folder and the CSV conversion of a DSB-size synthetic set per worker count."""
    cache = args.cache or args.out_dir / "cache" / f"dsb_synth_{args.num_images}_seed{args.seed}"
    generation = _synthetic_set(cache, args.num_images, args.seed)
    sources = {"folders": None, "csv": cache / "stage1_train_labels.csv"}
    seconds: dict[str, dict[str, float]] = {name: {} for name in sources}
    cpu_seconds: dict[str, dict[str, float]] = {name: {} for name in sources}
    load = {}
    digests = set()
    coco: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, labels_csv in sources.items():
            for workers in args.workers:
                load[f"{name}_{workers}"] = round(os.getloadavg()[0], 1)
                wall, cpu, coco, digest = _time_conversion(
                    cache, labels_csv, workers, Path(scratch)
                )
                seconds[name][str(workers)] = round(wall, 2)
                cpu_seconds[name][str(workers)] = round(cpu, 2)
                digests.add(digest)
                print(f"{name:8s} {workers} worker(s): {wall:6.1f} s wall, {cpu:6.1f} s CPU")
    masks_per_image = Counter(a["image_id"] for a in coco["annotations"])
    sizes = Counter(f"{im['height']}x{im['width']}" for im in coco["images"])
    lo, hi = str(min(args.workers)), str(max(args.workers))
    return {
        "dataset": str(cache),
        "generation_s": round(generation, 1),  # 0: reused from the cache
        "images": len(coco["images"]),
        "masks": len(coco["annotations"]),
        "masks_per_image": round(len(coco["annotations"]) / len(coco["images"]), 1),
        "max_masks_per_image": max(masks_per_image.values(), default=0),
        "size_mix": dict(sizes.most_common()),
        "seconds": seconds,  # wall clock, convert + write the JSON
        "cpu_seconds": cpu_seconds,  # all processes: the work, whatever else loads the machine
        "load_average_before": load,  # 1-minute load average as each run started
        f"speedup_{hi}_vs_{lo}_workers": {
            name: round(s[lo] / s[hi], 2) for name, s in seconds.items()
        },
        "csv_vs_folders": {w: round(seconds["csv"][w] / seconds["folders"][w], 2)
                           for w in seconds["csv"]},
        "identical_json": len(digests) == 1,
    }


# --------------------------------------------------------------------------------------------
# predict: nuclei prediction throughput (tools/predict.py's library), whole image and tiled


def _predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--configs", nargs="+", default=["configs/demo/mask_rcnn_fpn_R18.yaml"],
        help="model configs (%(default)s)",
    )
    parser.add_argument(
        "--weights", nargs="+",
        help="one checkpoint per config (default: random weights; a Mask R-CNN's cost grows "
        "with its detections, so trained weights give the realistic figure)",
    )
    parser.add_argument("--size", type=int, nargs=2, default=[1024, 1024], metavar=("H", "W"),
                        help="synthetic image size (%(default)s)")
    parser.add_argument("--tile", type=int, default=256, help="tile side (%(default)s)")
    parser.add_argument("--overlap", type=int, default=32, help="tile overlap (%(default)s)")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per mode (%(default)s)")
    parser.add_argument("--score-threshold", type=float, default=0.5)


def run_predict(args: argparse.Namespace) -> dict[str, Any]:
    """Megapixels of input image per second, whole-image and tiled, per config, on the CPU."""
    import numpy as np
    import torch

    from sharp_fpn.data.synthetic import generate_image
    from sharp_fpn.predict import NucleiPredictor

    if args.weights and len(args.weights) != len(args.configs):
        raise SystemExit(f"--weights: {len(args.weights)} given for {len(args.configs)} configs")
    height, width = args.size
    rgb = np.ascontiguousarray(
        generate_image(np.random.default_rng(0), height, width, "fluorescence")[0][..., :3]
    )
    megapixels = height * width / 1e6
    results = {}
    for k, config in enumerate(args.configs):
        weights = args.weights[k] if args.weights else None
        torch.manual_seed(0)
        predictor = NucleiPredictor(config, weights, device="cpu",
                                    score_threshold=args.score_threshold)
        predictor.predict(rgb[: args.tile, : args.tile], tile=0)  # warm-up
        per_mode = {}
        for mode, tile in (("whole_image", 0), ("tiled", args.tile)):
            load = round(os.getloadavg()[0], 1)
            seconds, cpu = [], []
            for _ in range(args.repeat):
                start, cpu_start = time.perf_counter(), _cpu_seconds()
                prediction = predictor.predict(rgb, tile=tile, overlap=args.overlap)
                seconds.append(time.perf_counter() - start)
                cpu.append(_cpu_seconds() - cpu_start)
            best = min(seconds)
            per_mode[mode] = {
                "tiles": prediction.tiles,
                "nuclei": prediction.count,
                "seconds": [round(s, 2) for s in seconds],
                "cpu_seconds": [round(c, 2) for c in cpu],
                "megapixels_per_s": round(megapixels / best, 3),  # best of the runs
                "load_average_before": load,
            }
            print(f"{config} {mode:11s}: {megapixels / best:6.3f} MP/s "
                  f"({best:.1f} s, {prediction.tiles} tiles, {prediction.count} nuclei)")
        results[config] = {
            "weights": weights or "random",
            "test_preprocessing": repr(predictor.augmentations),
            **per_mode,
        }
    return {"image": [height, width], "torch_threads": torch.get_num_threads(),
            "results": results}


BENCHMARKS: dict[str, Benchmark] = {
    "convert": Benchmark(
        "DSB2018 -> COCO conversion (folders and CSV) on a DSB-size synthetic set",
        _convert_arguments,
        run_convert,
    ),
    "predict": Benchmark(
        "nuclei prediction throughput (MP/s), whole image and tiled, per config",
        _predict_arguments,
        run_predict,
    ),
}


# --------------------------------------------------------------------------------------------


def _machine() -> dict[str, Any]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cores": cores,
        "python": platform.python_version(),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="results folder (%(default)s)"
    )
    commands = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, benchmark in BENCHMARKS.items():
        benchmark.add_arguments(commands.add_parser(name, help=benchmark.help))
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    figures = BENCHMARKS[args.benchmark].run(args)
    record = {
        "benchmark": args.benchmark,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(),
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "figures": figures,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"{args.benchmark}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
