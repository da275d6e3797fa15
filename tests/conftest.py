"""Shared test set-up: a private, empty datasets root, and single-threaded torch.

Every test model is tiny: one thread runs it fastest, above all on a shared 2-core machine.
"""
import atexit
import os
import shutil
import tempfile

import torch

# Set before any test module imports sharp_fpn, which registers its datasets under this root.
os.environ["DETECTRON2_DATASETS"] = tempfile.mkdtemp(prefix="sharp-fpn-datasets-")
atexit.register(shutil.rmtree, os.environ["DETECTRON2_DATASETS"], ignore_errors=True)
torch.set_num_threads(1)
