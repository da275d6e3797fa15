"""Export for deployment: TorchScript (and ONNX when installed), each export checked.

Two kinds of model (``tools/export.py``):

* **UNet family** (``sharp_fpn.models.GridUNet``, pure PyTorch): one file per pruning level
  ``L1..L4`` (the paper's fast mode: small sub-networks for phones). The exported module is
  :class:`ProbabilityModel`: ``(N, 3, H, W)`` float pixels -> ``(N, 1, H, W)`` nucleus
  probabilities (normalisation, the pruned network, sigmoid and the CGM gate inside), with
  ``H`` and ``W`` multiples of ``2**level`` (pad first).
* **Mask R-CNN** (detectron2) through detectron2's ``TracingAdapter``, traced on a sample
  image: input ``(3, h, w)`` float32 pixels in ``INPUT.FORMAT`` order, already resized as at
  test time; output the flat tuple ``(pred_boxes (N, 4), pred_classes (N,), pred_masks
  (N, 1, 28, 28) mask probabilities, scores (N,), image_size (2,))`` before post-processing
  (paste the masks with ``detectron2.layers.paste_masks_in_image``). A JSON file beside the
  model lists the outputs and the pre-processing.

Every export is loaded back and run on inputs other than the one it was traced on (other
sizes too); its outputs are compared with the PyTorch model's and the largest absolute
difference is reported (:class:`ExportCheck`); beyond the tolerance the export fails.

With the Python-only detectron2 fallback (no compiled ops) the Mask R-CNN trace works: the
R-CNN FPN path uses torchvision's ``roi_align`` and ``nms``, no ``detectron2._C`` op.
``from detectron2.export import TracingAdapter`` itself fails on detectron2 v0.6 with PyTorch
2.x, for a reason that has nothing to do with tracing: ``detectron2/export/__init__.py``
imports ``export/api.py``, which imports ``caffe2`` (removed from PyTorch in 2.0), so the
package cannot be imported at all. :func:`sharp_fpn.d2.compat.load_tracing_adapter` loads
the pure-PyTorch ``export/flatten.py`` without that ``__init__``. What stays out of reach: detectron2's Caffe2
export (``Caffe2Tracer``, ``export_caffe2_model``; Caffe2 is gone) and models using compiled
ops (rotated boxes, deformable convolutions).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .models.heads import ClassificationGuidedModule
from .models.unet import GridUNet, SegmentationOutput, count_parameters
from .utils import atomic_write, write_text_atomic

__all__ = [
    "ExportCheck",
    "ProbabilityModel",
    "export_mask_rcnn",
    "export_unet_levels",
    "onnx_status",
]


@dataclass
class ExportCheck:
    """One exported file and how its outputs compare with the PyTorch model's.

    ``max_abs_diff`` is over every output element of every check input (NaN when the outputs
    could not be compared, e.g. a different number of detections); ``ok`` when it is at most
    ``tolerance``. ``skipped`` holds the reason when nothing was written.
    """

    name: str
    format: str  # "torchscript" or "onnx"
    path: Optional[str]
    max_abs_diff: float
    tolerance: float
    ok: bool
    parameters: int = 0
    megabytes: float = 0.0
    note: str = ""
    skipped: str = ""

    def line(self) -> str:
        """A line for the console."""
        if self.skipped:
            return f"{self.name} [{self.format}]: SKIPPED - {self.skipped}"
        verdict = "ok" if self.ok else "FAILED"
        text = (f"{self.name} [{self.format}]: {verdict}, max |diff| {self.max_abs_diff:.3g} "
                f"(tolerance {self.tolerance:g}), {self.parameters:,} parameters, "
                f"{self.megabytes:.2f} MB -> {self.path}")
        return text + (f" ({self.note})" if self.note else "")

    def as_dict(self) -> dict:
        return asdict(self)


def onnx_status() -> Tuple[bool, str]:
    """Whether ONNX export can run here, and if not, why (for the skip message)."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        return False, ("the 'onnx' package is not installed (pip install onnx onnxruntime); "
                       "TorchScript only")
    return True, ""


class ProbabilityModel(nn.Module):
    """A ``GridUNet`` as a deployable function: pixels in, nucleus probabilities out.

    ``(N, C, H, W)`` float pixels -> ``(N, classes, H, W)`` probabilities: ``(x - mean) /
    std``, the network (its final branch), sigmoid, times the branch's CGM 0/1 decision when
    the network has CGMs. ``H`` and ``W`` must be multiples of ``2**network.depth``.

    Args:
        network: a ``GridUNet`` that returns one branch (prune it first for deep supervision).
        pixel_mean, pixel_std: per-channel normalisation; None: the input is used as it is.
    """

    def __init__(
        self,
        network: GridUNet,
        pixel_mean: Optional[Sequence[float]] = None,
        pixel_std: Optional[Sequence[float]] = None,
    ) -> None:
        super().__init__()
        self.network = network
        channels = network.in_channels
        mean = torch.zeros(channels) if pixel_mean is None else torch.tensor(pixel_mean)
        std = torch.ones(channels) if pixel_std is None else torch.tensor(pixel_std)
        self.register_buffer("pixel_mean", mean.float().view(1, -1, 1, 1), False)
        self.register_buffer("pixel_std", std.float().view(1, -1, 1, 1), False)

    def forward(self, x: Tensor) -> Tensor:
        output = self.network((x - self.pixel_mean) / self.pixel_std)
        if isinstance(output, SegmentationOutput):
            return torch.sigmoid(output.logits[-1]) * ClassificationGuidedModule.gate(
                output.has_object[-1]
            )
        if isinstance(output, list):
            raise ValueError("the network returns several branches; export network.prune(k)")
        return torch.sigmoid(output)


def _max_abs_diff(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """Largest |a - b| over paired tensors; NaN when shapes differ."""
    worst = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return float("nan")
        if x.numel():
            worst = max(worst, float((x.double() - y.double()).abs().max()))
    return worst


def _save_torchscript(module: torch.jit.ScriptModule, path: Path) -> float:
    """Save a traced module whole (temporary name, then rename); returns its size in MB."""
    with atomic_write(path, "wb") as f:
        torch.jit.save(module, f)
    return path.stat().st_size / 2**20


def export_unet_levels(
    network: GridUNet,
    levels: Sequence[int],
    out_dir: Path,
    check_inputs: Sequence[Tensor],
    *,
    name: str = "unet",
    pixel_mean: Optional[Sequence[float]] = None,
    pixel_std: Optional[Sequence[float]] = None,
    tolerance: float = 1e-5,
    onnx: bool = True,
) -> List[ExportCheck]:
    """Export ``network`` pruned to each level as TorchScript (and ONNX), each checked.

    Args:
        network: a ``GridUNet`` (eval mode is set on the copies); levels below its depth need
            heads on the top row (``deep_supervision="top"`` or ``"all"``).
        levels: pruning levels ``k`` in ``1..depth``; file ``<name>_L<k>.ts`` (``.onnx``).
        out_dir: where the files go.
        check_inputs: ``(N, C, H, W)`` pixel tensors, sides multiples of ``2**depth``; the
            trace uses the first, the check all of them (give more than one size).
        name: file name prefix.
        pixel_mean, pixel_std: normalisation built into the export (:class:`ProbabilityModel`).
        tolerance: largest accepted absolute difference of probabilities.
        onnx: also export ONNX when the ``onnx`` package is installed.

    Returns:
        One :class:`ExportCheck` per level and format (ONNX ones ``skipped`` when not possible).
    """
    out_dir = Path(out_dir)
    checks: List[ExportCheck] = []
    onnx_ok, onnx_reason = onnx_status() if onnx else (False, "not asked for")
    for level in levels:
        model = ProbabilityModel(network.prune(level), pixel_mean, pixel_std).eval()
        label = f"{name}_L{level}"
        with torch.no_grad():
            expected = [model(x) for x in check_inputs]
            traced = torch.jit.trace(model, check_inputs[0], check_trace=False)
        path = out_dir / f"{label}.ts"
        megabytes = _save_torchscript(traced, path)
        loaded = torch.jit.load(str(path))
        with torch.no_grad():
            got = [loaded(x) for x in check_inputs]
        diff = _max_abs_diff(got, expected)
        parameters = count_parameters(model.network)
        checks.append(ExportCheck(label, "torchscript", str(path), diff, tolerance,
                                  diff <= tolerance, parameters, round(megabytes, 3)))
        if onnx_ok:
            checks.append(_export_onnx(model, label, out_dir, check_inputs, expected, tolerance,
                                       parameters))
        else:
            checks.append(ExportCheck(label, "onnx", None, float("nan"), tolerance, False,
                                      skipped=onnx_reason))
    return checks


def _export_onnx(
    model: nn.Module,
    label: str,
    out_dir: Path,
    check_inputs: Sequence[Tensor],
    expected: Sequence[Tensor],
    tolerance: float,
    parameters: int,
) -> ExportCheck:
    """ONNX export (TorchScript-based exporter, dynamic batch and sides), checked with
    onnxruntime when it is installed, else only with ``onnx.checker``."""
    import onnx

    path = out_dir / f"{label}.onnx"
    out_dir.mkdir(parents=True, exist_ok=True)
    axes = {0: "batch", 2: "height", 3: "width"}
    torch.onnx.export(model, (check_inputs[0],), str(path), dynamo=False, opset_version=17,
                      input_names=["pixels"], output_names=["probabilities"],
                      dynamic_axes={"pixels": axes, "probabilities": axes})
    onnx.checker.check_model(str(path))
    megabytes = round(path.stat().st_size / 2**20, 3)
    try:
        import onnxruntime
    except ImportError:
        return ExportCheck(label, "onnx", str(path), float("nan"), tolerance, True, parameters,
                           megabytes, note="onnx.checker passed; onnxruntime not installed, "
                           "outputs not compared")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = [torch.from_numpy(session.run(None, {"pixels": x.numpy()})[0]) for x in check_inputs]
    diff = _max_abs_diff(got, expected)
    return ExportCheck(label, "onnx", str(path), diff, tolerance, diff <= tolerance, parameters,
                       megabytes)


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
        out_dir: gets ``<name>.ts`` and ``<name>.json`` (outputs and pre-processing).
        name: file name stem.
        tolerance: largest accepted absolute difference of boxes, scores and mask
            probabilities; a different number of detections fails the check.
        describe: extra entries for the JSON file (e.g. the pre-processing).
    """
    from .d2.compat import load_tracing_adapter

    adapter_cls = load_tracing_adapter()
    model = model.eval()

    def inference(net: nn.Module, inputs: List[dict]) -> List[dict]:
        return [{"instances": net.inference(inputs, do_postprocess=False)[0]}]

    with torch.no_grad():
        adapter = adapter_cls(model, [{"image": images[0]}], inference)
        traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
        expected = [adapter(image) for image in images]
    out_dir = Path(out_dir)
    path = out_dir / f"{name}.ts"
    megabytes = _save_torchscript(traced, path)
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        got = [loaded(image) for image in images]
    counts = [(int(e[0].shape[0]), int(g[0].shape[0])) for e, g in zip(expected, got)]
    diff = max(_max_abs_diff(g, e) for g, e in zip(got, expected))
    instances_schema = adapter.outputs_schema.schemas[0].schemas[0]
    info = {
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
                       count_parameters(model), round(megabytes, 3), note=note)
