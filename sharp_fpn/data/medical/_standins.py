"""Where the DICOM and MetaImage stand-ins are written: whole or nothing, replaceable.

:func:`standins_folder` gives a temporary folder beside ``root``; when the block ends without
an error it becomes ``root``, with a hidden marker file (``.sharp_fpn_standins``, which no
reader of the real layouts looks at) saying what wrote it. ``root`` may be missing, an empty
folder, or stand-ins written before (marked): those are replaced. Anything else is refused, so
real data is never overwritten. On an error the temporary folder is removed and ``root`` is
left as it was.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

MARKER = ".sharp_fpn_standins"


@contextmanager
def standins_folder(root: Path, what: str) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``root`` when the block succeeds (see the
    module). ``what`` is recorded in the marker. Raises FileExistsError when ``root`` is a
    file, or a non-empty folder without the marker."""
    root = Path(root)
    if root.exists():
        if not root.is_dir():
            raise FileExistsError(f"{root}: is a file, not a folder for stand-ins")
        if any(root.iterdir()) and not (root / MARKER).is_file():
            raise FileExistsError(f"{root}: exists, is not empty and holds no stand-ins written "
                                  "by sharp-fpn; choose another folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.", suffix=".tmp"))
    try:
        yield tmp
        (tmp / MARKER).write_text(what + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)
        old = None
        if root.exists():
            old = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.", suffix=".old"))
            os.replace(root, old / "data")
        os.replace(tmp, root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
