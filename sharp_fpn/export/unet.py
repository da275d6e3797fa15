"""UNet family export: ``torch.export`` (``.pt2``) and ONNX (the dynamo exporter), per pruning level.

What is exported (:class:`ProbabilityModel`): ``(N, 3, H, W)`` float pixels -> ``(N, 1, H, W)``
nucleus probabilities, with the normalisation, the pruned network, the sigmoid and the CGM
gate (per image) inside. One file per format and pruning level ``L1..L4`` (the paper's fast
mode: small sub-networks for phones); the non-nested schemes (UNet, UNet3+) have only the
full depth.

================  ==========================================================================
file              what it is
================  ==========================================================================
``<name>_Lk.pt2``  ``torch.export.export`` of the model, saved with ``torch.export.save``;
                  run it with ``torch.export.load(path).module()(pixels)``
``<name>_Lk.onnx`` ``torch.onnx.export(program, dynamo=True)`` of the same program (default
                  opset of the installed torch, recorded in the check's note), one file; input
                  ``pixels``, output ``probabilities``; checked with ``onnx.checker`` and run
                  with ONNX Runtime (CPU)
================  ==========================================================================

Dynamic dimensions, both formats (:func:`dynamic_shapes`): the batch ``N >= 1``, and the
sides ``H = 2**k * h``, ``W = 2**k * w`` with ``h, w >= 2`` at pruning level ``k`` (any
multiples of ``2**k`` from ``2 * 2**k`` up; pad first). Only the channels are fixed. The lower
bound is torch's: bilinear upsampling (``align_corners=True``) of a 1-pixel map is a special
case in its decomposition, so ``h = 1`` would become a guard of the program. Neither format
checks that a side is a multiple of ``2**k`` (torch 2.14's ``.pt2`` module checks the lower
bound of a derived dimension, not its divisibility; ONNX Runtime checks nothing): another side
gives a wrong map, not an error. The trace runs on a made-up ``(2, C, 3 * 2**k, 5 * 2**k)``
input (a size of 1 would be specialized, equal sizes would be unified), so every check input
differs from the traced one.

Every export is loaded back from its file and run on the check inputs (give several sizes and
batch sizes); the largest absolute difference from the PyTorch model is reported
(:class:`~sharp_fpn.export.check.ExportCheck`) and beyond the tolerance the export fails. The
``.pt2`` round trip computes the same ATen operations and measures 0; ONNX Runtime differs by
1e-6 (tiny widths) to 5e-5 (the paper's widths, random weights): its own convolution kernels
sum in another order (graph optimizations off, the difference stays), hence its own tolerance
(1e-4 by default).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..models.unet import GridUNet, count_parameters
from ..utils import atomic_write
from .check import ExportCheck, max_abs_diff, megabytes, onnx_status

__all__ = [
    "INPUT_NAME",
    "MIN_BLOCKS",
    "OUTPUT_NAME",
    "ProbabilityModel",
    "dynamic_shapes",
    "export_onnx",
    "export_program",
    "export_unet_levels",
    "load_program",
    "onnx_session",
    "run_onnx",
    "save_program",
    "side_multiple",
    "trace_example",
]

INPUT_NAME = "pixels"
OUTPUT_NAME = "probabilities"
MIN_BLOCKS = 2
"""The smallest side of an export, in units of ``2**level`` (see the module docstring)."""


class ProbabilityModel(nn.Module):
    """A ``GridUNet`` as a deployable function: pixels in, nucleus probabilities out.

    ``(N, C, H, W)`` float pixels -> ``(N, classes, H, W)`` probabilities: ``(x - mean) /
    std``, then ``network.predict_probabilities`` (the final branch's sigmoid, times its CGM's
    0/1 decision per image when the network has CGMs). ``H`` and ``W`` must be multiples of
    ``2**network.depth``. Export ``network.prune(k)``: it computes only the level's nodes and
    carries only their weights (an unpruned network computes every node for its final branch).

    Args:
        network: a ``GridUNet``.
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
        return self.network.predict_probabilities((x - self.pixel_mean) / self.pixel_std)


def side_multiple(level: int) -> int:
    """What the sides of a level-``level`` export must be multiples of: ``2**level``."""
    return 2**level


def dynamic_shapes(level: int) -> Tuple[dict]:
    """``torch.export`` dynamic shapes of the one input at pruning level ``level``: batch
    ``>= 1``, sides ``2**level * h`` and ``2**level * w`` with ``h, w >= MIN_BLOCKS``."""
    from torch.export import Dim

    step = side_multiple(level)
    return ({0: Dim("batch", min=1), 2: step * Dim("h", min=MIN_BLOCKS),
             3: step * Dim("w", min=MIN_BLOCKS)},)


def trace_example(channels: int, level: int) -> Tensor:
    """The input the export traces: ``(2, channels, 3 * 2**level, 5 * 2**level)`` pixels
    (no size 1, no two equal dynamic sizes: either would be fixed in the program)."""
    step = side_multiple(level)
    generator = torch.Generator().manual_seed(0)
    return torch.rand(2, channels, 3 * step, 5 * step, generator=generator) * 255


def _check_inputs_fit(inputs: Sequence[Tensor], level: int) -> None:
    step = side_multiple(level)
    for x in inputs:
        h, w = x.shape[-2:] if x.dim() == 4 else (0, 0)
        if x.dim() != 4 or h % step or w % step or min(h, w) < MIN_BLOCKS * step:
            raise ValueError(
                f"check input of shape {tuple(x.shape)}: level {level} exports take (N, C, H, W) "
                f"with H and W multiples of {step}, at least {MIN_BLOCKS * step}"
            )


def export_program(model: nn.Module, level: int, channels: int) -> "torch.export.ExportedProgram":
    """``torch.export.export`` of ``model`` (eval mode) with :func:`dynamic_shapes`."""
    return torch.export.export(model.eval(), (trace_example(channels, level),),
                               dynamic_shapes=dynamic_shapes(level))


def save_program(program: "torch.export.ExportedProgram", path: Path) -> None:
    """``torch.export.save`` to ``path`` all or nothing (temporary file, then rename)."""
    with atomic_write(path, "wb") as f:
        torch.export.save(program, f)


def load_program(path: Path) -> Callable[[Tensor], Tensor]:
    """A saved ``.pt2`` as a callable module (``torch.export.load(path).module()``)."""
    return torch.export.load(str(path)).module()


@contextlib.contextmanager
def _replaced_whole(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that wants a file name; renamed to
    ``path`` when the block succeeds, removed when it fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_onnx(program: "torch.export.ExportedProgram", path: Path) -> int:
    """ONNX of an exported program (the dynamo exporter, its dynamic shapes kept), written as
    one file and passed through ``onnx.checker``; returns the ONNX opset."""
    import onnx

    onnx_program = torch.onnx.export(program, dynamo=True, input_names=[INPUT_NAME],
                                     output_names=[OUTPUT_NAME], verbose=False)
    with _replaced_whole(Path(path)) as tmp:
        onnx_program.save(str(tmp), external_data=False)
        onnx.checker.check_model(str(tmp))
        model = onnx.load(str(tmp))
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def onnx_session(path: Path, threads: Optional[int] = None):
    """An ONNX Runtime CPU session of ``path`` using ``threads`` threads (default: as many as
    torch uses, so that the two are compared on the same cores)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, x: Tensor) -> Tensor:
    """Run an exported model's ONNX Runtime ``session`` on ``(N, C, H, W)`` pixels."""
    pixels = x.detach().to("cpu", torch.float32).contiguous().numpy()
    return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0])


def _shapes(inputs: Sequence[Tensor]) -> str:
    return ", ".join("x".join(str(s) for s in x.shape) for x in inputs)


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
    onnx_tolerance: float = 1e-4,
    onnx: bool = True,
) -> List[ExportCheck]:
    """Export ``network`` pruned to each level with ``torch.export`` (and ONNX), each checked.

    Args:
        network: a ``GridUNet`` (eval mode is set on the copies); levels below its depth need
            heads on the top row (``deep_supervision="top"`` or ``"all"``).
        levels: pruning levels ``k`` in ``1..depth``; files ``<name>_L<k>.pt2`` and ``.onnx``.
        out_dir: where the files go.
        check_inputs: ``(N, C, H, W)`` pixel tensors, sides multiples of ``2**k`` and at least
            ``2 * 2**k`` for every level ``k``; give several sizes and batch sizes: all of them
            differ from the traced input (:func:`trace_example`).
        name: file name prefix.
        pixel_mean, pixel_std: normalisation built into the export (:class:`ProbabilityModel`).
        tolerance: largest accepted absolute difference of the ``.pt2`` program's probabilities
            (the same ATen operations: 0 measured).
        onnx_tolerance: the same for ONNX Runtime, whose own kernels round differently: up
            to 5e-5 measured at the paper's widths.
        onnx: also export ONNX (when :func:`~sharp_fpn.export.check.onnx_status` allows).

    Returns:
        Per level, a ``"torch.export"`` :class:`ExportCheck`, then an ``"onnx"`` one
        (``skipped`` with the reason when ONNX was not asked for or cannot run here).
    """
    out_dir = Path(out_dir)
    checks: List[ExportCheck] = []
    onnx_ok, onnx_reason = onnx_status() if onnx else (False, "not asked for")
    dynamic = "dynamic: batch >= 1, H = {0}*h, W = {0}*w with h, w >= {1}"
    for level in levels:
        _check_inputs_fit(check_inputs, level)
        model = ProbabilityModel(network.prune(level), pixel_mean, pixel_std).eval()
        label = f"{name}_L{level}"
        parameters = count_parameters(model.network)
        note = (f"{dynamic.format(side_multiple(level), MIN_BLOCKS)}; checked on "
                f"{_shapes(check_inputs)}")
        with torch.no_grad():
            expected = [model(x) for x in check_inputs]
        program = export_program(model, level, network.in_channels)
        path = out_dir / f"{label}.pt2"
        save_program(program, path)
        loaded = load_program(path)
        with torch.no_grad():
            got = [loaded(x) for x in check_inputs]
        diff = max_abs_diff(got, expected)
        checks.append(ExportCheck(label, "torch.export", str(path), diff, tolerance,
                                  diff <= tolerance, parameters, megabytes(path), note=note))
        if not onnx_ok:
            checks.append(ExportCheck(label, "onnx", None, float("nan"), onnx_tolerance, False,
                                      skipped=onnx_reason))
            continue
        path = out_dir / f"{label}.onnx"
        opset = export_onnx(program, path)
        session = onnx_session(path)
        got = [run_onnx(session, x) for x in check_inputs]
        diff = max_abs_diff(got, expected)
        checks.append(ExportCheck(label, "onnx", str(path), diff, onnx_tolerance,
                                  diff <= onnx_tolerance, parameters, megabytes(path),
                                  note=f"opset {opset}, ONNX Runtime CPU; {note}"))
    return checks
