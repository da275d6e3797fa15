#!/usr/bin/env python
"""Export trained models for deployment (torch.export and ONNX; TorchScript for Mask R-CNN).

    # UNet family, per pruning level <name>_L<k>.pt2 (torch.export) and .onnx (dynamo exporter):
    python tools/export.py unet --config-file CFG --weights W --output export/  # trained
    python tools/export.py unet --arch unet_sharp --output export/              # random weights
    # Mask R-CNN: <name>.ts (TorchScript) through detectron2's TracingAdapter, traced on a
    # sample image (torch.export cannot export detectron2 v0.6's R-CNN: sharp_fpn/d2/export.py)
    python tools/export.py mask-rcnn --config-file CFG --weights W --output export/ \
        [--image IMG]

Models are exported on the CPU. The UNet exports take any batch and sides that are multiples
of 2**k from 2 * 2**k up (k the pruning level). Every exported file is loaded back and run on
images other than the traced one (other sizes and batch sizes too); the largest absolute
difference from the PyTorch model is printed and the export fails (exit status 1) beyond the
tolerance. ONNX needs the 'onnx' extra (pip install 'sharp-fpn[onnx]'), else it is skipped.
A report goes to <output>/export_report.json. What each file takes and returns:
sharp_fpn/export/unet.py and sharp_fpn/d2/export.py.

Every file of <output> that this tool did not write (the folder's record, .sharp-fpn-outputs.json,
says which) is refused unless --overwrite; the inputs (config, weights, check images) never are
outputs. Errors are one line naming the file (--debug: the traceback).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from sharp_fpn.cli import UserError, add_debug_argument, run
from sharp_fpn.data.synthetic import generate_image
from sharp_fpn.d2.engine import get_config
from sharp_fpn.d2.export import export_mask_rcnn
from sharp_fpn.d2.predictor import NucleiPredictor, model_label
from sharp_fpn.export import ExportCheck, export_unet_levels, onnx_status
from sharp_fpn.export.unet import MIN_BLOCKS
from sharp_fpn.models import ARCHS, GridUNet, create_model
from sharp_fpn.outdir import OutputDir
from sharp_fpn.predict import load_image

TOOL = "export"
REPORT = "export_report.json"


def sample_images(paths: list[str], sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """``(H, W, 3)`` uint8 RGB check images: the given files, else synthetic nuclei images."""
    if paths:
        return [load_image(Path(p)).rgb for p in paths]
    rng = np.random.default_rng(0)
    styles = ("fluorescence", "he")
    return [generate_image(rng, h, w, styles[i % 2])[0][..., :3] for i, (h, w) in enumerate(sizes)]


def run_unet(args: argparse.Namespace, folder: OutputDir) -> list:
    if args.config_file:
        predictor = NucleiPredictor(get_config(args.config_file, args.opts), args.weights,
                                    device="cpu")
        cfg = predictor.cfg
        network = getattr(predictor.model, "network", None)
        if not isinstance(network, GridUNet):
            raise UserError(
                f"{args.config_file}: the model is {cfg.MODEL.META_ARCHITECTURE} with "
                f"{type(network).__name__} inside; 'unet' exports the semantic meta-architecture"
                f" built on sharp_fpn.models (MODEL.UNET.USE_BACKBONE False)"
            )
        name = model_label(args.config_file)
    else:
        cfg = get_config(None, args.opts)
        network = create_model(args.arch, deep_supervision="top" if ARCHS[args.arch].scheme in
                               ("2plus", "sharp") else False, full_scale=args.full_scale)
        name = args.arch
        print(f"{args.arch}: random weights (no --config-file): checks that it exports")
    available = [k for k in range(1, network.depth + 1) if (0, k) in network.branches]
    levels = args.levels or available
    if set(levels) - set(available):
        raise UserError(f"--levels {' '.join(map(str, levels))}: {name} has pruning levels "
                        f"{' '.join(map(str, available))} only")
    multiple = 2 ** network.depth
    smallest = MIN_BLOCKS * multiple
    if args.size < smallest:
        raise UserError(f"--size {args.size}: at depth {network.depth} the check images need "
                         f"sides of at least {smallest}")
    sizes = [(args.size, args.size), (max(smallest, args.size // 2 // multiple * multiple),
                                      max(smallest, args.size * 3 // 4 // multiple * multiple))]
    images = sample_images(args.image, sizes)
    order = slice(None, None, -1) if cfg.INPUT.FORMAT == "BGR" else slice(None)
    inputs = []
    for rgb in images:  # crop to multiples of 2**depth, as the exported model needs
        h, w = (rgb.shape[0] // multiple) * multiple, (rgb.shape[1] // multiple) * multiple
        pixels = np.ascontiguousarray(rgb[:h, :w, order].transpose(2, 0, 1), dtype=np.float32)
        inputs.append(torch.from_numpy(pixels)[None])
    if min(min(x.shape[-2:]) for x in inputs) < smallest:
        raise UserError(f"--image: sides of at least {smallest} needed at depth {network.depth}")
    # a batch of two too: the last image and its mirror image
    inputs.append(torch.cat([inputs[-1], inputs[-1].flip(-1)]))
    network.eval()
    onnx = not args.no_onnx and onnx_status()[0]
    folder.claim_all(f"{name}_L{k}{suffix}" for k in levels
                     for suffix in (".pt2", ".onnx")[: 2 if onnx else 1])
    return export_unet_levels(
        network, levels, folder.folder, inputs, name=name, pixel_mean=cfg.MODEL.PIXEL_MEAN,
        pixel_std=cfg.MODEL.PIXEL_STD, tolerance=args.tolerance,
        onnx_tolerance=args.onnx_tolerance, onnx=not args.no_onnx,
    )


def run_mask_rcnn(args: argparse.Namespace, folder: OutputDir) -> list:
    cfg = get_config(args.config_file, args.opts)
    # the export keeps the config's test-time score threshold (detectron2's default 0.05)
    predictor = NucleiPredictor(cfg, args.weights, device="cpu",
                                score_threshold=cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST)
    rgbs = sample_images(args.image, [(256, 256), (260, 347)])
    images = [predictor.model_input(rgb) for rgb in rgbs]
    describe = {
        "config": args.config_file,
        "weights": args.weights,
        "input": f"(3, h, w) float32 pixels 0..255 in {cfg.INPUT.FORMAT} order, after "
                 f"{predictor.augmentations!r}",
        "score_threshold": cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST,
    }
    name = model_label(args.config_file)
    folder.claim_all([f"{name}.ts", f"{name}.json"])
    check = export_mask_rcnn(predictor.model, images, folder.folder, name=name,
                             tolerance=args.tolerance, describe=describe)
    onnx_ok, onnx_reason = onnx_status()
    reason = onnx_reason if not onnx_ok else (
        "not possible for Mask R-CNN: the dynamo ONNX exporter goes through torch.export, which "
        "cannot export detectron2 v0.6's R-CNN (sharp_fpn/d2/export.py), and detectron2's own "
        "ONNX export needs Caffe2")
    return [check, ExportCheck(check.name, "onnx", None, float("nan"), args.tolerance, False,
                               skipped=reason)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="kind", required=True)
    unet = commands.add_parser("unet", help="UNet family (pure PyTorch), every pruning level")
    source = unet.add_mutually_exclusive_group(required=True)
    source.add_argument("--config-file", help="a trained semantic model's config")
    source.add_argument("--arch", choices=sorted(ARCHS), help="random weights of this arch")
    unet.add_argument("--weights", help="checkpoint of --config-file's model")
    unet.add_argument("--levels", type=int, nargs="+", help="pruning levels (default: all)")
    unet.add_argument("--size", type=int, default=256, help="check image side (%(default)s)")
    unet.add_argument("--full-scale", default="upsample", help="--arch unet_sharp's F op")
    unet.add_argument("--no-onnx", action="store_true", help="torch.export only")
    unet.add_argument("--tolerance", type=float, default=1e-5,
                      help="largest |diff| of the .pt2 probabilities (%(default)s)")
    unet.add_argument("--onnx-tolerance", type=float, default=1e-4,
                      help="largest |diff| of the ONNX Runtime probabilities (%(default)s)")
    mrcnn = commands.add_parser("mask-rcnn", help="detectron2 Mask R-CNN via TracingAdapter")
    mrcnn.add_argument("--config-file", required=True)
    mrcnn.add_argument("--weights", required=True)
    mrcnn.add_argument("--tolerance", type=float, default=1e-4, help="%(default)s")
    for sub in (unet, mrcnn):
        sub.add_argument("--image", nargs="+", default=[],
                         help="check images, the first also traced (default: synthetic)")
        sub.add_argument("--output", required=True, help="folder for the exported files")
        sub.add_argument("--overwrite", action="store_true",
                         help="replace files of --output that this tool did not write")
        add_debug_argument(sub)
        sub.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                         help="config options to override")
    return parser


def export(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.kind == "unet" and args.config_file and not args.weights:
        parser.error("unet --config-file needs --weights")
    inputs = [p for p in (args.config_file, args.weights, *args.image) if p]
    for path in inputs:
        if not Path(path).is_file():
            raise UserError(f"{path}: no such file")
    folder = OutputDir(args.output, TOOL, overwrite=args.overwrite, inputs=inputs)
    folder.check(REPORT)  # before the work; the exported files once their names are known
    torch.manual_seed(0)
    with folder.lock():
        checks = run_unet(args, folder) if args.kind == "unet" else run_mask_rcnn(args, folder)
        for check in checks:
            print(check.line())
        with folder.open(REPORT, "w", encoding="utf-8") as f:
            f.write(json.dumps([c.as_dict() for c in checks], indent=2) + "\n")
    report = folder.folder / REPORT
    failed = [c for c in checks if not c.skipped and not c.ok]
    print(f"{len(checks) - len(failed)} of {len(checks)} exports ok or skipped; report {report}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """The exit status: 0, 1 after a failed check, or 1 after a one-line error on stderr."""
    return run(export, argv)


if __name__ == "__main__":
    sys.exit(main())
