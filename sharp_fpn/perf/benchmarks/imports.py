"""imports: how long ``import X`` takes in a fresh interpreter, and which frameworks it loads.

Every candidate is a fresh ``python -c "import X"`` process, timed by the one policy
(interleaved rounds after a warm-up, fastest round). A bare interpreter (``pass``) is timed
alongside, so ``import_s`` is a module's own import time (the process's minus the bare
interpreter's); ``over_torch_s``, for a module that loads torch, is what it adds to torch's
own import. The project's target (:func:`target`): ``import sharp_fpn`` loads neither
detectron2 nor cv2 and adds less than 0.5 s to torch's own import.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any, Callable, Dict, List

from ..timing import time_interleaved

#: Frameworks whose loading is reported for each import.
WATCHED = ("torch", "detectron2", "cv2")
DEFAULT_MODULES = ("torch", "sharp_fpn", "sharp_fpn.models", "sharp_fpn.d2")
BARE = "python"  # the candidate that imports nothing
TARGET_S = 0.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--modules", nargs="+", default=list(DEFAULT_MODULES),
                        help="imports to time, 'a, b' for several in one process "
                        "(%(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (%(default)s)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed rounds first (disk caches, .pyc files) (%(default)s)")


def _code(statement: str) -> str:
    return (f"{statement}\nimport json, sys\n"
            f"print(json.dumps({{m: m in sys.modules for m in {WATCHED!r}}}))")


def _candidate(modules: str, seen: Dict[str, Dict[str, bool]]) -> Callable[[], None]:
    names = [m.strip() for m in modules.split(",") if m.strip()]
    statement = "; ".join(f"import {m}" for m in names) or "pass"
    command = [sys.executable, "-c", _code(statement)]
    env = dict(os.environ, PYTHONWARNINGS="ignore")

    def run() -> None:
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode:
            raise RuntimeError(f"{statement!r} failed in a fresh interpreter:\n{done.stderr}")
        seen[modules] = json.loads(done.stdout.strip().splitlines()[-1])

    return run


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Import times (s) and loaded frameworks of each of ``args.modules``."""
    seen: Dict[str, Dict[str, bool]] = {}
    names: List[str] = [BARE] + [m for m in args.modules if m != BARE]
    candidates = {name: _candidate("" if name == BARE else name, seen) for name in names}
    timings = time_interleaved(candidates, rounds=args.rounds, warmup=args.warmup)
    bare = timings[BARE].best
    rows: Dict[str, Dict[str, Any]] = {}
    for name in names[1:]:
        rows[name] = {
            "process_s": round(timings[name].best, 4),
            "import_s": round(max(0.0, timings[name].best - bare), 4),  # 0: within the noise
            "rounds_s": [round(r, 4) for r in timings[name].rounds],
            "loads": seen[name],
        }
    torch_s = timings["torch"].best if "torch" in timings else None
    for name, row in rows.items():
        if torch_s is not None and name != "torch" and row["loads"]["torch"]:
            row["over_torch_s"] = round(max(0.0, timings[name].best - torch_s), 4)
        print(f"{name:18s} {row['import_s']:7.3f} s  loads "
              f"{[m for m, loaded in row['loads'].items() if loaded] or 'nothing watched'}")
    figures: Dict[str, Any] = {"interpreter_s": round(bare, 4), "modules": rows}
    if "sharp_fpn" in rows:
        figures["target"] = target(rows)
    return figures


def added_to_torch(row: Dict[str, Any]) -> float:
    """What importing a module adds to torch's own import: ``over_torch_s`` if it loads torch,
    else its whole import time (an upper bound: nothing of it is shared with torch)."""
    return row["over_torch_s"] if "over_torch_s" in row else row["import_s"]


def target(rows: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """The project's target for ``import sharp_fpn``: neither detectron2 nor cv2 loaded, less
    than :data:`TARGET_S` added to torch's own import (``sharp_fpn.models`` reported too)."""
    row = rows["sharp_fpn"]
    heavy = [m for m in ("detectron2", "cv2") if row["loads"][m]]
    added = added_to_torch(row)
    result: Dict[str, Any] = {"sharp_fpn_loads": heavy, "sharp_fpn_added_to_torch_s": added,
                              "limit_s": TARGET_S, "met": not heavy and added < TARGET_S}
    if "sharp_fpn.models" in rows:
        result["sharp_fpn_models_added_to_torch_s"] = added_to_torch(rows["sharp_fpn.models"])
    return result
