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

The output is never the input, and a file this tool did not write (the folder's record,
``.sharp-fpn-outputs.json``, says which) is replaced only with ``--overwrite``. Errors are one
line naming the file (``--debug``: the traceback).
"""
import argparse
import os
import pickle
import sys
import tempfile
from pathlib import Path

from sharp_fpn.cli import UserError, add_debug_argument, run
from sharp_fpn.outdir import OutputDir
from sharp_fpn.utils import silence_warnings

silence_warnings()  # the project's third-party filters, before detectron2 is imported

from sharp_fpn.d2.torchvision_weights import (  # noqa: E402
    DEFAULT_PREFIX,
    NOTE,
    convert_file,
)


TOOL = "convert_torchvision_weights"


def convert_weights(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", help="torchvision state-dict file (.pth)")
    parser.add_argument("target", help="checkpoint to write (.pth), for MODEL.WEIGHTS")
    parser.add_argument(
        "--prefix",
        default=DEFAULT_PREFIX,
        help=f"prepended to every converted name (default {DEFAULT_PREFIX!r}: the bottom-up of "
        "detectron2's FPN and of the grid necks)",
    )
    parser.add_argument("--overwrite", action="store_true",
                        help="replace TARGET even if this tool did not write it (never SOURCE)")
    add_debug_argument(parser)
    args = parser.parse_args(argv)
    target = Path(args.target)
    if not Path(args.source).is_file():
        raise UserError(f"{args.source}: no such file")
    if target.suffix != ".pth":
        raise UserError(f"{target}: the output must end in .pth (DetectionCheckpointer reads "
                        ".pkl files as Detectron/Caffe2 pickles)")
    folder = OutputDir(target.parent, TOOL, overwrite=args.overwrite, inputs=[args.source])
    folder.check(target.name)  # before the work
    # Converted into a hidden temporary file first: only a conversion that worked goes on
    # record, and the rename makes the target whole at once.
    fd, partial = tempfile.mkstemp(dir=folder.folder, prefix=f".{target.name}.", suffix=".pth")
    os.close(fd)
    try:
        try:
            arch, count, dropped = convert_file(args.source, partial, args.prefix)
        except (EOFError, pickle.UnpicklingError) as e:
            raise UserError(
                f"{args.source}: not a state-dict file that torch.load reads safely "
                f"({type(e).__name__}; a whole pickled model? save its state_dict() instead)"
            ) from e
        os.chmod(partial, 0o644)  # as the project's other outputs (mkstemp makes it 0600)
        os.replace(partial, folder.claim(target.name))
    finally:
        Path(partial).unlink(missing_ok=True)
    counters = [key for key in dropped if key.endswith("num_batches_tracked")]
    classifier = [key for key in dropped if key not in counters]
    print(f"{args.source}: torchvision {arch}, {count} tensors -> {args.target}")
    print(f"left out: the classifier ({', '.join(classifier) or 'none'}), "
          f"{len(counters)} num_batches_tracked counters")
    print(f"note: {NOTE}")
    return 0


def main(argv=None) -> int:
    """The exit status: 0, or 1 after a one-line error on stderr (see sharp_fpn.cli)."""
    return run(convert_weights, argv)


if __name__ == "__main__":
    sys.exit(main())
