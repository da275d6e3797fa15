"""What a row produced: :class:`RowResult`, stored as the row's ``result.json``."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Dict, List, Optional

from ..utils import write_text_atomic

RESULT_NAME = "result.json"


@dataclass
class RowResult:
    """One row's outcome; IoU and Dice in %, None where the row did not get that far."""

    key: str
    status: str  # "done", or why the row did not run or failed
    iou: Optional[float] = None
    dice: Optional[float] = None
    params: Optional[int] = None  # the trained network (tiny with --quick)
    config_params: Optional[int] = None  # the yaml's own network (the paper's widths)
    train_seconds: Optional[float] = None
    eval_seconds: Optional[float] = None
    per_image_iou: Optional[List[float]] = None
    pruning: Optional[List[Dict[str, float]]] = None

    @property
    def done(self) -> bool:
        return self.status == "done"

    def save(self, folder: Path) -> Path:
        """Write ``folder/result.json`` (atomically); returns its path."""
        path = Path(folder) / RESULT_NAME
        write_text_atomic(path, json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, path: Path) -> "RowResult":
        """A ``result.json``; unknown fields raise ValueError naming the file."""
        record = json.loads(Path(path).read_text(encoding="utf-8"))
        unknown = set(record) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown fields {sorted(unknown)}")
        return cls(**record)
