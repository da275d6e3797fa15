"""necks: the inference cost of Mask R-CNN with each grid neck beside detectron2's own FPN.

Per (backbone, neck): parameters (whole model and neck), GFLOPs (fvcore, multiply-adds), the
latency of one image, the peak memory of a fresh process running it; ratios to the plain FPN
on the same backbone. All models are built in one process and timed by the one policy
(interleaved rounds after a warm-up, fastest round), so a change of the machine's load hits
every model alike. Random weights with calibrated frozen norms
(:func:`sharp_fpn.d2.calibration.calibrated_random_model`), no score threshold nor NMS, the
top ``--detections`` boxes kept: the box and mask heads do the same work behind every neck.
Writes ``necks.md`` beside the JSON.
"""
from __future__ import annotations

import argparse
import multiprocessing
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from ...experiments.tables import PROJECT_ROOT
from ...utils import write_text_atomic
from ..timing import time_interleaved

#: name -> (config scheme, extra options). "sharp-256": the paper's grid as it is (every node
#: 256 wide, nothing reduced): the faithful, expensive variant.
NECK_VARIANTS: Dict[str, Tuple[str, List[str]]] = {
    "fpn": ("fpn", []),
    "2plus": ("2plus", []),
    "3plus": ("3plus", []),
    "sharp": ("sharp", []),
    "sharp-256": ("sharp", ["MODEL.SHARP_FPN.WIDTHS", "[256, 256, 256, 256]",
                            "MODEL.SHARP_FPN.REDUCE_UPSAMPLED", "False"]),
}
BACKBONES = ("R101", "VGG16")
RATIO_FIELDS = ("params_total_M", "gflops_total", "latency_ms", "peak_rss_mib")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, default=512, help="square input side (%(default)s)")
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=BACKBONES)
    parser.add_argument("--necks", nargs="+", default=list(NECK_VARIANTS),
                        choices=list(NECK_VARIANTS))
    parser.add_argument("--repeat", type=int, default=5,
                        help="timed rounds, interleaved across models (%(default)s)")
    parser.add_argument("--detections", type=int, default=100,
                        help="detections every model returns, so the heads do equal work "
                        "(%(default)s)")
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip the peak-memory processes (one per model)")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides for every model, KEY VALUE pairs (last option)")


def neck_config(backbone: str, neck: str, detections: int, opts: Sequence[str] = ()
                ) -> Tuple[str, List[str]]:
    """(config file, options) of Mask R-CNN with ``neck`` on ``backbone``: random weights give
    random scores, so every model keeps its top ``detections`` boxes, no threshold nor NMS;
    ``opts`` last."""
    scheme, extra = NECK_VARIANTS[neck]
    config = PROJECT_ROOT / "configs" / f"mask_rcnn_{scheme}_{backbone}.yaml"
    return str(config), [
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "MODEL.ROI_HEADS.NMS_THRESH_TEST", "1.0",
        "TEST.DETECTIONS_PER_IMAGE", str(detections), *extra, *opts,
    ]


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Rows of parameters, GFLOPs, latency (fastest round, ms) and peak memory per model."""
    import torch

    from ...d2.analysis import flop_counts, inference_peak_rss_mib, neck_model, parameter_counts

    models, rows = {}, {}
    for backbone in args.backbones:
        for neck in args.necks:
            key = f"{backbone} {neck}"
            config, opts = neck_config(backbone, neck, args.detections, args.opts)
            model, image = neck_model(config, opts, args.size)
            params = parameter_counts(model)
            flops = flop_counts(model, image, ["backbone", "backbone.bottom_up"])
            rows[key] = {
                "backbone": backbone, "neck": neck,
                "params_total_M": round(params["total"] / 1e6, 3),
                "params_neck_M": round(params["neck"] / 1e6, 3),
                "gflops_total": round(flops["total"] / 1e9, 2),
                "gflops_neck": round((flops["backbone"] - flops["backbone.bottom_up"]) / 1e9, 2),
            }
            models[key] = (model, image)
            print(f"built {key}: {rows[key]['params_total_M']} M parameters, "
                  f"{rows[key]['gflops_total']} GFLOPs", flush=True)

    detections: Dict[str, int] = {}

    def inference(key: str):
        model, image = models[key]

        def run_once() -> None:
            detections[key] = len(model([{"image": image}])[0]["instances"])

        return run_once

    with torch.no_grad():
        timings = time_interleaved({key: inference(key) for key in models}, rounds=args.repeat)
    for key, timing in timings.items():
        rows[key].update(latency_ms=round(1000 * timing.best, 1),
                         rounds_ms=[round(1000 * s, 1) for s in timing.rounds],
                         detections=detections[key])

    if args.memory:
        context = multiprocessing.get_context("spawn")
        threads = torch.get_num_threads()
        with context.Pool(1, maxtasksperchild=1) as pool:
            for key, row in rows.items():
                config, opts = neck_config(row["backbone"], row["neck"], args.detections,
                                           args.opts)
                row["peak_rss_mib"] = pool.apply(inference_peak_rss_mib,
                                                 (config, opts, args.size, threads))

    for row in rows.values():
        base = rows.get(f"{row['backbone']} fpn")
        if base:
            for field in RATIO_FIELDS:
                if field in row and base.get(field):
                    row[f"{field}_vs_fpn"] = round(row[field] / base[field], 3)
    table = markdown(rows, args)
    print(table)
    write_text_atomic(Path(args.out_dir) / "necks.md", table)
    return {"size": args.size, "torch_threads": torch.get_num_threads(), "rows": rows}


def markdown(rows: Dict[str, Dict[str, Any]], args: argparse.Namespace) -> str:
    """``necks.md``: one line per model, ratios to the plain FPN on the same backbone."""
    lines = [
        f"Mask R-CNN inference, {args.size}x{args.size}, CPU, random weights, GFLOPs as fvcore "
        f"counts them (multiply-adds), {args.detections} detections per model, latency the "
        f"fastest of {args.repeat} interleaved rounds; ratios to the plain FPN on the same "
        "backbone." + (f" Options: {' '.join(args.opts)}." if args.opts else ""),
        "",
        "| model | params (M) | neck params (M) | GFLOPs | neck GFLOPs | latency (ms) "
        "| peak RSS (MiB) | params x | GFLOPs x | latency x | memory x |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in rows.items():
        lines.append(
            f"| {key} | {r['params_total_M']} | {r['params_neck_M']} | {r['gflops_total']} "
            f"| {r['gflops_neck']} | {r['latency_ms']} | {r.get('peak_rss_mib', '')} "
            f"| {r.get('params_total_M_vs_fpn', '')} | {r.get('gflops_total_vs_fpn', '')} "
            f"| {r.get('latency_ms_vs_fpn', '')} | {r.get('peak_rss_mib_vs_fpn', '')} |"
        )
    return "\n".join(lines) + "\n"
