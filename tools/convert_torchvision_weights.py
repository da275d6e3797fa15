#!/usr/bin/env python
"""Convert torchvision ImageNet weights (vgg16, vgg16_bn, resnet101, ...) for sharp-fpn's configs.

    python tools/convert_torchvision_weights.py resnet101-cd907fc2.pth weights/R-101-tv.pth
    python tools/convert_torchvision_weights.py vgg16-397923af.pth weights/VGG16-tv.pth
    python tools/train_net.py --config-file configs/mask_rcnn_sharp_R101.yaml \\
        MODEL.WEIGHTS weights/R-101-tv.pth

The input is a torchvision state-dict file (``torch.save(model.state_dict())``, as torchvision's
own downloads are). The output loads into the bottom-up of every R101 / VGG16 config here with
detectron2's ``DetectionCheckpointer``; it expects RGB images with torchvision's mean and std,
which those configs set (see the note the tool prints). Details:
``sharp_fpn/d2/torchvision_weights.py``.
"""
import argparse
import sys

from sharp_fpn.utils import silence_warnings

silence_warnings()  # the project's third-party filters, before detectron2 is imported

from sharp_fpn.d2.torchvision_weights import (  # noqa: E402
    DEFAULT_PREFIX,
    NOTE,
    convert_file,
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", help="torchvision state-dict file (.pth)")
    parser.add_argument("target", help="checkpoint to write (.pth), for MODEL.WEIGHTS")
    parser.add_argument(
        "--prefix",
        default=DEFAULT_PREFIX,
        help=f"prepended to every converted name (default {DEFAULT_PREFIX!r}: the bottom-up of "
        "detectron2's FPN and of the grid necks)",
    )
    args = parser.parse_args(argv)
    try:
        arch, count, dropped = convert_file(args.source, args.target, args.prefix)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    counters = [key for key in dropped if key.endswith("num_batches_tracked")]
    classifier = [key for key in dropped if key not in counters]
    print(f"{args.source}: torchvision {arch}, {count} tensors -> {args.target}")
    print(f"left out: the classifier ({', '.join(classifier) or 'none'}), "
          f"{len(counters)} num_batches_tracked counters")
    print(f"note: {NOTE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
