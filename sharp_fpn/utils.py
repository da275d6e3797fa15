"""Small helpers shared across the package (no torch, no detectron2)."""
from __future__ import annotations

import csv
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

PathLike = Union[str, "os.PathLike[str]"]


@contextmanager
def atomic_write(path: PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` whole.

    The file is flushed and fsync-ed before the rename, so ``path`` holds either its old
    content or the complete new one, never a part; on any error the temporary file is removed
    and ``path`` is left as it was. The parent folder is created if needed.

        with atomic_write("out/table.csv", newline="") as f:
            f.write(...)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` all or nothing (see :func:`atomic_write`)."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_csv_atomic(
    path: PathLike,
    rows: Iterable[Union[Mapping[str, Any], Sequence[Any]]],
    columns: Sequence[str],
) -> None:
    """Write a header of ``columns`` then ``rows`` to ``path`` as CSV, all or nothing.

    The project's one CSV convention: UTF-8, ``,`` separated, ``\\n`` line ends (as DSB2018's
    own ``stage1_train_labels.csv``), values quoted only where they need it. A row is either a
    mapping keyed by column names (a missing key is written empty; a key that is not a column
    raises ValueError) or a sequence of exactly ``len(columns)`` values. Any error, one from
    ``rows`` included, leaves ``path`` as it was (see :func:`atomic_write`).
    """
    columns = list(columns)
    with atomic_write(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        for number, row in enumerate(rows, 1):
            if isinstance(row, Mapping):
                extra = [key for key in row if key not in columns]
                if extra:
                    raise ValueError(f"{path}: row {number} has keys {extra} that are not columns")
                writer.writerow([row.get(column, "") for column in columns])
            else:
                values = list(row)
                if len(values) != len(columns):
                    raise ValueError(
                        f"{path}: row {number} has {len(values)} values for {len(columns)} "
                        f"columns {columns}"
                    )
                writer.writerow(values)


def available_cpus() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity is not None:
        try:
            return max(1, len(affinity(0)))
        except OSError:
            pass
    return max(1, os.cpu_count() or 1)


_MALLOC_TRIM: Any = None


def release_free_memory() -> bool:
    """Give the heap's free pages back to the OS (glibc's ``malloc_trim(0)``); False where
    there is no glibc (a no-op).

    A model run on tile after tile frees its hundreds of MB of activations each time, but
    glibc keeps freed memory mapped when small, long-lived allocations (the stitch's masks
    and label chunks) sit between the freed blocks: measured on the shipped model, the
    resident memory of a tiled run climbed from 1,090 to 1,622 MB over 36 tiles of 1024 px,
    and stayed between 808 and 837 MB with this called after each tile. Dask's documentation
    gives the same remedy for its workers. It costs milliseconds."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        _MALLOC_TRIM = False
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            pass
    if _MALLOC_TRIM is False:
        return False
    _MALLOC_TRIM(0)
    return True


def worker_count(requested: Optional[int] = None) -> int:
    """How many worker processes to use: ``requested``, or every available core when None.

    The project's one rule (data conversion, synthetic data, predictions): None means
    :func:`available_cpus`; a number is taken as it is, even above the core count (the result
    never depends on it, only the speed). Raises ValueError for a number below 1.
    """
    if requested is None:
        return available_cpus()
    if isinstance(requested, bool) or int(requested) != requested:
        raise ValueError(f"workers must be a whole number, got {requested!r}")
    if requested < 1:
        raise ValueError(f"workers must be at least 1, got {requested}")
    return int(requested)


# --------------------------------------------------------------------------------------------
# warnings

#: The third-party warnings the project silences, each as (message regex, category, module
#: regex of the code that emits it); every other warning, the project's own above all, stays
#: on. Applied by :func:`silence_warnings`: by ``sharp_fpn.d2`` before detectron2 is first
#: imported, by the tools at start-up and by the test suite around every test.
THIRD_PARTY_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # detectron2 v0.6 scripts a few helpers at import time; torch 2.14 deprecates TorchScript.
    (r"`torch\.jit\.script(_method)?` is deprecated", FutureWarning, r"torch\.jit\."),
    # detectron2 v0.6's anchor generator calls torch.meshgrid without indexing=.
    (r"torch\.meshgrid: in an upcoming release", UserWarning, r"torch\.functional"),
    # detectron2 v0.6 resizes masks through PIL (np.asarray of a PIL image is read-only) and
    # hands them to torch.from_numpy in annotations_to_instances, or fvcore's flip does after
    # its ResizeTransform; both only read them.
    (r"The given NumPy array is not writable", UserWarning,
     r"(detectron2\.data\.|fvcore\.transforms\.)"),
    # pycocotools' compiled RLE decode/encode/area hand NumPy 2 an __array__ that takes no
    # copy= argument (NumPy falls back to a copy; the results are right).
    (r"__array__ implementation doesn't accept a copy keyword", DeprecationWarning,
     r"pycocotools\."),
)


def silence_warnings() -> None:
    """Filter :data:`THIRD_PARTY_WARNINGS` (idempotent: the filters are not added twice).

    Filters belong to the process (a spawned worker starts with fresh ones and calls this
    again) and to the current :func:`warnings.catch_warnings` block, which pytest opens around
    each test.
    """
    for message, category, module in THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
