"""Checkpoints: written whole or not at all, read with errors that name the file, resumed from
the newest one that can be read, and checked against the model where a mismatch would make
every number meaningless.

:class:`AtomicCheckpointer` is detectron2's ``DetectionCheckpointer`` with these rules:

* **writing**: to a temporary name, renamed when whole, ``last_checkpoint`` too; so a run
  killed at any moment leaves its last complete checkpoint;
* **reading**: a missing file or one that is not a checkpoint (truncated, empty, another kind
  of file) raises :class:`UnreadableCheckpoint` naming it, in one line;
* **resuming** (``resume_or_load(..., resume=True)`` in a folder that holds checkpoints): from
  the one ``last_checkpoint`` names; if that one is missing or unreadable, from the newest
  readable other checkpoint of the folder (``model_final.pth``, then ``model_<iteration>.pth``
  newest first), with a warning that names both; if none can be read,
  :class:`UnreadableCheckpoint` listing why. A folder with checkpoints but no
  ``last_checkpoint`` resumes from its newest readable checkpoint likewise;
* **fit** (:func:`fit_problem`): a checkpoint of the run itself (resuming) and the weights to
  evaluate (``strict=True``) must fit the model exactly: a parameter missing from the file, a
  key of the file the model lacks, or a tensor of another shape raise :class:`WeightsMismatch`
  (detectron2 only logs them, and evaluates a half-random model). Weights to start training
  from (``MODEL.WEIGHTS``, e.g. an ImageNet bottom-up) load as detectron2 loads them: what
  fits, with a log line about the rest; but a file of which *nothing* fits (torchvision's own
  file, not converted; weights of another kind of model) is refused, since the run would
  silently start from scratch.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils import comm

from ..cli import UserError
from ..utils import PathLike, atomic_write, write_text_atomic

__all__ = [
    "LAST_CHECKPOINT",
    "AtomicCheckpointer",
    "CheckpointError",
    "UnreadableCheckpoint",
    "WeightsMismatch",
    "fit_problem",
    "holds_checkpoint",
    "is_checkpoint_name",
    "run_checkpoints",
]

logger = logging.getLogger(__name__)

#: The file naming a run's latest checkpoint (detectron2's).
LAST_CHECKPOINT = "last_checkpoint"
#: detectron2's checkpoint names: ``model_<iteration, 7 digits>.pth`` and ``model_final.pth``.
_CHECKPOINT_NAME = re.compile(r"model_(\d{7}|final)\.pth")


class CheckpointError(UserError, ValueError):
    """A checkpoint or weights file that cannot be used; the message names it and why."""


class UnreadableCheckpoint(CheckpointError):
    """A checkpoint file that is missing or that cannot be read."""


class WeightsMismatch(CheckpointError):
    """Weights that do not fit the model they are loaded into."""


def is_checkpoint_name(name: str) -> bool:
    """Whether ``name`` is one of detectron2's checkpoint names (``model_0000099.pth``,
    ``model_final.pth``)."""
    return _CHECKPOINT_NAME.fullmatch(name) is not None


def run_checkpoints(folder: PathLike) -> List[Path]:
    """The checkpoint files of a run's folder, newest first: ``model_final.pth``, then
    ``model_<iteration>.pth`` by decreasing iteration."""
    try:
        names = [p.name for p in Path(folder).iterdir()
                 if is_checkpoint_name(p.name) and p.is_file()]
    except (FileNotFoundError, NotADirectoryError):
        return []
    # "model_final.pth" sorts after every "model_<digits>.pth"
    return [Path(folder) / name for name in sorted(names, reverse=True)]


def holds_checkpoint(folder: PathLike) -> bool:
    """Whether ``folder`` holds a run to resume: ``last_checkpoint`` or any checkpoint."""
    return bool(str(folder)) and (
        os.path.exists(os.path.join(folder, LAST_CHECKPOINT)) or bool(run_checkpoints(folder))
    )


def fit_problem(incompatible: Any, path: str, model_name: str) -> Optional[str]:
    """Why the weights of ``path`` do not fit the model, or None when they fit exactly.

    ``incompatible`` is what a checkpointer's ``_load_model`` returns: ``missing_keys``,
    ``unexpected_keys`` and ``incorrect_shapes`` (``(key, shape in file, shape in model)``).
    """
    shapes = list(incompatible.incorrect_shapes)
    reshaped = {key for key, *_ in shapes}  # left out of the load, so also "missing"
    missing = [key for key in incompatible.missing_keys if key not in reshaped]
    unexpected = list(incompatible.unexpected_keys)
    if not (missing or unexpected or shapes):
        return None
    examples = missing[:2] + unexpected[:2] + [
        f"{key} {tuple(file)} vs {tuple(model)}" for key, file, model in shapes[:2]
    ]
    return (
        f"{path} does not fit the model of this config ({model_name}): {len(missing)} "
        f"parameters missing, {len(unexpected)} unexpected, {len(shapes)} of another shape "
        f"(e.g. {', '.join(examples)}); were the weights trained with this config?"
    )


def _first_line(error: BaseException) -> str:
    """``Kind: first sentence of the message`` (torch's messages run to paragraphs)."""
    text = str(error).strip().splitlines()
    if not text:
        return type(error).__name__
    return f"{type(error).__name__}: {text[0].split('. ')[0].rstrip('.')}"


class AtomicCheckpointer(DetectionCheckpointer):
    """detectron2's checkpointer under the rules of the module docstring.

    ``model_name`` names the model in :class:`WeightsMismatch` messages (the trainer sets its
    config's meta-architecture and backbone; default: the model's class).
    """

    def __init__(self, model: torch.nn.Module, save_dir: str = "", **kwargs: Any) -> None:
        super().__init__(model, save_dir, **kwargs)
        self.model_name = type(self.model).__name__
        self._fit = ""  # while loading: "exact", "some" or "" (detectron2's own rules)
        self._loading = ""

    # --- writing -----------------------------------------------------------------------------

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        target = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {target}")
        with atomic_write(target, "wb") as f:
            torch.save(data, f)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        write_text_atomic(os.path.join(self.save_dir, LAST_CHECKPOINT), last_filename_basename)

    # --- reading -----------------------------------------------------------------------------

    def _load_file(self, filename: str) -> Dict[str, Any]:
        try:
            data = super()._load_file(filename)
        except Exception as e:  # noqa: BLE001  (torch and pickle raise many kinds)
            raise UnreadableCheckpoint(
                f"{filename}: not a readable checkpoint ({_first_line(e)})"
            ) from e
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            raise UnreadableCheckpoint(f"{filename}: not a checkpoint (it holds no model "
                                       "parameters)")
        return data

    def _load_model(self, checkpoint: Any) -> Any:
        offered = list(checkpoint.get("model", ()))  # _load_model takes "model" out
        incompatible = super()._load_model(checkpoint)
        if self._fit == "exact":
            problem = fit_problem(incompatible, self._loading, self.model_name)
            if problem:
                raise WeightsMismatch(problem)
        elif self._fit == "some":
            wanted = {name for name, _ in self.model.named_parameters()}  # buffers aside
            reshaped = {key for key, *_ in incompatible.incorrect_shapes}
            missing = set(incompatible.missing_keys) | reshaped
            if wanted and not wanted - missing:
                first = f"; its first key: {offered[0]}" if offered else ""
                raise WeightsMismatch(
                    f"{self._loading}: none of its {len(offered)} tensors fits a parameter of "
                    f"this model ({self.model_name}{first}); torchvision's files need "
                    "tools/convert_torchvision_weights.py first"
                )
        return incompatible

    def _load_checked(self, path: str, checkpointables: Optional[Sequence[str]],
                      fit: str) -> Dict[str, Any]:
        """``load(path)``; a missing local file is :class:`UnreadableCheckpoint` (detectron2:
        an AssertionError); ``fit``: ``"exact"`` (:func:`fit_problem`) or ``"some"`` (at
        least one parameter loaded), else :class:`WeightsMismatch`."""
        local = "://" not in path
        if local and not os.path.isfile(path) and (comm.is_main_process() or
                                                   comm.get_world_size() == 1):
            raise UnreadableCheckpoint(f"{path}: no such file")
        self._fit, self._loading = fit, path
        try:
            return self.load(path, checkpointables=checkpointables)
        finally:
            self._fit, self._loading = "", ""

    # --- resuming ----------------------------------------------------------------------------

    def has_checkpoint(self) -> bool:
        """:func:`holds_checkpoint` of the save folder (detectron2's: ``last_checkpoint``
        exists), so that a run whose ``last_checkpoint`` is lost resumes too."""
        return holds_checkpoint(self.save_dir)

    def _tagged(self) -> tuple:
        """(path ``last_checkpoint`` names or None, why it cannot be used or None)."""
        tag = os.path.join(self.save_dir, LAST_CHECKPOINT)
        try:
            name = Path(tag).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None, None
        except (OSError, UnicodeDecodeError) as e:
            return None, f"{tag}: unreadable ({_first_line(e)})"
        if not name or os.path.basename(name) != name:
            return None, f"{tag}: names no checkpoint file ({name!r})"
        path = os.path.join(self.save_dir, name)
        if not os.path.isfile(path):
            return None, f"{tag} names {name}, which does not exist"
        return path, None

    def resume(self) -> Dict[str, Any]:
        """Load the run's latest readable checkpoint, model and checkpointables (module
        docstring); it must fit the model."""
        tagged, problem = self._tagged()
        problems = [problem] if problem else []
        candidates = [tagged] if tagged else []
        candidates += [str(p) for p in run_checkpoints(self.save_dir) if str(p) != tagged]
        for path in candidates:
            try:
                data = self._load_checked(path, None, fit="exact")
            except UnreadableCheckpoint as e:
                problems.append(str(e))
                continue
            if problems:
                logger.warning(f"{problems[0]}; resumed from {path}, the newest readable "
                               f"checkpoint" + (f" ({'; '.join(problems[1:])})"
                                                if len(problems) > 1 else ""))
            return data
        raise UnreadableCheckpoint(
            f"{self.save_dir}: no checkpoint to resume from can be read ("
            + ("; ".join(problems) or "none found")
            + "); restore one, or start the run anew (--overwrite)"
        )

    def resume_or_load(self, path: str, *, resume: bool = True, strict: bool = False
                       ) -> Dict[str, Any]:
        """Resume the run of ``save_dir`` when ``resume`` and it holds one (:meth:`resume`);
        else load the model's weights from ``path`` (nothing when empty): every parameter
        fitting exactly when ``strict``, else what fits (at least one parameter)."""
        if resume and self.has_checkpoint():
            return self.resume()
        if not path:
            if strict:
                raise UnreadableCheckpoint(
                    "no weights to load: MODEL.WEIGHTS is empty"
                    + (f" and {self.save_dir} holds no checkpoint" if resume else "")
                )
            return self.load("", checkpointables=[])
        try:
            return self._load_checked(path, [], fit="exact" if strict else "some")
        except UnreadableCheckpoint as e:
            raise UnreadableCheckpoint(f"MODEL.WEIGHTS: {e}") from e
