"""Reproduce the paper's Table 1, 2 or 3 (with Figures 5 and 7): train every row, evaluate,
and write the table beside the paper's numbers.

:func:`reproduce` is what ``tools/reproduce.py`` runs. Written under the output folder
(atomically):

- ``table{N}.md``, ``table{N}.csv``: ours beside the paper's (SPEC section 2); Table 1 also
  as the paper lays it out (models down, its five data sets across); Table 3's eight models
  this project does not have are listed with the paper's figures only;
- ``table{N}_iou_boxplot.png``: per-image IoU of every row (the paper's Figure 5);
- Table 1, when the UNet# row with deep supervision ran: ``fig7_pruning.png`` and
  ``pruning.csv``, the sub-networks L1..L4 pruned from it: parameters, images per second
  measured here, IoU (the paper's Figure 7);
- ``rows/<row>/``: each row's training output, config and ``result.json`` (``resume`` reuses
  finished rows).

``quick`` runs every row on the CPU on its data set's synthetic stand-in (DSB2018: the embedded
synthetic nuclei; BraTS19, LiTS17, LIDC-IDRI, LUNA16: ``<dataset>_quick_train`` / ``_val``,
written in the data set's own format by ``sharp_fpn.data.medical``) with the recipe of
``configs/experiments/quick/`` (tiny widths, small inputs) and few iterations: it tests the
pipeline, it does not reproduce the paper, and the table says so. Rows run one after the other
in this process (one GPU, or the CPU).

Training needs detectron2: :mod:`sharp_fpn.d2.runner` is imported when rows run, so this module
(and its tables and writers) imports without it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

from .recipes import QUICK_ITERS
from .report import (
    header_note,
    machine_load,
    paper_layout,
    table_rows,
    write_figures,
    write_tables,
)
from .results import RESULT_NAME, RowResult
from .tables import DATASET_NAMES, NOT_IMPLEMENTED, PROJECT_ROOT, PRUNING_ROW, select_rows

logger = logging.getLogger("sharp_fpn.experiments")


@dataclass(frozen=True)
class Options:
    """One reproducer run (the command line's flags).

    Attributes:
        table: 1, 2 or 3.
        quick: smoke run (synthetic set, CPU, tiny widths, few iterations).
        output: output folder; None for ``output/reproduce/table<N>[_quick]``.
        rows: row keys to run (None: all of the table's).
        datasets: only the rows of these data sets (Table 1's columns: ``dsb2018``,
            ``brats19``, ``lits17``, ``lidc``, ``luna16``); None: every one.
        iters: ``SOLVER.MAX_ITER`` of every row (None: the quick recipe's or the configs').
        resume: reuse rows whose ``result.json`` exists.
        speed_seconds: time spent measuring each pruned level's images per second.
        threads: torch's intra-op threads for the whole run; None: 1 with ``quick`` (its tiny
            models run fastest on one thread, and many times faster on a busy shared CPU:
            measured 4 s against 103 s for a quick UNet# row at load 9 on 2 cores), else
            torch's default (one per core).
        opts: config overrides for every row, ``KEY VALUE`` pairs.
    """

    table: int
    quick: bool = False
    output: Optional[Path] = None
    rows: Optional[Sequence[str]] = None
    datasets: Optional[Sequence[str]] = None
    iters: Optional[int] = None
    resume: bool = False
    speed_seconds: float = 2.0
    threads: Optional[int] = None
    opts: Sequence[str] = field(default_factory=tuple)

    def output_dir(self) -> Path:
        if self.output is not None:
            return Path(self.output)
        return PROJECT_ROOT / "output" / "reproduce" / (
            f"table{self.table}" + ("_quick" if self.quick else ""))

    def row_threads(self) -> Optional[int]:
        if self.threads is None and self.quick:
            return 1
        return self.threads

    def row_iters(self) -> Optional[int]:
        if self.iters is None and self.quick:
            return QUICK_ITERS[self.table]
        return self.iters


def run_rows(options: Options, output: Path
             ) -> Tuple[Dict[str, RowResult], Dict[str, int], Dict[str, str]]:
    """Every selected row: trained and evaluated, reused (``resume``), or listed as not
    implemented (Table 3's other models), not run (no config yet) or failed (training
    diverged).

    Returns the results by row key, the iterations each row trained, and per data set what
    its rows trained and were evaluated on (``"train -> test"``).
    """
    from ..d2.runner import row_config, run_row

    rows = select_rows(options.table, options.rows, options.datasets)
    results: Dict[str, RowResult] = {}
    used_iters: Dict[str, int] = {}
    data: Dict[str, str] = {}
    for n, row in enumerate(rows, 1):
        where = f"[{n}/{len(rows)}] {row.key}"
        row_dir = output / "rows" / row.key
        if not row.implemented:
            results[row.key] = RowResult(row.key, NOT_IMPLEMENTED)
            continue
        if not row.config_path.is_file():
            results[row.key] = RowResult(row.key, f"not run: {row.config} does not exist yet")
            logger.warning(f"{where}: {results[row.key].status}")
            continue
        cfg = row_config(row, options.quick, options.row_iters(), options.opts, row_dir)
        used_iters[row.key] = cfg.SOLVER.MAX_ITER
        data[DATASET_NAMES[row.dataset]] = (
            f"{', '.join(cfg.DATASETS.TRAIN)} -> {', '.join(cfg.DATASETS.TEST)}")
        done = row_dir / RESULT_NAME
        if options.resume and done.is_file():
            results[row.key] = RowResult.load(done)
            logger.info(f"{where}: reused {done}")
            continue
        logger.info(f"{where}: training {cfg.SOLVER.MAX_ITER} iterations ({row.config})")
        pruning = options.table == 1 and row.key == PRUNING_ROW
        try:
            r = results[row.key] = run_row(row, cfg, row_dir, pruning, options.speed_seconds)
        except FloatingPointError as e:  # a diverged row is a result too; go on with the rest
            results[row.key] = RowResult(row.key, f"failed: {e}")
            logger.error(f"{where}: {results[row.key].status}")
            continue
        logger.info(f"{where}: IoU {r.iou:.2f}%, Dice {r.dice:.2f}%, "
                    f"{r.train_seconds:.0f} s training, {r.eval_seconds:.0f} s evaluation")
    return results, used_iters, data


def reproduce(options: Options) -> Path:
    """Run the rows, write the tables and figures; return the output folder.

    Raises:
        UnknownRowError: ``options.rows`` names a row the table does not have (before any
            row runs).
    """
    rows = select_rows(options.table, options.rows, options.datasets)  # checked first
    from ..d2.runner import set_threads, setup_logging

    setup_logging()
    threads = options.row_threads()
    if threads is not None:
        set_threads(threads)
    output = options.output_dir()
    started = time.perf_counter()
    results, used_iters, data = run_rows(options, output)
    pruning = write_figures(output, options.table, options.quick, rows, results)
    note = header_note(options.table, options.quick, used_iters, machine_load(), data)
    note += f"Total wall time: {time.perf_counter() - started:.0f} s.\n"
    records = table_rows(options.table, rows, results, options.quick)
    layout = paper_layout(rows, results) if options.table == 1 else ""
    write_tables(output, options.table, records, note, pruning, layout)
    logger.info(f"wrote {output / f'table{options.table}.md'}")
    return output


__all__ = ["Options", "reproduce", "run_rows"]
