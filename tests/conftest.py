"""Shared test set-up: every test sees a private, empty datasets root."""
import os
import tempfile

# Set before any test module imports sharp_fpn, which registers its datasets under this root.
os.environ["DETECTRON2_DATASETS"] = tempfile.mkdtemp(prefix="sharp-fpn-datasets-")

import atexit  # noqa: E402
import shutil  # noqa: E402

atexit.register(shutil.rmtree, os.environ["DETECTRON2_DATASETS"], ignore_errors=True)
