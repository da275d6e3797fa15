"""The paper's experiments as library code; ``tools/reproduce.py`` is a command line over it.

* :mod:`.tables`: Table 1 (five data sets), 2 and 3 rows with the paper's numbers, Figure 7's
  pruned parameter counts, row and data set selection;
* :mod:`.recipes`: the ``--quick`` recipe, yaml files in ``configs/experiments/quick/``, and
  each row's synthetic stand-in data set;
* :mod:`.results`: a row's outcome (``result.json``);
* :mod:`.report`: the markdown/CSV tables, the IoU box plot, the pruning figure;
* :mod:`.reproduce`: :class:`~.reproduce.Options` and :func:`~.reproduce.reproduce`, the run.

Framework-free on import; training and evaluating a row is in :mod:`sharp_fpn.d2.runner`.
"""
from .reproduce import Options, reproduce
from .results import RowResult
from .tables import (
    TABLE1,
    TABLE1_EXTRAS,
    TABLE2,
    TABLE3,
    Row,
    UnknownRowError,
    rows_of,
    select_rows,
)

__all__ = ["Options", "Row", "RowResult", "TABLE1", "TABLE1_EXTRAS", "TABLE2", "TABLE3",
           "UnknownRowError", "reproduce", "rows_of", "select_rows"]
