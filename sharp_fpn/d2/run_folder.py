"""A training run's OUTPUT_DIR: one run at a time, and no finished or interrupted run replaced
unless the user asks.

:func:`run_folder` wraps a run (``tools/train_net.py``, ``tools/demo.py``) in the rules of
:class:`sharp_fpn.outdir.OutputDir`:

* the folder is created; a file in its place, or a folder that cannot be written, is refused
  in one line;
* it is locked while the run writes (``.sharp-fpn.lock``, naming the process): a second run
  into it is refused, naming the folder and the first run's process; the lock of a process
  that died (a killed run) is taken over;
* a folder holding a **finished run** (``model_final.pth``) or an **interrupted one**
  (``last_checkpoint``, or checkpoints ``model_<iteration>.pth``) is refused, unless

  - ``resume``: the run goes on from its last checkpoint (``--resume``);
  - ``overwrite``: it starts anew; the earlier run's checkpoints, ``last_checkpoint`` and
    ``metrics.json`` are removed first (so that no checkpoint of it can be mistaken for one of
    the new run), and a warning lists them (``--overwrite``);
  - ``replace_own``: the earlier run was made by the same tool (the folder's record says it
    wrote ``last_checkpoint`` or ``model_final.pth``): removed as with ``overwrite``
    (``tools/demo.py``, whose folder holds nothing but its own products);

* the files a run replaces (``config.yaml``, ``last_checkpoint``, ``model_final.pth``) are put
  on the folder's record as the tool's; one that exists and is not the tool's (a user's
  ``config.yaml``) is refused unless ``overwrite``; the run's inputs (its config file, its
  ``MODEL.WEIGHTS``) are never removed nor replaced;
* an evaluation (``eval_only``) only takes the lock: evaluating a finished run is what it is
  for, and it writes its config to ``inference/config.yaml``, beside its results, never over
  the trained model's ``config.yaml``.

``log.txt`` and ``metrics.json`` are appended to, never replaced, and are not put on record.

Several processes, several machines: the folder is held once per run, by machine 0's launching
process (torchrun: by rank 0), for all of them. The other processes never take the lock nor
check the folder; they write only their own ``log.txt.rank<N>`` into it (appended to, like
``log.txt``), so machines that share the folder's filesystem never write the same file. Rank
0's ``distributed.json`` (each process's parameter digest and images) is a run file like
``model_final.pth``: replaced by the next run, removed when a run starts anew.
"""
from __future__ import annotations

import logging
import os
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterable, Iterator, List, Optional

from ..cli import UserError
from ..outdir import OutputConflict, OutputDir
from ..utils import PathLike
from .checkpoint import LAST_CHECKPOINT, run_checkpoints

#: What rank 0 writes after a multi-process training (``sharp_fpn.d2.distributed.REPORT``;
#: named here so that this module stays free of torch.distributed).
DISTRIBUTED_REPORT = "distributed.json"

__all__ = ["EVAL_CONFIG", "REPLACED", "run_files", "run_folder"]

logger = logging.getLogger(__name__)

#: Files a training run replaces (put on the folder's record as the tool's).
REPLACED = ("config.yaml", LAST_CHECKPOINT, "model_final.pth", DISTRIBUTED_REPORT)
#: Where an evaluation writes its config, relative to OUTPUT_DIR.
EVAL_CONFIG = "inference/config.yaml"
#: Files of an earlier run removed when a run starts anew, besides its checkpoints.
_STALE = (LAST_CHECKPOINT, "metrics.json", DISTRIBUTED_REPORT)


def run_files(folder: PathLike) -> List[Path]:
    """The files that make ``folder`` hold a run: its checkpoints and ``last_checkpoint``."""
    folder = Path(folder)
    files = run_checkpoints(folder)
    if (folder / LAST_CHECKPOINT).is_file():
        files.append(folder / LAST_CHECKPOINT)
    return files


def _same(a: PathLike, b: PathLike) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _describe(folder: Path, files: List[Path]) -> str:
    names = [p.name for p in files]
    if "model_final.pth" in names:
        return "a finished run (model_final.pth)"
    tag = folder / LAST_CHECKPOINT
    if tag.is_file():
        try:
            last = tag.read_text(encoding="utf-8").strip()
        except OSError:
            last = "?"
        return f"an interrupted run (last checkpoint {last}, no model_final.pth)"
    return f"an interrupted run ({names[0]}, no model_final.pth)"


def _list(names: List[str], most: int = 4) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


@contextmanager
def run_folder(
    output_dir: PathLike,
    *,
    tool: str = "train",
    resume: bool = False,
    overwrite: bool = False,
    replace_own: bool = False,
    eval_only: bool = False,
    config_file: Optional[PathLike] = None,
    inputs: Iterable[PathLike] = (),
    lock: bool = True,
) -> Iterator[OutputDir]:
    """Hold ``output_dir`` for one run under the rules of the module docstring.

    Args:
        output_dir: the run's ``OUTPUT_DIR``.
        tool: the writing tool's kind on the folder's record (``"train"``, ``"demo"``).
        resume, overwrite, replace_own: what to do with a run the folder holds already.
        eval_only: the run only evaluates.
        config_file: the run's config file: never replaced, unless it is a ``config.yaml``
            the tool itself wrote there (a run's own dumped config, reused).
        inputs: other files the run reads (``MODEL.WEIGHTS``): never removed nor replaced.
        lock: take the folder's lock (False where the caller holds it already).

    Yields:
        the folder's :class:`~sharp_fpn.outdir.OutputDir` for this tool.

    Raises:
        OutputConflict, UserError: one line naming the folder (or file) and what to do.
    """
    if not str(output_dir):
        raise UserError("OUTPUT_DIR is empty: give the folder for the run's outputs")
    if resume and overwrite:
        raise UserError(f"{output_dir}: --resume continues the run there, --overwrite starts it "
                        "anew; give one of them")
    folder = Path(output_dir)
    inputs = [Path(p) for p in inputs if p and "://" not in str(p)]
    probe = OutputDir(folder, tool)  # a file in the way, an unwritable folder: refused here
    if config_file and not probe.owns(os.path.relpath(config_file, folder)):
        inputs.append(Path(config_file))
    with ExitStack() as held:
        if lock:
            try:
                held.enter_context(probe.lock())
            except OSError as e:  # a folder that says it is writable, and is not (root, /sys)
                raise OutputConflict(
                    f"{folder}: cannot write in the output folder ({e.strerror or e})"
                ) from None
        if eval_only:
            out = OutputDir(folder, tool, overwrite=overwrite, inputs=inputs)
            out.claim(EVAL_CONFIG)
            yield out
            return
        existing = run_files(folder)
        adopt = False
        if existing:
            what = _describe(folder, existing)
            if resume:
                adopt = True  # continuing it: its files are the run's own
            elif not overwrite and not (replace_own and any(probe.owns(p.name) for p in existing)):
                if replace_own:
                    for p in existing:  # whose is it: "written by train", "not by sharp-fpn"
                        if p.name in REPLACED:
                            probe.check(p.name)
                    raise OutputConflict(
                        f"{folder}: holds {what} that {tool} did not make; pass --overwrite to "
                        "replace it, or choose another output folder"
                    )
                raise OutputConflict(
                    f"{folder}: holds {what}; pass --resume to continue it, --overwrite to "
                    "start anew (its checkpoints are removed), or choose another OUTPUT_DIR"
                )
            if not resume:
                stale = existing + [folder / n for n in _STALE if (folder / n).is_file()]
                stale = list(dict.fromkeys(stale))
                for path in stale:
                    if any(_same(path, i) for i in inputs):
                        raise OutputConflict(
                            f"{path}: is one of the run's inputs and would be removed with the "
                            f"earlier run in {folder}; copy it elsewhere, or choose another "
                            "OUTPUT_DIR"
                        )
                for path in stale:
                    path.unlink()
                reason = "--overwrite" if overwrite else f"replacing {tool}'s own earlier run"
                logger.warning(f"{folder}: {reason}: starting anew; removed the files of "
                               f"{what}: {_list([p.name for p in stale])}")
        out = OutputDir(folder, tool, overwrite=overwrite or adopt, inputs=inputs)
        out.claim_all(REPLACED)
        yield out
