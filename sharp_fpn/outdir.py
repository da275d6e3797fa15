"""Output folders that never lose a user's file: what a tool wrote is on record, nothing else is
overwritten, and a folder in use by a running tool is locked.

Every tool that writes into a folder given by the user (``predict``, the converters, training)
goes through :class:`OutputDir`:

* a file is written only if it does not exist, or if a run of the *same tool* wrote it before
  (the folder's record, ``.sharp-fpn-outputs.json``, lists what each tool wrote); anything else
  is refused with :class:`OutputConflict` naming the file, unless ``overwrite=True`` (the
  tools' ``--overwrite``);
* a file that is one of the run's inputs is never an output (``inputs=``);
* a file the record lists is some tool's output: :func:`is_recorded_output` tells readers to
  leave it out of their inputs (a second ``predict`` run never segments the first one's
  overlays);
* the name is put on record *before* the file is written, and the file itself is written to a
  temporary name and renamed when whole (:func:`sharp_fpn.utils.atomic_write`), so a run killed
  at any moment leaves either the old file or the new one, and its rerun may replace both;
* :meth:`OutputDir.lock` holds ``.sharp-fpn.lock`` while a run writes, naming the process; a
  second run into the same folder is refused while the first lives, and a lock whose process
  has died (same host) is taken over.

No torch, no detectron2.
"""
from __future__ import annotations

import json
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterable, Iterator, Optional

from .utils import PathLike, atomic_write

__all__ = [
    "LOCK_NAME",
    "RECORD_NAME",
    "OutputConflict",
    "OutputDir",
    "is_recorded_output",
    "recorded_outputs",
]

RECORD_NAME = ".sharp-fpn-outputs.json"
LOCK_NAME = ".sharp-fpn.lock"


class OutputConflict(RuntimeError):
    """An output that would destroy something: a user's file, an input, a folder in use."""


def _read_record(folder: Path) -> dict:
    path = folder / RECORD_NAME
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise OutputConflict(
            f"{path}: unreadable record of earlier outputs ({e}); delete it only if nothing "
            "in the folder is yours to keep"
        ) from None
    if not isinstance(record, dict) or not all(isinstance(v, list) for v in record.values()):
        raise OutputConflict(f"{path}: not a record of outputs (expected {{tool: [names]}})")
    return record


def recorded_outputs(folder: PathLike, tool: Optional[str] = None) -> set:
    """Names (relative to ``folder``) that ``tool`` (default: any sharp-fpn tool) wrote into
    ``folder``; an unreadable record counts as none."""
    try:
        record = _read_record(Path(folder))
    except OutputConflict:
        return set()
    kinds = record.values() if tool is None else [record.get(tool, [])]
    return {name for names in kinds for name in names if isinstance(name, str)}


def is_recorded_output(path: PathLike) -> bool:
    """Whether ``path`` is a file some sharp-fpn tool wrote (and so no input of another run)."""
    path = Path(path)
    return path.name == RECORD_NAME or path.name in recorded_outputs(path.parent)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


class OutputDir:
    """A folder a tool writes into, under the rules of the module docstring.

    Args:
        folder: the output folder; created if missing. An existing file there, or a folder that
            cannot be written, is refused at once, naming it.
        tool: the writing tool's kind (``"predict"``, ``"convert_dsb2018"``, ``"train"``...):
            a run may replace what earlier runs of the same kind wrote.
        overwrite: replace any file (the user said ``--overwrite``); inputs stay protected.
        inputs: the run's input files; none of them is ever written.
    """

    def __init__(
        self,
        folder: PathLike,
        tool: str,
        *,
        overwrite: bool = False,
        inputs: Iterable[PathLike] = (),
    ):
        self.folder = Path(folder)
        self.tool = tool
        self.overwrite = overwrite
        self._inputs = {self._key(p) for p in inputs}
        if self.folder.exists() and not self.folder.is_dir():
            raise OutputConflict(f"{self.folder}: is a file, not a folder for the outputs")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputConflict(f"{self.folder}: cannot create the output folder ({e.strerror})")
        if not os.access(self.folder, os.W_OK | os.X_OK):
            raise OutputConflict(f"{self.folder}: the output folder is not writable")
        self._record = _read_record(self.folder)

    @staticmethod
    def _key(path: PathLike) -> str:
        return os.path.realpath(path)

    def _mine(self) -> set:
        return set(self._record.get(self.tool, ()))

    def check(self, name: str) -> Path:
        """The path of output ``name`` if this run may write it; else :class:`OutputConflict`."""
        path = self.folder / name
        if self._key(path) in self._inputs:
            raise OutputConflict(f"{path}: is one of the inputs; choose another output")
        # a Zarr output (a folder) this tool wrote may be replaced; any other folder is in the way
        if path.is_dir() and not (name.endswith(".zarr") and (self.overwrite
                                                              or name in self._mine())):
            raise OutputConflict(f"{path}: a folder is in the way of an output file")
        if path.exists() and not self.overwrite and name not in self._mine():
            owner = next((t for t, names in self._record.items() if name in names), None)
            made_by = f"written by {owner}" if owner else "not written by sharp-fpn"
            raise OutputConflict(
                f"{path}: exists ({made_by}); choose another output folder, or pass "
                "--overwrite to replace it"
            )
        return path

    def claim(self, name: str) -> Path:
        """:meth:`check` ``name`` and put it on record as this tool's output (before writing)."""
        path = self.check(name)
        if name not in self._mine():
            self._record.setdefault(self.tool, []).append(name)
            self._save_record()
        return path

    def claim_all(self, names: Iterable[str]) -> list:
        """Check every name first, then record them all: nothing is claimed if one conflicts."""
        names = list(names)
        paths = [self.check(name) for name in names]
        new = [n for n in names if n not in self._mine()]
        if new:
            self._record.setdefault(self.tool, []).extend(new)
            self._save_record()
        return paths

    @contextmanager
    def open(self, name: str, mode: str = "w", **open_kwargs) -> Iterator[IO]:
        """Claim ``name`` and write it whole or not at all (:func:`~sharp_fpn.utils.atomic_write`)."""
        with atomic_write(self.claim(name), mode, **open_kwargs) as f:
            yield f

    def owns(self, name: str) -> bool:
        """Whether an earlier or this run of this tool wrote ``name``."""
        return name in self._mine()

    def _save_record(self) -> None:
        text = json.dumps(self._record, indent=1, sort_keys=True) + "\n"
        with atomic_write(self.folder / RECORD_NAME, "w", encoding="utf-8") as f:
            f.write(text)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder's lock while the block runs; refused while another run holds it."""
        path = self.folder / LOCK_NAME
        me = {"pid": os.getpid(), "host": socket.gethostname(), "tool": self.tool}
        for _ in range(2):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._holder(path)
                if holder is None:  # stale: its process is gone
                    path.unlink(missing_ok=True)
                    continue
                raise OutputConflict(
                    f"{self.folder}: in use by {holder.get('tool', 'a sharp-fpn tool')} "
                    f"(pid {holder.get('pid')} on {holder.get('host')}); wait for it to end, or "
                    f"delete {path} if no such run is going"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            break
        else:
            raise OutputConflict(f"{path}: cannot take the lock")
        try:
            yield
        finally:
            if self._holder(path) == me:
                path.unlink(missing_ok=True)

    @staticmethod
    def _holder(path: Path) -> Optional[dict]:
        """The lock's holder, or None when it is stale (its process died on this host)."""
        try:
            holder = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"tool": "an unknown process (unreadable lock)"}
        same_host = holder.get("host") == socket.gethostname()
        if same_host and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]):
            return None
        return holder
