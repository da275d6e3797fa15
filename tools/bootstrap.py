#!/usr/bin/env python3
"""Create or reuse the project's virtual environment ``.venv`` (called by ``make``).

Three stages, each recorded in ``.venv/sharp-fpn-stages`` only once it finished:

1. ``torch``: a new venv with torch/torchvision (pinned), ``setuptools<81`` (detectron2 v0.6
   needs ``pkg_resources``) and wheel;
2. ``detectron2``: tools/install_detectron2.py (official source, else the checked fallback);
3. ``project``: this project, editable, with its dependencies and test tools.

A stage is redone when its inputs changed (the pins, the installer, setup.py); a ``.venv``
without a finished first stage is a half-made one from an interrupted run and is rebuilt from
scratch, never trusted. Standard library only.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
STAMP = VENV / "sharp-fpn-stages"
TORCH_PINS = ["torch==2.14.1", "torchvision==0.29.1"]
BUILD_PINS = ["setuptools>=64,<81", "wheel"]


def _digest(*parts: object) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            h.update(part.read_bytes())
        else:
            h.update(repr(part).encode())
    return h.hexdigest()[:16]


def stage_keys() -> dict[str, str]:
    torch_key = _digest(TORCH_PINS, BUILD_PINS, sys.version_info[:2])
    d2_key = _digest(torch_key, ROOT / "tools" / "install_detectron2.py")
    project_key = _digest(d2_key, ROOT / "setup.py")
    return {"torch": torch_key, "detectron2": d2_key, "project": project_key}


def venv_python() -> Path:
    return VENV / "bin" / "python"


def read_stamp() -> dict[str, str]:
    try:
        return json.loads(STAMP.read_text())
    except (OSError, ValueError):
        return {}


def write_stamp(done: dict[str, str]) -> None:
    tmp = STAMP.with_suffix(".tmp")
    tmp.write_text(json.dumps(done, indent=1))
    os.replace(tmp, STAMP)


def run(*cmd: object) -> None:
    cmd_s = [str(c) for c in cmd]
    print("[bootstrap] $ " + " ".join(cmd_s), flush=True)
    subprocess.check_call(cmd_s, cwd=ROOT)


def main() -> int:
    keys = stage_keys()
    done = read_stamp()
    py = venv_python()

    if done.get("torch") != keys["torch"] or not py.exists():
        if VENV.exists():
            print("[bootstrap] .venv is missing its first stage (interrupted or outdated): rebuilding it")
            shutil.rmtree(VENV)
        print("[bootstrap] creating .venv", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
        run(py, "-m", "pip", "install", "--upgrade", "pip")
        run(py, "-m", "pip", "install", *BUILD_PINS, *TORCH_PINS)
        done = {"torch": keys["torch"]}
        write_stamp(done)

    if done.get("detectron2") != keys["detectron2"]:
        run(py, ROOT / "tools" / "install_detectron2.py")
        done = {"torch": keys["torch"], "detectron2": keys["detectron2"]}
        write_stamp(done)

    if done.get("project") != keys["project"]:
        run(py, "-m", "pip", "install", "--no-build-isolation", "-e", f"{ROOT}[test,onnx,napari]")
        done = dict(keys)
        write_stamp(done)

    out = subprocess.run(
        [py, "-c", "import detectron2, importlib.util as u; from detectron2 import _C; "
         "print(detectron2.__version__, 'python-only fallback' if getattr(_C, 'IS_STAND_IN', False) "
         "else 'with compiled ops')"],
        capture_output=True, text=True, cwd=ROOT,
    )
    if out.returncode != 0:
        print(out.stderr, file=sys.stderr)
        print("[bootstrap] detectron2 does not import in .venv; remove .venv and run make again",
              file=sys.stderr)
        return 1
    print(f"[bootstrap] .venv ready: detectron2 {out.stdout.strip()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
