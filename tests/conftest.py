"""Shared test set-up: a private, empty datasets root, single-threaded torch, and the project's
warning filters around every test.

Every test model is tiny: one thread runs it fastest, above all on a shared 2-core machine.

Warnings: pytest.ini makes any warning that sharp_fpn's own modules emit an error; the
third-party ones the project knows of are silenced by the same function the tools and
``sharp_fpn.d2`` call (:func:`sharp_fpn.utils.silence_warnings`). pytest restores the filters
after each test, hence the set-up hook; the call at import covers collection.
"""
import atexit
import os
import shutil
import tempfile

import pytest
import torch

from sharp_fpn.utils import silence_warnings

# Set before any test module imports sharp_fpn, which registers its datasets under this root.
os.environ["DETECTRON2_DATASETS"] = tempfile.mkdtemp(prefix="sharp-fpn-datasets-")
atexit.register(shutil.rmtree, os.environ["DETECTRON2_DATASETS"], ignore_errors=True)
torch.set_num_threads(1)
silence_warnings()
# Qt without a window system (the napari plugin's tests): the offscreen platform needs no X
# client libraries; napari's canvas gets its OpenGL through the X server pytest-xvfb starts
# (Mesa's llvmpipe), which Qt's offscreen platform uses when DISPLAY is set.
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """The project's third-party filters inside pytest's per-test warnings context, before any
    fixture of the test is set up (module-scoped ones included, which an autouse function
    fixture would come after)."""
    silence_warnings()


def pytest_collection(session):
    """The same filters while test modules are imported (detectron2's import-time warnings):
    pytest restores the filters after loading this file, and applies pytest.ini's before this
    hook runs."""
    silence_warnings()
