"""predict: nuclei prediction throughput (:class:`sharp_fpn.d2.predictor.NucleiPredictor`, the
library of ``tools/predict.py``), whole image and tiled, per config, on the CPU.

Every (config, mode) pair is a candidate of the one timing policy (interleaved rounds, fastest
round); each predictor is first warmed up on one tile. Megapixels of input image per second.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Dict

from ...experiments.tables import PROJECT_ROOT
from ..measure import cpu_seconds
from ..timing import time_interleaved

MODES = {"whole_image": False, "tiled": True}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--configs", nargs="+", default=["configs/demo/mask_rcnn_fpn_R18.yaml"],
        help="model configs, relative to the checkout (%(default)s)",
    )
    parser.add_argument(
        "--weights", nargs="+",
        help="one checkpoint per config, or 'random' (default: random weights for all; a Mask "
        "R-CNN's cost grows with its detections, so trained weights give the realistic figure)",
    )
    parser.add_argument("--size", type=int, nargs=2, default=[1024, 1024], metavar=("H", "W"),
                        help="synthetic image size (%(default)s)")
    parser.add_argument("--tile", type=int, default=256, help="tile side (%(default)s)")
    parser.add_argument("--overlap", type=int, default=32, help="tile overlap (%(default)s)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed rounds, interleaved across configs and modes (%(default)s)")
    parser.add_argument("--score-threshold", type=float, default=0.5)


def _config_path(config: str) -> str:
    path = Path(config)
    return str(path if path.is_absolute() or path.is_file() else PROJECT_ROOT / path)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Megapixels per second (fastest round) per config and mode; the tiled/whole ratio."""
    import numpy as np
    import torch

    from ...d2.predictor import NucleiPredictor
    from ...data.synthetic import generate_image

    if args.weights and len(args.weights) != len(args.configs):
        raise SystemExit(f"--weights: {len(args.weights)} given for {len(args.configs)} configs")
    height, width = args.size
    rgb = np.ascontiguousarray(
        generate_image(np.random.default_rng(0), height, width, "fluorescence")[0][..., :3]
    )
    megapixels = height * width / 1e6
    candidates: Dict[str, Callable[[], None]] = {}
    records: Dict[str, Dict[str, Any]] = {}
    predictors = {}
    for k, config in enumerate(args.configs):
        weights = args.weights[k] if args.weights and args.weights[k] != "random" else None
        torch.manual_seed(0)
        predictor = NucleiPredictor(_config_path(config), weights, device="cpu",
                                    score_threshold=args.score_threshold)
        predictor.predict(rgb[: args.tile, : args.tile], tile=0)  # warm-up
        predictors[config] = (predictor, weights)
        for mode, tiled in MODES.items():
            key = f"{config} {mode}"
            record = records[key] = {"cpu_s": []}

            def predict(predictor=predictor, tile=args.tile if tiled else 0, record=record):
                cpu_start = cpu_seconds()
                record["prediction"] = predictor.predict(rgb, tile=tile, overlap=args.overlap)
                record["cpu_s"].append(cpu_seconds() - cpu_start)

            candidates[key] = predict
    timings = time_interleaved(candidates, rounds=args.repeat, warmup=0)
    results = {}
    for config, (predictor, weights) in predictors.items():
        per_mode = {}
        for mode in MODES:
            key = f"{config} {mode}"
            timing, prediction = timings[key], records[key]["prediction"]
            per_mode[mode] = {
                "tiles": prediction.tiles,
                "nuclei": prediction.count,
                "seconds": round(timing.best, 3),
                "rounds_s": [round(s, 3) for s in timing.rounds],
                "cpu_seconds": [round(c, 2) for c in records[key]["cpu_s"]],
                "megapixels_per_s": round(timing.per_second(megapixels), 3),
            }
            print(f"{config} {mode:11s}: {timing.per_second(megapixels):6.3f} MP/s "
                  f"({timing.best:.2f} s, {prediction.tiles} tiles, {prediction.count} nuclei)")
        results[config] = {
            "weights": weights or "random",
            "test_preprocessing": repr(predictor.augmentations),
            **per_mode,
            "tiled_vs_whole_image_time": round(
                timings[f"{config} tiled"].best / timings[f"{config} whole_image"].best, 3),
        }
    return {"image": [height, width], "torch_threads": torch.get_num_threads(),
            "results": results}
