#!/usr/bin/env python
"""Benchmarks (not tests): time the project's heavy paths on realistic inputs.

    python tools/benchmark.py convert             # DSB2018 -> COCO on a DSB-size synthetic set
    python tools/benchmark.py predict             # prediction MP/s, whole image and tiled
    python tools/benchmark.py necks               # Mask R-CNN cost of each neck vs FPN

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

import torch

from sharp_fpn.utils import write_text_atomic

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
        help="one checkpoint per config, or 'random' (default: random weights for all; a Mask "
        "R-CNN's cost grows with its detections, so trained weights give the realistic figure)",
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
    from sharp_fpn.d2.predictor import NucleiPredictor

    if args.weights and len(args.weights) != len(args.configs):
        raise SystemExit(f"--weights: {len(args.weights)} given for {len(args.configs)} configs")
    height, width = args.size
    rgb = np.ascontiguousarray(
        generate_image(np.random.default_rng(0), height, width, "fluorescence")[0][..., :3]
    )
    megapixels = height * width / 1e6
    results = {}
    for k, config in enumerate(args.configs):
        weights = args.weights[k] if args.weights and args.weights[k] != "random" else None
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


# --------------------------------------------------------------------------------------------
# necks: Mask R-CNN inference cost of each grid neck beside detectron2's own FPN

#: name -> (config scheme, extra options). "sharp-256": the paper's grid as it is (every node
#: 256 wide, nothing reduced): the faithful, expensive variant.
NECK_VARIANTS: dict[str, tuple[str, list[str]]] = {
    "fpn": ("fpn", []),
    "2plus": ("2plus", []),
    "3plus": ("3plus", []),
    "sharp": ("sharp", []),
    "sharp-256": ("sharp", ["MODEL.SHARP_FPN.WIDTHS", "[256, 256, 256, 256]",
                            "MODEL.SHARP_FPN.REDUCE_UPSAMPLED", "False"]),
}


def _necks_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, default=512, help="square input side (%(default)s)")
    parser.add_argument("--backbones", nargs="+", default=["R101", "VGG16"], choices=["R101", "VGG16"])
    parser.add_argument("--necks", nargs="+", default=list(NECK_VARIANTS), choices=list(NECK_VARIANTS))
    parser.add_argument("--repeat", type=int, default=5,
                        help="timed inferences per model, interleaved across models (%(default)s)")
    parser.add_argument("--detections", type=int, default=100,
                        help="detections every model returns, so the heads do equal work (%(default)s)")


def _neck_config(backbone: str, neck: str, detections: int):
    from sharp_fpn.d2.engine import get_config

    scheme, extra = NECK_VARIANTS[neck]
    # Random weights give random scores: keep the top `detections` boxes without a score
    # threshold or NMS, so the box and mask heads do the same work behind every neck.
    return get_config(f"configs/mask_rcnn_{scheme}_{backbone}.yaml", [
        "MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
        "MODEL.ROI_HEADS.NMS_THRESH_TEST", "1.0", "TEST.DETECTIONS_PER_IMAGE", str(detections),
        *extra,
    ])


def _calibrated_model(cfg, image):
    """The model with random weights whose frozen norms are set to the statistics of ``image``.

    A randomly initialised ResNet with FrozenBN (identity statistics) lets activations grow
    block after block until boxes and scores are not finite; one calibrating pass, in which
    every FrozenBN takes the mean and variance of its own input, keeps them at unit scale.
    """
    from detectron2.layers import FrozenBatchNorm2d
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = build_model(cfg).eval()

    def calibrate(module, inputs):
        x = inputs[0]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)))
        module.weight.fill_(1.0)
        module.bias.zero_()

    hooks = [m.register_forward_pre_hook(calibrate) for m in model.modules()
             if isinstance(m, FrozenBatchNorm2d)]
    with torch.no_grad():
        model([{"image": image}])
    for hook in hooks:
        hook.remove()
    return model


class _TensorOutputs(torch.nn.Module):
    """A detectron2 model as a function of one image tensor returning tensors, for fvcore.

    (detectron2's own FlopCountAnalysis goes through detectron2.export, which v0.6 cannot
    import without caffe2.)
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        instances = self.model([{"image": image}])[0]["instances"]
        return instances.pred_boxes.tensor, instances.scores, instances.pred_masks


def _neck_memory(backbone: str, neck: str, detections: int, size: int) -> dict[str, float]:
    """Peak resident memory (MiB) of a fresh process that builds the model and runs it twice."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    model = _calibrated_model(_neck_config(backbone, neck, detections), image)
    with torch.no_grad():
        model([{"image": image}])
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so a spawned child would
    # report its parent's peak.
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    return {"peak_rss_mib": round(kib / 1024, 1)}


def run_necks(args: argparse.Namespace) -> dict[str, Any]:
    """Parameters, GFLOPs, median latency and peak memory of Mask R-CNN with each neck.

    All models run in one process, their timed inferences interleaved round by round, so a
    change in the machine's load hits every model alike; ratios are to the plain FPN on the
    same backbone.
    """
    import multiprocessing
    import statistics

    from fvcore.nn import FlopCountAnalysis

    image = torch.randint(0, 256, (3, args.size, args.size), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    models, rows = {}, {}
    for backbone in args.backbones:
        for neck in args.necks:
            key = f"{backbone} {neck}"
            model = _calibrated_model(_neck_config(backbone, neck, args.detections), image)
            neck_params = sum(p.numel() for n, p in model.backbone.named_parameters()
                              if not n.startswith("bottom_up."))
            flops = FlopCountAnalysis(_TensorOutputs(model), (image,))
            flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            by_module = flops.by_module()
            rows[key] = {
                "backbone": backbone, "neck": neck,
                "params_total_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
                "params_neck_M": round(neck_params / 1e6, 3),
                "gflops_total": round(flops.total() / 1e9, 2),
                "gflops_neck": round(
                    (by_module["model.backbone"] - by_module["model.backbone.bottom_up"]) / 1e9, 2
                ),
                "seconds": [],
            }
            models[key] = model
            print(f"built {key}: {rows[key]['params_total_M']} M parameters, "
                  f"{rows[key]['gflops_total']} GFLOPs", flush=True)

    with torch.no_grad():
        for key, model in models.items():  # warm-up
            model([{"image": image}])
        for round_ in range(args.repeat):
            for key, model in models.items():
                start = time.perf_counter()
                outputs = model([{"image": image}])
                rows[key]["seconds"].append(time.perf_counter() - start)
                rows[key]["detections"] = len(outputs[0]["instances"])
            print(f"round {round_ + 1}/{args.repeat} done (load {os.getloadavg()[0]:.1f})", flush=True)

    context = multiprocessing.get_context("spawn")
    os.environ["BENCH_THREADS"] = str(torch.get_num_threads())
    with context.Pool(1, maxtasksperchild=1) as pool:
        for key, row in rows.items():
            row.update(pool.apply(_neck_memory, (row["backbone"], row["neck"], args.detections, args.size)))

    for key, row in rows.items():
        row["median_latency_ms"] = round(1000 * statistics.median(row["seconds"]), 1)
        row["seconds"] = [round(s, 3) for s in row["seconds"]]
        base = rows.get(f"{row['backbone']} fpn")
        if base:
            for field in ("params_total_M", "gflops_total", "median_latency_ms", "peak_rss_mib"):
                row[f"{field}_vs_fpn"] = round(row[field] / base[field], 3)
    table = _necks_table(rows, args)
    print(table)
    write_text_atomic(args.out_dir / "necks.md", table)
    return {"size": args.size, "torch_threads": torch.get_num_threads(),
            "load_average_after": round(os.getloadavg()[0], 1), "rows": rows}


def _necks_table(rows: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"Mask R-CNN inference, {args.size}x{args.size}, CPU, random weights, GFLOPs as fvcore "
        "counts them (multiply-adds), "
        f"{args.detections} detections per model, median of {args.repeat} interleaved runs; "
        "ratios to the plain FPN on the same backbone.",
        "",
        "| model | params (M) | neck params (M) | GFLOPs | neck GFLOPs | latency (ms) | peak RSS (MiB) "
        "| params x | GFLOPs x | latency x | memory x |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in rows.items():
        lines.append(
            f"| {key} | {r['params_total_M']} | {r['params_neck_M']} | {r['gflops_total']} "
            f"| {r['gflops_neck']} | {r['median_latency_ms']} | {r['peak_rss_mib']} "
            f"| {r.get('params_total_M_vs_fpn', '')} | {r.get('gflops_total_vs_fpn', '')} "
            f"| {r.get('median_latency_ms_vs_fpn', '')} | {r.get('peak_rss_mib_vs_fpn', '')} |"
        )
    return "\n".join(lines) + "\n"


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
    "necks": Benchmark(
        "Mask R-CNN with each neck: parameters, GFLOPs, latency, memory, ratios to FPN",
        _necks_arguments,
        run_necks,
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
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
