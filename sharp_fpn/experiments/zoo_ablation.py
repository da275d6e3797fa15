"""What each choice of the shipped models' recipe buys (issue 8), measured on held-out data.

Each variant is the recipe (``configs/zoo/mask_rcnn_fpn_R18h.yaml``) with one choice undone,
trained for the same short budget on ``nuclei_synth2_nobf_train``: synthetic v2 *without* the
brightfield style, so that the held-out brightfield images are a style mix the model never
saw, next to held-out fluorescence and H&E of another seed (``nuclei_synth2_test_<style>``).

=====================  =========================================================================
variant                what changes
=====================  =========================================================================
``recipe``             nothing: percentile normalisation, photometric, scale and dihedral
                       augmentations
``no_photometric``     ``INPUT.PHOTOMETRIC False``
``no_normalisation``   ``INPUT.NORMALIZE ""`` (images as read, as the demo models see them)
``no_rescale``         ``INPUT.RESCALE_RANGE [1.0, 1.0]`` (nuclei only at their drawn sizes)
``v1_data``            trained on the v1 synthetic set (``nuclei_synth_train``) instead
=====================  =========================================================================

Every variant is trained by ``tools/train_net.py`` in its own process (one thread each,
``jobs`` at a time, each resumable with ``--resume``) into ``<out>/<variant>``, then all are
scored side by side by :func:`sharp_fpn.perf.zoo.evaluate` (DSB score and COCO mask AP per
style, the classical pipeline beside them) into ``<out>/ablation.json`` and ``.md``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .tables import PROJECT_ROOT

__all__ = ["CONFIG", "VARIANTS", "run_ablation", "train_variant", "variant_options"]

CONFIG = PROJECT_ROOT / "configs" / "zoo" / "mask_rcnn_fpn_R18h.yaml"
TRAIN_SET = "nuclei_synth2_nobf_train"

#: variant -> config overrides (on top of the short budget and TRAIN_SET).
VARIANTS: Dict[str, List[str]] = {
    "recipe": [],
    "no_photometric": ["INPUT.PHOTOMETRIC", "False"],
    "no_normalisation": ["INPUT.NORMALIZE", ""],
    "no_rescale": ["INPUT.RESCALE_RANGE", "[1.0, 1.0]"],
    "v1_data": ["DATASETS.TRAIN", '("nuclei_synth_train",)'],
}


def variant_options(name: str, iters: int, out: Path) -> List[str]:
    """The ``tools/train_net.py`` overrides of variant ``name`` trained for ``iters``."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    drops = sorted({s for s in (int(iters * 0.75), int(iters * 0.9)) if 0 < s < iters})
    steps = "(" + "".join(f"{s}," for s in drops) + ")"
    return ["DATASETS.TRAIN", f'("{TRAIN_SET}",)', "DATASETS.TEST", "()",
            "SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", steps,
            "SOLVER.WARMUP_ITERS", str(min(200, iters // 4)),
            "SOLVER.CHECKPOINT_PERIOD", str(max(50, iters // 4)),
            "OUTPUT_DIR", str(out / name), *VARIANTS[name]]


def train_variant(name: str, iters: int, out: Path, threads: int = 1) -> Path:
    """Train variant ``name`` (resuming a run cut short); returns its final weights."""
    weights = out / name / "model_final.pth"
    if weights.is_file():
        return weights
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    (out / name).mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(PROJECT_ROOT / "tools" / "train_net.py"), "--config-file",
               str(CONFIG), "--resume", *variant_options(name, iters, out)]
    with open(out / f"{name}.log", "a") as log:
        subprocess.run(command, check=True, env=env, stdout=log, stderr=subprocess.STDOUT,
                       cwd=PROJECT_ROOT)
    return weights


def run_ablation(out: Path, iters: int = 500, variants: Optional[Sequence[str]] = None,
                 jobs: int = 2, images_per_style: Optional[int] = None,
                 echo=print) -> Dict:
    """Train every variant (``jobs`` at a time) and score them side by side."""
    from ..perf.zoo import Candidate, evaluate, registered_images, write_report

    names = list(variants or VARIANTS)
    for name in names:
        variant_options(name, iters, out)  # unknown names refused before any training
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        weights = dict(zip(names, pool.map(lambda n: train_variant(n, iters, out), names)))
    echo(f"trained {', '.join(names)} ({iters} iterations each) into {out}")
    candidates = [Candidate(n, str(out / n / "config.yaml"), str(weights[n])) for n in names]
    results = evaluate(candidates, images=registered_images(limit=images_per_style),
                       throughput=False, echo=echo,
                       heldout_source="the registered nuclei_synth2_test_<style> sets",
                       notes=[f"each variant trained {iters} iterations on {TRAIN_SET} (no "
                              f"brightfield: the brightfield rows are a style it never saw)"])
    write_report(results, out / "ablation.json")
    return results
