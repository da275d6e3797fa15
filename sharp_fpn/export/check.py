"""What every export reports (:class:`ExportCheck`), and the helpers its checks share.

Framework-free (torch only): :mod:`sharp_fpn.d2.export` uses these for Mask R-CNN too.
"""
from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

from torch import Tensor

__all__ = ["ONNX_PACKAGES", "ExportCheck", "max_abs_diff", "megabytes", "onnx_status"]

ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
"""What the ONNX part needs: ``onnx`` and ``onnxscript`` (the dynamo exporter writes the
model with them), ``onnxruntime`` (the check runs it). ``pip install 'sharp-fpn[onnx]'``."""


@dataclass
class ExportCheck:
    """One exported file and how its outputs compare with the PyTorch model's.

    ``format`` is ``"torch.export"`` (a ``.pt2`` ``ExportedProgram``), ``"onnx"`` or
    ``"torchscript"`` (Mask R-CNN only). ``max_abs_diff`` is over every output element of
    every check input (NaN when the outputs could not be compared, e.g. a different number of
    detections); ``ok`` when it is at most ``tolerance``. ``skipped`` holds the reason when
    nothing was written.
    """

    name: str
    format: str
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
    """Whether the ONNX export and its check can run here, and if not, why (the skip reason)."""
    missing = []
    for name in ONNX_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        return False, (f"{', '.join(missing)} cannot be imported (install the 'onnx' extra: "
                       f"pip install 'sharp-fpn[onnx]', i.e. {' '.join(ONNX_PACKAGES)}); "
                       "no ONNX export")
    return True, ""


def max_abs_diff(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """Largest ``|a - b|`` over paired tensors (in float64); NaN when a pair's shapes differ."""
    worst = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return float("nan")
        if x.numel():
            worst = max(worst, float((x.double() - y.double()).abs().max()))
    return worst


def megabytes(path: Path) -> float:
    """A file's size in MiB, rounded to 3 decimals."""
    return round(Path(path).stat().st_size / 2**20, 3)
