"""Mask R-CNN export (detectron2): TorchScript through ``TracingAdapter``, checked.

The project's only TorchScript. ``torch.export`` cannot export detectron2 v0.6's R-CNN (tried
with torch 2.14.1 on ``TracingAdapter(model, [{"image": image}], inference)``, the same
adapter as below, on a 64 x 80 image):

* ``torch.export.export(adapter, adapter.flattened_inputs)`` (non-strict, the default) fails at
  the first layer: ``GuardOnDataDependentSymNode: Could not guard on data-dependent expression
  Eq((u0 + 80)*(3*u1 + 192), 0)``, raised by ``if x.numel() == 0 and self.training`` in
  ``detectron2/layers/wrappers.py:100`` (``Conv2d.forward``). ``ImageList.from_tensors``
  computes the padded size as a tensor (``torch.stack(...).max(0)``, rounded up to the size
  divisibility) and pads with its ``.item()`` values, so every size after it is unbacked.
* ``strict=True`` fails earlier: ``Unsupported: Attempted to call function marked as skipped``,
  ``unittest.mock.patch``, which ``TracingAdapter.forward`` calls (``patch_builtin_len``).
* ``torch.export.draft_export`` runs (over two minutes on 2 cores) and reports 13
  data-dependent guards it could not prove, "not able to soundly produce a graph": the padding
  above; the finite-value checks (``valid_mask.all()`` in ``find_top_rpn_proposals`` and
  ``fast_rcnn_inference``, ``Boxes.clip``'s assertion); the sum of the RPN's per-level top-k
  sizes; the empty-box filter, ``batched_nms`` and ``boxes[keep]``; the detections kept by the
  score threshold and ``DETECTIONS_PER_IMAGE``. The number of proposals and detections depends
  on the data at every stage.

Getting past these needs detectron2's code changed (upstream's later export work), which this
project does not patch. So Mask R-CNN keeps ``torch.jit.trace``: the trace records the control
flow taken on the sample image and the check below runs the saved file on other images and
sizes. The tracer's warnings about exactly that (``TracerWarning``: "Converting a tensor to a
Python boolean", "Iterating over a tensor", "Using len to get tensor shape", "torch.as_tensor
results are registered as constants") and torch 2.14's FutureWarnings on ``torch.jit.trace``,
``trace_method``, ``script`` (detectron2's ``script_if_tracing``), ``save`` and ``load`` are
silenced around these calls only (:data:`TORCHSCRIPT_WARNINGS`); the round-trip check
verifies the result instead.

The export: input ``(3, h, w)`` float32 pixels in ``INPUT.FORMAT`` order, already resized as at
test time; output the flat tuple ``(pred_boxes (N, 4), pred_classes (N,), pred_masks
(N, 1, 28, 28) mask probabilities, scores (N,), image_size (2,))`` before post-processing
(paste the masks with ``detectron2.layers.paste_masks_in_image``). A JSON file beside the
model lists the outputs and the pre-processing. With the Python-only detectron2 fallback (no
compiled ops) the trace works: the R-CNN FPN path uses torchvision's ``roi_align`` and
``nms``. Out of reach: detectron2's Caffe2 export (Caffe2 is gone from PyTorch) and models
using compiled ops (rotated boxes, deformable convolutions). ``TracingAdapter`` comes from
:func:`sharp_fpn.d2.compat.load_tracing_adapter` (``import detectron2.export`` fails on v0.6
with PyTorch 2.x).
"""
from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..export.check import ExportCheck, max_abs_diff, megabytes
from ..models.unet import count_parameters
from ..utils import atomic_write, write_text_atomic
from .compat import load_tracing_adapter

__all__ = ["TORCHSCRIPT_WARNINGS", "export_mask_rcnn"]

TORCHSCRIPT_WARNINGS = (
    # torch 2.14 deprecates TorchScript: trace, trace_method (inside trace), script (detectron2's
    # script_if_tracing helpers, scripted while tracing), save, load
    (r"`torch\.jit\.(trace|trace_method|script|save|load)` is deprecated", FutureWarning),
    # the tracer on the R-CNN's data-dependent Python control flow (recorded as taken)
    (r"Converting a tensor to a Python boolean", torch.jit.TracerWarning),
    (r"Iterating over a tensor", torch.jit.TracerWarning),
    (r"Using len to get tensor shape", torch.jit.TracerWarning),
    (r"torch\.as_tensor results are registered as constants", torch.jit.TracerWarning),
    # detectron2 v0.6's anchor generator calls torch.meshgrid without indexing=
    (r"torch\.meshgrid: in an upcoming release", UserWarning),
)
"""(message regex, category) of every warning tracing, saving and loading the R-CNN emits."""


@contextlib.contextmanager
def _torchscript_warnings_silenced() -> Iterator[None]:
    """:data:`TORCHSCRIPT_WARNINGS`, and only those, ignored inside the block."""
    with warnings.catch_warnings():
        for message, category in TORCHSCRIPT_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


def export_mask_rcnn(
    model: nn.Module,
    images: Sequence[Tensor],
    out_dir: Path,
    *,
    name: str = "mask_rcnn",
    tolerance: float = 1e-4,
    describe: Optional[dict] = None,
) -> ExportCheck:
    """Trace a detectron2 R-CNN (eval mode) with ``TracingAdapter`` and check the export.

    Args:
        model: a ``GeneralizedRCNN``.
        images: ``(3, h, w)`` float32 pixel tensors as the model takes them (``INPUT.FORMAT``,
            resized); the trace uses the first, the check all (give other sizes too).
        out_dir: gets ``<name>.ts`` (TorchScript) and ``<name>.json`` (outputs and
            pre-processing).
        name: file name stem.
        tolerance: largest accepted absolute difference of boxes, scores and mask
            probabilities; a different number of detections fails the check.
        describe: extra entries for the JSON file (e.g. the pre-processing).

    Returns:
        A ``"torchscript"`` :class:`ExportCheck`; its note gives the detections per image.
    """
    adapter_cls = load_tracing_adapter()
    model = model.eval()

    def inference(net: nn.Module, inputs: List[dict]) -> List[dict]:
        return [{"instances": net.inference(inputs, do_postprocess=False)[0]}]

    out_dir = Path(out_dir)
    path = out_dir / f"{name}.ts"
    with torch.no_grad():
        adapter = adapter_cls(model, [{"image": images[0]}], inference)
        expected = [adapter(image) for image in images]
        with _torchscript_warnings_silenced():
            traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
            with atomic_write(path, "wb") as f:
                torch.jit.save(traced, f)
            loaded = torch.jit.load(str(path))
            got = [loaded(image) for image in images]
    counts = [(int(e[0].shape[0]), int(g[0].shape[0])) for e, g in zip(expected, got)]
    diff = max(max_abs_diff(g, e) for g, e in zip(got, expected))
    instances_schema = adapter.outputs_schema.schemas[0].schemas[0]
    info = {
        "format": "torchscript (torch.jit.load)",
        "outputs": list(instances_schema.keys) + ["image_size"],
        "masks": "pred_masks are (N, 1, M, M) probabilities in the boxes; paste with "
                 "detectron2.layers.paste_masks_in_image",
        "traced_on": list(images[0].shape),
        **(describe or {}),
    }
    write_text_atomic(out_dir / f"{name}.json", json.dumps(info, indent=2) + "\n")
    note = "detections per check image: " + ", ".join(str(e) for e, _ in counts)
    if not any(e for e, _ in counts):
        note += " (no detection: only the empty output was compared)"
    ok = bool(diff <= tolerance) and all(e == g for e, g in counts)
    return ExportCheck(name, "torchscript", str(path), diff, tolerance, ok,
                       count_parameters(model), megabytes(path), note=note)
